"""The opt-in C++ fused LoRA path (:mod:`lightning_lora.core._lora_cpp`) against the Python autograd
functions it replaces: outputs and every gradient equal bit for bit on the CPU in fp32 and bf16, with
and without bias, with dropout (eval: the C++ path; train: the Python path either way), sibling sets
(q/k/v), input replay (a GELU MLP's output projection), unused sibling outputs, several optimizer
steps (cast caching), and the version and double-backward checks."""

from __future__ import annotations

import copy
import gc
import os
import re
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_lora as ll
from lightning_lora.core import _lora_cpp
from lightning_lora.methods import lora as lora_mod
from test_lora_reference_cycles import PARAMS, assert_steps_leave_no_cyclic_garbage  # the test directory is on sys.path


def _no_compiler() -> bool:
    """No C++ compiler on this machine: load_inline cannot build anything. (ninja is a test dependency,
    so its absence is an install defect and fails ``test_extension_builds``; so does a build that
    fails with a compiler present.)"""
    return shutil.which(os.environ.get("CXX", "c++")) is None


# the opt-in C++ path compiles at first use: like CUDA tests without a GPU, these need something pip
# cannot install (a system C++ compiler); CI has g++ and runs them
pytestmark = pytest.mark.skipif(_no_compiler(), reason="no system C++ compiler to build the opt-in C++ path (pip "
                                "cannot install one, as it cannot a GPU); CI has g++ and runs these")


def test_extension_builds() -> None:
    """With a compiler and ninja the extension builds: otherwise every comparison below would pit
    the Python path against itself (``_build()`` is None after a failed build) and pass vacuously."""
    assert _lora_cpp._build() is not None


