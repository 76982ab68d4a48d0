"""Several named adapters on one model (lightning_lora.core.multi) and the baseline merges
(lightning_lora.merge.baselines): switching and routing equal running each adapter alone, save/load
by name is exact (also for merged adapters), PEFT reads the saved layout, the merges match their
formulas on small tensors."""

from __future__ import annotations

import json

import pytest
import torch

import lightning_lora as ll
from lightning_lora.core import multi
from lightning_lora.core.state import CONFIG_NAME, WEIGHTS_NAME
from lightning_lora.merge import baselines as mb

TARGETS = ["query", "value", "dense"]
HEAD = ["classifier", "pooler"]


def _inputs(batch: int = 4, seed: int = 3) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 96, (batch, 7), generator=torch.Generator().manual_seed(seed))}


@torch.no_grad()
def _randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _single(model_builders, kw: dict, seed: int, method: str = "lora"):
    """A model carrying one adapter (the reference), perturbed with ``seed``."""
    m = model_builders["bert_cls"](0)
    ll.inject_adapter(m, method, dict(kw))
    _randomize(ll.trainable_parameters(m), seed)
    return m


ADAPTERS = {  # name -> (method, config, perturbation seed)
    "a": ("lora", dict(r=4, alpha=8, target_modules=TARGETS, modules_to_save=HEAD), 1),
    "b": ("lora", dict(r=2, alpha=2, target_modules=["query", "key"], modules_to_save=HEAD), 2),
    "c": ("dylora", dict(r=4, alpha=4, target_modules=["value"]), 3),  # another method, no head
}


@pytest.fixture
def three(model_builders):
    """(multi-adapter model, {name: the same adapter alone on a fresh model})."""
    m = model_builders["bert_cls"](0)
    alone = {}
    for name, (method, kw, seed) in ADAPTERS.items():
        multi.add_adapter(m, name, method, dict(kw))
        ref = _single(model_builders, kw, seed, method)
        alone[name] = ref
        # give the named adapter exactly the reference's tensors (same perturbation)
        ref_state = ll.adapter_state_dict(ref)
        with multi.use_adapter(m, name):
            for t, layer in multi.named_adapter_layers(m, name).items():
                layer.load_state_dict({k[len(t) + 1:]: v for k, v in ref_state.items() if k.startswith(t + ".")},
                                      strict=False)
            for h in ("classifier", "bert.pooler"):
                if name != "c":
                    w = m.get_submodule(h)
                    w.copies[name].load_state_dict({k[len(h) + 1:]: v for k, v in ref_state.items()
                                                   if k.startswith(h + ".")})
    return m, alone


def test_first_adapter_active_then_set_adapter(three):
    m, _ = three
    assert multi.adapter_names(m) == ["a", "b", "c"]
    assert multi.active_adapters(m) == ["a"]
    multi.set_adapter(m, ["b", "c"])
    assert multi.active_adapters(m) == ["b", "c"]
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        multi.set_adapter(m, "zz")
    with pytest.raises(ValueError, match="already exists"):
        multi.add_adapter(m, "a", "lora", r=2, target_modules=["query"])
    with pytest.raises(ValueError, match="identifier"):
        multi.add_adapter(m, "x.y", "lora", r=2, target_modules=["query"])
    with pytest.raises(RuntimeError, match="named adapters"):
        ll.inject_adapter(m, "lora", target_modules=["query"])


def test_switching_equals_each_adapter_alone(three):
    m, alone = three
    x = _inputs()
    outs = {}
    for name in ("b", "a", "c", "a"):  # switch per batch, back and forth
        multi.set_adapter(m, name)
        outs[name] = _logits(m, x)
        torch.testing.assert_close(outs[name], _logits(alone[name], x), atol=0, rtol=0)
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3  # the adapters differ: the test is not vacuous
    with multi.use_adapter(m, "b"):
        torch.testing.assert_close(_logits(m, x), outs["b"], atol=0, rtol=0)
    assert multi.active_adapters(m) == ["a"]


def test_no_active_adapter_is_the_base_model(three, model_builders):
    m, _ = three
    x = _inputs()
    multi.set_adapter(m, [])
    torch.testing.assert_close(_logits(m, x), _logits(model_builders["bert_cls"](0), x), atol=0, rtol=0)


