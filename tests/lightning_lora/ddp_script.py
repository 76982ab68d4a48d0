"""Two-process CPU (gloo) DDP run of AdapterCallback, driven by test_ddp.py as a subprocess.

    python tests/lightning_lora/ddp_script.py OUT_DIR [ddp|ddp_spawn] [--pre-inject] [--old-torch-buffers]

Each rank writes ``OUT_DIR/rank{r}.pt``: world size, adapter tensors at fit start and at the end,
whether the frozen base moved, and the optimizer's parameter count. The launching process (which
for ``ddp`` is rank 0 itself) writes ``OUT_DIR/main.pt`` with the adapter its module holds after
``fit`` returned, and rank 0 saves ``OUT_DIR/last.ckpt``.

The ranks see different data (Lightning's DistributedSampler), so identical adapters at the end
show that gradients were synchronised.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the source tree, also in the processes Lightning starts

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_lora as ll  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        # a constant buffer that starts different on each rank: DDP (or the callback, on older torch)
        # must make it rank 0's before training, as with DDP's own defaults
        self.register_buffer("marker", torch.full((3,), float(os.environ.get("LOCAL_RANK", "0"))))
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        # torch's attention (adapted with --attention): reads its out_proj's weight, never calls it
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        tokens = torch.stack([h, h.flip(-1)], 1)  # (N, 2, 16)
        h = h + self.attn(tokens, tokens, tokens, need_weights=False)[0].mean(1)
        return self.head(torch.tanh(self.fc2(h)))


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=5e-2)


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.init: dict[str, torch.Tensor] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.ddp_flags: dict[str, bool] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper AdapterCallback's defaults reached
        # the per-forward buffer sync: forward_sync_buffers in torch >= 2.13, broadcast_buffers before
        sync = getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True))
        self.ddp_flags = {"forward_buffer_sync": bool(sync),
                          "gradient_as_bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False))}
        self.buffer = pl_module.net.marker.detach().clone()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.init = {k: v.detach().clone() for k, v in ll.adapter_state_dict(pl_module.net).items()}
        self.base = {n: p.detach().clone() for n, p in pl_module.named_parameters() if not p.requires_grad}

    def on_train_end(self, trainer, pl_module) -> None:
        final = {k: v.detach().clone() for k, v in ll.adapter_state_dict(pl_module.net).items()}
        params = dict(pl_module.named_parameters())
        torch.save(
            {
                "world_size": trainer.world_size,
                "init": self.init,
                "final": final,
                "base_moved": any(not torch.equal(params[n], v) for n, v in self.base.items()),
                "optimizer_params": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups),
                "steps": trainer.global_step,
                "ddp_flags": self.ddp_flags,
                "buffer_at_start": self.buffer,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    out = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    pre_inject = "--pre-inject" in sys.argv
    if "--old-torch-buffers" in sys.argv:  # the path for a torch without forward_sync_buffers
        import lightning_lora.core.ddp_defaults as ddp_defaults

        ddp_defaults.buffer_sync_argument = lambda: "broadcast_buffers"
        warnings.filterwarnings("ignore", ".*broadcast_buffers.*is deprecated.*")
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    module = TinyModule()
    targets = ["fc1", "fc2", "attn"] if "--attention" in sys.argv else ["fc1", "fc2"]
    cb = ll.AdapterCallback("lora", r=4, alpha=8, target_modules=targets, target="net")
    if pre_inject:  # with spawn strategies the launching process's module must carry the layers
        ll.inject_adapter(module.net, "lora", cb.config)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(out),
        callbacks=[cb, Record(out)],
    )
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=False))
    if strategy == "ddp":
        trainer.save_checkpoint(out / "last.ckpt")  # collective; rank 0 writes
    if strategy != "ddp" or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        main_state = {k: v.detach().clone() for k, v in ll.adapter_state_dict(module.net).items()} if (
            ll.get_adapter_method(module.net) is not None) else {}
        torch.save(main_state, out / "main.pt")


if __name__ == "__main__":
    main()
