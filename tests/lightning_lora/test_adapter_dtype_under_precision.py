"""Adapter dtype under Lightning precision settings, and NLoRA's residual delta in fp64.

- ``Trainer(precision="bf16-true")`` / ``"16-true"`` converts the whole module in ``strategy.setup``,
  after ``AdapterCallback.setup`` injected the adapter: its parameters, fp32 by the config's
  ``adapter_dtype``, trained in bf16 without a word. ``on_fit_start`` (after that conversion) now
  warns once, naming the method, the count, the dtype found and the one configured; mixed precision
  and an ``adapter_dtype`` that matches stay silent.
- NLoRA's full residual (``s·(BNA − B0N0A0)``) computed its delta with ``.float()``: an fp64 adapter
  merged with fp32 rounding (merged outputs off by ~1e-6). It now accumulates in
  :func:`~lightning_lora.core.layer.accumulate_dtype`; fp32 / bf16 stay the fp32 formula bit for bit.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

DTYPE_WARNING = "adapter_dtype"


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=1e-2)


def _fit(tmp_path, precision: str, module: pl.LightningModule | None = None, **cfg: object
         ) -> tuple[ll.AdapterCallback, list[warnings.WarningMessage]]:
    cb = ll.AdapterCallback("lora", r=2, target_modules=["0", "2"], **cfg)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=4)
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   callbacks=[cb], precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every emission counts, not only the first per location
        t.fit(module if module is not None else Tiny(), data)
    return cb, [w for w in caught if DTYPE_WARNING in str(w.message)]


@pytest.mark.parametrize(("precision", "found"), [("bf16-true", "bfloat16"), ("16-true", "float16")])
def test_true_half_precision_warns_once_about_cast_adapter_parameters(tmp_path, precision, found):
    cb, caught = _fit(tmp_path, precision)
    assert all(p.dtype == getattr(torch, found) for layer in cb.layers.values() for p in
               (layer.lora_A, layer.lora_B))  # the precision plugin did cast them: the warning is true
    assert len(caught) == 1
    msg = str(caught[0].message)
    # method, count (A and B of two layers), found and configured dtypes, and the way out
    assert "'lora'" in msg and " 4 " in msg
    assert f"are {found}," in msg and "configured adapter_dtype float32" in msg
    assert "bf16-mixed" in msg and f"precision={precision!r}" in msg


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precisions_that_keep_the_adapter_dtype_do_not_warn(tmp_path, precision):
    cb, caught = _fit(tmp_path, precision)
    assert all(layer.lora_A.dtype == torch.float32 for layer in cb.layers.values())
    assert caught == []


def test_adapter_dtype_matching_the_true_precision_does_not_warn(tmp_path):
    cb, caught = _fit(tmp_path, "bf16-true", adapter_dtype="bfloat16")
    assert all(layer.lora_B.dtype == torch.bfloat16 for layer in cb.layers.values())
    assert caught == []


def test_model_cast_after_injection_warns_under_full_precision(tmp_path):
    """Injected by hand, then ``module.to(torch.bfloat16)``: the callback adopts the adapter, and the
    parameters it finds at fit start are not the config's fp32."""
    module = Tiny()
    ll.inject_adapter(module.net, "lora", r=2, target_modules=["0", "2"])
    module.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 8, generator=g).bfloat16(), torch.randint(0, 3, (8,), generator=g)),
                      batch_size=4)
    cb = ll.AdapterCallback("lora", r=2, target_modules=["0", "2"], target="net")
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   callbacks=[cb], precision="32-true")
    with pytest.warns(UserWarning, match=r"4 'lora' adapter parameter tensors are bfloat16, not the configured "
                                         r"adapter_dtype float32"):
        t.fit(module, data)


# ---- NLoRA's full-residual delta in fp64 -------------------------------------------------------------
def _trained_nlora(method: str, dtype: torch.dtype, **kw: object) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 12)).to(dtype)
    layers = ll.inject_adapter(model, method, target_modules=["0", "2"], r=4, adapter_dtype=dtype, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # moved away from the init: the residual's delta is non-zero
        for p in ll.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)
    return model, layers


# nlora's default (nystrom) is the full residual A, N, B minus A0, N0, B0; reference without a residual
# and IntTune's N − N0 go through the core layer's delta
@pytest.mark.parametrize(("method", "kw"), [("nlora", {}), ("nlora", {"init": "reference"}), ("inttune", {})])
def test_fp64_nlora_merged_output_equals_the_unmerged_forward(method, kw):
    model, layers = _trained_nlora(method, torch.float64, **kw)
    assert all(layer.delta_weight().dtype == torch.float64 for layer in layers.values())
    x = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
        ll.merge_adapter(model)
        merged = model(x)
    torch.testing.assert_close(merged, y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nlora_residual_delta_below_fp64_is_the_fp32_formula(dtype):
    """fp32 / bf16 adapters: the delta is still computed in fp32, bit for bit as before."""
    model, layers = _trained_nlora("nlora", dtype)
    for layer in layers.values():
        assert len(layer.offset_names) == 3
        A, N, B, A0, N0, B0 = (t.float() for t in layer._factors_and_offsets())
        with torch.no_grad():
            expected = layer.scaling * ((B - B0) @ (N @ A) + B0 @ ((N - N0) @ A + N0 @ (A - A0)))
            dw = layer.delta_weight()
        assert dw.dtype == torch.float32 and torch.equal(dw, expected)
