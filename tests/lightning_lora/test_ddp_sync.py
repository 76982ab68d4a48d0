"""lightning_lora.core.ddp_sync: Lightning's per-step SIGTERM broadcast without the GPU drain.

The CUDA path (pinned buffers, events, NCCL) needs two GPUs (`benchmarks/ddp_scaling.py` measures
it); here the same decision logic runs on 2 CPU processes with gloo, in a subprocess so the pytest
process is never forked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

import lightning_lora as ll
from lightning_lora.core.ddp_sync import AsyncSigtermCheck, install_async_sigterm_check, uninstall_async_sigterm_check

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import json, os, sys, types
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from lightning_lora.core.ddp_sync import AsyncSigtermCheck, install_async_sigterm_check

    def run(rank, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        loop = types.SimpleNamespace()
        trainer = types.SimpleNamespace(received_sigterm=False, world_size=2,
                                        fit_loop=types.SimpleNamespace(epoch_loop=loop),
                                        strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
        check = AsyncSigtermCheck(trainer, torch.device("cpu"))
        stopped = None
        for step in range(6):
            if rank == 0 and step == 2:
                trainer.received_sigterm = True  # only rank 0 gets the signal
            try:
                check()
            except SIGTERMException:
                stopped = step
                break
        with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
            json.dump({{"stopped": stopped}}, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
    """
)


def test_every_rank_stops_in_the_same_step_one_step_after_the_signal(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    port = 29000 + os.getpid() % 1000
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(port)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = [json.loads((tmp_path / f"rank{r}.json").read_text())["stopped"] for r in (0, 1)]
    # rank 0 saw SIGTERM before the check of step 2; Lightning's own check stops at step 2, this one
    # reads step 2's flag at step 3 -- on both ranks, so neither waits in a collective for the other
    assert stopped == [3, 3]


def test_runs_without_stopping_until_the_signal_then_stops_one_step_later():
    trainer = types.SimpleNamespace(received_sigterm=False)
    check = AsyncSigtermCheck(trainer, torch.device("cpu"))
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:  # one-rank group for the broadcast
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(30000 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for _ in range(5):
            check()
        assert check.steps == 5
        trainer.received_sigterm = True
        check()  # the flag of this step is read at the next one
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            check()
        except SIGTERMException:
            pass
        else:
            raise AssertionError("the flag set one step earlier did not stop the loop")
    finally:
        if created:
            dist.destroy_process_group()


def test_lightning_still_has_the_method_it_replaces():
    # if Lightning renames or drops it, install becomes a silent no-op: this test says so
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))


def test_install_is_a_no_op_on_one_cpu_process_and_uninstall_restores():
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.fc(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(ll.trainable_parameters(self), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ll.AdapterCallback("lora", r=2, target_modules=["fc"])])
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
    loop = trainer.fit_loop.epoch_loop
    assert "_broadcast_sigterm_tensor" not in loop.__dict__  # one process: Lightning's method untouched
    assert install_async_sigterm_check(trainer) is False
    # installed by hand (as on GPUs), then restored
    loop._broadcast_sigterm_tensor = AsyncSigtermCheck(trainer, torch.device("cpu"))
    uninstall_async_sigterm_check(trainer)
    assert "_broadcast_sigterm_tensor" not in loop.__dict__
    assert loop._broadcast_sigterm_tensor.__func__ is _TrainingEpochLoop._broadcast_sigterm_tensor
