"""The server strategy: Flower FedAvg over the exchanged adapter tensors, with a byte meter.

``AdapterFedAvg`` subclasses ``flwr.server.strategy.FedAvg`` and changes three things:

- aggregation in float64: ``θ̄ = Σ_k n_k θ_k / Σ_k n_k`` per tensor, cast back to the input dtype
  (Flower's own ``aggregate`` sums fp32 arrays in fp32). For FFA-LoRA, ``θ = B`` and A0 is shared,
  so ``s·B̄ A0`` is exactly the weighted mean of the clients' ``s·B_k A0`` (METHODS §16,
  invariant 2); for LoRA, averaging A and B separately is not the mean of the products.
- bytes on the wire, measured: every ``FitIns`` the server sends and every ``FitRes`` it gets
  back is serialised with Flower's own protobuf serde (``ServerMessage(fit_ins=...)`` /
  ``ClientMessage(fit_res=...)``, the messages the gRPC transport carries) and its size recorded,
  with the bytes of the ``Parameters.tensors`` inside (NumPy ``.npy`` blobs) counted separately.
  ``round_bytes`` holds one dict per round.
- round 1: every client reports a digest of its frozen tensors; different digests raise, since
  then the clients do not share A0 (or the base model) and FedAvg would mix different models.
- a client whose tensors are not all finite (it diverged) is a failure: a logged warning, a
  :class:`NonFiniteClientError` in ``failures`` and no part in the mean (with ``accept_failures=False``
  the round then keeps the old parameters, as for any failure). Tensor counts and shapes must agree
  across clients (:func:`weighted_mean` raises otherwise).

Centralised evaluation is FedAvg's ``evaluate_fn``; client-side evaluation is off by default.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._deps import require

fl = require("flwr")
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage  # noqa: E402

log = logging.getLogger(__name__)


def parameters_bytes(parameters: Parameters) -> int:
    """Bytes of the serialised tensors in a Flower ``Parameters``."""
    return sum(len(t) for t in parameters.tensors)


def fit_ins_bytes(ins: FitIns) -> int:
    """Size of the protobuf ``ServerMessage`` that carries ``ins`` to a client."""
    return ServerMessage(fit_ins=serde.fit_ins_to_proto(ins)).ByteSize()


def fit_res_bytes(res: FitRes) -> int:
    """Size of the protobuf ``ClientMessage`` that carries ``res`` back to the server."""
    return ClientMessage(fit_res=serde.fit_res_to_proto(res)).ByteSize()


def weighted_mean(arrays: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Per-tensor ``Σ_k w_k a_k / Σ_k w_k`` accumulated in float64, returned in each tensor's dtype.

    Every client must send as many tensors as client 0, each of the same shape (``ValueError``
    otherwise: NumPy would broadcast a ``(1,)`` tensor into a ``(2, 2)`` one)."""
    if len(arrays) != len(weights):
        raise ValueError(f"weighted_mean got {len(arrays)} clients' tensors but {len(weights)} weights")
    if any(not np.isfinite(float(w)) or float(w) < 0 for w in weights):
        raise ValueError(f"weighted_mean needs finite, non-negative weights, got {list(weights)}")
    total = float(sum(weights))
    if not arrays or total <= 0:
        raise ValueError("weighted_mean needs at least one client with a positive weight")
    ref = [np.shape(a) for a in arrays[0]]
    for k, client in enumerate(arrays[1:], start=1):
        if len(client) != len(ref):
            raise ValueError(f"client {k} sent {len(client)} tensors, client 0 sent {len(ref)}: "
                             "method or adapter targets differ")
        for i, (a, shape) in enumerate(zip(client, ref)):
            if np.shape(a) != shape:
                raise ValueError(f"tensor {i}: client {k} sent shape {np.shape(a)}, client 0 sent {shape}: "
                                 "method, rank or adapter targets differ")
    out = []
    for i, first in enumerate(arrays[0]):
        acc = np.zeros(first.shape, dtype=np.float64)
        for a, w in zip(arrays, weights):
            acc += float(w) * a[i].astype(np.float64)
        out.append((acc / total).astype(first.dtype))
    return out


def all_finite(arrays: list[np.ndarray]) -> bool:
    """Whether every floating-point entry of ``arrays`` is finite (no NaN, no ±inf)."""
    return all(np.isfinite(a).all() for a in arrays if np.issubdtype(np.asarray(a).dtype, np.inexact))


class NonFiniteClientError(ValueError):
    """A client returned NaN or infinite tensors (it diverged); recorded in ``AdapterFedAvg.failures``
    instead of being averaged into the global adapter. ``client`` is its Flower ``ClientProxy``
    (``None`` where none was given), ``result`` its ``FitRes``."""

    def __init__(self, message: str, client: Any = None, result: FitRes | None = None) -> None:
        super().__init__(message)
        self.client, self.result = client, result


