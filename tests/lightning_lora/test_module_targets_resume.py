"""The non-linear targets through the Lightning callback: a net with an ``nn.MultiheadAttention``, a
grouped ``nn.ConvTranspose1d`` and a bare 3-D expert parameter, adapted by one ``AdapterCallback``;
training interrupted at a checkpoint and resumed ends where an uninterrupted run does, the checkpoint
holds only the adapter, and merging at the end of fit keeps the outputs."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_lora as ll


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 8, 8) / 3)  # (E, out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, 8): even positions expert 0, odd 1
        return torch.stack([x[:, i] @ self.weight[i % 2].t() for i in range(x.shape[1])], 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.ConvTranspose1d(8, 8, 3, stride=2, padding=1, groups=2)
        self.experts = Experts()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, L, 8)
        h = x + self.attn(x, x, x, need_weights=False)[0]
        h = self.up(h.transpose(1, 2)).transpose(1, 2)  # (N, 2L - 1, 8)
        return self.head(torch.tanh(self.experts(h)).mean(1))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch, _):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4, 8, generator=g), torch.randint(0, 3, (12,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _callback(**kw) -> ll.AdapterCallback:
    return ll.AdapterCallback("lora", r=2, target="net", target_modules=["attn", "up"],
                              target_parameters=["experts.weight"], **kw)


def _trainer(root, max_steps, callbacks, checkpointing=False) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=checkpointing, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=str(root), callbacks=callbacks)


def _adapter(module: Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ll.adapter_state_dict(module.net).items()}


def test_resume_matches_uninterrupted_training(tmp_path):
    full = Module()
    _trainer(tmp_path / "a", 6, [_callback()]).fit(full, _loader())
    part = Module()
    mc = ModelCheckpoint(dirpath=tmp_path / "b", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path / "b", 3, [_callback(), mc], checkpointing=True).fit(part, _loader())
    after3 = _adapter(part)
    state = torch.load(tmp_path / "b" / "step=3.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == {f"net.{k}" for k in after3}  # the adapter only
    assert {"net.attn.lora_out_B", "net.up.lora_B", "net.experts.lora_B__weight"} <= set(state)
    resumed = Module()
    _trainer(tmp_path / "c", 6, [_callback()]).fit(resumed, _loader(), ckpt_path=str(tmp_path / "b" / "step=3.ckpt"))
    final_full, final_resumed = _adapter(full), _adapter(resumed)
    assert final_full.keys() == final_resumed.keys() == after3.keys()
    for k in final_full:
        assert not torch.equal(final_resumed[k], after3[k]), f"{k}: the resumed run did not train"
        torch.testing.assert_close(final_resumed[k], final_full[k], atol=0, rtol=0)


def test_merge_on_fit_end_keeps_the_outputs(tmp_path):
    module = Module()
    _trainer(tmp_path, 3, [_callback(merge_on_fit_end=True, export_dir=tmp_path / "adapter")]).fit(module, _loader())
    assert all(layer.merged for layer in ll.adapter_layers(module.net).values())
    x = next(iter(_loader()))[0]
    loaded = Net()
    ll.load_adapter(loaded, tmp_path / "adapter")
    module.net.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.net(x), loaded(x), atol=1e-5, rtol=0)
