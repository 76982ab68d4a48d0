"""SMoRA-specific invariants (METHODS.md §7); the shared S1-S6 run in test_invariants.py."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.methods.lora import LoRALinear, LoRAConfig
from lightning_lora.methods.smora import SMoRAConfig, SMoRALinear, load_imbalance, routing_stats, update_bias

N_IN, N_OUT = 12, 10


def layer(seed: int = 0, **kw) -> SMoRALinear:
    """One SMoRA layer with B != 0 and a non-trivial router, so routing changes the output."""
    torch.manual_seed(seed)
    base = nn.Linear(N_IN, N_OUT)
    cfg = SMoRAConfig(**{"r": 6, "top_k": 2, "alpha": 6.0, "target_modules": ["x"], **kw})
    lyr = SMoRALinear(base, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lyr.lora_B.normal_(generator=g)
        if cfg.router_init != "zeros":
            lyr.router_weight.normal_(generator=g)
    return lyr


def X(n: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, N_IN, generator=torch.Generator().manual_seed(seed))


def naive_forward(lyr: SMoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-rank loop written straight from eqs. (2)-(3): the reference for the vectorised path."""
    rows = []
    for t in range(x.shape[0]):
        z = lyr.router_weight @ x[t]  # (r,)
        scores = z + lyr.router_bias
        chosen = sorted(range(lyr.r), key=lambda i: -float(scores[i].detach()))[: lyr.top_k]
        logits = torch.stack([(scores if lyr.bias_in_gate else z)[i] for i in chosen])
        g = torch.softmax(logits, 0) * lyr.gate_scale
        y = lyr.base_layer(x[t])
        for j, i in enumerate(chosen):  # rank-1 expert i: B[:, i] (A[i] · x)
            y = y + lyr.scaling * g[j] * lyr.lora_B[:, i] * (lyr.lora_A[i] @ x[t])
        rows.append(y)
    return torch.stack(rows)


# ---- routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 6])
def test_top_k_selects_exactly_k_ranks_and_gates_sum_to_one(k):
    lyr = layer(top_k=k)
    with torch.no_grad():
        lyr.router_bias.copy_(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    gates, idx = lyr.route(X())
    assert gates.dtype == torch.float32 and gates.shape == (9, 6) and idx.shape == (9, k)
    assert ((gates > 0).sum(-1) == k).all()  # exactly k non-zero gates per token (invariant 2)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(9))
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(torch.nonzero(gates)[:, 1].view(9, k), -1).values)
    # the selected ranks are the k largest of z + β
    scores = X() @ lyr.router_weight.t() + lyr.router_bias
    kth = scores.gather(-1, idx).min(-1).values
    unselected = scores.masked_fill(gates > 0, float("-inf")).max(-1).values
    assert (kth >= unselected).all()


@pytest.mark.parametrize("bias_in_gate", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_vectorised_gating_equals_naive_per_rank_loop(k, bias_in_gate):
    """Forward and every gradient (invariant 5: the dense masked path == a loop over active ranks)."""
    lyr = layer(top_k=k, bias_in_gate=bias_in_gate, gate_scale=1.5)
    with torch.no_grad():
        lyr.router_bias.copy_(0.5 * torch.randn(6, generator=torch.Generator().manual_seed(4)))
    x1, x2 = X().requires_grad_(), X().requires_grad_()
    y, y_ref = lyr(x1), naive_forward(lyr, x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((y * w).sum(), [x1, lyr.lora_A, lyr.lora_B, lyr.router_weight])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x2, lyr.lora_A, lyr.lora_B, lyr.router_weight])
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_k_equals_r_uniform_router_gate_scale_r_is_dense_lora():
    """Invariant 3: k = r, W_g = 0 (uniform logits), β = 0, gate_scale = r == LoRA with the same A, B, s."""
    r = 4
    lyr = layer(r=r, top_k=r, gate_scale=float(r), alpha=8.0, router_init="zeros")
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(N_IN, N_OUT), LoRAConfig(r=r, alpha=8.0, fused=False, target_modules=["x"]))
    with torch.no_grad():
        lora.base_layer.load_state_dict(lyr.base_layer.state_dict())
        lora.lora_A.copy_(lyr.lora_A)
        lora.lora_B.copy_(lyr.lora_B)
    torch.testing.assert_close(lyr(X()), lora(X()), atol=1e-6, rtol=1e-6)


