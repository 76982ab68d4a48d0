"""``ALLoRAOptimizer.step`` fires torch's process-wide optimizer step hooks
(``torch.optim.optimizer.register_optimizer_step_pre_hook`` / post) once per step, not once for the
wrapper and again for the inner optimizer; the wrapper's own step hooks still run once, also under
Lightning's automatic optimisation (which passes a closure)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora.optim.allora import ALLoRAOptimizer


@pytest.fixture
def global_calls():
    calls: list[str] = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("post"))]
    yield calls
    for h in handles:
        h.remove()


def _grads(model: nn.Module) -> None:
    model.zero_grad()
    model(torch.randn(5, 6)).pow(2).sum().backward()


@pytest.mark.parametrize("apply_to", ["grad", "update"])
def test_global_step_hooks_fire_once_per_step(global_calls, apply_to):
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = ALLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), eta=2.0, apply_to=apply_to)
    own: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: own.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: own.append("post"))
    for step in range(1, 4):
        _grads(model)
        opt.step()
        assert global_calls == ["pre", "post"] * step and own == ["pre", "post"] * step
    global_calls.clear()
    loss = opt.step(lambda: model(torch.randn(2, 6)).sum())  # a closure, as Lightning passes one
    assert global_calls == ["pre", "post"] and torch.is_tensor(loss)
    twin = copy.deepcopy(opt)  # Optimizer.__setstate__ path: must not re-wrap the class's step
    global_calls.clear()
    _grads(model)
    twin.step()
    opt.step()
    assert global_calls == ["pre", "post"] * 2


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return ALLoRAOptimizer(torch.optim.SGD(self.parameters(), lr=0.1), eta=2.0)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_global_step_hooks_fire_once_per_lightning_step(global_calls, tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 6), torch.randn(12, 1))
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(_Module(), DataLoader(data, batch_size=4))
    assert trainer.global_step == 3 and global_calls.count("pre") == 3 and global_calls.count("post") == 3
