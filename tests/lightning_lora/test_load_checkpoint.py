"""load_adapter_checkpoint: a Lightning checkpoint written through AdapterCallback restored into a fresh
module outside the Trainer (LoRA and DyLoRA), read with weights_only=True, with clear errors."""

from __future__ import annotations

import pathlib

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.methods.dylora import get_rank, set_rank

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

TARGETS = ["fc1", "fc2"]
METHOD_KW = {"lora": {"r": 4, "alpha": 8}, "dylora": {"r": 4, "alpha": 8}}


class Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TinyModule(pl.LightningModule):
    def __init__(self, hidden: int = 16, data_dir: pathlib.Path | None = None, save_hparams: bool = False) -> None:
        super().__init__()
        if save_hparams:
            self.save_hyperparameters()
        torch.manual_seed(0)  # the frozen base is identical across instances
        self.net = Net(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=2e-2)


def loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=4)


def trainer(tmp_path, callbacks, max_steps: int = 4) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=str(tmp_path), callbacks=list(callbacks), num_sanity_val_steps=0,
    )


def callback(method: str = "lora", target: str | None = "net") -> ll.AdapterCallback:
    modules = TARGETS if target else [f"net.{t}" for t in TARGETS]
    return ll.AdapterCallback(method, target_modules=modules, target=target, **METHOD_KW[method])


def train(tmp_path, method: str = "lora", target: str | None = "net", weights_only: bool = False, module=None):
    """Train a few steps with AdapterCallback + ModelCheckpoint; returns (trained module, trainer, last.ckpt)."""
    module = module or TinyModule()
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=weights_only)
    t = trainer(tmp_path, [callback(method, target), mc])
    t.fit(module, loader())
    return module, t, tmp_path / "ckpt" / "last.ckpt"


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def outputs(module: nn.Module) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(X)


def base_outputs() -> torch.Tensor:
    return outputs(TinyModule())


# ---- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "save_weights_only"])
@pytest.mark.parametrize("method", ["lora", "dylora"])
def test_fresh_module_matches_trained_bit_exact(tmp_path, method, weights_only):
    trained, _, ckpt = train(tmp_path, method, weights_only=weights_only)
    fresh = TinyModule()
    assert ll.load_adapter_checkpoint(fresh, ckpt, target="net") is fresh
    assert set(ll.adapter_layers(fresh.net)) == set(TARGETS)
    assert ll.get_adapter_method(fresh.net).config.to_dict() == ll.get_adapter_method(trained.net).config.to_dict()
    expected = outputs(trained)
    assert not torch.equal(expected, base_outputs()), "adapter did not train"
    assert outputs(fresh).dtype == torch.float32
    assert torch.equal(outputs(fresh), expected)
    # adapter trainable, base frozen: ready to train further
    assert {n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_whole_module_target_none(tmp_path):
    trained, _, ckpt = train(tmp_path, "dylora", target=None)
    meta = torch.load(ckpt, weights_only=True)["lightning_lora"]["layer_metadata"]
    assert meta == {"r_max": 4, "ranks": {"net.fc1": 4, "net.fc2": 4}}
    fresh = ll.load_adapter_checkpoint(TinyModule(), ckpt)
    assert set(ll.adapter_layers(fresh)) == {"net.fc1", "net.fc2"}
    assert torch.equal(outputs(fresh), outputs(trained))


def test_dylora_deployment_rank_is_saved_and_restored(tmp_path):
    trained, t, _ = train(tmp_path, "dylora")
    set_rank(trained.net, 2)
    t.save_checkpoint(tmp_path / "rank2.ckpt")
    info = torch.load(tmp_path / "rank2.ckpt", weights_only=True)["lightning_lora"]
    assert info["method"] == "dylora"
    assert info["layer_metadata"] == {"r_max": 4, "ranks": {"fc1": 2, "fc2": 2}}
    fresh = ll.load_adapter_checkpoint(TinyModule(), tmp_path / "rank2.ckpt", target="net")
    assert get_rank(fresh.net) == 2
    expected = outputs(trained)
    assert torch.equal(outputs(fresh), expected)
    set_rank(trained.net, 4)
    assert not torch.equal(outputs(trained), expected)  # the rank matters: rank 2 is what was restored


def test_loads_into_already_injected_module(tmp_path):
    trained, _, ckpt = train(tmp_path)
    fresh = TinyModule()
    ll.inject_adapter(fresh.net, "lora", target_modules=TARGETS, **METHOD_KW["lora"])
    layers = {n: id(m) for n, m in ll.adapter_layers(fresh.net).items()}
    ll.load_adapter_checkpoint(fresh, ckpt, target="net")
    assert {n: id(m) for n, m in ll.adapter_layers(fresh.net).items()} == layers  # not injected twice
    assert torch.equal(outputs(fresh), outputs(trained))
    other = TinyModule()
    ll.inject_adapter(other.net, "dylora", target_modules=TARGETS, r=4)
    with pytest.raises(ll.AdapterFormatError, match=r"last\.ckpt.*'lora'.*'dylora'"):
        ll.load_adapter_checkpoint(other, ckpt, target="net")


def test_hparams_with_path_load(tmp_path):
    trained, _, ckpt = train(tmp_path, module=TinyModule(data_dir=tmp_path / "data", save_hparams=True))
    with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath]):
        hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert isinstance(hparams["data_dir"], pathlib.Path)
    fresh = ll.load_adapter_checkpoint(TinyModule(), ckpt, target="net")
    assert torch.equal(outputs(fresh), outputs(trained))