def test_k_equals_r_is_lora_with_softmax_gate_folded_per_token():
    """k = r, β = 0, any router: y = W0x + b + s·B (softmax(W_g x) ⊙ A x), a LoRA whose rank-i column
    is scaled per token by softmax(W_g x)_i (the exact dense reference of eq. 2)."""
    lyr = layer(top_k=6)
    x = X()
    g = torch.softmax(x @ lyr.router_weight.t(), -1)  # (N, r)
    ref = lyr.base_layer(x) + lyr.scaling * ((x @ lyr.lora_A.t()) * g) @ lyr.lora_B.t()
    torch.testing.assert_close(lyr(x), ref, atol=1e-6, rtol=1e-6)


def test_unselected_rank_gets_zero_gradient():
    """Invariant 6: a rank no token selects gets exactly zero grad in A[i] and B[:, i]."""
    lyr = layer(top_k=2)
    with torch.no_grad():
        lyr.router_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0, 0.0, -100.0]))  # rank 5 never wins
    x = X()
    (lyr(x) ** 2).sum().backward()
    assert torch.equal(lyr.lora_A.grad[5], torch.zeros(N_IN))
    assert torch.equal(lyr.lora_B.grad[:, 5], torch.zeros(N_OUT))
    assert lyr.lora_A.grad[0].abs().sum() > 0 and lyr.lora_B.grad[:, 0].abs().sum() > 0


def test_bias_only_selects_gates_unchanged_when_selection_unchanged():
    """Invariant 8: with bias_in_gate=False, changing β leaves the gates of tokens whose selected set
    did not change bit-identical; with bias_in_gate=True they move."""
    x = X(40)
    for bias_in_gate in (False, True):
        lyr = layer(top_k=2, bias_in_gate=bias_in_gate)
        g0, i0 = lyr.route(x)
        with torch.no_grad():
            lyr.router_bias.copy_(0.3 * torch.randn(6, generator=torch.Generator().manual_seed(8)))
        g1, i1 = lyr.route(x)
        same = (torch.sort(i0, -1).values == torch.sort(i1, -1).values).all(-1)
        assert 0 < int(same.sum()) < 40, "test needs tokens with and without a changed selection"
        if bias_in_gate:
            assert not torch.equal(g0[same], g1[same])
        else:
            assert torch.equal(g0[same], g1[same])


def test_s1_exact_at_init_for_any_routing():
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT)
    lyr = SMoRALinear(base, SMoRAConfig(r=6, top_k=2, target_modules=["x"]))
    with torch.no_grad():
        lyr.router_weight.normal_()
        lyr.router_bias.normal_()
        assert torch.equal(lyr(X()), base(X()))


def test_router_runs_in_fp32_under_autocast():
    """S5: logits, top-k and softmax in fp32 even for bf16 activations inside autocast."""
    lyr = layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lyr(X())
        gates, idx = lyr.route(X().bfloat16())
    assert gates.dtype == torch.float32 and y.dtype == torch.bfloat16
    z = X().bfloat16().float() @ lyr.router_weight.t()  # the fp32 logits of the bf16 input
    torch.testing.assert_close(gates.gather(-1, idx), torch.softmax(z.gather(-1, idx), -1), atol=1e-6, rtol=1e-6)


# ---- load balancing (eq. 4) ----------------------------------------------------------------------
def test_bias_rule_raises_underloaded_and_lowers_overloaded():
    lyr = layer()
    counts = torch.tensor([10, 0, 3, 3, 2, 0])  # mean 3
    frac = lyr.update_bias(counts, u=0.1)
    torch.testing.assert_close(lyr.router_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0, 0.1, 0.1]))
    torch.testing.assert_close(frac, counts.float() / 18)
    assert torch.equal(lyr.load_counts, counts)
    assert isinstance(lyr.router_bias, torch.Tensor) and not isinstance(lyr.router_bias, nn.Parameter)
    assert "router_bias" not in dict(lyr.named_parameters()) and "router_bias" in dict(lyr.named_buffers())