def test_per_example_routing_equals_each_adapter_alone(three, model_builders):
    m, alone = three
    x = _inputs(batch=6)
    index = torch.tensor([1, 0, -1, 2, 1, 0])  # names[i]; -1: base model
    names = ["a", "b", "c"]
    with multi.route_adapters(m, names, index):
        routed = _logits(m, x)
    base = model_builders["bert_cls"](0)
    for row, i in enumerate(index.tolist()):
        ref = base if i < 0 else alone[names[i]]
        one = {k: v[row : row + 1] for k, v in x.items()}
        torch.testing.assert_close(routed[row : row + 1], _logits(ref, one), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="first dim"):
        with multi.route_adapters(m, names, torch.tensor([0, 1])):
            m(**x)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        with multi.route_adapters(m, names, torch.tensor([3, 0, 0, 0, 0, 0])):
            pass


def test_several_active_adapters_add_their_updates(model_builders):
    """Without heads: a + b active == base + ΔW_a + ΔW_b, checked on the merged dense weights."""
    m = model_builders["bert"](0)
    multi.add_adapter(m, "a", "lora", r=3, alpha=6, target_modules=["query", "value"])
    multi.add_adapter(m, "b", "lora", r=2, alpha=2, target_modules=["query", "key"])
    for n, seed in (("a", 1), ("b", 2)):
        for layer in multi.named_adapter_layers(m, n).values():
            _randomize([layer.lora_A, layer.lora_B], seed)
    ref = model_builders["bert"](0)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear):
                for n in ("a", "b"):
                    layer = multi.named_adapter_layers(m, n).get(name)
                    if layer is not None:
                        module.weight += layer.delta_weight()
    x = _inputs()
    multi.set_adapter(m, ["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(m(**x).last_hidden_state, ref(**x).last_hidden_state, atol=1e-5, rtol=0)
        ll.merge_adapter(m)  # merges the active set, exactly
        torch.testing.assert_close(m(**x).last_hidden_state, ref(**x).last_hidden_state, atol=1e-5, rtol=0)
        with pytest.raises(RuntimeError, match="merged"):
            multi.set_adapter(m, "a")
        ll.unmerge_adapter(m)
    base = model_builders["bert"](0)
    for t, layer in multi.multi_layers(m).items():
        torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(t).weight, atol=1e-6, rtol=0)


def test_only_active_adapters_train(three):
    m, _ = three
    multi.set_adapter(m, "b")
    x = _inputs()
    m(**x).logits.sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n or ".copies.b." in n for n in trainable)
    for n, p in m.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
    assert any(".copies.b." in n for n in trainable) and any("lora_A" in n for n in trainable)


def test_save_load_by_name_round_trip(three, model_builders, tmp_path):
    m, _ = three
    x = _inputs()
    paths = multi.save_adapters(m, tmp_path)
    assert paths["a"] == tmp_path / "a" and (tmp_path / "c" / WEIGHTS_NAME).is_file()
    fresh = model_builders["bert_cls"](0)
    assert multi.load_adapters(fresh, tmp_path) == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        multi.set_adapter(m, name)
        multi.set_adapter(fresh, name)
        torch.testing.assert_close(_logits(fresh, x), _logits(m, x), atol=0, rtol=0)
    # each sub-directory is a plain single adapter too
    single = ll.load_adapter(model_builders["bert_cls"](0), tmp_path / "b")
    multi.set_adapter(m, "b")
    torch.testing.assert_close(_logits(single, x), _logits(m, x), atol=0, rtol=0)


def test_failed_load_leaves_model_as_it_was(three, model_builders, tmp_path):
    m, _ = three
    multi.save_adapters(m, tmp_path, names=["a"])
    other = model_builders["bert_cls"](0)
    multi.add_adapter(other, "keep", "lora", r=2, target_modules=["query"])
    before = set(other.state_dict())
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(3, 3)
    meta = __import__("safetensors").safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt").metadata()
    save_file(tensors, str(tmp_path / "a" / WEIGHTS_NAME), metadata=meta)
    with pytest.raises(ll.AdapterFormatError, match="shape"):
        multi.load_adapter_as(other, tmp_path / "a", "a")
    assert multi.adapter_names(other) == ["keep"] and set(other.state_dict()) == before


def test_peft_loads_our_named_layout(three, tmp_path):
    import peft
    from transformers import BertForSequenceClassification

    from tests.conftest import tiny_bert_config  # type: ignore[import-not-found]

    m = three[0]
    multi.delete_adapter(m, "c")  # PEFT reads LoRA; "c" is DyLoRA
    multi.save_adapters(m, tmp_path)
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    x = _inputs()
    for name in ("a", "b"):
        pm.set_adapter(name)
        multi.set_adapter(m, name)
        torch.testing.assert_close(_logits(pm, x), _logits(m, x), atol=1e-5, rtol=0)