# ---- errors ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        ll.load_adapter_checkpoint(TinyModule(), tmp_path / "nope.ckpt", target="net")


def test_not_a_checkpoint_file(tmp_path):
    (tmp_path / "junk.ckpt").write_text("hello")
    with pytest.raises(ll.AdapterFormatError, match=r"junk\.ckpt"):
        ll.load_adapter_checkpoint(TinyModule(), tmp_path / "junk.ckpt", target="net")


def test_non_adapter_checkpoint(tmp_path):
    plain = TinyModule()
    t = trainer(tmp_path, [], max_steps=1)
    t.fit(plain, loader())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    fresh = TinyModule()
    with pytest.raises(ll.AdapterFormatError, match=r"plain\.ckpt: not an adapter checkpoint written by AdapterCallback"):
        ll.load_adapter_checkpoint(fresh, tmp_path / "plain.ckpt", target="net")
    assert not ll.adapter_layers(fresh)


def test_wrong_model_shape_mismatch(tmp_path):
    _, _, ckpt = train(tmp_path)
    wide = TinyModule(hidden=32)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    grads = {n: p.requires_grad for n, p in wide.named_parameters()}
    with pytest.raises(ll.AdapterFormatError, match=r"last\.ckpt: shape mismatch.*net\.fc1\.lora_B: file \(16, 4\), model \(32, 4\)"):
        ll.load_adapter_checkpoint(wide, ckpt, target="net")
    # left as it was: no adapter, same weights, same requires_grad
    assert not ll.adapter_layers(wide) and ll.get_adapter_method(wide.net) is None
    assert wide.state_dict().keys() == before.keys()
    assert all(torch.equal(wide.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in wide.named_parameters()} == grads


def test_wrong_target_names_fail_clearly(tmp_path):
    _, _, ckpt = train(tmp_path)
    with pytest.raises(ll.AdapterFormatError, match=r"last\.ckpt: adapter does not fit this model"):
        ll.load_adapter_checkpoint(TinyModule(), ckpt, target="net.head")  # no fc1/fc2 below it
    with pytest.raises(AttributeError, match="backbone"):
        ll.load_adapter_checkpoint(TinyModule(), ckpt, target="backbone")


def test_missing_adapter_key_strict_and_not(tmp_path):
    trained, _, ckpt = train(tmp_path)
    data = torch.load(ckpt, weights_only=True)
    del data["state_dict"]["net.fc2.lora_B"]
    torch.save(data, tmp_path / "broken.ckpt")
    fresh = TinyModule()
    with pytest.raises(ll.AdapterFormatError, match=r"broken\.ckpt: .*missing \['net\.fc2\.lora_B'\]"):
        ll.load_adapter_checkpoint(fresh, tmp_path / "broken.ckpt", target="net")
    assert not ll.adapter_layers(fresh)
    partial = ll.load_adapter_checkpoint(TinyModule(), tmp_path / "broken.ckpt", target="net", strict=False)
    assert torch.equal(partial.net.fc1.lora_B, trained.net.fc1.lora_B)
    assert torch.equal(partial.net.fc2.lora_B, torch.zeros_like(partial.net.fc2.lora_B))  # left at its init


class _Evil:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True
    return "pwned"


class Custom:
    def __init__(self, v: int = 1) -> None:
        self.v = v


def test_never_unpickles_arbitrary_objects(tmp_path):
    trained, _, ckpt = train(tmp_path)
    data = torch.load(ckpt, weights_only=True)
    data["hyper_parameters"] = {"evil": _Evil()}
    torch.save(data, tmp_path / "evil.ckpt")
    with pytest.raises(ll.AdapterFormatError, match=r"evil\.ckpt: cannot be read with torch\.load\(weights_only=True\)"):
        ll.load_adapter_checkpoint(TinyModule(), tmp_path / "evil.ckpt", target="net")
    assert not _Evil.ran
    # a class the user trusts can be allowlisted explicitly
    data["hyper_parameters"] = {"custom": Custom(3)}
    torch.save(data, tmp_path / "custom.ckpt")
    with pytest.raises(ll.AdapterFormatError, match="Custom"):
        ll.load_adapter_checkpoint(TinyModule(), tmp_path / "custom.ckpt", target="net")
    with torch.serialization.safe_globals([Custom]):
        fresh = ll.load_adapter_checkpoint(TinyModule(), tmp_path / "custom.ckpt", target="net")
    assert torch.equal(outputs(fresh), outputs(trained))
    assert pathlib.PosixPath not in torch.serialization.get_safe_globals()  # ours were scoped to the call