def test_bias_update_moves_load_toward_balance_on_a_skewed_router():
    """Invariant 7: a router that sends every token to ranks 0 and 1 becomes balanced by β alone."""
    lyr = layer(r=6, top_k=2, router_init="zeros")
    with torch.no_grad():  # feature 0 is a constant 1: z_i = 0.2 (5 - i) + a small input-dependent part
        lyr.router_weight[:, 0] = 0.2 * torch.arange(5.0, -1.0, -1.0)
        lyr.router_weight[:, 1:] = 0.05 * torch.randn(6, N_IN - 1, generator=torch.Generator().manual_seed(0))
    lyr.train()
    ratios = []
    for step in range(60):
        x = torch.randn(64, N_IN, generator=torch.Generator().manual_seed(100 + step))
        x[:, 0] = 1.0
        lyr(x).sum().backward()  # a training forward counts the routed tokens
        ratios.append(load_imbalance(lyr.update_bias(u=0.02)))
    assert ratios[0] > 2.5  # r / k = 3 would mean every token picks the same 2 of 6 ranks
    assert sum(ratios[-10:]) / 10 < 1.5  # ~1.3: the multinomial noise of 128 picks over 6 ranks
    assert lyr.router_bias[0] < 0 < lyr.router_bias[5]  # over-loaded rank pushed down, under-loaded up
    assert int(lyr.load_counts.sum()) == 60 * 64 * 2


def test_counting_only_in_training_forwards():
    lyr = layer()
    lyr.eval()
    lyr(X())
    assert lyr.pending_counts is None
    lyr.train()
    with torch.no_grad():
        lyr(X())
    assert lyr.pending_counts is None
    lyr(X())
    assert int(lyr.pending_counts.sum()) == 9 * 2


def test_routing_stats_sum_to_one_and_model_level_update():
    m = nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, 4)).train()
    ll.inject_adapter(m, "smora", r=4, top_k=2, target_modules=["0", "2"])
    assert routing_stats(m) == {}
    m(X()).sum().backward()
    stats = update_bias(m)
    assert set(stats) == {"0", "2"}
    for f in stats.values():
        torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    for f in routing_stats(m).values():
        torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    for f in routing_stats(m, cumulative=True).values():
        torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    assert all(layer.pending_counts is None for layer in ll.adapter_layers(m).values())
    # nothing routed since: β does not move, stats of an empty window are zeros
    before = {n: layer.router_bias.clone() for n, layer in ll.adapter_layers(m).items()}
    empty = update_bias(m)
    assert all(torch.equal(layer.router_bias, before[n]) for n, layer in ll.adapter_layers(m).items())
    assert all(float(f.sum()) == 0 for f in empty.values())


# ---- merge, save -------------------------------------------------------------------------------
def test_merge_raises_and_leaves_model_unchanged():
    m = nn.Sequential(nn.Linear(N_IN, 8)).eval()
    layers = ll.inject_adapter(m, "smora", r=4, top_k=2, target_modules=["0"])
    w0 = m[0].base_layer.weight.clone()
    for call in (ll.merge_adapter, lambda mod: ll.unload(mod, merge=True), lambda mod: layers["0"].delta_weight()):
        with pytest.raises(RuntimeError, match="input"):
            call(m)
    assert torch.equal(m[0].base_layer.weight, w0) and not layers["0"].merged


def test_save_load_carries_bias_and_load_counts(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, 4)).train()

    m = make()
    ll.inject_adapter(m, "smora", r=4, top_k=2, target_modules=["0", "2"])
    for step in range(3):
        m(X(seed=step)).sum().backward()
        update_bias(m, u=0.05)
    ll.save_adapter(m, tmp_path / "a")
    fresh = make()
    ll.load_adapter(fresh, tmp_path / "a")
    for n, layer in ll.adapter_layers(m).items():
        other = ll.adapter_layers(fresh)[n]
        assert layer.router_bias.abs().sum() > 0 and torch.equal(other.router_bias, layer.router_bias)
        assert int(layer.load_counts.sum()) == 3 * 9 * 2 and torch.equal(other.load_counts, layer.load_counts)