def test_delete_adapter_and_back_to_base(three, model_builders):
    m, alone = three
    x = _inputs()
    multi.delete_adapter(m, "a")
    assert multi.adapter_names(m) == ["b", "c"] and multi.active_adapters(m) == []
    multi.set_adapter(m, "c")
    torch.testing.assert_close(_logits(m, x), _logits(alone["c"], x), atol=0, rtol=0)
    multi.delete_adapter(m, "b")
    multi.delete_adapter(m, "c")
    plain = model_builders["bert_cls"](0)
    assert set(m.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(_logits(m, x), _logits(plain, x), atol=0, rtol=0)
    ll.inject_adapter(m, "lora", target_modules=["query"])  # a plain model again


def test_injected_adapter_becomes_default(model_builders, tmp_path):
    kw = dict(r=4, alpha=8, target_modules=TARGETS, modules_to_save=HEAD)
    m = _single(model_builders, kw, seed=5)
    ref = _single(model_builders, kw, seed=5)
    multi.add_adapter(m, "other", "lora", r=2, target_modules=["key"])
    assert multi.adapter_names(m) == ["default", "other"] and multi.active_adapters(m) == ["default"]
    x = _inputs()
    torch.testing.assert_close(_logits(m, x), _logits(ref, x), atol=0, rtol=0)
    multi.save_adapters(m, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "other" / WEIGHTS_NAME).is_file()
    assert multi.load_adapters(model_builders["bert_cls"](0), tmp_path) == ["default", "other"]


# ---- baseline merges --------------------------------------------------------------------------
def test_ties_matches_formula_by_hand():
    d1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.1, 4.0]])
    d2 = torch.tensor([[-1.0, 2.0, -0.2], [-3.0, 0.3, -1.0]])
    # density 0.5: keep the 3 largest |.| of each; d1 -> [3,0,0],[-2,0,4]; d2 -> [0,2,0],[-3,0,-1]
    # elected sign of the sum: [+,+,0],[-,0,+]; disjoint mean of the agreeing, non-zero entries
    expected = torch.tensor([[3.0, 2.0, 0.0], [-2.5, 0.0, 4.0]])
    torch.testing.assert_close(mb.ties([d1, d2], density=0.5), expected)
    torch.testing.assert_close(mb.ties([d1, d2], density=0.5, lam=0.5), 0.5 * expected)
    # weights scale the trimmed updates before the election: d2 ×5 wins the sign at [1, 2] (4 - 5 < 0)
    weighted = mb.ties([d1, d2], density=0.5, weights=[1.0, 5.0])
    assert weighted[1, 2] == -5.0 and weighted[1, 0] == pytest.approx(-8.5)
    # density 1, one update: the update itself
    torch.testing.assert_close(mb.ties([d1], density=1.0), d1)
    with pytest.raises(ValueError, match="density"):
        mb.ties([d1], density=0.0)


def test_task_arithmetic_concat_and_low_rank_on_small_tensors():
    g = torch.Generator().manual_seed(0)
    f = [(torch.randn(5, r, generator=g), torch.randn(r, 7, generator=g), s) for r, s in ((2, 0.5), (3, 2.0))]
    deltas = [s * b @ a for b, a, s in f]
    torch.testing.assert_close(mb.task_arithmetic(deltas, [0.3, -1.0]), 0.3 * deltas[0] - deltas[1])
    b, a = mb.concat_factors(f, [0.3, -1.0])
    assert b.shape == (5, 5) and a.shape == (5, 7)
    torch.testing.assert_close(b @ a, 0.3 * deltas[0] - deltas[1], atol=1e-5, rtol=0)
    full = deltas[0] + deltas[1]  # rank 5 at most
    b5, a5 = mb.low_rank_factors(full, 5)
    torch.testing.assert_close(b5 @ a5, full, atol=1e-5, rtol=0)
    b2, a2 = mb.low_rank_factors(full, 2)
    s = torch.linalg.svdvals(full)
    assert float((full - b2 @ a2).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-4)  # Eckart–Young
    bq, aq = mb.low_rank_factors_of_product(*mb.concat_factors(f), 2)  # through the factors, same result
    torch.testing.assert_close(bq @ aq, b2 @ a2, atol=1e-5, rtol=0)
    b9, a9 = mb.low_rank_factors(full, 9)  # padded with zero units
    assert b9.shape == (5, 9) and a9[5:].abs().max() == 0


