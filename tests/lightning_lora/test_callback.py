"""AdapterCallback with a tiny LightningModule on CPU: injection, optimizer, checkpoints, resume, export."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import peft
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

TARGETS = ["fc1", "fc2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TinyModule(pl.LightningModule):
    def __init__(self, all_params: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the frozen base must be identical across instances
        self.net = Net()
        self.all_params = all_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        params = self.parameters() if self.all_params else ll.trainable_parameters(self)
        return torch.optim.AdamW(params, lr=2e-2)


def loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, max_steps: int = 3, callbacks=(), checkpointing: bool = False, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpointing, default_root_dir=str(tmp_path),
        callbacks=list(callbacks), num_sanity_val_steps=0, **kw,
    )


def callback(**kw) -> ll.AdapterCallback:
    return ll.AdapterCallback("lora", r=4, alpha=8, target_modules=TARGETS, target="net", **kw)


def adapter_tensors(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ll.adapter_state_dict(module.net).items()}


def _expected_ckpt_keys() -> set[str]:
    return {f"net.{m}.{p}" for m in TARGETS for p in ("lora_A", "lora_B")}


# ---- setup --------------------------------------------------------------------------------------
def test_setup_injects_once_across_stages(tmp_path):
    module, cb = TinyModule(), callback()
    t = trainer(tmp_path, callbacks=[cb])
    t.fit(module, loader(), loader())
    layers = ll.adapter_layers(module.net)
    assert set(layers) == set(TARGETS)
    after_fit = {n: id(m) for n, m in layers.items()}
    t.validate(module, loader(), verbose=False)
    t.test(module, loader(), verbose=False)
    preds = t.predict(module, loader())
    assert len(preds) == 3 and preds[0].shape == (4, 3)
    layers = ll.adapter_layers(module.net)
    assert {n: id(m) for n, m in layers.items()} == after_fit
    assert not any(isinstance(m.base_layer, ll.AdapterLayer) for m in layers.values())
    # a second trainer with the same callback and module does not re-inject either
    trainer(tmp_path, callbacks=[cb]).validate(module, loader(), verbose=False)
    assert {n: id(m) for n, m in ll.adapter_layers(module.net).items()} == after_fit


def test_validate_only_also_injects(tmp_path):
    module = TinyModule()
    trainer(tmp_path, callbacks=[callback()]).validate(module, loader(), verbose=False)
    assert set(ll.adapter_layers(module.net)) == set(TARGETS)


def test_callback_rejects_other_method_on_adapted_module(tmp_path):
    module = TinyModule()
    ll.inject_adapter(module.net, "lora", r=2, target_modules=["fc1"])
    cb = callback()
    cb.method_name = "other"  # what a callback of a different method would ask for
    with pytest.raises(RuntimeError, match="already carries"):
        trainer(tmp_path, callbacks=[cb]).validate(module, loader(), verbose=False)


def test_bad_target_attribute_is_named(tmp_path):
    cb = ll.AdapterCallback("lora", r=2, target_modules=TARGETS, target="backbone")
    with pytest.raises(AttributeError, match="backbone"):
        trainer(tmp_path, callbacks=[cb]).validate(TinyModule(), loader(), verbose=False)


# ---- optimizer ----------------------------------------------------------------------------------
def test_only_trainable_params_reach_optimizer(tmp_path):
    module = TinyModule()
    t = trainer(tmp_path, callbacks=[callback()])
    base_before = {id(p): p.detach().clone() for p in module.parameters()}  # same objects after wrapping
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(module, loader())
    assert not [w for w in record if "frozen" in str(w.message)]
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    expected = {id(p) for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    assert opt_params == expected and len(expected) == 4
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    assert len(frozen) == 6
    for n, p in frozen:
        assert torch.equal(p, base_before[id(p)]), f"frozen {n} changed"
    assert not torch.equal(module.net.fc1.lora_B, torch.zeros_like(module.net.fc1.lora_B)), "adapter did not train"


def test_warns_when_optimizer_holds_frozen_params(tmp_path):
    module = TinyModule(all_params=True)
    with pytest.warns(UserWarning, match="frozen parameter"):
        trainer(tmp_path, max_steps=1, callbacks=[callback()]).fit(module, loader())


# ---- checkpoints ---------------------------------------------------------------------------------
def _ckpt_keys(path) -> tuple[set[str], dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return set(ckpt["state_dict"]), ckpt


@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "save_weights_only"])
def test_checkpoints_hold_only_adapter(tmp_path, weights_only):
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=weights_only)
    module = TinyModule()
    t = trainer(tmp_path, callbacks=[callback(), mc], checkpointing=True)
    t.fit(module, loader())
    keys, ckpt = _ckpt_keys(tmp_path / "ckpt" / "last.ckpt")
    assert keys == _expected_ckpt_keys()
    assert ckpt["lightning_lora"]["method"] == "lora" and ckpt["lightning_lora"]["config"]["r"] == 4
    assert ("optimizer_states" in ckpt) != weights_only
    # and trainer.save_checkpoint too
    t.save_checkpoint(tmp_path / "manual.ckpt", weights_only=weights_only)
    assert _ckpt_keys(tmp_path / "manual.ckpt")[0] == _expected_ckpt_keys()


def test_checkpoint_keeps_modules_to_save(tmp_path):
    module = TinyModule()
    cb = ll.AdapterCallback("lora", r=4, target_modules=TARGETS, modules_to_save=["head"], target="net")
    t = trainer(tmp_path, max_steps=1, callbacks=[cb])
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "m.ckpt")
    assert _ckpt_keys(tmp_path / "m.ckpt")[0] == _expected_ckpt_keys() | {"net.head.weight", "net.head.bias"}


def test_resume_matches_uninterrupted_training(tmp_path):
    # uninterrupted: 6 steps (2 epochs of 3 batches)
    full = TinyModule()
    trainer(tmp_path / "a", max_steps=6, callbacks=[callback()]).fit(full, loader())
    # interrupted: 3 steps, checkpoint, then a NEW module, callback and trainer resume to 6
    # (a ModelCheckpoint inside the step, as a real interruption would leave; Lightning's own
    # epoch bookkeeping differs for a checkpoint written by save_checkpoint after fit returned)
    part = TinyModule()
    mc = ModelCheckpoint(dirpath=tmp_path / "b", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "b", max_steps=3, callbacks=[callback(), mc], checkpointing=True).fit(part, loader())
    after3 = adapter_tensors(part)
    assert _ckpt_keys(tmp_path / "b" / "step=3.ckpt")[0] == _expected_ckpt_keys()
    resumed = TinyModule()
    trainer(tmp_path / "c", max_steps=6, callbacks=[callback()]).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "b" / "step=3.ckpt")
    )
    final_full, final_resumed = adapter_tensors(full), adapter_tensors(resumed)
    assert final_full.keys() == final_resumed.keys() == after3.keys()
    for k in final_full:
        assert not torch.equal(final_resumed[k], after3[k]), f"{k}: resumed run did not train"
        torch.testing.assert_close(final_resumed[k], final_full[k], atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_checkpoint_missing_adapter_keys_fails_clearly(tmp_path):
    module = TinyModule()
    t = trainer(tmp_path, max_steps=1, callbacks=[callback()])
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "ok.ckpt")
    ckpt = torch.load(tmp_path / "ok.ckpt", map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["net.fc2.lora_B"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(RuntimeError, match=r"missing \['net\.fc2\.lora_B'\]"):
        trainer(tmp_path, max_steps=2, callbacks=[callback()]).fit(
            TinyModule(), loader(), ckpt_path=str(tmp_path / "broken.ckpt")
        )
    # the intact checkpoint restores the adapter for evaluation
    fresh = TinyModule()
    trainer(tmp_path, callbacks=[callback()]).validate(fresh, loader(), ckpt_path=str(tmp_path / "ok.ckpt"),
                                                       verbose=False)
    for k, v in adapter_tensors(module).items():
        assert torch.equal(adapter_tensors(fresh)[k], v)


def test_checkpoint_of_full_model_is_rejected(tmp_path):
    """A checkpoint written without the adapter (plain fine-tuning) does not silently load."""
    plain = TinyModule()
    t = trainer(tmp_path, max_steps=1)
    t.fit(plain, loader())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(RuntimeError, match="missing"):
        trainer(tmp_path, callbacks=[callback()]).validate(TinyModule(), loader(),
                                                           ckpt_path=str(tmp_path / "plain.ckpt"), verbose=False)


# ---- end of fit: merge and export ----------------------------------------------------------------
def test_merge_on_fit_end_and_export_dir(tmp_path):
    module = TinyModule()
    export = tmp_path / "export"
    t = trainer(tmp_path, max_steps=3, callbacks=[callback(merge_on_fit_end=True, export_dir=export)])
    t.fit(module, loader())
    layers = ll.adapter_layers(module.net)
    assert all(layer.merged for layer in layers.values())
    x = torch.randn(5, 8)
    with torch.no_grad():
        y_merged = module(x)
        ll.unmerge_adapter(module.net)
        y_adapter = module(x)
        with ll.disable_adapter(module.net):
            y_base = module(x)
    torch.testing.assert_close(y_merged, y_adapter, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y_adapter, y_base, atol=1e-4)
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    # the exported directory loads in PEFT and here, with the trained outputs
    theirs = peft.PeftModel.from_pretrained(TinyModule().net, str(export)).eval()
    ours = ll.load_adapter(TinyModule().net, export)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), y_adapter, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), y_adapter, atol=1e-6, rtol=0)  # y_adapter: after unmerge
    # the callback's own save_adapter writes the same tensors
    cb = callback()
    cb.save_adapter(module, tmp_path / "again")
    again = ll.load_adapter(TinyModule().net, tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_bf16_mixed_precision_training(tmp_path):
    module = TinyModule()
    t = trainer(tmp_path, max_steps=3, callbacks=[callback()], precision="bf16-mixed")
    t.fit(module, loader())
    for k, v in adapter_tensors(module).items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k  # fp32 master weights
    assert not torch.equal(module.net.fc1.lora_B, torch.zeros_like(module.net.fc1.lora_B))