def _client_name(proxy: Any, index: int) -> str:
    cid = getattr(proxy, "cid", None)
    return f"client {cid!r}" if cid is not None else f"client #{index} of the round's results"


class AdapterFedAvg(fl.server.strategy.FedAvg):
    """FedAvg of the trainable adapter tensors (see the module docstring). Takes FedAvg's keyword
    arguments; ``on_fit_config_fn`` defaults to sending ``{"server_round": r}``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_evaluate_clients", 0)
        kwargs.setdefault("on_fit_config_fn", lambda r: {"server_round": r})
        super().__init__(**kwargs)
        self.round_bytes: list[dict[str, Any]] = []
        self.client_metrics: list[dict[str, Any]] = []
        self.latest: list[np.ndarray] | None = None
        self.last_client_arrays: list[tuple[int, list[np.ndarray]]] = []  # (n_k, tensors) of the last round
        # (round, failure) of every client that raised: FedAvg's accept_failures drops them silently
        self.failures: list[tuple[int, Any]] = []

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[override]
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self.round_bytes.append({
            "round": server_round,
            "clients": len(pairs),
            "down_message_bytes": sum(fit_ins_bytes(ins) for _, ins in pairs),
            "down_tensor_bytes": sum(parameters_bytes(ins.parameters) for _, ins in pairs),
            "up_message_bytes": 0,
            "up_tensor_bytes": 0,
        })
        return pairs

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[override]
        self.failures.extend((server_round, f) for f in failures)
        if not results:
            return None, {}
        if failures and not self.accept_failures:
            return None, {}
        record = next(r for r in self.round_bytes if r["round"] == server_round)
        record["up_message_bytes"] = sum(fit_res_bytes(res) for _, res in results)
        record["up_tensor_bytes"] = sum(parameters_bytes(res.parameters) for _, res in results)
        metrics = [dict(res.metrics or {}) for _, res in results]
        digests = {m["frozen_digest"] for m in metrics if "frozen_digest" in m}
        if len(digests) > 1:
            raise RuntimeError(f"round {server_round}: clients hold different frozen tensors (base model or FFA-LoRA A0); "
                               "build them from the same seeds (a0_seed) before federating")
        arrays = [parameters_to_ndarrays(res.parameters) for _, res in results]
        # a client that diverged (NaN / inf tensors) would make the weighted mean non-finite: it is a
        # failure (recorded, warned about) and left out of the mean, as Flower does with clients that raise
        finite = [all_finite(a) for a in arrays]
        if not all(finite):
            for k, ((proxy, res), ok) in enumerate(zip(results, finite)):
                if ok:
                    continue
                name = _client_name(proxy, k)
                msg = (f"round {server_round}: {name} (n={res.num_examples}) returned non-finite parameters "
                       "(NaN or inf); left out of the aggregate")
                log.warning(msg)
                self.failures.append((server_round, NonFiniteClientError(msg, proxy, res)))
            if not self.accept_failures:
                return None, {}
            results = [r for r, ok in zip(results, finite) if ok]
            metrics = [m for m, ok in zip(metrics, finite) if ok]
            arrays = [a for a, ok in zip(arrays, finite) if ok]
            if not results:
                return None, {}
        weights = [float(res.num_examples) for _, res in results]
        self.latest = weighted_mean(arrays, weights)
        self.last_client_arrays = [(res.num_examples, a) for (_, res), a in zip(results, arrays)]
        for m, (_, res) in zip(metrics, results):
            m.pop("frozen_digest", None)
            self.client_metrics.append({"round": server_round, "num_examples": res.num_examples, **m})
        summary: dict[str, Any] = {}
        losses = [(m["train_loss"], w) for m, w in zip(metrics, weights) if np.isfinite(m.get("train_loss", np.nan))]
        if losses:
            summary["train_loss"] = float(sum(l * w for l, w in losses) / sum(w for _, w in losses))
        eps = [m["epsilon"] for m in metrics if "epsilon" in m]
        if eps:
            summary["max_client_epsilon"] = float(max(eps))
        return ndarrays_to_parameters(self.latest), summary

    def bytes_summary(self) -> dict[str, float]:
        """Mean per-round bytes (all clients together) over the recorded rounds."""
        if not self.round_bytes:
            return {}
        keys = ("down_message_bytes", "down_tensor_bytes", "up_message_bytes", "up_tensor_bytes")
        out = {f"{k}_per_round": float(np.mean([r[k] for r in self.round_bytes])) for k in keys}
        out["message_bytes_per_round"] = out["down_message_bytes_per_round"] + out["up_message_bytes_per_round"]
        return out