def _two_loras(model_builders):
    m = model_builders["bert_cls"](0)
    multi.add_adapter(m, "a", "lora", r=3, alpha=6, target_modules=["query", "value"], modules_to_save=HEAD)
    multi.add_adapter(m, "b", "lora", r=2, alpha=2, target_modules=["query", "key"], modules_to_save=HEAD)
    for n, seed in (("a", 1), ("b", 2)):
        _randomize([p for layer in multi.named_adapter_layers(m, n).values() for p in (layer.lora_A, layer.lora_B)], seed)
    return m


def test_model_merges_match_formulas(model_builders):
    m = _two_loras(model_builders)
    da, db = multi.adapter_delta_weights(m, "a"), multi.adapter_delta_weights(m, "b")
    mb.merge_concat(m, ["a", "b"], "cat", weights=[0.5, 2.0])
    mb.merge_task_arithmetic(m, ["a", "b"], "ta2", rank=2)
    mb.merge_ties(m, ["a", "b"], "ties", density=0.3)
    zero = torch.zeros(32, 32)
    cat, ta2, tie = (multi.adapter_delta_weights(m, n) for n in ("cat", "ta2", "ties"))
    assert set(cat) == set(da) | set(db)
    assert multi.adapter_method(m, "cat").config.r == 5 and multi.adapter_method(m, "ta2").config.r == 2
    for t in cat:
        a, b = da.get(t, zero), db.get(t, zero)
        torch.testing.assert_close(cat[t], 0.5 * a + 2.0 * b, atol=1e-5, rtol=0)
        ref_b, ref_a = mb.low_rank_factors(a + b, 2)
        torch.testing.assert_close(ta2[t], ref_b @ ref_a, atol=1e-5, rtol=0)
        ref_b, ref_a = mb.low_rank_factors(mb.ties([a, b], 0.3), 3)
        torch.testing.assert_close(tie[t], ref_b @ ref_a, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="plain LoRA"):
        multi.add_adapter(m, "d", "dylora", r=2, target_modules=["query"])
        mb.merge_concat(m, ["a", "d"], "bad")
    assert "bad" not in multi.adapter_names(m)


def test_merged_adapter_save_load_same_outputs(model_builders, tmp_path):
    """A merged adapter (with a source's head) gives the same outputs after save/load, alone and by name."""
    m = _two_loras(model_builders)
    mb.merge_ties(m, ["a", "b"], "ties", density=0.5, rank=3, modules_to_save_from="b")
    mb.merge_concat(m, ["a", "b"], "cat")
    x = _inputs()
    multi.set_adapter(m, "ties")
    y = _logits(m, x)
    multi.set_adapter(m, "a")
    assert (y - _logits(m, x)).abs().max() > 1e-4
    multi.save_adapters(m, tmp_path, names=["ties", "cat"])
    fresh = model_builders["bert_cls"](0)
    multi.load_adapters(fresh, tmp_path)
    multi.set_adapter(fresh, "ties")
    torch.testing.assert_close(_logits(fresh, x), y, atol=0, rtol=0)
    single = ll.load_adapter(model_builders["bert_cls"](0), tmp_path / "cat")
    multi.set_adapter(m, "cat")
    torch.testing.assert_close(_logits(single, x), _logits(m, x), atol=0, rtol=0)
    # the merged adapter carries b's head, merged or not
    multi.set_adapter(m, "ties")
    ll.merge_adapter(m)
    torch.testing.assert_close(_logits(m, x), y, atol=1e-5, rtol=0)
    ll.unmerge_adapter(m)


