"""The C++ path's automatic mode (the default, ``lightning_lora.core._lora_cpp.resolve_auto``): CUDA
inputs only; no compiler, no attempt; an earlier run's build loaded at once; otherwise a background
child builds while the Python path runs, polled at most once a second, and its build switched on
when it ends; a user's ``enable`` / ``disable`` meanwhile wins; a failed build leaves the Python path.
The state machine runs here on the CPU with the builder and the compiler faked; the real build
(``python _lora_cpp.py --build``) needs a compiler and the real CUDA switch-over a GPU."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lightning_lora as ll
from lightning_lora.core import _lora_cpp
from lightning_lora.methods import lora as lora_mod


class FakeBuilder:
    """``subprocess.Popen`` of the background build: ``poll()`` gives None until ``finish(code)``."""

    def __init__(self, argv, **kwargs) -> None:
        self.argv, self.kwargs, self.code, self.polls = argv, kwargs, None, 0
        STARTED.append(self)

    def poll(self):
        self.polls += 1
        if self.code == 0:  # a real child that exits 0 has put the library in the cache
            BUILT[0] = True
        return self.code


STARTED: list[FakeBuilder] = []
#: whether the (faked) extension cache holds this process's build
BUILT = [False]


@pytest.fixture
def auto(monkeypatch):
    """Automatic mode from scratch, with a compiler, no earlier build and a controllable clock."""
    STARTED.clear()
    BUILT[0] = False
    clock = [100.0]
    monkeypatch.setattr(lora_mod, "_CPP", _lora_cpp.AUTO)
    monkeypatch.setattr(_lora_cpp, "_MODULE", None)
    monkeypatch.setattr(_lora_cpp, "_FAILED", False)
    monkeypatch.setattr(_lora_cpp, "_BUILDER", None)
    monkeypatch.setattr(_lora_cpp, "_NEXT_POLL", 0.0)
    monkeypatch.setattr(_lora_cpp, "_toolchain", lambda: True)
    monkeypatch.setattr(_lora_cpp, "_is_built", lambda build_dir, name: BUILT[0])
    monkeypatch.setattr(_lora_cpp.subprocess, "Popen", FakeBuilder)
    monkeypatch.setattr(_lora_cpp.time, "monotonic", lambda: clock[0])
    return clock


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("auto", "auto"), ("", "auto"), ("1", True), ("on", True),
                                        ("0", None), ("false", None), (" OFF ", None)])
def test_env_values(monkeypatch, value, mode) -> None:
    if value is None:
        monkeypatch.delenv("LIGHTNING_LORA_CPP", raising=False)
    else:
        monkeypatch.setenv("LIGHTNING_LORA_CPP", value)
    assert _lora_cpp.mode_from_env() == mode


def test_env_typo_is_refused_at_import() -> None:
    """Before the automatic mode any value but 1 meant off: a typo now fails loudly, naming the variable."""
    env = {**os.environ, "LIGHTNING_LORA_CPP": "yse"}
    proc = subprocess.run([sys.executable, "-c", "import lightning_lora"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "LIGHTNING_LORA_CPP='yse': expected 1 (on), 0 (off) or auto" in proc.stderr.strip().splitlines()[-1]


def test_default_is_automatic_in_a_fresh_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_LORA_CPP"}
    code = ("import lightning_lora as ll; from lightning_lora.methods import lora as m; "
            "from lightning_lora.core import _lora_cpp as c; assert m._CPP is c.AUTO and c.status() == 'auto'")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_cpu_inputs_start_nothing(auto) -> None:
    """On the CPU the automatic mode is the Python path, and asks nothing per forward."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    ll.inject_adapter(net, "lora", r=2, target_modules=["0", "1"])
    out = net(torch.randn(3, 8, requires_grad=True))
    out.sum().backward()
    assert out.grad_fn.name() == "_FusedLoRABackward"
    assert STARTED == [] and lora_mod._CPP is _lora_cpp.AUTO and _lora_cpp.status() == "auto"


def test_only_cuda_training_takes_part() -> None:
    """CUDA inputs with gradients enabled; not CPU inputs, not inference (``lncrna predict`` on a GPU
    must not leave a build running behind a short command)."""
    from types import SimpleNamespace

    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert _lora_cpp.starts_auto(cuda) and not _lora_cpp.starts_auto(cpu)
    with torch.no_grad():
        assert not _lora_cpp.starts_auto(cuda)
    with torch.inference_mode():
        assert not _lora_cpp.starts_auto(cuda)


