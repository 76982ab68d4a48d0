"""lightning_lora.federated: FFA-LoRA / LoRA on Flower with Opacus DP-SGD (METHODS.md §16)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import adapter_layers, inject_adapter
from lightning_lora.federated import (
    AdapterFedAvg,
    DPConfig,
    FederatedDependencyMissing,
    FederationConfig,
    LocalTraining,
    PrivateTrainer,
    dirichlet_split,
    exchanged_names,
    frozen_digest,
    get_arrays,
    register_grad_samplers,
    run_simulation,
    set_arrays,
)
from lightning_lora.federated._deps import require

ROOT = Path(__file__).resolve().parents[2]


def _mlp(method: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    inject_adapter(m, method, r=2, alpha=4.0, target_modules=["0", "2"], **kw)  # scaling 2: exercises s
    with torch.no_grad():
        for layer in adapter_layers(m).values():
            layer.lora_B.normal_()
    return m


# ---- non-IID split -----------------------------------------------------------------------------
def test_dirichlet_split_partitions_seeded_and_skewed():
    y = np.repeat([0, 1, 2, 3], 250)
    parts = dirichlet_split(y, 8, alpha=0.1, seed=3, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))  # disjoint and complete
    assert all(len(p) >= 5 for p in parts)
    again = dirichlet_split(y, 8, alpha=0.1, seed=3, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_split(y, 8, alpha=0.1, seed=4, min_size=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))

    def skew(ps):  # mean total-variation distance of client label histograms from the global one
        return np.mean([0.5 * np.abs(np.bincount(y[p], minlength=4) / len(p) - 0.25).sum() for p in ps])

    assert skew(parts) > 0.4 > 0.1 > skew(dirichlet_split(y, 8, alpha=1000.0, seed=3))
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(y, 8, alpha=0.0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split(y[:10], 8, alpha=1.0, min_size=2)


# ---- what travels ------------------------------------------------------------------------------
def test_only_trainable_adapter_tensors_travel():
    ffa, lora = _mlp("ffa_lora"), _mlp("lora")
    assert exchanged_names(ffa) == ["0.lora_B", "2.lora_B"]
    assert exchanged_names(lora) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    inject_adapter(m, "ffa_lora", r=2, target_modules=["0"], modules_to_save=["2"])
    assert exchanged_names(m) == ["0.lora_B", "2.weight", "2.bias"]
    arrays = [a + 1 for a in get_arrays(ffa)]
    set_arrays(ffa, arrays)
    assert all(np.array_equal(a, b) for a, b in zip(get_arrays(ffa), arrays))
    with pytest.raises(ValueError, match="2 trainable tensors"):
        set_arrays(ffa, arrays[:1])
    with pytest.raises(ValueError, match="shape"):
        set_arrays(ffa, [arrays[1], arrays[0]])


def test_frozen_digest_sees_a0_and_base_not_b():
    a, b = _mlp("ffa_lora", a0_seed=1), _mlp("ffa_lora", a0_seed=1)
    assert frozen_digest(a) == frozen_digest(b)
    with torch.no_grad():
        b[0].lora_B.add_(1.0)  # trainable: not part of the digest
    assert frozen_digest(a) == frozen_digest(b)
    assert frozen_digest(a) != frozen_digest(_mlp("ffa_lora", a0_seed=2))  # another A0


# ---- Opacus per-sample gradients ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ffa_lora"])
def test_opacus_per_sample_grads_match_autograd(method):
    from opacus.grad_sample import GradSampleModule

    register_grad_samplers()
    model = _mlp(method)
    ref_model = copy.deepcopy(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    torch.manual_seed(1)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))  # (batch, tokens, features)
    F.cross_entropy(gsm(x).mean(1), y).backward()
    trained = [n for n, p in ref_model.named_parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ref_p = dict(ref_model.named_parameters())[name]
        ref = torch.stack([torch.autograd.grad(F.cross_entropy(ref_model(x[i:i + 1]).mean(1), y[i:i + 1]), ref_p)[0]
                           for i in range(5)])
        torch.testing.assert_close(p.grad_sample, ref, rtol=1e-5, atol=1e-6)
    if method == "ffa_lora":
        assert trained == ["0.lora_B", "2.lora_B"]
        assert all(not hasattr(l.lora_A, "grad_sample") and l.lora_A.grad is None for l in adapter_layers(model).values())
    gsm.remove_hooks()


def test_dp_step_clips_and_noises_b_only_and_never_touches_a0():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    inject_adapter(model, "ffa_lora", r=8, target_modules=["0"])
    a0 = model[0].lora_A.clone()
    C, sigma, batch = 0.5, 2.0, 16
    dp = PrivateTrainer(model, DPConfig(max_grad_norm=C, noise_multiplier=sigma), sample_rate=0.1, total_steps=1,
                        batch_size=batch, seed=0)
    dp0 = PrivateTrainer(model, DPConfig(max_grad_norm=C, noise_multiplier=0.0), 0.1, 1, batch)
    assert dp0.module is dp.module  # one set of Opacus hooks per model
    # 1) no noise: the step direction is the mean of per-sample gradients clipped to norm <= C
    opt = dp0.optimizer(torch.optim.SGD([model[0].lora_B], lr=1.0))
    x = 10 * torch.randn(batch, 64)
    with torch.no_grad():
        model[0].lora_B.normal_()
    b_before = model[0].lora_B.detach().clone()
    dp.module(x).pow(2).sum(1).mean().backward()
    per_sample = model[0].lora_B.grad_sample.clone()
    norms = per_sample.flatten(1).norm(dim=1)
    assert (norms > C).all()  # large inputs: every example is clipped
    opt.step()
    clipped = per_sample * (C / (norms + 1e-6)).view(-1, 1, 1)
    torch.testing.assert_close(b_before - model[0].lora_B.detach(), clipped.sum(0) / batch, rtol=1e-4, atol=1e-6)
    opt.zero_grad(set_to_none=True)
    # 2) zero per-sample gradients: the update is pure noise of std sigma*C/batch on B
    opt = dp.optimizer(torch.optim.SGD([model[0].lora_B], lr=1.0))
    b_before = model[0].lora_B.detach().clone()
    (0.0 * dp.module(x).sum()).backward()
    opt.step()
    noise = (model[0].lora_B.detach() - b_before).flatten()
    assert abs(float(noise.std()) / (sigma * C / batch) - 1) < 0.1  # 512 draws
    assert torch.equal(model[0].lora_A, a0) and model[0].lora_A.grad is None
    dp.close()


def test_accountant_spends_at_most_target_epsilon():
    model = _mlp("ffa_lora")
    dp = PrivateTrainer(model, DPConfig(epsilon=3.0, delta=1e-5), sample_rate=0.05, total_steps=40, batch_size=8)
    assert dp.epsilon() == 0.0
    for _ in range(40):
        dp.account()
    eps = dp.epsilon()
    assert 2.8 < eps <= 3.0  # σ from Opacus's search spends the budget, not more
    dp.close()


def test_dp_rejects_what_it_cannot_sample():
    with pytest.raises(ValueError, match="dropout"):
        PrivateTrainer(_mlp("lora", dropout=0.1), DPConfig(noise_multiplier=1.0), 0.1, 1, 8)
    with pytest.raises(ValueError, match="DoRA"):
        PrivateTrainer(_mlp("lora", use_dora=True), DPConfig(noise_multiplier=1.0), 0.1, 1, 8)
    with pytest.raises(ValueError, match="accountant"):
        DPConfig(accountant="moments")
    with pytest.raises(ValueError, match="epsilon"):
        DPConfig(epsilon=0)


# ---- aggregation: exact for FFA-LoRA, not for LoRA -------------------------------------------------
def _one_round(method: str, **kw):
    cfg = FederationConfig(task="tiny", method=method, num_clients=3, num_rounds=1, dirichlet_alpha=0.5,
                           local=LocalTraining(local_steps=3, batch_size=8, lr=0.5), adapter={"r": 4}, **kw)
    return run_simulation(cfg)


def _delta_ws(model, arrays, names):
    """{layer: s·B A} (float64) with the trainable tensors set to ``arrays``."""
    d = dict(zip(names, arrays))
    out = {}
    for lname, layer in adapter_layers(model).items():
        B = torch.from_numpy(d[f"{lname}.lora_B"]).double()
        A = torch.from_numpy(d[f"{lname}.lora_A"]).double() if f"{lname}.lora_A" in d else layer.lora_A.double()
        out[lname] = layer.scaling * B @ A
    return out


def test_ffa_aggregated_update_is_exactly_the_mean_of_client_updates():
    out = _one_round("ffa_lora")
    model, strategy = out["model"], out["strategy"]
    names = exchanged_names(model)
    clients = strategy.last_client_arrays
    w = np.array([n for n, _ in clients], dtype=np.float64)
    assert len(clients) == 3 and len(set(w)) > 1  # non-IID: unequal client sizes weight the mean
    glob = _delta_ws(model, get_arrays(model), names)
    per_client = [_delta_ws(model, a, names) for _, a in clients]
    for lname, dw in glob.items():
        mean = sum(wk * c[lname] for wk, c in zip(w, per_client)) / w.sum()
        assert float(mean.abs().max()) > 0  # the clients did move
        # aggregated in fp64 and returned in fp32: equal up to the fp32 rounding of B̄
        torch.testing.assert_close(dw, mean, rtol=1e-6, atol=1e-9)


def test_lora_separate_averaging_is_not_the_mean_of_products():
    out = _one_round("lora")
    model, strategy = out["model"], out["strategy"]
    names = exchanged_names(model)
    clients = strategy.last_client_arrays
    w = np.array([n for n, _ in clients], dtype=np.float64)
    glob = _delta_ws(model, get_arrays(model), names)  # s·(mean B)(mean A)
    per_client = [_delta_ws(model, a, names) for _, a in clients]
    d = [dict(zip(names, a)) for _, a in clients]
    gaps = []
    for lname, layer in adapter_layers(model).items():
        mean = sum(wk * c[lname] for wk, c in zip(w, per_client)) / w.sum()
        gap = glob[lname] - mean
        gaps.append(float(gap.norm() / mean.norm()))
        # the gap is exactly the cross term -s·Σ_k w_k (B_k - B̄)(A_k - Ā) / Σ_k w_k
        Bs = [torch.from_numpy(c[f"{lname}.lora_B"]).double() for c in d]
        As = [torch.from_numpy(c[f"{lname}.lora_A"]).double() for c in d]
        Bm, Am = (sum(wk * t for wk, t in zip(w, ts)) / w.sum() for ts in (Bs, As))
        cross = sum(wk * (b - Bm) @ (a - Am) for wk, b, a in zip(w, Bs, As)) / w.sum()
        torch.testing.assert_close(gap, -layer.scaling * cross, rtol=1e-4, atol=1e-9)
    assert max(gaps) > 1e-5  # far above fp32 rounding (~1e-7): separate averaging is not the mean update


def test_bytes_on_the_wire_ffa_half_of_lora():
    ffa, lora = _one_round("ffa_lora"), _one_round("lora")
    for out in (ffa, lora):
        per_client = out["down_tensor_bytes_per_round"] / out["num_clients"]
        payload = 4 * out["exchanged_params"]  # fp32
        assert payload < per_client <= payload + 160 * out["exchanged_tensors"]  # + .npy headers
        assert out["down_message_bytes_per_round"] > out["down_tensor_bytes_per_round"]
        assert out["up_message_bytes_per_round"] > out["up_tensor_bytes_per_round"]
    # tiny BERT: every adapted layer is square (32x32) or 32x64 / 64x32 -> B is half of A+B
    assert ffa["down_tensor_bytes_per_round"] / lora["down_tensor_bytes_per_round"] == 0.5
    assert ffa["up_tensor_bytes_per_round"] / lora["up_tensor_bytes_per_round"] == 0.5
    # whole messages: + status, config, metrics (a few hundred bytes; tiny payloads here)
    assert 0.5 < ffa["message_bytes_per_round"] / lora["message_bytes_per_round"] < 0.51
    assert ffa["exchanged_params"] * 2 == lora["exchanged_params"]


def test_dp_simulation_reports_epsilon_within_target():
    # GDP (a CLT approximation) finds no sigma for eps 6 at q = 8/52 over 3 steps; eps 1 works for all clients
    out = _one_round("ffa_lora", dp=DPConfig(epsilon=1.0, delta=1e-3, noise_multiplier=None, accountant="gdp"))
    assert 0 < out["max_client_epsilon"] <= 1.0 + 1e-6
    assert out["noise_multiplier"] > 0
    assert len(out["noise_multipliers"]) == out["num_clients"]


def test_simulation_raises_when_a_client_fails():
    # FedAvg (accept_failures) used to drop such clients silently: this very config ran with 1 of 3 clients
    with pytest.raises(RuntimeError, match="2 client fit"):
        _one_round("ffa_lora", dp=DPConfig(epsilon=6.0, delta=1e-3, accountant="gdp"))


def test_dp_noise_multiplier_reported_per_client_by_size_not_by_arrival_order():
    # sigma is per client (q = batch / n_k); the run used to report whichever client came back
    # last, in Flower's random sampling order, so FFA-LoRA and LoRA with the same privacy showed
    # different sigma (SST-2: 0.583 vs 0.469 = clients of 3,202 and 12,981 examples)
    from lightning_lora.federated.dp import noise_multiplier_for
    from lightning_lora.federated.simulation import noise_multiplier_summary

    dp = DPConfig(epsilon=6.0, delta=1e-3)  # RDP: Opacus's GDP search fails for the small clients at 3 steps
    outs = {m: _one_round(m, dp=dp) for m in ("ffa_lora", "lora")}
    sizes = sorted(outs["lora"]["client_sizes"])
    assert all(len(out["strategy"].client_metrics) == len(sizes) for out in outs.values())  # no client failed
    expected = [noise_multiplier_for(dp, min(1.0, 8 / n), 3) for n in sizes]
    for out in outs.values():
        assert out["noise_multiplier_client_sizes"] == sizes
        assert out["noise_multipliers"] == pytest.approx(expected)
        assert out["noise_multiplier"] == pytest.approx(expected[-1])  # the largest client's
        assert out["noise_multiplier_min"] <= out["noise_multiplier"] <= out["noise_multiplier_max"]
    assert len(set(expected)) > 1  # the clients differ in size, hence in sigma
    rows = [{"round": 2, "num_examples": n, "noise_multiplier": s} for n, s in [(50, 1.0), (500, 0.5), (90, 0.8)]]
    rows.append({"round": 1, "num_examples": 9999, "noise_multiplier": 0.1})  # an earlier round: ignored
    for order in (rows, rows[::-1]):
        got = noise_multiplier_summary(order)
        assert got["noise_multipliers"] == [1.0, 0.8, 0.5] and got["noise_multiplier"] == 0.5
    assert noise_multiplier_summary([{"round": 1, "train_loss": 0.3}]) == {}


def test_frozen_mismatch_between_clients_raises():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    a, b = _mlp("ffa_lora", a0_seed=1), _mlp("ffa_lora", a0_seed=2)
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(get_arrays(m)), 10,
                             {"frozen_digest": frozen_digest(m), "train_loss": 0.1})) for m in (a, b)]
    strategy = AdapterFedAvg()
    strategy.round_bytes.append({"round": 1})
    with pytest.raises(RuntimeError, match="different frozen tensors"):
        strategy.aggregate_fit(1, results, [])


def test_missing_dependency_names_the_pip_command():
    with pytest.raises(FederatedDependencyMissing, match=r"pip install 'lightning-lora\[federated\]'"):
        require("flwr_not_installed_here")


def test_cli_simulate_writes_metrics(tmp_path):
    from lightning_lora.federated.__main__ import main

    assert main([]) == 2 and main(["bogus"]) == 2
    out = tmp_path / "m.json"
    assert main(["simulate", "num_clients=2", "num_rounds=1", "local.local_steps=1", "adapter.r=2",
                 f"hydra.run.dir={tmp_path}", f"output={out}", "device=cpu"]) == 0
    m = json.loads(out.read_text())
    assert m["num_clients"] == 2 and m["method"] == "ffa_lora" and 0 <= m["accuracy"] <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_server_and_two_client_processes(tmp_path):
    """A Flower server and 2 clients as separate processes over gRPC on localhost, 1 round."""
    addr = f"127.0.0.1:{_free_port()}"
    common = ["num_clients=2", "num_rounds=1", "local.local_steps=1", "adapter.r=2", "device=cpu", f"address={addr}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lightning_lora.federated"]
    out = tmp_path / "server.json"
    server = subprocess.Popen([*cmd, "server", *common, f"output={out}", f"hydra.run.dir={tmp_path}/s"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    clients = [subprocess.Popen([*cmd, "client", *common, f"partition_id={k}", f"hydra.run.dir={tmp_path}/c{k}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT) for k in (0, 1)]
    try:
        assert server.wait(timeout=600) == 0, server.stderr.read().decode()[-2000:]
        assert all(c.wait(timeout=60) == 0 for c in clients)
    finally:
        for p in (server, *clients):
            if p.poll() is None:
                p.kill()
    m = json.loads(out.read_text())
    assert m["round_bytes"][0]["clients"] == 2 and m["up_tensor_bytes_per_round"] > 0
    assert 0 <= m["accuracy"] <= 1


def test_seeded_head_draws_the_classifier_from_the_seed_and_keeps_the_pooler():
    from lightning_lora.federated.data import _seeded_head
    from tests.conftest import build_tiny_bert

    a, b, c = (_seeded_head(build_tiny_bert(0, classifier=True), s) for s in (7, 7, 8))
    ref = build_tiny_bert(0, classifier=True)
    assert torch.equal(a.classifier.weight, b.classifier.weight)  # every process: the same head
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert not torch.equal(a.classifier.weight, ref.classifier.weight)  # re-drawn, not the builder's
    assert torch.equal(a.classifier.bias, torch.zeros_like(a.classifier.bias))
    assert torch.equal(a.bert.pooler.dense.weight, ref.bert.pooler.dense.weight)