@pytest.mark.parametrize("merge", [False, True])
def test_unload_removes_every_named_adapter_and_keeps_the_active_head(three, model_builders, merge):
    m, alone = three
    x = _inputs()
    multi.set_adapter(m, "b")
    with_b = _logits(m, x)
    ll.unload(m, merge=merge)
    assert multi.adapter_names(m) == [] and multi.active_adapters(m) == []
    assert not multi.multi_layers(m) and not ll.adapter_layers(m)
    plain = model_builders["bert_cls"](0)
    assert set(m.state_dict()) == set(plain.state_dict())  # no adapter or copy tensors left
    # the heads are b's trained copies (as PEFT's unload); merged: b's update is in the weights too
    for h in ("classifier", "bert.pooler"):
        torch.testing.assert_close(m.get_submodule(h).state_dict(), alone["b"].get_submodule(h).state_dict(),
                                   atol=0, rtol=0)
    if merge:
        torch.testing.assert_close(_logits(m, x), with_b, atol=1e-5, rtol=1e-5)
    else:
        for h in ("classifier", "bert.pooler"):
            plain.get_submodule(h).load_state_dict(alone["b"].get_submodule(h).state_dict())
        torch.testing.assert_close(_logits(m, x), _logits(plain, x), atol=0, rtol=0)
    multi.add_adapter(m, "d", "lora", r=2, target_modules=["query"])  # a clean registry again
    assert multi.adapter_names(m) == ["d"]


@pytest.mark.parametrize("how", ["add", "load"])
def test_failed_named_adapter_leaves_a_single_adapter_model_as_it_was(model_builders, tmp_path, how):
    """A model with one injected adapter is turned into a named-adapter model by ``add_adapter``; when the
    add (or ``load_adapter_as``) fails, it must be given back as it was: same modules, same method, and
    ``save_adapter`` still works."""
    other = model_builders["linear"](0)
    ll.inject_adapter(other, "lora", r=2, target_modules=["fc1"])
    ll.save_adapter(other, tmp_path / "linear")
    m = model_builders["bert"](0)
    ll.inject_adapter(m, "lora", r=4, target_modules=["query"], modules_to_save=["pooler"])
    modules = [(n, type(x)) for n, x in m.named_modules()]
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    method = ll.get_adapter_method(m)
    with pytest.raises((ValueError, ll.AdapterFormatError)):
        if how == "add":
            multi.add_adapter(m, "x", "lora", dict(r=2, target_modules=["nope"]))
        else:
            multi.load_adapter_as(m, tmp_path / "linear", "x")
    assert [(n, type(x)) for n, x in m.named_modules()] == modules
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grads
    assert ll.get_adapter_method(m) is method and not multi.adapter_names(m)
    ll.save_adapter(m, tmp_path / "again")


def test_disabling_named_adapters_runs_the_original_saved_modules(model_builders):
    """Disabled = the base model, heads included: the per-adapter copy of a module trained in full
    (``modules_to_save``) steps aside for the original, as in PEFT."""
    from test_invariants import make_inputs  # the test directory is on sys.path

    base = model_builders["bert"](0)
    m = model_builders["bert"](0)
    multi.add_adapter(m, "a", "lora", dict(r=2, target_modules=["query"], modules_to_save=["pooler"]))
    with torch.no_grad():
        for p in ll.trainable_parameters(m):
            p.add_(0.3)
        x = make_inputs("bert")
        want = base(**x).pooler_output
        assert not torch.allclose(m(**x).pooler_output, want)
        with ll.disable_adapter(m):
            torch.testing.assert_close(m(**x).pooler_output, want, rtol=0, atol=0)
        assert not torch.allclose(m(**x).pooler_output, want)


@pytest.mark.parametrize("method,kw", [("lora", {"use_dora": True}), ("bat", {}), ("bone", {}), ("lora", {})],
                         ids=["dora", "bat", "bone", "lora"])
def test_merging_several_active_adapters_matches_their_forward(method, kw):
    """Two active adapters merge to what the unmerged model computes, also for updates that depend on
    the base (DoRA, Bat: merged one after another, the second update was computed from a base that
    already held the first), and unmerging gives the base back."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    base = {k: v.clone() for k, v in m.state_dict().items()}
    for name, seed in (("a", 1), ("b", 2)):
        multi.add_adapter(m, name, method, dict(r=2, target_modules=["0", "2"], **kw))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in multi.named_adapter_layers(m, name).values():
                for pname, p in layer.named_parameters():
                    if not pname.startswith("base_layer"):
                        p.add_(0.5 * torch.randn(p.shape, generator=g))
    multi.set_adapter(m, ["a", "b"])
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = m(x)
        ll.merge_adapter(m)
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="merged"):
            multi.adapter_delta_weights(m, "a")
        with pytest.raises(RuntimeError, match="merged"):
            multi.add_adapter(m, "c", method, dict(r=2, target_modules=["0"], **kw))
        ll.unmerge_adapter(m)
        for k, v in ll.unload(m).state_dict().items():
            torch.testing.assert_close(v, base[k], rtol=0, atol=1e-5, msg=k)
