"""Merged state against disabling, loading and training: no path may leave an update in the base
weights that the adapter's state does not account for."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_lora as ll
from lightning_lora.core import multi

from test_callback import TinyModule, adapter_tensors, callback, loader, trainer  # the test directory is on sys.path
from test_invariants import SPECS, adapt, default_perturb, make_inputs, out_of, perturb

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

MERGEABLE = [m for m in ll.available_methods() if ll.get_method(m).mergeable]


def _adapted(model_builders, method: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    kw = next(iter(SPECS[method].variants.values()))
    m, _ = adapt(model_builders, method, dict(kw), "linear")
    perturb(SPECS[method], m)
    return m, make_inputs("linear")


def test_mergeable_flag_matches_the_invariant_suite():
    """``Method.mergeable`` says what the invariant suite found: ``merge()`` works or raises."""
    assert {m for m in ll.available_methods() if not ll.get_method(m).mergeable} == {
        m for m, spec in SPECS.items() if not spec.can_merge}


@pytest.mark.parametrize("method", MERGEABLE)
def test_disabling_a_merged_adapter_is_refused(model_builders, method):
    m, x = _adapted(model_builders, method)
    with torch.no_grad():
        y = out_of(m, x)
        ll.merge_adapter(m)
        with pytest.raises(RuntimeError, match="unmerge"):
            ll.set_adapter_enabled(m, False)
        with pytest.raises(RuntimeError, match="unmerge"):
            with ll.disable_adapter(m):
                pass
        assert not any(layer.disabled for layer in ll.adapter_layers(m).values()), "a refused disable changed a layer"
        torch.testing.assert_close(out_of(m, x), y, rtol=1e-5, atol=1e-5)  # still the merged adapter
        layer = next(iter(ll.adapter_layers(m).values()))
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.disable_adapter()


@pytest.mark.parametrize("method", MERGEABLE)
def test_merging_a_disabled_adapter_is_refused(model_builders, method):
    m, x = _adapted(model_builders, method)
    with torch.no_grad(), ll.disable_adapter(m):
        y0 = out_of(m, x)
        with pytest.raises(RuntimeError, match="enable it first"):
            ll.merge_adapter(m)
        assert torch.equal(out_of(m, x), y0), "a refused merge changed the disabled model"


def test_named_adapters_refuse_disable_while_merged(model_builders):
    m = model_builders["linear"](0)
    multi.add_adapter(m, "a", "lora", dict(r=2, target_modules=["fc1", "fc2"]))
    multi.add_adapter(m, "b", "lora", dict(r=2, target_modules=["fc1", "fc2"]))
    default_perturb(m)
    ll.merge_adapter(m)
    with pytest.raises(RuntimeError, match="unmerge"):
        ll.set_adapter_enabled(m, False)


@pytest.mark.parametrize("method", ["lora", "dylora", "bone", "lora_sb"])
def test_load_adapter_into_a_merged_model(model_builders, method, tmp_path):
    """Loading into merged layers gives the loaded adapter's output, still merged; unmerging then
    gives back the base weights (the old update does not stay behind in them)."""
    src, x = _adapted(model_builders, method)
    ll.save_adapter(src, tmp_path / "a")
    with torch.no_grad():
        want = out_of(src, x)
    dst, _ = _adapted(model_builders, method)
    with torch.no_grad():
        default_perturb(dst, seed=7)  # another adapter than the file's
    base = {n: p.detach().clone() for n, p in dst.named_parameters() if not p.requires_grad}
    ll.merge_adapter(dst)
    ll.load_adapter(dst, tmp_path / "a")
    assert all(layer.merged for layer in ll.adapter_layers(dst).values())
    with torch.no_grad():
        torch.testing.assert_close(out_of(dst, x), want, rtol=1e-5, atol=1e-5)
    ll.unmerge_adapter(dst)
    for n, p in dst.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-5, msg=n)


def test_merge_on_fit_end_then_test_from_an_earlier_checkpoint(tmp_path):
    """``trainer.test(ckpt_path=...)`` after ``merge_on_fit_end``: the checkpoint's adapter runs (not the
    final merged one), and the base weights are intact."""
    ckpts = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    module = TinyModule()
    base = {k: v.clone() for k, v in TinyModule().net.state_dict().items()}
    trainer(tmp_path, max_steps=3, callbacks=[callback(merge_on_fit_end=True), ckpts], checkpointing=True).fit(
        module, loader())
    assert all(layer.merged for layer in ll.adapter_layers(module.net).values())
    ref = TinyModule()
    ll.load_adapter_checkpoint(ref, tmp_path / "step=1.ckpt", target="net")
    with pytest.warns(UserWarning, match="unmerged before loading"):
        trainer(tmp_path, callbacks=[callback()]).test(module, loader(), ckpt_path=str(tmp_path / "step=1.ckpt"),
                                                      verbose=False)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref(x))
    for k, v in module.net.state_dict().items():
        if ".base_layer." in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=1e-6, msg=k)


def test_second_fit_after_merge_on_fit_end_trains(tmp_path):
    module = TinyModule()
    trainer(tmp_path, callbacks=[callback(merge_on_fit_end=True)]).fit(module, loader())
    before = adapter_tensors(module)
    with pytest.warns(UserWarning, match="unmerged to train"):
        trainer(tmp_path, callbacks=[callback()]).fit(module, loader())
    after = adapter_tensors(module)
    assert not any(layer.merged for layer in ll.adapter_layers(module.net).values())
    assert any(not torch.equal(before[k], after[k]) for k in before), "the second fit did not train the adapter"


@pytest.mark.parametrize("method", [m for m in ll.available_methods() if not ll.get_method(m).mergeable])
def test_merge_on_fit_end_refuses_unmergeable_methods_up_front(method):
    with pytest.raises(ValueError, match="cannot merge"):
        ll.AdapterCallback(method, target_modules=["fc1"], merge_on_fit_end=True)


def test_load_adapter_checkpoint_into_a_merged_module(tmp_path):
    ckpts = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    module = TinyModule()
    trainer(tmp_path, max_steps=2, callbacks=[callback(merge_on_fit_end=True), ckpts], checkpointing=True).fit(
        module, loader())
    ref = TinyModule()
    ll.load_adapter_checkpoint(ref, tmp_path / "step=1.ckpt", target="net")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain load into merged layers needs no warning: it re-merges
        ll.load_adapter_checkpoint(module, tmp_path / "step=1.ckpt", target="net")
    assert all(layer.merged for layer in ll.adapter_layers(module.net).values())
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-6)


def test_disable_adapter_acts_when_called_and_a_with_block_restores(model_builders):
    m, x = _adapted(model_builders, "lora")
    base = model_builders["linear"](0)
    with torch.no_grad():
        y0, y = out_of(base, x), out_of(m, x)
        ll.disable_adapter(m)  # a bare call: disabled from here on (it used to do nothing)
        assert torch.equal(out_of(m, x), y0)
        ll.set_adapter_enabled(m, True)
        with ll.disable_adapter(m):
            assert torch.equal(out_of(m, x), y0)
        assert torch.equal(out_of(m, x), y)