def test_no_toolchain_ends_the_mode_quietly(auto, monkeypatch, caplog) -> None:
    monkeypatch.setattr(_lora_cpp, "_toolchain", lambda: False)
    caplog.set_level(logging.INFO, logger=_lora_cpp.__name__)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # nobody asked for the C++ path: no warning
        assert _lora_cpp.resolve_auto() is None
    assert lora_mod._CPP is None and STARTED == [] and _lora_cpp.status() == "off"
    assert any("no C++ compiler or ninja" in r.getMessage() for r in caplog.records)


def test_an_earlier_build_is_loaded_at_once(auto, monkeypatch) -> None:
    module = object()
    BUILT[0] = True
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: module)
    assert _lora_cpp.resolve_auto() is module
    assert lora_mod._CPP is module and STARTED == [] and _lora_cpp.status() == "on"


def test_background_build_then_switch(auto, monkeypatch, caplog) -> None:
    clock = auto
    module = object()
    loads = []
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: loads.append(quiet) or module)
    caplog.set_level(logging.INFO, logger=_lora_cpp.__name__)

    assert _lora_cpp.resolve_auto() is None  # the first CUDA forward: a child starts, Python path now
    (builder,) = STARTED
    assert builder.argv == [sys.executable, _lora_cpp.__file__, "--build"]
    assert builder.kwargs["start_new_session"] is True  # a Ctrl-C of the run does not kill it halfway
    assert lora_mod._CPP is _lora_cpp.AUTO
    assert any("building the C++ LoRA path in the background" in r.getMessage() for r in caplog.records)

    for _ in range(50):  # forwards within the same second do not poll the child
        assert _lora_cpp.resolve_auto() is None
    assert builder.polls == 0
    clock[0] += 1.0
    assert _lora_cpp.resolve_auto() is None and builder.polls == 1  # polled: still building
    assert _lora_cpp.status() == "building" and loads == []

    builder.code = 0
    clock[0] += 0.5  # within the second: the next forward still does not poll
    assert _lora_cpp.resolve_auto() is None and loads == []
    clock[0] += 0.5
    assert _lora_cpp.resolve_auto() is module  # done: loaded (quietly) and switched on
    assert loads == [True] and lora_mod._CPP is module and _lora_cpp.status() == "on"
    assert len(STARTED) == 1


def test_status_of_a_loaded_build_back_in_automatic_mode_is_on(auto, monkeypatch) -> None:
    """Automatic mode set again after the build was loaded (a benchmark switching variants): the next
    CUDA training forward runs the C++ path, and status says so."""
    module = object()
    BUILT[0] = True
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: module)
    _lora_cpp.resolve_auto()
    monkeypatch.setattr(_lora_cpp, "_MODULE", module)
    lora_mod._CPP = _lora_cpp.AUTO
    assert _lora_cpp.status() == "on" and lora_mod._CPP is module


def test_status_finishes_a_done_build(auto, monkeypatch) -> None:
    """``status()`` polls at once (no one-second wait): a benchmark waits for the steady state with it."""
    module = object()
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: module)
    _lora_cpp.resolve_auto()
    STARTED[0].code = 0
    assert _lora_cpp.status() == "on" and lora_mod._CPP is module


def test_failed_background_build_leaves_the_python_path(auto, monkeypatch, caplog) -> None:
    clock = auto
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: pytest.fail("a failed build is not loaded"))
    caplog.set_level(logging.INFO, logger=_lora_cpp.__name__)
    _lora_cpp.resolve_auto()
    STARTED[0].code = 1
    clock[0] += 1.0
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        assert _lora_cpp.resolve_auto() is None
    assert lora_mod._CPP is None and _lora_cpp.status() == "off"
    assert any("background build of the C++ LoRA path failed (exit 1)" in r.getMessage() for r in caplog.records)


