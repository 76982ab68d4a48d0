"""Adapters under ``torch.compile``: the same outputs and gradients as eager, and one graph.

Compiling is the usual answer to a step bound by the host (many small kernels launched from Python),
so an adapter that breaks the compiler's graph at every layer would take that answer away. Under
compile ``LoRALinear`` runs its plain formula (the fused path's caches, version checks and
``autograd.Function`` are eager-only), which the compiler fuses itself. The tests use the
``aot_eager`` backend: it traces forward and backward as inductor does, without a C compiler.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

import lightning_lora as ll

from test_callback import TinyModule, adapter_tensors, callback, loader, trainer
from test_invariants import SPECS, adapt, default_perturb, make_inputs, out_of, perturb, probe_loss  # the test directory is on sys.path

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

#: methods whose training-time bookkeeping is a Python side effect in forward or backward, which the
#: compiler cannot trace: method -> why. They still give eager's outputs and gradients (tested).
GRAPH_BREAKS = {
    "increlora": "importance scores are accumulated by hooks with side effects at every step",
}


def _first_variant(method: str) -> tuple[dict, str]:
    spec = SPECS[method]
    kw = next(iter(spec.variants.values()))
    return dict(kw), ("bert" if "bert" in spec.models else spec.models[0])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ll.available_methods())
def test_compiled_matches_eager(model_builders, method):
    """Forward and backward through ``torch.compile`` give eager's output and adapter gradients."""
    kw, model = _first_variant(method)
    m, layers = adapt(model_builders, method, kw, model)
    assert layers
    perturb(SPECS[method], m)  # a non-trivial adapter (B = 0 would hide a wrong adapter path)
    m.eval()  # no dropout: the compiled graph draws its masks differently
    x = make_inputs(model)
    y = out_of(m, x)
    probe_loss(y).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads, "no adapter gradient in eager"
    for p in m.parameters():
        p.grad = None
    yc = out_of(torch.compile(m, backend="aot_eager"), x)
    probe_loss(yc).backward()
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        got = dict(m.named_parameters())[n].grad
        assert got is not None, f"{n}: no gradient under compile"
        torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-12, msg=n)


def _explain(model_builders, method: str, autocast: bool = False):
    kw, model = _first_variant(method)
    m, _ = adapt(model_builders, method, kw, model)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explained = torch._dynamo.explain(m)(**make_inputs(model))
    return explained, sorted({str(b.reason).splitlines()[0] for b in explained.break_reasons})


@pytest.mark.parametrize("method", [m for m in ll.available_methods() if m not in GRAPH_BREAKS])
def test_compiles_to_one_graph(model_builders, method):
    """A training-mode forward of the adapted model is one graph: no break at any adapter layer, and no
    warning from the compiler about our code (LQ-LoRA's code book once came from an ``lru_cache``,
    which the compiler traces through with a warning of possible silent incorrectness)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explained, reasons = _explain(model_builders, method)
    assert explained.graph_break_count == 0, f"{explained.graph_break_count} graph breaks: {reasons}"
    ours = [str(w.message) for w in caught if "lightning_lora" in str(w.message) or "lru_cache" in str(w.message)]
    assert not ours, ours


@pytest.mark.parametrize("method", ["lora", "bat", "lora_sb"])
def test_compiles_to_one_graph_under_autocast(model_builders, method):
    """Under bf16 autocast too: the fused path asks which autocast dtype is on (``_autocast_dtype``),
    and methods that build their weight in forward switch autocast off for it (``no_autocast``); both
    asked ``torch.amp.autocast_mode.is_autocast_available``, which torch 2.11's compiler cannot trace
    (a graph break per layer, seen on the H200's image; torch 2.13 traces it)."""
    explained, reasons = _explain(model_builders, method, autocast=True)
    assert explained.graph_break_count == 0, f"{explained.graph_break_count} graph breaks: {reasons}"


@pytest.mark.parametrize("method", sorted(GRAPH_BREAKS))
def test_known_graph_breaks_come_only_from_side_effecting_hooks(model_builders, method):
    """The methods listed in GRAPH_BREAKS break the graph, and only at their hooks' side effects: when
    one compiles to one graph, this fails and the entry goes."""
    assert method in ll.available_methods()
    explained, reasons = _explain(model_builders, method)
    assert explained.graph_break_count > 0
    # torch 2.11 and later word it "... side effect"; torch 2.10 "Compilation of intermediate hooks
    # requires compiled autograd" (the same register_hook on IncreLoRA's intermediate ΔW)
    assert reasons and all("side effect" in r or "intermediate hooks" in r for r in reasons), reasons


def test_lora_sibling_model_compiles_and_trains(model_builders):
    """LoRA on every BERT linear (q/k/v share an input: the eager path fuses them) compiles to one
    graph in training mode, with dropout, and an optimizer step through the compiled model moves
    every adapter tensor as the eager model's step does, within float error."""
    models = [model_builders["bert"](0) for _ in range(2)]
    for m in models:
        torch.manual_seed(0)  # the same A at init in both
        ll.inject_adapter(m, "lora", r=4, alpha=8, target_modules=["query", "key", "value", "dense"])
        default_perturb(m)
        m.train()
    explained = torch._dynamo.explain(models[1])(**make_inputs("bert"))
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    runs = [models[0], torch.compile(models[1], backend="aot_eager")]
    for m in models:  # eval: identical computation; the train-mode graph is checked above
        m.eval()
    after = []
    for m, run in zip(models, runs):
        opt = torch.optim.SGD(ll.trainable_parameters(m), lr=0.5)
        probe_loss(out_of(run, make_inputs("bert"))).backward()
        opt.step()
        after.append(ll.adapter_state_dict(m))
    assert after[0].keys() == after[1].keys()
    for k in after[0]:
        torch.testing.assert_close(after[1][k], after[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_adapter_callback_trains_a_compiled_module(tmp_path):
    """``trainer.fit(torch.compile(module))`` with ``AdapterCallback``: the callback injects into the
    compiled module's original, only the adapter trains, and the result is eager training's."""
    eager = TinyModule()
    trainer(tmp_path / "eager", callbacks=[callback()]).fit(eager, loader())
    module = TinyModule()
    compiled = torch.compile(module, backend="aot_eager")
    trainer(tmp_path / "compiled", callbacks=[callback()]).fit(compiled, loader())
    assert ll.adapter_layers(module.net), "the callback did not inject into the compiled module"
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n, p in eager.named_parameters() if p.requires_grad}
    got, want = adapter_tensors(module), adapter_tensors(eager)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
