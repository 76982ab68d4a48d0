"""Edge cases: empty merges, FedAvg client weights, cost-table errors that name the
matrix, LQ-LoRA budget plans under the injection's Fisher settings, a balanced SVD that leaves the
global RNGs alone, and Bone/Bat on GPT-2 Conv1D (no PEFT MiSS config PEFT cannot load)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core import multi
from lightning_lora.core.state import CONFIG_NAME
from lightning_lora.merge import baselines as mb
from lightning_lora.methods import lq_lora
from lightning_lora.methods.ffa import fedavg
from lightning_lora.quant import build_cost_table, lq_decompose, solve_ilp
from lightning_lora.quant.decompose import balanced_svd


# ---- item 2: merges of no sources ----------------------------------------------------------
@pytest.mark.parametrize("merge,kw", [
    (mb.merge_ties, {}), (mb.merge_ties, {"rank": 2}), (mb.merge_task_arithmetic, {}),
    (mb.merge_task_arithmetic, {"rank": 2}), (mb.merge_concat, {}),
], ids=["ties", "ties_rank", "task_arithmetic", "task_arithmetic_rank", "concat"])
def test_merge_of_no_sources_is_a_clear_value_error(merge, kw):
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    multi.add_adapter(m, "a", "lora", r=2, target_modules=["0", "2"])
    # merge_ties without rank used to fail in max([]): "max() arg is an empty sequence"
    with pytest.raises(ValueError, match=r"^nothing to merge: no sources$"):
        merge(m, [], "merged", **kw)
    assert multi.adapter_names(m) == ["a"]  # nothing was added


# ---- item 3: FedAvg client weights ---------------------------------------------------------
def _ffa_clients(n: int = 2) -> list[dict[str, torch.Tensor]]:
    """FFA-LoRA states with a shared A0 (a0_seed) and client k's B filled with k + 1."""
    states = []
    for k in range(n):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 8))
        ll.inject_adapter(model, "ffa_lora", dict(r=2, a0_seed=7), target_modules=["0"])
        with torch.no_grad():
            model[0].lora_B.fill_(k + 1.0)
        states.append(ll.adapter_state_dict(model))
    return states


@pytest.mark.parametrize("weights,match", [
    ([2.0, -1.0], "non-negative"),   # a positive sum used to let this extrapolate: 2 B_0 - B_1
    ([float("nan"), 1.0], "finite"),  # NaN <= 0 is False: used to pass and return NaN everywhere
    ([float("inf"), 1.0], "finite"),
    ([0.0, 0.0], "all zero"),
    ([1.0], "1 weights for 2 client states"),
], ids=["negative", "nan", "inf", "all_zero", "wrong_count"])
def test_fedavg_rejects_invalid_client_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg(_ffa_clients(), weights)


def test_fedavg_accepts_a_zero_weight_client():
    s0, s1 = _ffa_clients()
    avg = fedavg([s0, s1], [0.0, 3.0])  # a client with no samples is ignored, not an error
    assert torch.equal(avg["0.lora_B"], s1["0.lora_B"]) and torch.equal(avg["0.lora_A"], s0["0.lora_A"])


def test_federated_weighted_mean_rejects_invalid_weights():
    """The Flower strategy's own aggregation already validated its weights (regression guard)."""
    from lightning_lora.federated.strategy import weighted_mean

    arrays = [[np.ones(3, np.float32)], [np.zeros(3, np.float32)]]
    for weights in ([2.0, -1.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="finite, non-negative"):
            weighted_mean(arrays, weights)
    with pytest.raises(ValueError, match="positive weight"):
        weighted_mean(arrays, [0.0, 0.0])


# ---- item 4: cost-table errors name the matrix ---------------------------------------------
def test_cost_table_errors_name_the_matrix_before_any_decomposition():
    g = torch.Generator().manual_seed(0)
    weights = {"ok": torch.randn(16, 32, generator=g), "small": torch.randn(4, 32, generator=g)}
    done: list[str] = []
    with pytest.raises(ValueError, match=r"matrix 'small' of shape \(4, 32\): rank must be in \[0, 4\], got 8"):
        build_cost_table(weights, 8, ["nf4"], max_iters=1, progress=done.append)
    assert done == []  # checked up front: "ok" was not decomposed first
    fisher = {"ok": torch.ones(16, 32), "small": torch.ones(3, 3)}
    with pytest.raises(ValueError, match=r"matrix 'small': Fisher has shape \(3, 3\)"):
        build_cost_table(weights, 2, ["nf4"], max_iters=1, fisher=fisher)
    with pytest.raises(ValueError, match=r"no Fisher tensor given for matrix 'small'"):
        build_cost_table(weights, 2, ["nf4"], max_iters=1, fisher={"ok": torch.ones(16, 32)})
    # an error raised inside the decomposition names the matrix and the config too
    bad = {"ok": weights["ok"], "bad": torch.full((8, 32), float("nan"))}
    with pytest.raises(ValueError, match=r"matrix 'bad', config b4-s8-fp32-B64-G256: cannot quantize"):
        build_cost_table(bad, 0, ["nf4"], max_iters=1)


# ---- item 5: the budget plan uses the injection's Fisher settings --------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_budget_plan_costs_use_fisher_path_and_fisher_mode(tmp_path, monkeypatch):
    net = _Net()
    targets = ["fc1", "fc2"]
    weights = lq_lora.target_weights(net, target_modules=targets)
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(w.shape, generator=g) ** 4 for n, w in weights.items()}  # far from uniform
    path = tmp_path / "fisher.safetensors"
    lq_lora.save_fisher(fisher, str(path))
    grid = ["nf2", "nf3", "nf4"]
    settings = dict(max_iters=3, fisher_mode="row", svd="exact", seed=5)
    tables = []
    real = lq_lora.build_cost_table

    def spy(*args, **kwargs):
        tables.append(real(*args, **kwargs))
        return tables[-1]

    monkeypatch.setattr(lq_lora, "build_cost_table", spy)
    lq_lora.quantize_model(net, r=4, budget=3.4, configs=grid, target_modules=targets, fisher_path=str(path),
                           **settings)
    assert len(tables) == 1
    expected = real(weights, 4, grid, fisher=fisher, **settings)
    np.testing.assert_array_equal(tables[0].cost, expected.cost)  # the injection's Fisher, mode, svd, seed
    # not vacuous: the unweighted default costs (what the plan used before) and the two-sided Fisher
    # costs both differ from these
    assert not np.allclose(tables[0].cost, real(weights, 4, grid, max_iters=3).cost)
    assert not np.allclose(tables[0].cost, real(weights, 4, grid, fisher=fisher, max_iters=3, svd="exact", seed=5).cost)
    chosen = ll.get_adapter_method(net).config.matrix_configs
    assert chosen == {n: c.name for n, c in solve_ilp(expected, 3.4).choice.items()}