def test_child_that_built_nothing_here_is_not_loaded_in_the_foreground(auto, monkeypatch) -> None:
    """A child that exits 0 but left no library under this process's name (it imported another torch)
    must not make this process compile for a minute in the foreground: the Python path instead."""
    clock = auto
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: pytest.fail("no foreground build"))
    _lora_cpp.resolve_auto()
    STARTED[0].code = 0
    monkeypatch.setattr(_lora_cpp, "_is_built", lambda build_dir, name: False)
    clock[0] += 1.0
    assert _lora_cpp.resolve_auto() is None and lora_mod._CPP is None


def test_a_builder_that_cannot_start_leaves_the_python_path(auto, monkeypatch) -> None:
    def no_interpreter(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "")

    monkeypatch.setattr(_lora_cpp.subprocess, "Popen", no_interpreter)
    assert _lora_cpp.resolve_auto() is None
    assert lora_mod._CPP is None and _lora_cpp.status() == "off"


def test_two_threads_start_one_builder(auto, monkeypatch) -> None:
    """Forwards in two threads at once (a slow start: the race is certain without the lock)."""
    import threading
    import time

    def slow_builder(argv, **kwargs):
        time.sleep(0.2)
        return FakeBuilder(argv, **kwargs)

    monkeypatch.setattr(_lora_cpp.subprocess, "Popen", slow_builder)
    threads = [threading.Thread(target=_lora_cpp.resolve_auto) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(STARTED) == 1


@pytest.mark.parametrize("user", ["disable", "enable"])
def test_user_choice_during_the_build_wins(auto, monkeypatch, user) -> None:
    clock = auto
    built, chosen = object(), object()
    _lora_cpp.resolve_auto()
    if user == "disable":
        ll.disable_cpp_path()
    else:
        monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: chosen)
        assert ll.enable_cpp_path() is True
    monkeypatch.setattr(_lora_cpp, "_build", lambda quiet=False: built)
    STARTED[0].code = 0
    clock[0] += 1.0
    _lora_cpp.resolve_auto()
    assert lora_mod._CPP is (None if user == "disable" else chosen)


def test_the_build_script_builds_without_the_package(tmp_path) -> None:
    """What the background child runs: this file alone, from a folder where ``lightning_lora`` is not
    importable, into torch's extension cache under the name the parent loads."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        # the child's failure path: exit 1, nothing raised past it
        proc = subprocess.run([sys.executable, _lora_cpp.__file__, "--build"], cwd=tmp_path, capture_output=True)
        assert proc.returncode == 1
        return
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-I", _lora_cpp.__file__, "--build"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    name = _lora_cpp._extension_name()
    assert _lora_cpp._is_built(_lora_cpp._build_directory(name), name)


@pytest.mark.gpu
def test_cuda_training_switches_to_the_cpp_path(tmp_path) -> None:
    """End to end on a GPU, in a fresh process in the default mode: an inference forward starts
    nothing; the first CUDA training forwards run the Python path, the background build ends, later
    forwards run the C++ function, and its outputs and gradients equal the Python path's bit for bit."""
    code = r'''
import time, torch, lightning_lora as ll
from lightning_lora.core import _lora_cpp as c
from lightning_lora.methods import lora as m
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).cuda()
ll.inject_adapter(net, "lora", r=4, target_modules=["0", "2"])
for layer in ll.adapter_layers(net).values():
    torch.nn.init.normal_(layer.lora_B, std=0.1)
x = torch.randn(8, 64, device="cuda", requires_grad=True)
with torch.no_grad():
    net(x)
assert c.status() == "auto", c.status()  # inference starts nothing
out = net(x)
first = out.grad_fn.name()
assert first == "_FusedLoRABackward", first
deadline = time.monotonic() + 400
while c.status() == "building" and time.monotonic() < deadline:
    time.sleep(1)
assert c.status() == "on", c.status()
def run():
    net.zero_grad(); x.grad = None
    o = net(x); o.square().sum().backward()
    return o.grad_fn.name(), o.detach().clone(), x.grad.clone(), [p.grad.clone() for p in ll.trainable_parameters(net)]
name_cpp, *cpp = run()
assert "CppNode" in name_cpp, name_cpp
m._CPP = None
name_py, *py = run()
assert name_py == "_FusedLoRABackward"
assert torch.equal(cpp[0], py[0]) and torch.equal(cpp[1], py[1])
assert all(torch.equal(a, b) for a, b in zip(cpp[2], py[2]))
'''
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_LORA_CPP"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)  # a fresh cache: the background build really runs
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=500)