class Block(nn.Module):
    """q/k/v reading one input (a sibling set), an output projection, a GELU MLP (input replay)."""

    def __init__(self, d: int = 16, bias: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = nn.Linear(d, d, bias=bias)
        self.up = nn.Linear(d, 2 * d, bias=bias)
        self.down = nn.Linear(2 * d, d, bias=bias)

    def forward(self, x: torch.Tensor, use_v: bool = True) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = self.o(q * k.sigmoid() + (v if use_v else 0))
        return self.down(F.gelu(self.up(h + x)))


def _pair(dtype: torch.dtype, bias: bool, dropout: float = 0.0, siblings: bool = True, adapter_dtype: str = "float32"):
    torch.manual_seed(0)
    model = Block(bias=bias).to(dtype)
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v", "o", "up", "down"],
                      dropout=dropout, fuse_siblings=siblings, adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in ll.adapter_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return model, copy.deepcopy(model)


def _run(model: nn.Module, cpp: bool, dtype: torch.dtype, steps: int = 3, use_v: bool = True, seed: int = 7):
    """Outputs, input gradients and parameter gradients of ``steps`` AdamW steps."""
    mod = _lora_cpp._build() if cpp else None
    lora_mod._CPP = mod
    try:
        opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
        gen = torch.Generator().manual_seed(seed)
        records = []
        for _ in range(steps):
            x = torch.randn(2, 5, 16, generator=gen).to(dtype).requires_grad_(True)
            torch.manual_seed(11)  # dropout masks
            out = model(x, use_v=use_v)
            out.float().pow(2).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            records.append((out.detach().clone(), x.grad.clone(), grads))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return records
    finally:
        lora_mod._CPP = None


def _grad_fn_names(model: nn.Module, cpp: bool, dtype: torch.dtype) -> set[str]:
    lora_mod._CPP = _lora_cpp._build() if cpp else None
    names = set()
    try:
        hooks = [m.register_forward_hook(lambda m, i, o: names.add(o.grad_fn.name()))
                 for m in ll.adapter_layers(model).values()]
        model(torch.randn(2, 5, 16).to(dtype).requires_grad_(True))
        for h in hooks:
            h.remove()
    finally:
        lora_mod._CPP = None
    return names


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (oa, xa, ga), (ob, xb, gb) in zip(a, b):
        assert torch.equal(oa, ob)
        assert torch.equal(xa, xb)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            assert ga[n].dtype == gb[n].dtype, n
            assert torch.equal(ga[n], gb[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("siblings", [True, False])
def test_bit_identical(dtype: torch.dtype, bias: bool, siblings: bool) -> None:
    py, cpp = _pair(dtype, bias, siblings=siblings)
    _assert_same(_run(py, False, dtype), _run(cpp, True, dtype))
    names = _grad_fn_names(cpp, True, dtype)
    assert all("CppNode" in n for n in names), names  # every layer took the C++ functions
    if siblings:
        assert any(m._siblings.sets for m in ll.adapter_layers(cpp).values())


def test_fp64_adapters_on_fp32() -> None:
    """The CPU proxy's setting: fp64 adapters cast to the fp32 activations, fp64 gradients."""
    py, cpp = _pair(torch.float32, True, adapter_dtype="float64")
    _assert_same(_run(py, False, torch.float32), _run(cpp, True, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout(dtype: torch.dtype) -> None:
    """Train-mode dropout takes the Python path (same masks); eval mode the C++ one."""
    py, cpp = _pair(dtype, True, dropout=0.1)
    _assert_same(_run(py, False, dtype), _run(cpp, True, dtype))
    py.eval()
    cpp.eval()
    _assert_same(_run(py, False, dtype, steps=1), _run(cpp, True, dtype, steps=1))
    assert all("CppNode" in n for n in _grad_fn_names(cpp, True, dtype))


def test_unused_sibling_output() -> None:
    py, cpp = _pair(torch.float32, True)
    _run(py, False, torch.float32, steps=1)  # learn the sibling sets
    _run(cpp, True, torch.float32, steps=1)
    a = _run(py, False, torch.float32, steps=2, use_v=False)
    b = _run(cpp, True, torch.float32, steps=2, use_v=False)
    _assert_same(a, b)
    assert "lora_B" in "".join(a[0][2]) and not any(n.startswith("v.") for n in b[0][2])


def test_autocast_bf16() -> None:
    py, cpp = _pair(torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _run(py, False, torch.float32)
        b = _run(cpp, True, torch.float32)
    _assert_same(a, b)


def test_base_weight_written_before_backward_raises() -> None:
    _, model = _pair(torch.float32, True, siblings=False)
    lora_mod._CPP = _lora_cpp._build()
    try:
        out = model(torch.randn(2, 5, 16, requires_grad=True))
        with torch.no_grad():
            model.down.base_layer.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    finally:
        lora_mod._CPP = None


def test_double_backward_raises() -> None:
    _, model = _pair(torch.float32, True)
    lora_mod._CPP = _lora_cpp._build()
    try:
        x = torch.randn(2, 5, 16, requires_grad=True)
        model(x)  # learn the sibling sets
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gx.sum().backward()
    finally:
        lora_mod._CPP = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_fan_in_fan_out(dtype: torch.dtype) -> None:
    """transformers ``Conv1D`` bases (weight stored (in, out)), alone and as a sibling set."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = Block()
    for name in ("q", "k", "v", "o", "up", "down"):
        lin = getattr(model, name)
        conv = Conv1D(lin.out_features, lin.in_features)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.t())
            conv.bias.copy_(lin.bias)
        setattr(model, name, conv)
    model = model.to(dtype)
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v", "o", "up", "down"])
    with torch.no_grad():
        for layer in ll.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    cpp = copy.deepcopy(model)
    _assert_same(_run(model, False, dtype), _run(cpp, True, dtype))
    assert all("CppNode" in n for n in _grad_fn_names(cpp, True, dtype))


def test_dora_detached_norm() -> None:
    torch.manual_seed(0)
    model = Block()
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["o", "up", "down"], use_dora=True)
    with torch.no_grad():
        for layer in ll.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    cpp = copy.deepcopy(model)
    _assert_same(_run(model, False, torch.float32), _run(cpp, True, torch.float32))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_forward(mode: str) -> None:
    py, cpp = _pair(torch.bfloat16, True)
    _run(py, False, torch.bfloat16, steps=1)
    _run(cpp, True, torch.bfloat16, steps=1)
    x = torch.randn(2, 5, 16).bfloat16()
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        a = py(x)
        lora_mod._CPP = _lora_cpp._build()
        try:
            b = cpp(x)
        finally:
            lora_mod._CPP = None
    assert torch.equal(a, b)


def test_env_switch_builds_at_first_forward() -> None:
    import subprocess
    import sys

    code = ("import torch, lightning_lora as ll; from lightning_lora.methods import lora as m\n"
            "assert m._CPP is True\n"
            "net = torch.nn.Sequential(torch.nn.Linear(8, 8)); ll.inject_adapter(net, 'lora', r=2, target_modules=['0'])\n"
            "out = net(torch.randn(3, 8, requires_grad=True)); out.sum().backward()\n"
            "assert 'CppNode' in out.grad_fn.name() and m._CPP is not True, out.grad_fn.name()\n")
    env = {**__import__("os").environ, "LIGHTNING_LORA_CPP": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_failed_build_warns_once_and_runs_python(monkeypatch) -> None:
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension: no compiler")

    monkeypatch.setattr(ext, "load_inline", broken)
    monkeypatch.setattr(_lora_cpp, "_MODULE", None)
    monkeypatch.setattr(_lora_cpp, "_FAILED", False)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _lora_cpp.enable() is False
    assert lora_mod._CPP is None and _lora_cpp._build() is None  # no second attempt, no second warning
    py, _ = _pair(torch.float32, True, siblings=False)
    out = py(torch.randn(2, 5, 16, requires_grad=True))
    assert out.grad_fn.name() == "_FusedLoRABackward"


def test_first_build_is_announced_and_a_cached_one_is_not(monkeypatch, tmp_path, caplog) -> None:
    """The first build compiles for about a minute in silence: one line before (with the folder) and
    one after (with the seconds); reusing the built library says nothing. ``load_inline`` is faked
    (a real build costs a minute of CPU): it writes the library file where a real build would."""
    import logging
    import torch.utils.cpp_extension as ext

    built = []

    def fake_load_inline(name, cpp_sources, build_directory=None, **kwargs):
        build_directory = build_directory or ext._get_build_directory(name, verbose=False)  # load_inline's own default
        assert os.path.dirname(build_directory) == str(tmp_path)
        open(os.path.join(build_directory, name + ext.LIB_EXT), "wb").close()
        built.append(name)
        return object()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(ext, "load_inline", fake_load_inline)
    monkeypatch.setattr(_lora_cpp, "_MODULE", None)
    monkeypatch.setattr(_lora_cpp, "_FAILED", False)
    caplog.set_level(logging.INFO, logger=_lora_cpp.__name__)

    assert _lora_cpp._build() is not None  # an empty extension folder: a fresh build
    messages = [r.getMessage() for r in caplog.records if r.name == _lora_cpp.__name__]
    assert len(messages) == 2, messages
    assert "compiling the C++ LoRA path once (about a minute" in messages[0]
    assert os.path.join(str(tmp_path), built[0]) in messages[0]  # where the cache is
    assert re.fullmatch(r"lightning_lora: C\+\+ LoRA path built in \d+\.\d s", messages[1])

    caplog.clear()
    monkeypatch.setattr(_lora_cpp, "_MODULE", None)  # a new process: the library is in the folder now
    assert _lora_cpp._build() is not None and len(built) == 2
    assert not [r for r in caplog.records if r.name == _lora_cpp.__name__]

    # another torch version: torch would rebuild in the same folder without a word from the file
    # check, so the version is part of the extension's name and the build is announced again
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    monkeypatch.setattr(_lora_cpp, "_MODULE", None)
    assert _lora_cpp._build() is not None and len(built) == 3 and built[2] != built[0]
    assert len([r for r in caplog.records if r.name == _lora_cpp.__name__]) == 2


@pytest.mark.parametrize("cpp", [False, True])
def test_replayed_from_activation_is_freed_with_the_graph(cpp: bool) -> None:
    """The GELU input that the down projection's adapter replays its input from is freed when the
    graph is, without waiting for the cyclic garbage collector: the C++ path's recipe encoding was once
    a recursive closure, a reference cycle that kept every such activation (a BERT MLP's, one per
    layer: 1.1 GiB on BERT-base at 32 x 512) allocated after backward until a collection ran."""
    model, _ = _pair(torch.float32, True)
    seen = []
    model.up.register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))
    lora_mod._CPP = _lora_cpp._build() if cpp else None
    enabled = gc.isenabled()
    gc.disable()
    try:
        x = torch.randn(2, 5, 16, requires_grad=True)
        out = model(x)
        assert ("CppNode" in model.down(F.gelu(model.up(x))).grad_fn.name()) == cpp  # the path under test ran
        seen.clear()
        out = model(x)
        out.sum().backward()
        del out
        assert seen and seen[0]() is None
    finally:
        lora_mod._CPP = None
        if enabled:
            gc.enable()


def test_public_switch_turns_the_cpp_path_on_and_off() -> None:
    """``lightning_lora.enable_cpp_path()`` / ``disable_cpp_path()``: the C++ function runs, then the Python one."""
    model, _ = _pair(torch.float32, True)
    x = torch.randn(2, 5, 16)
    try:
        assert ll.enable_cpp_path() is True
        assert "CppNode" in model.o(x).grad_fn.name()
        ll.disable_cpp_path()
        assert model.o(x).grad_fn.name() == "_FusedLoRABackward"
    finally:
        ll.disable_cpp_path()


def _on(cpp: bool) -> None:
    lora_mod._CPP = _lora_cpp._build() if cpp else None


@pytest.mark.parametrize("cpp", [False, True])
def test_replay_source_written_in_place_keeps_the_python_path(cpp: bool) -> None:
    """The GELU input the down projection would replay its input from is written in place after the
    GELU saved it. The Python path reads it in backward only (autograd raises there, as it would for
    the GELU itself); the C++ path read it in forward and raised there, also for a forward whose
    graph never runs backward. Now it keeps the Python function for such an input."""
    model, _ = _pair(torch.float32, True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = model.down(F.gelu(model.up(x))).detach()
    _on(cpp)
    try:
        u = model.up(x)
        h = F.gelu(u)
        with torch.no_grad():
            u.mul_(1.0)  # bumps the version of the GELU's saved input, values unchanged
        out = model.down(h)  # raised here on the C++ path
        assert torch.equal(out, ref)
        assert out.grad_fn.name() == "_FusedLoRABackward"
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    finally:
        lora_mod._CPP = None


def test_replay_source_packed_by_a_hook_is_not_unpacked_in_forward() -> None:
    """The GELU ran under saved-tensor hooks (torch.utils.checkpoint, offloading) and the down
    projection outside them: the C++ path unpacked the GELU's saved input during the forward (a
    checkpoint recomputed its region there and the activation it frees was held until backward).
    Now such an input keeps the Python path: no unpack in forward, outputs and gradients as there."""
    results = []
    for cpp in (False, True):
        model, _ = _pair(torch.float32, True)
        unpacks: list[int] = []
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
        _on(cpp)
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacks.append(1) or t):
                h = F.gelu(model.up(x))
            out = model.down(h)
            assert not unpacks  # nothing unpacked before backward
            out.pow(2).sum().backward()
        finally:
            lora_mod._CPP = None
        results.append([out.detach(), x.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    for a, b in zip(*results):
        assert torch.equal(a, b)


class _Marked(torch.Tensor):
    """A tensor subclass whose default ``__torch_function__`` keeps the subclass on results."""


@pytest.mark.parametrize("siblings", [True, False])
def test_tensor_subclass_input_keeps_the_python_path(siblings: bool) -> None:
    """A ``__torch_function__`` subclass sees the Python function's ops (its outputs keep the class);
    the C++ function's ATen calls bypass it and gave plain tensors. It keeps the Python path."""
    out = {}
    for cpp in (False, True):
        model, _ = _pair(torch.float32, True, siblings=siblings)
        model(torch.randn(2, 5, 16))  # learn the sibling sets
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5)).as_subclass(_Marked)
        _on(cpp)
        try:
            out[cpp] = model.q(x)
        finally:
            lora_mod._CPP = None
        assert type(out[cpp]) is _Marked
    assert torch.equal(out[False].as_subclass(torch.Tensor), out[True].as_subclass(torch.Tensor))


@pytest.mark.parametrize("siblings", [True, False])
def test_modified_base_weight_error_is_the_python_paths(siblings: bool) -> None:
    """The error for a base weight written before backward reads word for word as on the Python path."""
    messages = []
    for cpp in (False, True):
        model, _ = _pair(torch.float32, True, siblings=siblings)
        model(torch.randn(2, 5, 16))  # learn the sibling sets
        _on(cpp)
        try:
            out = model(torch.randn(2, 5, 16, requires_grad=True))
        finally:
            lora_mod._CPP = None
        with torch.no_grad():
            model.q.base_layer.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            out.sum().backward()
        messages.append(str(info.value).split("\n")[0])
    assert messages[0] == messages[1]


@pytest.mark.parametrize("siblings", [True, False])
@pytest.mark.parametrize("cpp", [False, True])
def test_forward_mode_ad_raises_as_on_the_python_path(cpp: bool, siblings: bool) -> None:
    """Forward-mode AD through a fused layer: the Python function has no jvp and raises
    NotImplementedError; the C++ one raised other errors (an out= kernel's, or a RuntimeError for a
    dual adapter weight). Under a dual level the Python function runs."""
    import torch.autograd.forward_ad as fwAD

    model, _ = _pair(torch.float32, True, siblings=siblings)
    model(torch.randn(2, 5, 16))  # learn the sibling sets
    x = torch.randn(2, 5, 16)
    _on(cpp)
    try:
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="must implement the jvp function"):
                model.q(fwAD.make_dual(x, torch.ones_like(x)))
            A = model.o.lora_A
            del model.o._parameters["lora_A"]
            model.o.lora_A = fwAD.make_dual(A.detach(), torch.ones_like(A))  # a dual adapter weight only
            with pytest.raises(NotImplementedError, match="must implement the jvp function"):
                model.o(x)
    finally:
        lora_mod._CPP = None


@PARAMS
def test_training_steps_leave_no_cyclic_garbage(kind: str, mode: str) -> None:
    """test_lora_reference_cycles.py's check on the C++ path (its recipe encoding once was a cycle)."""
    assert_steps_leave_no_cyclic_garbage(kind, mode, cpp=True)


#: the methods whose layers run the C++ function in training: plain LoRA and the LoRALinear subclasses
#: that claim ``cpp_path`` (ALLoRA, FFA-LoRA, GradNormLoRP's DoRA form with the detached norm, Flexora
#: outside its gate step)
CPP_METHODS = {"lora", "allora", "ffa_lora", "gradnorm_lorp", "flexora"}


def test_cpp_path_is_opt_in_per_subclass() -> None:
    """A LoRALinear subclass starts on the Python function (its forward may add what the C++ one's ATen
    calls bypass) until its own body claims ``cpp_path``; the claims are the ones listed above."""

    class Plain(lora_mod.LoRALinear):
        pass

    class Claims(lora_mod.LoRALinear):
        cpp_path = True

    class Inherits(Claims):
        pass

    assert lora_mod.LoRALinear.cpp_path and Claims.cpp_path
    assert not Plain.cpp_path and not Inherits.cpp_path
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = Plain(base, lora_mod.LoRAConfig(r=2))
    lora_mod._CPP = _lora_cpp._build()
    try:
        y = layer(torch.randn(3, 8, requires_grad=True))
        assert "CppNode" not in _graph_names(y.grad_fn)
        y = Claims(base, lora_mod.LoRAConfig(r=2))(torch.randn(3, 8, requires_grad=True))
        assert "CppNode" in _graph_names(y.grad_fn)
    finally:
        lora_mod._CPP = None
    claimed = {c.__name__ for c in _subclasses(lora_mod.LoRALinear) if c.cpp_path}
    assert claimed == {"ALLoRALinear", "FFALoRALinear", "GradNormLoRPLinear", "FlexoraLinear"}


def _subclasses(cls: type) -> list[type]:
    """The library's subclasses of ``cls`` at any depth (tests' own subclasses filtered out by module)."""
    out, stack = [], list(cls.__subclasses__())
    while stack:
        c = stack.pop()
        if c.__module__.startswith("lightning_lora."):
            out.append(c)
        stack.extend(c.__subclasses__())
    return out


@pytest.mark.parametrize("method", ll.available_methods())
def test_every_method_gives_the_same_outputs_and_gradients_on_both_paths(model_builders, method) -> None:
    """Since session 23 the C++ path is the default for CUDA training, switched on process-wide: every
    registered method must give, with it on, what the Python path gives, bit for bit. Plain LoRA
    layers and their sibling sets reach it, and so do the LoRALinear subclasses that claim
    ``cpp_path`` (checked: a C++ node in the graph of every method in ``CPP_METHODS``); the other
    methods' layers keep the Python functions. Two steps (the second after an optimizer step: cast
    caches) of each method's first test variant, in train mode, no dropout."""
    from test_invariants import SPECS, adapt, make_inputs, out_of, perturb, probe_loss  # the test directory is on sys.path

    spec = SPECS[method]
    kw = dict(next(iter(spec.variants.values())))
    model = "bert" if "bert" in spec.models else spec.models[0]
    results = []
    for cpp in (False, True):
        m, layers = adapt(model_builders, method, kw, model)
        assert layers
        perturb(spec, m)
        m.train()
        for mod in m.modules():  # no dropout anywhere: the two runs must see the same masks (none)
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        opt = torch.optim.SGD(ll.trainable_parameters(m), lr=0.1)
        lora_mod._CPP = _lora_cpp._build() if cpp else None
        try:
            run = []
            for step in range(2):
                y = out_of(m, make_inputs(model, seed=step + 1))
                if cpp and method in CPP_METHODS:  # the comparison is not vacuous: the C++ functions ran
                    assert "CppNode" in _graph_names(y.grad_fn)
                elif cpp:  # and the methods said to keep the Python functions do
                    assert "CppNode" not in _graph_names(y.grad_fn)
                probe_loss(y).backward()
                run.append((y.detach().clone(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                 if p.grad is not None}))
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            lora_mod._CPP = None
        results.append(run)
    for (y_py, g_py), (y_cpp, g_cpp) in zip(*results):
        assert torch.equal(y_cpp, y_py)
        assert g_cpp.keys() == g_py.keys() and g_py
        for n in g_py:
            assert torch.equal(g_cpp[n], g_py[n]), n


def _graph_names(fn) -> str:
    """Every node name of the autograd graph under ``fn``, joined. The visited nodes are kept alive in
    ``seen``: a node's Python object may be made afresh at each ``next_functions`` access and freed
    after it, so a bare set of ids saw a new node take a freed one's id and skipped it (torch 2.11 on
    the H200 stopped this walk after four nodes of a BERT)."""
    seen: dict[int, object] = {}
    names, stack = [], [fn]
    while stack:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen[id(f)] = f
        names.append(f.name())
        stack.extend(g for g, _ in f.next_functions)
    return " ".join(names)