def test_config_validation_and_yaml_defaults():
    with pytest.raises(ValueError, match="top_k"):
        SMoRAConfig(r=4, top_k=5)
    with pytest.raises(ValueError, match="count_scope"):
        SMoRAConfig(count_scope="epoch")
    with pytest.raises(ValueError, match="router_init"):
        SMoRAConfig(router_init="kaiming")
    c = SMoRAConfig()
    assert (c.r, c.top_k, c.alpha, c.gate_scale, c.bias_in_gate) == (64, 8, 128.0, 1.0, False)
    conf = yaml.safe_load((Path(__file__).parents[2] / "conf" / "adapter" / "smora.yaml").read_text())
    assert conf.pop("method") == "smora"
    conf = {k: v for k, v in conf.items() if k not in ("target_modules", "modules_to_save")}
    assert ll.make_config("smora", conf) == SMoRAConfig()


# ---- Lightning: the callback drives the balancer -----------------------------------------------
class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(ll.trainable_parameters(self), lr=0.1)


def _fit(tmp_path, cb, steps: int, accumulate: int = 1) -> tuple[pl.Trainer, Net]:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)), batch_size=4)
    module = Net()
    t = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
        callbacks=[cb], accumulate_grad_batches=accumulate,
    )
    t.fit(module, data)
    return t, module


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.parametrize("scope,accumulate", [("batch", 1), ("step", 2)])
def test_callback_updates_bias_per_step_and_logs_routing(tmp_path, scope, accumulate):
    cb = ll.AdapterCallback("smora", r=4, top_k=2, bias_update_rate=0.01, count_scope=scope,
                            log_per_layer=True, target_modules=["0", "2"], target="net")
    t, module = _fit(tmp_path, cb, steps=3, accumulate=accumulate)
    for name, layer in cb.layers.items():
        # 3 optimizer steps x `accumulate` batches of 4 tokens x top-2, all consumed by β updates
        assert int(layer.load_counts.sum()) == 3 * accumulate * 4 * 2
        assert layer.pending_counts is None
        assert layer.router_bias.abs().sum() > 0
        # every β entry is a sum of ±0.01 steps: one per update (3 updates in both scopes)
        assert (layer.router_bias.abs() <= 3 * 0.01 + 1e-6).all()
    keys = set(t.callback_metrics)
    assert {"smora/load_max_over_mean", "smora/load_max_over_mean_worst", "smora/0/load_max_over_mean"} <= keys
    assert 1.0 <= float(t.callback_metrics["smora/load_max_over_mean"]) <= 2.0  # at most r / k
    assert set(cb.method.last_stats) == {"0", "2"}


# ---- review fixes --------------------------------------------------------------------------------
def test_beta_stays_fp32_when_the_model_is_cast_to_bf16():
    """``model.to(bfloat16)`` (what Lightning's "bf16-true" does) must not cast β: in bf16 a u = 1e-3
    step rounds away once |β| >= 0.5, so balancing would stall at ±0.5."""
    m = nn.Sequential(nn.Linear(N_IN, N_OUT))
    ll.inject_adapter(m, "smora", r=6, top_k=2, target_modules=["0"])
    m.to(torch.bfloat16)
    lyr = m[0]
    assert lyr.router_bias.dtype == torch.float32 and "router_bias" in dict(lyr.named_buffers())
    assert lyr.lora_A.dtype == torch.bfloat16  # the rest follows the requested dtype
    assert m(X().bfloat16()).dtype == torch.bfloat16
    for _ in range(600):  # rank 0 always over-loaded: β_0 walks down, the others up, 1e-3 per step
        lyr.update_bias(torch.tensor([10, 0, 0, 0, 0, 0]), u=1e-3)
    torch.testing.assert_close(lyr.router_bias, torch.tensor([-0.6, 0.6, 0.6, 0.6, 0.6, 0.6]), atol=1e-4, rtol=0)
    m.double()  # a wider dtype is kept
    assert lyr.router_bias.dtype == torch.float64


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_callback_with_bf16_true_precision_keeps_beta_fp32(tmp_path):
    cb = ll.AdapterCallback("smora", r=4, top_k=2, bias_update_rate=0.01, target_modules=["0", "2"], target="net")
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)), batch_size=4)
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   callbacks=[cb], precision="bf16-true")
    t.fit(Net(), data)
    for layer in cb.layers.values():
        assert layer.lora_B.dtype == torch.bfloat16  # bf16-true did convert the module
        assert layer.router_bias.dtype == torch.float32 and layer.router_bias.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(gate_scale=0.0), dict(gate_scale=-1.0), dict(router_std=-0.1)])
