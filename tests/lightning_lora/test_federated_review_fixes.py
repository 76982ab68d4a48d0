"""lightning_lora.federated: fixes from API review 2 (items 2-4).

- a DP-SGD client with fewer examples than ``batch_size`` steps as far as the plain client;
- the round-1 frozen digest ignores BatchNorm running statistics (but not frozen weights);
- a client with non-finite tensors is a failure, not part of the mean; shapes are checked.
"""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from torch import nn
from torch.utils.data import TensorDataset

from lightning_lora import adapter_layers, inject_adapter
from lightning_lora.federated import AdapterFedAvg, DPConfig, LocalTraining, frozen_digest, get_arrays
from lightning_lora.federated.client import AdapterClient
from lightning_lora.federated.strategy import NonFiniteClientError, weighted_mean


class _Tiny(nn.Module):
    """input_ids / attention_mask -> mean embedding -> Linear [-> BatchNorm] -> Tanh -> Linear (2 classes)."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.Tanh(),
                                  nn.Linear(8, 2))

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.body(h)


def _model(method: str = "ffa_lora", bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = _Tiny(bn)
    inject_adapter(m, method, r=2, alpha=2, target_modules=["body.0", "body.3"])
    with torch.no_grad():
        for layer in adapter_layers(m).values():
            layer.lora_B.normal_()
    return m


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 10, (n, 5), generator=g), torch.ones(n, 5, dtype=torch.long),
                         torch.randint(0, 2, (n,), generator=g))


def _fitres(arrays, n, metrics=None, cid=None):
    proxy = SimpleNamespace(cid=cid) if cid is not None else None
    return proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, dict(metrics or {}))


def _strategy(server_round: int, **kw) -> AdapterFedAvg:
    s = AdapterFedAvg(**kw)
    s.round_bytes.append({"round": server_round})
    return s


# ---- item 2: DP client smaller than the batch ------------------------------------------------------
@pytest.mark.parametrize("method", ["ffa_lora", "lora"])
def test_dp_client_smaller_than_batch_size_matches_the_plain_update(method):
    # sigma = 0 and a clipping bound that never binds: DP-SGD is plain SGD on the same batches (q is
    # capped at 1, so every step sees all n = 8 examples); Opacus used to divide by batch_size = 32
    n, bs = 8, 32
    tr = LocalTraining(local_steps=2, batch_size=bs, lr=0.5, bf16=False)
    m0, m1 = _model(method), _model(method)
    p0 = get_arrays(m0)
    plain, n_plain, _ = AdapterClient(m0, _data(n, 1), tr, dp=None).fit(p0, {"server_round": 1})
    dp_client = AdapterClient(m1, _data(n, 1), tr, dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e6))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dp, n_dp, _ = dp_client.fit(p0, {"server_round": 1})
    finally:
        dp_client.private.close()
    assert n_plain == n_dp == n
    # Opacus's hooks on modules whose input needs no gradient: torch's notice is kept from the user
    assert not [w for w in caught if "Full backward hook is firing" in str(w.message)]
    upd_plain = np.concatenate([(a - b).ravel() for a, b in zip(plain, p0)])
    upd_dp = np.concatenate([(a - b).ravel() for a, b in zip(dp, p0)])
    assert np.linalg.norm(upd_plain) > 1e-3  # the clients did move
    ratio = np.linalg.norm(upd_dp) / np.linalg.norm(upd_plain)
    assert ratio == pytest.approx(1.0, abs=1e-4), f"DP update is {ratio:.4f}x the plain one (was n/batch_size = 0.25)"
    np.testing.assert_allclose(upd_dp, upd_plain, rtol=1e-4, atol=1e-6)


# ---- item 3: frozen digest and BatchNorm running statistics -------------------------------------------
def test_frozen_digest_ignores_running_stats_but_sees_frozen_weights():
    a, b = _model(bn=True), _model(bn=True)
    assert frozen_digest(a) == frozen_digest(b)
    b.train()
    with torch.no_grad():
        b(*_data(16, 5).tensors[:2])  # a train-mode forward updates BatchNorm's running statistics
    assert not torch.equal(a.body[1].running_mean, b.body[1].running_mean)
    assert int(b.body[1].num_batches_tracked) == 1
    assert frozen_digest(a) == frozen_digest(b)
    # a genuinely different frozen tensor is still seen: base weight, BatchNorm's frozen affine, FFA-LoRA's A0
    for tensor in (lambda m: m.body[0].base_layer.weight,
                   lambda m: m.body[1].weight,
                   lambda m: m.body[0].lora_A):
        c = _model(bn=True)
        assert frozen_digest(c) == frozen_digest(a)
        with torch.no_grad():
            tensor(c).view(-1)[0] += 1e-3
        assert frozen_digest(c) != frozen_digest(a)


def test_batchnorm_clients_from_the_same_seeds_aggregate_after_local_training():
    tr = LocalTraining(local_steps=2, batch_size=4, bf16=False)
    ma, mb = _model(bn=True), _model(bn=True)  # two processes, same seeds
    p = get_arrays(ma)
    ra = AdapterClient(ma, _data(16, 2), tr).fit(p, {"server_round": 1})
    rb = AdapterClient(mb, _data(16, 3), tr).fit(p, {"server_round": 1})
    assert not torch.equal(ma.body[1].running_mean, mb.body[1].running_mean)
    assert ra[2]["frozen_digest"] == rb[2]["frozen_digest"]
    params, _ = _strategy(1).aggregate_fit(1, [_fitres(*ra), _fitres(*rb)], [])
    assert params is not None
    # a client with a different frozen base weight is still refused
    mc = _model(bn=True)
    with torch.no_grad():
        mc.body[3].base_layer.weight.add_(0.01)
    rc = AdapterClient(mc, _data(16, 4), tr).fit(p, {"server_round": 1})
    assert rc[2]["frozen_digest"] != ra[2]["frozen_digest"]
    with pytest.raises(RuntimeError, match="different frozen tensors"):
        _strategy(1).aggregate_fit(1, [_fitres(*ra), _fitres(*rc)], [])


# ---- item 4: non-finite clients and shape checks ------------------------------------------------------
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_client_is_a_failure_and_left_out_of_the_mean(bad_value, caplog):
    good = [np.ones((2, 2), np.float32), np.full(3, 2.0, np.float32)]
    good2 = [np.full((2, 2), 3.0, np.float32), np.zeros(3, np.float32)]
    bad = [np.ones((2, 2), np.float32), np.array([0.0, bad_value, 1.0], np.float32)]
    s = _strategy(3)
    with caplog.at_level(logging.WARNING):
        params, metrics = s.aggregate_fit(3, [_fitres(good, 1000, {"train_loss": 0.3}, cid="a"),
                                              _fitres(bad, 1, {"train_loss": float("nan")}, cid="diverged-7"),
                                              _fitres(good2, 1000, {"train_loss": 0.5}, cid="b")], [])
    out = parameters_to_ndarrays(params)
    assert all(np.isfinite(a).all() for a in out)
    np.testing.assert_allclose(out[0], np.full((2, 2), 2.0))
    np.testing.assert_allclose(out[1], np.full(3, 1.0))
    assert metrics["train_loss"] == pytest.approx(0.4)
    assert len(s.failures) == 1
    r, err = s.failures[0]
    assert r == 3 and isinstance(err, NonFiniteClientError) and "diverged-7" in str(err)
    assert err.client.cid == "diverged-7" and err.result.num_examples == 1
    assert [m["num_examples"] for m in s.client_metrics] == [1000, 1000]
    assert [n for n, _ in s.last_client_arrays] == [1000, 1000]
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert any("diverged-7" in rec.getMessage() and "non-finite" in rec.getMessage() for rec in warnings)


def test_non_finite_clients_without_accept_failures_or_alone_give_no_update():
    good, bad = [np.ones((2, 2), np.float32)], [np.full((2, 2), np.nan, np.float32)]
    s = _strategy(2, accept_failures=False)
    assert s.aggregate_fit(2, [_fitres(good, 10), _fitres(bad, 10)], []) == (None, {})
    assert len(s.failures) == 1 and isinstance(s.failures[0][1], NonFiniteClientError)
    assert "#1" in str(s.failures[0][1])  # no proxy: named by its position
    s = _strategy(2)
    assert s.aggregate_fit(2, [_fitres(bad, 10, cid="x")], []) == (None, {})
    assert s.latest is None and len(s.failures) == 1


def test_weighted_mean_checks_tensor_count_and_shapes():
    two = [np.ones((2, 2), np.float32)]
    with pytest.raises(ValueError, match=r"shape \(1,\).*\(2, 2\)"):
        weighted_mean([two, [np.full(1, 5, np.float32)]], [1, 1])  # used to broadcast to 3.0 everywhere
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([two, [np.ones((2, 2, 1), np.float32)]], [1, 1])
    with pytest.raises(ValueError, match="2 tensors, client 0 sent 1"):
        weighted_mean([two, two + [np.ones(3, np.float32)]], [1, 1])  # extra tensors used to be ignored
    with pytest.raises(ValueError, match="1 tensors, client 0 sent 2"):
        weighted_mean([two + [np.ones(3, np.float32)], two], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([two, two], [1])
    np.testing.assert_allclose(weighted_mean([two, [np.full((2, 2), 4.0, np.float32)]], [3, 1])[0], np.full((2, 2), 1.75))
    s = _strategy(3)
    with pytest.raises(ValueError, match="shape"):
        s.aggregate_fit(3, [_fitres(two, 1), _fitres([np.full(1, 5, np.float32)], 1)], [])
