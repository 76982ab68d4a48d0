"""Run a federation: in one process (simulation) or as a real server and real clients.

Simulation uses Flower's own round loop (``flwr.server.Server``: client sampling, ``configure_fit``,
``fit_round``, ``aggregate_fit``, centralised evaluation, ``History``) with every client attached
through :class:`InProcessClientProxy`, the in-process counterpart of Flower's ``GrpcClientProxy``:
each ``FitIns`` / ``FitRes`` is serialised to the protobuf bytes the gRPC transport would carry and
parsed back, so a simulated client sees exactly what a remote one receives. (Flower 1.x's own
simulation engine, ``flwr.simulation.run_simulation``, runs only on Ray: a large extra dependency
that starts a cluster of worker processes; this loop needs neither and runs clients one at a time,
so they can share one model on one GPU.)

Real processes use Flower's gRPC transport: :func:`serve` (``flwr.server.start_server``) and
:func:`connect` (``flwr.client.start_client``); every process builds the task, the split and the
model from the same config and seeds. Flower marks these two functions deprecated in favour of
its SuperLink / SuperNode deployment (which needs a packaged Flower App); they work in flwr 1.42.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.inject import inject_adapter
from ..core.config import finite_number, whole_number
from ._deps import require
from .client import AdapterClient, LocalTraining, evaluate_model
from .data import FederatedTask, build_task
from .dp import DPConfig
from .params import exchanged_names, get_arrays, set_arrays
from .strategy import AdapterFedAvg

fl = require("flwr")
from flwr.common import (  # noqa: E402
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
    Status,
    ndarrays_to_parameters,
    serde,
)
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402

METHODS = ("ffa_lora", "lora")


@dataclass
class FederationConfig:
    """One federated run.

    Attributes:
        task: ``sst2`` | ``lncrna`` | ``tiny``; ``task_options`` go to its builder (``max_train`` ...).
        method: ``ffa_lora`` (only B trains and travels) or ``lora`` (A and B).
        adapter: adapter options (``r``, ``alpha``, ``target_modules``, ``modules_to_save``, ...);
            unset targets take the task's defaults. FFA-LoRA gets ``a0_seed = seed`` unless given,
            so every process draws the same A0.
        num_clients, dirichlet_alpha, split_seed, min_client_size: the non-IID split.
        num_rounds, local: rounds and each client's local training per round.
        dp: DP-SGD options, or None.
        eval_every: score the global model every this many rounds (0: only after the last).
        seed: model (head, LoRA A) and client data-order seed.
    """

    task: str = "tiny"
    task_options: dict[str, Any] = field(default_factory=dict)
    method: str = "ffa_lora"
    adapter: dict[str, Any] = field(default_factory=lambda: {"r": 8})
    num_clients: int = 8
    dirichlet_alpha: float = 0.5
    split_seed: int = 0
    min_client_size: int = 8
    num_rounds: int = 10
    local: LocalTraining = field(default_factory=LocalTraining)
    dp: DPConfig | None = None
    eval_every: int = 0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"federated method must be one of {METHODS}, got {self.method!r}")
        # every option is checked here, before the task, model and split are built: a float or a
        # string failed deep in range() or a comparison, a negative eval_every evaluated every round,
        # and a bad min_client_size / dirichlet_alpha surfaced only once the model had been built
        # (min_client_size < 1 even ran all rounds with failing clients before raising)
        for name in ("num_clients", "num_rounds", "eval_every", "min_client_size", "split_seed", "seed"):
            setattr(self, name, whole_number(getattr(self, name), name))
        if self.num_rounds < 1 or self.num_clients < 1:
            raise ValueError(f"num_rounds and num_clients must be >= 1, got {self.num_rounds}, {self.num_clients}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only after the last round), got {self.eval_every}")
        if self.min_client_size < 1:
            raise ValueError(f"min_client_size must be >= 1 (a client needs an example), got {self.min_client_size}")
        self.dirichlet_alpha = finite_number(self.dirichlet_alpha, "dirichlet_alpha")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha!r}")
        # a device torch cannot name, or CUDA on a machine without it, failed deep inside model.to()
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available here; use device=cpu")
        if isinstance(self.local, dict):
            self.local = LocalTraining(**self.local)
        if isinstance(self.dp, dict):
            self.dp = DPConfig(**self.dp)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(task: FederatedTask, cfg: FederationConfig) -> nn.Module:
    """The task's base model with the adapter injected; identical in every process for one config."""
    model = task.make_model()
    options = dict(cfg.adapter)
    if options.get("target_modules") is None:
        options["target_modules"] = task.target_modules
    if options.get("modules_to_save") is None:
        options["modules_to_save"] = task.modules_to_save
    if cfg.method == "ffa_lora":
        options.setdefault("a0_seed", cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # LoRA's A init: the same in every process
        inject_adapter(model, cfg.method, **options)
    return model.to(cfg.device)


def make_task(cfg: FederationConfig) -> FederatedTask:
    return build_task(cfg.task, seed=cfg.seed, **cfg.task_options)


def make_client(task: FederatedTask, cfg: FederationConfig, model: nn.Module, partition_id: int) -> AdapterClient:
    """Client ``partition_id`` of the config's non-IID split."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition_id must be in [0, {cfg.num_clients}), got {partition_id}")
    parts = task.client_sets(cfg.num_clients, cfg.dirichlet_alpha, seed=cfg.split_seed, min_size=cfg.min_client_size)
    return AdapterClient(model, parts[partition_id], cfg.local, dp=cfg.dp, num_rounds=cfg.num_rounds,
                         seed=cfg.seed * 1000 + partition_id, device=cfg.device)


def make_strategy(task: FederatedTask, cfg: FederationConfig, model: nn.Module, num_clients: int,
                  evals: list[dict[str, Any]]) -> AdapterFedAvg:
    """FedAvg over all ``num_clients`` every round, centralised evaluation into ``evals``."""
    last = cfg.num_rounds

    def evaluate_fn(server_round: int, arrays: list[np.ndarray], config: dict[str, Any]):
        due = server_round == last or (cfg.eval_every and server_round % cfg.eval_every == 0)
        if server_round == 0 or not due:
            return None
        set_arrays(model, arrays)
        scores = evaluate_model(model, task.eval, device=cfg.device)
        evals.append({"round": server_round, **scores})
        return scores["loss"], scores

    return AdapterFedAvg(
        fraction_fit=1.0, min_fit_clients=num_clients, min_available_clients=num_clients,
        initial_parameters=ndarrays_to_parameters(get_arrays(model)), evaluate_fn=evaluate_fn,
    )


class InProcessClientProxy(ClientProxy):
    """A Flower ``ClientProxy`` that runs the client in this process; messages travel as protobuf
    bytes (see the module docstring). ``client_fn()`` builds the client on first use."""

    def __init__(self, cid: str, client_fn: Callable[[], Any]) -> None:
        super().__init__(cid)
        self._client_fn = client_fn
        self._client: Any = None

    def _get(self):
        if self._client is None:
            c = self._client_fn()
            self._client = c.to_client() if hasattr(c, "to_client") else c
        return self._client

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        wire = ServerMessage(fit_ins=serde.fit_ins_to_proto(ins)).SerializeToString()
        ins = serde.fit_ins_from_proto(ServerMessage.FromString(wire).fit_ins)
        res = self._get().fit(ins)
        wire = ClientMessage(fit_res=serde.fit_res_to_proto(res)).SerializeToString()
        return serde.fit_res_from_proto(ClientMessage.FromString(wire).fit_res)

    def get_parameters(self, ins: GetParametersIns, timeout: float | None, group_id: int | None) -> GetParametersRes:
        return self._get().get_parameters(ins)

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None) -> GetPropertiesRes:
        return GetPropertiesRes(status=Status(Code.OK, ""), properties={})

    def evaluate(self, ins: EvaluateIns, timeout: float | None, group_id: int | None) -> EvaluateRes:
        return self._get().evaluate(ins)

    def reconnect(self, ins: ReconnectIns, timeout: float | None, group_id: int | None) -> DisconnectRes:
        return DisconnectRes(reason="")


def _report(cfg: FederationConfig, strategy: AdapterFedAvg, evals: list[dict[str, Any]], model: nn.Module,
            seconds: float, history: Any = None) -> dict[str, Any]:
    names = exchanged_names(model)
    out: dict[str, Any] = {
        "method": cfg.method, "task": cfg.task, "num_clients": cfg.num_clients, "num_rounds": cfg.num_rounds,
        "dp": cfg.dp is not None, "seed": cfg.seed, "seconds": seconds,
        "exchanged_tensors": len(names),
        "exchanged_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        **strategy.bytes_summary(),
        "round_bytes": strategy.round_bytes,
        "evals": evals,
    }
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k != "round"})
    eps = [m["epsilon"] for m in strategy.client_metrics if "epsilon" in m]
    if eps:
        out["max_client_epsilon"] = float(max(eps))
    out.update(noise_multiplier_summary(strategy.client_metrics))
    return out


def noise_multiplier_summary(client_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Every client's DP noise multiplier σ from the last round's fit metrics, ordered by client size.

    σ is per client: each one spends ε over its own ``rounds · local_steps`` steps at its own sample
    rate ``q = batch_size / n_k``, so a small client gets a larger σ (same ε, δ). There is no single
    σ of a run; the result holds ``noise_multipliers`` (one per client, increasing ``n_k``, with
    ``noise_multiplier_client_sizes`` alongside), their min and max, and ``noise_multiplier``: the
    σ of the largest client. (It used to be the σ of whichever client reported last, and Flower
    samples clients in random order, so two runs with identical privacy reported different σ.)
    Empty without DP.
    """
    rows = [m for m in client_metrics if "noise_multiplier" in m]
    if not rows:
        return {}
    last = max(m.get("round", 0) for m in rows)
    pairs = sorted((int(m.get("num_examples", 0)), float(m["noise_multiplier"])) for m in rows if m.get("round", 0) == last)
    sigmas = [s for _, s in pairs]
    return {"noise_multipliers": sigmas, "noise_multiplier_client_sizes": [n for n, _ in pairs],
            "noise_multiplier_min": min(sigmas), "noise_multiplier_max": max(sigmas), "noise_multiplier": sigmas[-1]}


def run_simulation(cfg: FederationConfig, task: FederatedTask | None = None) -> dict[str, Any]:
    """``cfg.num_clients`` clients in this process, Flower's round loop; returns the run's metrics
    (final ``accuracy``, bytes per round, ε, per-round records)."""
    task = task or make_task(cfg)
    model = build_model(task, cfg)
    evals: list[dict[str, Any]] = []
    strategy = make_strategy(task, cfg, model, cfg.num_clients, evals)
    parts = task.client_sets(cfg.num_clients, cfg.dirichlet_alpha, seed=cfg.split_seed, min_size=cfg.min_client_size)
    manager = fl.server.SimpleClientManager()
    clients: list[AdapterClient] = []

    def client_fn(k: int) -> Callable[[], AdapterClient]:
        def make() -> AdapterClient:
            c = AdapterClient(model, parts[k], cfg.local, dp=cfg.dp, num_rounds=cfg.num_rounds,
                              seed=cfg.seed * 1000 + k, device=cfg.device)
            clients.append(c)
            return c
        return make

    for k in range(cfg.num_clients):
        manager.register(InProcessClientProxy(str(k), client_fn(k)))
    server = fl.server.Server(client_manager=manager, strategy=strategy)
    server.set_max_workers(1)  # one client at a time: they share the model
    start = time.perf_counter()
    history, _ = server.fit(num_rounds=cfg.num_rounds, timeout=None)
    seconds = time.perf_counter() - start
    if strategy.failures:  # in one process a failed client is a bug, not a dropped connection
        r, f = strategy.failures[0]
        err = f[1].status.message if isinstance(f, tuple) else repr(f)
        raise RuntimeError(f"{len(strategy.failures)} client fit(s) failed (FedAvg would have dropped them); "
                           f"first, round {r}: {err}")
    if strategy.latest is not None:
        set_arrays(model, strategy.latest)
    for c in clients:
        if c.private is not None:
            c.private.close()
            break  # one GradSampleModule per shared model
    out = _report(cfg, strategy, evals, model, seconds, history)
    out["client_sizes"] = [len(p) for p in parts]
    out["model"] = model
    out["strategy"] = strategy
    return out


def serve(cfg: FederationConfig, address: str = "127.0.0.1:8080") -> dict[str, Any]:
    """A real Flower server on ``address`` for ``cfg.num_clients`` clients; blocks until the last round."""
    task = make_task(cfg)
    model = build_model(task, cfg)
    evals: list[dict[str, Any]] = []
    strategy = make_strategy(task, cfg, model, cfg.num_clients, evals)
    start = time.perf_counter()
    fl.server.start_server(server_address=address, config=fl.server.ServerConfig(num_rounds=cfg.num_rounds),
                           strategy=strategy)
    return _report(cfg, strategy, evals, model, time.perf_counter() - start)


def connect(cfg: FederationConfig, partition_id: int, address: str = "127.0.0.1:8080") -> None:
    """A real Flower client holding partition ``partition_id``; returns when the server ends the run."""
    task = make_task(cfg)
    model = build_model(task, cfg)
    client = make_client(task, cfg, model, partition_id)
    fl.client.start_client(server_address=address, client=client.to_client())