def test_config_rejects_dead_gates_and_negative_router_std(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SMoRAConfig(r=4, top_k=2, **bad)


def test_model_level_update_with_layers_on_different_devices():
    """A model split over devices (``device_map="auto"``) keeps each layer's counts on its own device;
    ``update_bias`` stacked them as they were and raised. The meta device stands in for a second GPU."""
    m = nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, 4)).train()
    ll.inject_adapter(m, "smora", r=4, top_k=2, target_modules=["0", "2"])
    m(X()).sum().backward()
    expected = m[0].pending_counts.clone()
    m[2].to("meta")
    m[2].pending_counts = torch.zeros(4, dtype=torch.long, device="meta")
    stats = update_bias(m, u=0.1)
    assert stats["2"].device.type == "meta" and m[2].router_bias.device.type == "meta"
    torch.testing.assert_close(stats["0"], expected.float() / expected.sum())
    torch.testing.assert_close(m[0].router_bias, 0.1 * torch.sign(expected.float().mean() - expected.float()))
    assert torch.equal(m[0].load_counts, expected)


def test_model_level_update_finds_smora_adapters_added_by_name():
    """``add_adapter`` wraps each target in a multi-adapter layer; ``update_bias(model)`` used to
    raise "no SMoRA layers found" there. Only the adapter that ran has counts, so only its β moves."""
    m = nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, 4)).train()
    ll.add_adapter(m, "a", "smora", r=4, top_k=2, target_modules=["0", "2"])
    ll.add_adapter(m, "b", "smora", r=4, top_k=2, target_modules=["0"])
    ll.set_adapter(m, "a")
    m(X()).sum().backward()
    stats = update_bias(m, u=0.1)
    assert set(stats) == {"0[a]", "2[a]", "0[b]"}
    a0, b0 = m[0].adapters["a"], m[0].adapters["b"]
    assert int(a0.load_counts.sum()) == 9 * 2 and a0.router_bias.abs().sum() > 0
    assert int(b0.load_counts.sum()) == 0 and torch.equal(b0.router_bias, torch.zeros(4))
    assert set(routing_stats(m)) == {"0[a]", "2[a]"}  # b routed nothing: left out


@pytest.mark.parametrize("r,k", [(8, 3), (64, 8)])
def test_gates_bit_identical_for_an_unchanged_selection_with_k_at_least_3(r, k):
    """Invariant 8 for k >= 3 (k = 2 sums two terms, which commute): the selected set's softmax
    used to be summed in score order, so a β change that only reordered the set moved gates by an
    ulp. Thousands of tokens make a reordering with an unchanged set certain."""
    torch.manual_seed(0)
    lyr = SMoRALinear(nn.Linear(32, 16), SMoRAConfig(r=r, top_k=k, target_modules=["x"]))
    with torch.no_grad():
        lyr.router_weight.normal_()
    x = torch.randn(4000, 32, generator=torch.Generator().manual_seed(1))
    g0, i0 = lyr.route(x)
    with torch.no_grad():
        lyr.router_bias.copy_(0.5 * torch.randn(r, generator=torch.Generator().manual_seed(2)))
    g1, i1 = lyr.route(x)
    same = (torch.sort(i0, -1).values == torch.sort(i1, -1).values).all(-1)
    assert 100 < int(same.sum()) < 4000
    assert torch.equal(g0[same], g1[same])
    assert torch.equal(i0, torch.sort(i0, -1).values)  # indices come in rank order
