"""Lightning DDP on 2 CPU processes (gloo) with AdapterCallback, run as a subprocess (ddp_script.py)
so the pytest process itself is never forked or re-launched by Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import lightning_lora as ll

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _run(out: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert proc.returncode == 0, f"ddp_script failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_ranks(out: Path, attention: bool = False) -> dict:
    r0, r1 = _load(out / "rank0.pt"), _load(out / "rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] == 4
    keys = {f"{m}.{p}" for m in ("fc1", "fc2") for p in ("lora_A", "lora_B")}
    if attention:  # nn.MultiheadAttention: its four factors, trained through the weights it reads
        keys |= {f"attn.{p}" for p in ("lora_A", "lora_B", "lora_out_A", "lora_out_B")}
    assert set(r0["final"]) == set(r1["final"]) == keys
    for k in keys:
        assert torch.equal(r0["init"][k], r1["init"][k]), f"{k}: ranks started from different adapters"
        assert not torch.equal(r0["final"][k], r0["init"][k]), f"{k}: adapter did not train"
        # each rank saw different batches: equality after 4 steps needs synchronised gradients
        assert torch.equal(r0["final"][k], r1["final"][k]), f"{k}: ranks diverged"
    assert not r0["base_moved"] and not r1["base_moved"]
    assert r0["optimizer_params"] == r1["optimizer_params"] == len(keys)
    # AdapterCallback's DDP defaults reached the wrapper (the net has no buffers; the ranks' equal
    # adapters above hold with gradients as bucket views)
    assert r0["ddp_flags"] == r1["ddp_flags"] == {"forward_buffer_sync": False, "gradient_as_bucket_view": True}
    # the buffer each rank built differently is rank 0's on both when training starts
    assert torch.equal(r0["buffer_at_start"], torch.zeros(3)) and torch.equal(r1["buffer_at_start"], torch.zeros(3))
    return r0


def test_ddp_two_cpu_processes(tmp_path):
    _run(tmp_path, "ddp")
    r0 = _check_ranks(tmp_path)
    ckpt = _load(tmp_path / "last.ckpt")
    # the adapter, and the net's own buffer (non-parameter state of the user's model is kept)
    assert set(ckpt["state_dict"]) == {f"net.{k}" for k in r0["final"]} | {"net.marker"}
    main = _load(tmp_path / "main.pt")
    assert all(torch.equal(main[k], r0["final"][k]) for k in r0["final"])


def test_ddp_trains_an_adapted_attention_in_step_on_both_ranks(tmp_path):
    _run(tmp_path, "ddp", "--attention")
    _check_ranks(tmp_path, attention=True)


def test_ddp_older_torch_path_broadcasts_the_buffers_once(tmp_path):
    """Without forward_sync_buffers the callback fills broadcast_buffers=False, which also skips DDP's
    sync at wrap; the callback then broadcasts the buffers from rank 0 when training starts."""
    _run(tmp_path, "ddp", "--old-torch-buffers")
    _check_ranks(tmp_path)


@pytest.mark.slow
def test_ddp_spawn_with_pre_injected_module(tmp_path):
    """With ddp_spawn, the launching process's module gets the trained adapter back only when it
    already carries the adapter layers (see the warning test below)."""
    _run(tmp_path, "ddp_spawn", "--pre-inject")
    r0 = _check_ranks(tmp_path)
    main = _load(tmp_path / "main.pt")
    assert set(main) == set(r0["final"])
    assert all(torch.equal(main[k], r0["final"][k]) for k in r0["final"])


def test_spawn_strategy_without_pre_injection_warns():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    from torch import nn

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    launcher = _MultiProcessingLauncher.__new__(_MultiProcessingLauncher)
    fake = types.SimpleNamespace(strategy=types.SimpleNamespace(launcher=launcher), is_global_zero=True)
    with pytest.warns(UserWarning, match="inject_adapter"):
        ll.AdapterCallback("lora", r=2, target_modules=["fc"]).setup(fake, Module(), "fit")
    # pre-injected: no warning
    module = Module()
    ll.inject_adapter(module, "lora", r=2, target_modules=["fc"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.AdapterCallback("lora", r=2, target_modules=["fc"]).setup(fake, module, "fit")
