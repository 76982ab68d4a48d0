"""The Flower client: K local steps on the client's own data, then send the trainable tensors.

``AdapterClient`` is a Flower ``NumPyClient``: ``fit(parameters, config)`` loads the global
trainable tensors (FFA-LoRA: B and any ``modules_to_save``; LoRA: A and B and those), runs
``local_steps`` optimizer steps (plain, or DP-SGD with Opacus, see :mod:`.dp`) and returns the new
tensors, the client's example count n_k (the FedAvg weight) and metrics: ``train_loss``,
``epsilon`` (spent so far; DP, last round), and in round 1 ``frozen_digest`` (see :mod:`.params`).

The optimizer is built fresh every round (SGD, the paper's, keeps no state anyway); the DP
accountant and the noise RNG live as long as the client, so ε adds up over rounds. Several
clients may share one model object (the in-process simulation runs them one at a time).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.config import finite_number, whole_number
from ._deps import require
from .dp import DPConfig, PrivateTrainer
from .params import frozen_digest, get_arrays, set_arrays

fl = require("flwr")


@dataclass
class LocalTraining:
    """What a client does in one round.

    Attributes:
        local_steps: optimizer steps per round (K; the paper: 10).
        batch_size: examples per step (expected batch size under DP's Poisson sampling).
        lr: learning rate (the paper's SGD grids: LoRA 0.01-0.1, FFA-LoRA 0.1-1.0).
        optimizer: ``"sgd"`` (paper; the α ↔ lr equivalence of §16 holds for SGD only) or ``"adamw"``.
        momentum, weight_decay: optimizer options.
        bf16: bf16 autocast on CUDA (non-DP only: Opacus's per-sample gradients run in fp32).
    """

    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        # whole numbers and a finite lr, checked before any client trains ("abc" failed on the comparison)
        self.local_steps = whole_number(self.local_steps, "local.local_steps")
        self.batch_size = whole_number(self.batch_size, "local.batch_size")
        for name in ("lr", "momentum", "weight_decay"):
            setattr(self, name, finite_number(getattr(self, name), f"local.{name}"))
        if self.local_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"local_steps, batch_size and lr must be positive, got {self}")


def make_optimizer(params: list[nn.Parameter], cfg: LocalTraining) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out


class AdapterClient(fl.client.NumPyClient):
    """One federated client (see the module docstring).

    Args:
        model: the adapted model (adapter injected; same frozen weights on every client).
        data: this client's rows ``(input_ids, attention_mask, label)``.
        train: local training options.
        dp: DP-SGD options, or ``None`` for plain training.
        num_rounds: rounds the client will train (DP: σ is planned for ``num_rounds · local_steps`` steps).
        seed: data order and DP noise seed of this client.
        device: where to train.
    """

    def __init__(self, model: nn.Module, data: Dataset, train: LocalTraining, dp: DPConfig | None = None,
                 num_rounds: int = 1, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.model, self.data, self.cfg, self.device = model, data, train, torch.device(device)
        self.num_examples = len(data)  # type: ignore[arg-type]
        if self.num_examples == 0:
            raise ValueError("a client needs at least one example")
        self.seed = seed
        self.num_rounds = num_rounds
        self.private: PrivateTrainer | None = None
        g = torch.Generator().manual_seed(seed)
        if dp is None:
            loader = DataLoader(data, batch_size=min(train.batch_size, self.num_examples), shuffle=True, generator=g,
                                drop_last=True)
        else:
            sample_rate = min(1.0, train.batch_size / self.num_examples)
            # Opacus's DPOptimizer divides the clipped, noised gradient sum by the *expected* batch
            # size (loss_reduction="mean"): that is q·n_k = min(batch_size, n_k), not batch_size; a
            # client with n_k < batch_size (q capped at 1) would otherwise step n_k / batch_size short
            self.private = PrivateTrainer(model, dp, sample_rate=sample_rate, total_steps=num_rounds * train.local_steps,
                                          batch_size=min(train.batch_size, self.num_examples), seed=seed)
            dpl = require("opacus.data_loader")
            loader = dpl.DPDataLoader(data, sample_rate=sample_rate, generator=g)
        self.loader = loader
        self._batches = self._cycle()

    def _cycle(self) -> Iterator[Any]:
        while True:
            yield from self.loader

    # ---- Flower NumPyClient ---------------------------------------------------------------------
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_arrays(self.model)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        set_arrays(self.model, parameters)
        server_round = int(config.get("server_round", 1))
        # the frozen model this client starts the round from (before local training touches any buffer)
        digest = frozen_digest(self.model) if server_round == 1 else None
        loss = self.train_round()
        metrics: dict[str, Any] = {"train_loss": loss}
        if self.private is not None:
            metrics["noise_multiplier"] = self.private.noise_multiplier
            if server_round >= self.num_rounds or config.get("report_epsilon"):
                metrics["epsilon"] = self.private.epsilon()  # an accountant query costs ~0.1 s: last round only
        if digest is not None:
            metrics["frozen_digest"] = digest
        return get_arrays(self.model), self.num_examples, metrics

    # ---- local training ---------------------------------------------------------------------------
    def train_round(self) -> float:
        """``local_steps`` optimizer steps; returns the mean training loss of the round."""
        model = self.model
        model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.cfg)
        forward: nn.Module = model
        if self.private is not None:
            opt = self.private.optimizer(opt)
            forward = self.private.module
        amp = self.cfg.bf16 and self.private is None and self.device.type == "cuda"
        losses: list[float] = []
        for _ in range(self.cfg.local_steps):
            ids, mask, y = (t.to(self.device, non_blocking=True) for t in next(self._batches))
            if len(y) == 0:  # Poisson sampling drew no example: the step is still accounted (conservative)
                if self.private is not None:
                    self.private.account()
                continue
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = _logits(forward, ids, mask)
            loss = F.cross_entropy(logits.float(), y)
            with warnings.catch_warnings():
                # Opacus's per-sample-gradient hooks are full backward hooks on modules whose input (token
                # ids) needs no gradient; torch then warns that they fire on outputs only, which is what
                # Opacus reads (grad_output): noise for the user, not a fault
                warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed "
                                        "with respect to module outputs", category=UserWarning)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.private is not None:
                self.private.account()
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate_model(model: nn.Module, data: Dataset, batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, float]:
    """Accuracy, balanced accuracy and mean loss of ``model`` on rows ``(input_ids, attention_mask, label)``."""
    device = torch.device(device)
    model.to(device).eval()
    preds, labels, losses = [], [], []
    for ids, mask, y in DataLoader(data, batch_size=batch_size):
        ids, mask, y = ids.to(device), mask.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = _logits(model, ids, mask).float()
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        preds.append(logits.argmax(-1).cpu())
        labels.append(y.cpu())
    p, t = torch.cat(preds), torch.cat(labels)
    recalls = [float((p[t == c] == c).float().mean()) for c in t.unique()]
    return {"accuracy": float((p == t).float().mean()), "balanced_accuracy": float(np.mean(recalls)),
            "loss": sum(losses) / len(t)}