# ---- item 6: balanced_svd and the global RNGs ----------------------------------------------
def test_balanced_svd_leaves_global_rngs_alone_and_is_deterministic(monkeypatch):
    reseeded: list[int] = []
    original = torch.cuda.manual_seed_all

    def record(seed: int) -> None:  # what torch.manual_seed does to every CUDA device
        reseeded.append(seed)
        original(seed)

    monkeypatch.setattr(torch.cuda, "manual_seed_all", record)
    m = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    cpu_state = torch.get_rng_state()
    first = balanced_svd(m, 4, seed=3)
    second = balanced_svd(m, 4, seed=3)
    assert reseeded == []  # used to call torch.manual_seed, reseeding every CUDA device's RNG
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = balanced_svd(m + torch.randn(40, 24, generator=torch.Generator().manual_seed(9)), 4, seed=4)
    assert not torch.equal(other[0], first[0])
    # the same draws as torch.svd_lowrank under that seed: results did not change with the fix
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        U, S, V = torch.svd_lowrank(m, q=14, niter=2)
    root = S[:4].sqrt()
    assert torch.equal(first[0], U[:, :4] * root) and torch.equal(first[1], root.unsqueeze(1) * V[:, :4].t())
    for shape in [(24, 40), (16, 16)]:  # wide (torch transposes) and square inputs
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(x, q=min(14, *shape), niter=2)
        L1, L2 = balanced_svd(x, 4, seed=0)
        root = S[:4].sqrt()
        assert torch.equal(L1, U[:, :4] * root) and torch.equal(L2, root.unsqueeze(1) * V[:, :4].t())
    assert torch.equal(torch.get_rng_state(), cpu_state)
    dec1, dec2 = (lq_decompose(m, 4, "nf3", max_iters=3, seed=1) for _ in range(2))
    assert torch.equal(dec1.L1, dec2.L1) and torch.equal(dec1.q_dense, dec2.q_dense)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA RNG states exist only with a GPU (CI has none)")
def test_balanced_svd_leaves_every_cuda_rng_state_alone():
    m = torch.randn(40, 24, device="cuda")
    states = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
    first = balanced_svd(m, 4, seed=3)
    assert all(torch.equal(torch.cuda.get_rng_state(d), s) for d, s in enumerate(states))
    assert all(torch.equal(a, b) for a, b in zip(first, balanced_svd(m, 4, seed=3)))


# ---- item 7: Bone / Bat on GPT-2 Conv1D ----------------------------------------------------
@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_bone_on_conv1d_is_not_written_as_peft_miss_and_round_trips_here(model_builders, variant, tmp_path):
    import peft
    ours = model_builders["gpt2"](0)
    ll.inject_adapter(ours, "bone", dict(r=4, variant=variant), target_modules=["c_attn", "c_proj"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ll.trainable_parameters(ours):
            p.normal_(std=0.05, generator=g)
    # saving works: our own config format (it used to be a MiSS config that PEFT refuses: "Target
    # module Conv1D(nf=96, nx=32) is not supported"), with a warning naming the module
    with pytest.warns(UserWarning, match=r"transformer\.h\.0\.attn\.c_attn.*lightning_lora's own format"):
        ll.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert "peft_type" not in cfg and cfg["lightning_lora"]["variant"] == variant
    # the strict PEFT export refuses, naming the module
    with pytest.raises(ValueError, match=r"module 'transformer\.h\.0\.attn\.c_attn' is a transformers Conv1D"):
        ll.get_adapter_method(ours).peft_config(ll.adapter_layers(ours))
    x = {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        y = ours(**x).logits
        assert (y - model_builders["gpt2"](0)(**x).logits).abs().max() > 1e-3
        fresh = ll.load_adapter(model_builders["gpt2"](0), tmp_path / "a")
        assert torch.equal(fresh(**x).logits, y)
    assert ll.get_adapter_method(fresh).config.variant == variant
    with pytest.raises(Exception):  # PEFT refuses the directory (no peft_type) instead of mis-loading it
        peft.PeftModel.from_pretrained(model_builders["gpt2"](0), str(tmp_path / "a"))


def test_bone_on_linear_layers_still_exports_peft_miss(model_builders):
    ours = model_builders["bert"](0)
    ll.inject_adapter(ours, "bone", dict(r=4), target_modules=["query", "value"])
    cfg = ll.get_adapter_method(ours).to_peft_config(ll.adapter_layers(ours))
    assert cfg["peft_type"] == "MISS" and cfg["target_modules"] == sorted(ll.adapter_layers(ours))
    assert math.isclose(cfg["r"], 4)
