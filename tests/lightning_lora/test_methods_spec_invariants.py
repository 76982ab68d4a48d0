"""Promises of METHODS.md (shared/design/METHODS.md) that no other test pinned.

Found by mapping every section's invariants, defaults and equations to the existing tests; what was
already covered is not repeated here. Each test names the section it checks. Tiny CPU tensors and
meta-device models only (the whole file runs in seconds).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from torch import nn

import lightning_lora as ll


def _one_layer(method: str, n: int = 64, m: int = 48, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m))
    return model, ll.inject_adapter(model, method, dict(kw), target_modules=["0"])["0"]


def _assert_kaiming_uniform(t: torch.Tensor, fan_in: int) -> None:
    """``nn.init.kaiming_uniform_(a=√5)`` (the ``nn.Linear`` default): U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    t = t.detach().float()
    assert t.abs().max() <= bound * (1 + 1e-6), "outside the Kaiming-uniform bound"
    assert t.abs().max() > 0.9 * bound, "far inside the bound: not U(-bound, bound)"
    # the std of U(-b, b) is b/√3; a normal or a narrower uniform misses it
    assert abs(t.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)


# ---- §1 (and §4, §5, §7, §13): A Kaiming-uniform (a = √5), B = 0 ---------------------------------------
@pytest.mark.parametrize("method,kw", [
    ("lora", dict(r=8)),
    ("lora", dict(r=8, use_dora=True)),
    ("dylora", dict(r=8)),
    ("allora", dict(r=8, eta=1.0)),
    ("smora", dict(r=8, top_k=2)),
    ("flexora", dict(r=8)),
])
def test_a_is_kaiming_uniform_and_b_is_zero_at_init(method, kw):
    """§1 Initialisation: "A: Kaiming-uniform (a = √5, the nn.Linear default) [code] ... B = 0" (the
    default of every LoRA-form layer: §4 DyLoRA factors, §5 standard LoRA init, §7 SMoRA defaults)."""
    _, layer = _one_layer(method, **kw)
    _assert_kaiming_uniform(layer.lora_A, layer.in_features)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_lora_gaussian_init_draws_a_with_std_one_over_r():
    """§1: the "gaussian" option is PEFT's ``init_lora_weights="gaussian"``: A ~ N(0, σ²) with σ = 1/r
    (PEFT: ``nn.init.normal_(std=1 / r)``), B = 0."""
    r = 8
    _, layer = _one_layer("lora", r=r, init="gaussian")
    a = layer.lora_A.detach()
    assert abs(a.std().item() - 1 / r) < 0.1 / r and abs(a.mean().item()) < 0.2 / r
    assert a.abs().max() > 1 / math.sqrt(layer.in_features)  # a normal, not the Kaiming-uniform bound
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_slora_a_and_n_are_kaiming_uniform_and_b_is_zero():
    """§14 SLoRA [code]: "A and N Kaiming-uniform (a = √5), B = 0 ⇒ ΔW = 0"."""
    _, layer = _one_layer("slora", r=16)
    _assert_kaiming_uniform(layer.lora_A, layer.in_features)  # (r, n): fan_in n
    _assert_kaiming_uniform(layer.lora_core, layer.r)  # (r, r): fan_in r
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_increlora_components_draw_normal_002_with_e_zero_and_reserve_e_1e5():
    """§15 algorithm steps 1-2 [code]: every component starts with a, b ~ N(0, 0.02²); the initial
    ranks have e = 0, the advance-learning reserve e = 1e-5."""
    _, layer = _one_layer("increlora", r=4)
    A, B, e, _ = layer.factors()
    assert A.shape == (5, 64) and B.shape == (48, 5)  # 4 ranks + 1 reserve
    for t in (A, B):
        assert abs(t.detach().std().item() - 0.02) < 0.15 * 0.02 and abs(t.detach().mean().item()) < 0.005
    assert e.detach().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 1e-5], abs=0, rel=1e-6)


def test_smora_router_is_small_and_beta_and_counters_start_at_zero():
    """§7 Defaults [design]: "router zero or small init, β = 0"."""
    _, layer = _one_layer("smora", r=16, top_k=4)
    w = layer.router_weight.detach()
    assert abs(w.std().item() - 0.02) < 0.1 * 0.02
    assert torch.equal(layer.router_bias, torch.zeros(16)) and torch.equal(layer.load_counts, torch.zeros(16, dtype=torch.long))


# ---- §3 GradNormLoRP: the optimizer's weight normalisation ----------------------------------------------
def _wn_param(seed: int = 0, m: int = 24, n: int = 16) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-1, 1, m).unsqueeze(1)  # rows of very different norms
    return nn.Parameter(torch.randn(m, n, generator=g) * rows)


def test_gradnorm_weight_norm_reparameterisation_is_exact_at_init():
    """§3 invariant 1: ``g·v/‖v‖ == W`` (to fp32 rounding) with g initialised to ‖W‖_row, as the optimizer
    builds it: a step with a zero gradient (no weight decay) rebuilds W from (g, v) unchanged."""
    from lightning_lora.optim.gradnorm_lorp import GradNormLoRPAdamW

    p = _wn_param()
    w = p.detach().clone()
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "weight_norm": True}], lr=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(opt.state[p]["wn_g"], w.norm(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(p.detach(), w, atol=1e-7, rtol=1e-6)  # rows up to |w| ~ 30: relative


def test_gradnorm_optimizer_direction_gradient_is_the_textbook_projection(monkeypatch):
    """§3 equations / invariant 2, on what the optimizer really projects (the existing test checks the
    formula on a hand-made tensor): ``∇v = (g/‖v‖)(I − v̂v̂ᵀ)∇p`` row-wise, hence ``⟨∇v_i, v_i⟩ = 0``,
    also after steps that moved g away from ‖v‖."""
    import lightning_lora.optim.gradnorm_lorp as gl

    seen: list[torch.Tensor] = []
    project = gl.project

    def recording_project(grad, proj):
        seen.append(grad.detach().clone())
        return project(grad, proj)

    monkeypatch.setattr(gl, "project", recording_project)
    p = _wn_param(1)
    opt = gl.GradNormLoRPAdamW([{"params": [p], "rank": 4, "weight_norm": True, "proj_type": "identity"}],
                               lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(2)
    ratios = []
    for _ in range(3):
        w = p.detach().clone()
        state = opt.state[p]
        g = state["wn_g"].clone() if "wn_g" in state else w.norm(dim=1)
        vnorm = state["wn_vnorm"].clone() if "wn_vnorm" in state else w.norm(dim=1)
        grad = torch.randn(p.shape, generator=gen)
        p.grad = grad.clone()
        opt.step()
        got = seen[-1]
        v_hat = torch.sign(g).unsqueeze(1) * w / w.norm(dim=1, keepdim=True)
        expected = (g / vnorm).unsqueeze(1) * (grad - (grad * v_hat).sum(dim=1, keepdim=True) * v_hat)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        cos = (got * v_hat).sum(dim=1) / got.norm(dim=1).clamp_min(1e-12)
        assert cos.abs().max() < 1e-5, "direction gradient not orthogonal to v"
        ratios.append((g / vnorm - 1).abs().max().item())
    assert ratios[0] == 0 and max(ratios[1:]) > 1e-4, "g/‖v‖ never left 1: the factor went untested"


@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_gradnorm_weight_decay_is_decoupled_and_applied_once(optim_bits, weight_norm):
    """§3 invariant 9 for the 8-bit state ("weight decay disabled inside the 8-bit step and applied
    after projecting back") and the weight-norm path ("decoupled weight decay on both" v and g): with a
    zero gradient one step is pure decay, ``p ← (1 − lr·wd)·p``."""
    from lightning_lora.optim.gradnorm_lorp import GradNormLoRPAdamW

    p = _wn_param(3)
    before = p.detach().clone()
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "weight_norm": weight_norm}], lr=0.1,
                            weight_decay=0.5, optim_bits=optim_bits)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5), atol=1e-6, rtol=1e-6)


# ---- §7 SMoRA: the unified view (invariant 4) ---------------------------------------------------------
def test_smora_equals_multi_lora_moe_with_block_diagonal_gates():
    """§7 invariant 4: E experts of rank r_e stacked as ``A = [A_1; …; A_E]``, ``B = [B_1 | … | B_E]``:
    ``Σ_e g_e B_e A_e x == B·G(x)·A x`` with ``G = blockdiag(g_1 I, …, g_E I)``. SMoRA with k = r, a
    router whose rows are tied within each block of r_e ranks, and gate_scale = r_e gives every rank of
    expert e the gate ``softmax_e(W_e x)``, so it must equal that E-expert MoE."""
    from lightning_lora.methods.smora import SMoRAConfig, SMoRALinear

    E, re_, n, m = 3, 2, 12, 10
    r = E * re_
    torch.manual_seed(0)
    base = nn.Linear(n, m)
    layer = SMoRALinear(base, SMoRAConfig(r=r, top_k=r, alpha=6.0, gate_scale=float(re_), target_modules=["x"]))
    g = torch.Generator().manual_seed(1)
    w_expert = torch.randn(E, n, generator=g)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
        layer.router_weight.copy_(w_expert.repeat_interleave(re_, dim=0))
    layer.eval()
    x = torch.randn(9, n, generator=g)
    gates = torch.softmax(x @ w_expert.t(), dim=-1)  # (N, E): per-expert gates
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    moe = base(x) + sum(
        gates[:, e : e + 1] * s * (x @ A[e * re_ : (e + 1) * re_].t()) @ B[:, e * re_ : (e + 1) * re_].t()
        for e in range(E)
    )
    stacked = torch.stack([
        base(x[t]) + s * B @ torch.block_diag(*[gates[t, e] * torch.eye(re_) for e in range(E)]) @ A @ x[t]
        for t in range(x.shape[0])
    ])
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(stacked, moe, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, moe, atol=1e-6, rtol=1e-6)


# ---- §12 LoRA-XS / LoRA-SB: the federated corollary (Fed-SB) ---------------------------------------------
def test_fed_sb_average_of_cores_is_the_average_of_updates():
    """§12 [derived]: with shared frozen B, A, ``mean_k(B R_k A) = B·mean_k(R_k)·A``; only R travels
    (r² numbers per module), and FedAvg of it gives exactly the mean client update."""
    from lightning_lora.federated.params import exchanged_names, frozen_digest, get_arrays, set_arrays
    from lightning_lora.federated.strategy import weighted_mean

    def client(seed: int) -> nn.Module:
        torch.manual_seed(0)  # same base and same frozen factors on every client
        model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 12))
        ll.inject_adapter(model, "lora_xs", dict(r=4, svd="exact"), target_modules=["0", "2"])
        with torch.no_grad():  # "local training": each client moves its cores differently
            g = torch.Generator().manual_seed(100 + seed)
            for p in ll.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g))
        return model

    clients = [client(k) for k in range(3)]
    weights = [5.0, 1.0, 2.0]
    assert exchanged_names(clients[0]) == ["0.lora_core", "2.lora_core"]
    assert sum(a.size for a in get_arrays(clients[0])) == 2 * 4 * 4
    assert len({frozen_digest(c) for c in clients}) == 1
    deltas = [{n: layer.delta_weight().detach().double() for n, layer in ll.adapter_layers(c).items()} for c in clients]
    server = client(99)
    set_arrays(server, weighted_mean([get_arrays(c) for c in clients], weights))
    for name, layer in ll.adapter_layers(server).items():
        mean = sum(w * d[name] for w, d in zip(weights, deltas)) / sum(weights)
        assert mean.abs().max() > 0.1
        torch.testing.assert_close(layer.delta_weight().detach().double(), mean, atol=1e-6, rtol=1e-5)


# ---- S6 worked counts not pinned elsewhere (meta-device models: nothing allocated) -----------------------
def _meta(cls_name: str, **cfg):
    import transformers

    config = getattr(transformers, f"{cls_name}Config")(vocab_size=128, **cfg)
    with torch.device("meta"):
        return getattr(transformers, f"{cls_name}Model")(config)


def _count(model: nn.Module, method: str, targets: list[str], **kw) -> int:
    ll.inject_adapter(model, method, kw, target_modules=targets)
    return sum(p.numel() for p in ll.trainable_parameters(model))


LLAMA32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                  num_key_value_heads=8)


@pytest.mark.parametrize("method,kw,expected", [
    ("bone", dict(r=64), 7_340_032),
    ("bat", dict(r=64), 7_340_032),
    ("lora", dict(r=32, alpha=64), 9_175_040),
])
def test_worked_count_llama32_3b_q_v(method, kw, expected):
    """S6 and §9: Llama-3.2-3B (hidden 3072, KV 1024, 28 layers), q and v: Bone / Bat r = 64 →
    7,340,032; LoRA r = 32 → 9,175,040."""
    assert _count(_meta("Llama", **LLAMA32_3B), method, ["q_proj", "v_proj"], **kw) == expected


def test_worked_count_mistral_7b_lora_r32():
    """S6 and §12: Mistral-7B (hidden 4096, KV 1024, FFN 14336, 32 layers), 7 projections, LoRA r = 32
    → 83,886,080 (≈ 40.6× LoRA-SB's 2,064,384 at r = 96, pinned in test_lora_sb.py)."""
    model = _meta("Mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    n = _count(model, "lora", targets, r=32)
    assert n == 83_886_080 and round(n / 2_064_384, 1) == 40.6


def test_worked_count_flexora_winogrande_selection():
    """§13 [derived]: Llama-3-8B, q and v, r = 8: stage 2 keeps LoRA only in the selected layers
    (default exclusion "remove": no adapter elsewhere); Winogrande's [0,1,2,3,4,20,25,27,30,31] →
    1,064,960 = 10 × 106,496. Counted after Flexora's own stage 2 (``finish_search`` on gate logits
    positive exactly on those layers), so the gates and the removed layers' adapters must be gone."""
    assert ll.make_config("flexora").exclusion == "remove"
    model = _meta("Llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)
    selected = [0, 1, 2, 3, 4, 20, 25, 27, 30, 31]
    ll.inject_adapter(model, "flexora", dict(r=8, alpha=16), target_modules=["q_proj", "v_proj"])
    method, layers = ll.get_adapter_method(model), ll.adapter_layers(model)
    assert len(layers) == 64 and len(method.layer_keys) == 32
    method.set_gate_logits(torch.tensor([1.0 if int(k.rsplit(".", 1)[1]) in selected else -1.0
                                         for k in method.layer_keys]), layers)
    assert method.finish_search(layers, model) == [f"layers.{i}" for i in selected]
    assert sum(p.numel() for p in ll.trainable_parameters(model)) == 1_064_960
    assert sorted(ll.adapter_layers(model)) == sorted(f"layers.{i}.self_attn.{p}" for i in selected
                                                       for p in ("q_proj", "v_proj"))


# ---- plugin defaults the "Defaults" / "Open choices" paragraphs fix ----------------------------------------
DEFAULTS = {
    # §1 open choices: Kaiming-uniform A; DoRA norm detached; explicit merge (nothing merged on eval())
    "lora": dict(init="kaiming", dora_detach_norm=True, use_rslora=False, use_dora=False, dropout=0.0),
    # §2 defaults [code] + open choices (keep-best iterate, two-sided Fisher, randomized SVD)
    "lq_lora": dict(r=64, alpha=16.0, scaling=0.25, dropout=0.0, quant="nf4", max_iters=100, svd="lowrank",
                    return_last=False, fisher_mode="two_sided"),
    # §3 defaults [code]: DoRA path r = 8, α 16, dropout 0.1; projection rank 8, scale 4, gap 500, std; eps 1e-6
    "gradnorm_lorp": dict(r=8, alpha=16.0, dropout=0.1, use_dora=True, proj_rank=8, proj_scale=4.0,
                          update_proj_gap=500, proj_type="std", optim_bits=32, eps=1e-6),
    # §4 defaults [code] + open choices: r_max 8, α 16, frozen mode, r_min 1, uniform pmf
    "dylora": dict(r=8, alpha=16.0, mode="frozen", r_min=1, rank_pmf=None),
    # §5: row granularity, gradient scaling (paper wording); η has no silent default (tested elsewhere)
    "allora": dict(granularity="row", apply_to="grad"),
    # §7 defaults: total rank 64, top-k 8, gate_scale 1, u = 1e-3, β selection-only, per-batch counts
    "smora": dict(r=64, top_k=8, gate_scale=1.0, bias_update_rate=1e-3, bias_in_gate=False, count_scope="batch"),
    # §9: r = 64, variant bone, dropout 0, scale 1
    "bone": dict(r=64, variant="bone", dropout=0.0, scaling=1.0),
    # §12: LoRA-XS core N(0, (1e-5)²), s = 1 (α = r), torch.svd_lowrank; LoRA-SB T counted in batches,
    # warmup 0.02
    "lora_xs": dict(core_init="gaussian", core_std=1e-5, svd="lowrank"),
    "lora_sb": dict(t_unit="batches", warmup_ratio=0.02, svd="lowrank"),
    # §13 defaults [code] + open choices: r 8, α 16, dropout 0, gate lr 0.01, 8 validation batches,
    # linear gate, α̂ > 0 selection, all-layers fallback, unselected layers get no adapter
    "flexora": dict(r=8, alpha=16.0, dropout=0.0, gate_lr=0.01, gate_batches=8, gate_power=1,
                    selection="positive", empty_selection="all", exclusion="remove"),
    # §14 open choices: nystrom + residual (base-preserving), fp64 pinv
    "nlora": dict(init="nystrom", residual=True, pinv_dtype="float64"),
    # §15 defaults [code] + open choices: r0 = 1, β = 0.85, reserve e 1e-5, γ = 0.1 non-squared,
    # exact top-h, incre_rank_num 1, advance learning on, a, b ~ N(0, 0.02²)
    "increlora": dict(r=1, beta1=0.85, beta2=0.85, reserve_e=1e-5, orth_reg=0.1, orth_squared=False,
                      tie_break="exact", incre_rank_num=1, advance_learning=True, init_std=0.02),
}


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_config_defaults_match_the_spec(method):
    cfg = ll.make_config(method, **({"eta": 1.0} if method == "allora" else {}))
    got = {k: getattr(cfg, k) for k in DEFAULTS[method]}
    assert got == DEFAULTS[method]


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb", "ffa_lora", "nlora", "allora"])
def test_scale_one_by_default(method):
    """§12 (LoRA-XS α = r; LoRA-SB s = 1 forced), §14 (α = r, s = 1), §16 (default α = r), §5 (s = 1)."""
    _, layer = _one_layer(method, n=24, m=16, r=4, **({"eta": 1.0} if method == "allora" else {}))
    assert layer.scaling == 1.0


def test_gradnorm_optimizer_defaults():
    """§3 defaults: Adam betas (0.9, 0.999), eps 1e-6, bias correction on; textbook direction gradient
    (repo_parity off) and std projection for "rank" groups."""
    from lightning_lora.optim.gradnorm_lorp import GradNormLoRPAdamW

    p = nn.Parameter(torch.randn(6, 4))
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 2}])
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-6
    assert group["proj_type"] == "std" and group["repo_parity"] is False and group["weight_norm"] is False


def test_lq_lora_grid_and_presets():
    """§2: the ILP grid b ∈ {2,3,4,8} × b0 ∈ {2,3,4,8} × b1 ∈ {bf16,fp16,fp32} × B0 ∈ {16,32,64} ×
    B1 ∈ {16,64,256} = 432 configs; presets nf4 = (4, 8, fp32, 64, 256), nf3 = (3, 8, fp32, 64, 256)."""
    from lightning_lora.quant import FULL_GRID, PRESETS, QuantConfig

    assert len(FULL_GRID) == len(set(FULL_GRID)) == 432
    assert {c.bits for c in FULL_GRID} == {2, 3, 4, 8} and {c.scale_bits for c in FULL_GRID} == {2, 3, 4, 8}
    assert {c.scale_dtype for c in FULL_GRID} == {"bf16", "fp16", "fp32"}
    assert {c.block_size for c in FULL_GRID} == {16, 32, 64} and {c.scale_block_size for c in FULL_GRID} == {16, 64, 256}
    assert PRESETS["nf4"] == QuantConfig(4, 8, "fp32", 64, 256)
    assert PRESETS["nf3"] == QuantConfig(3, 8, "fp32", 64, 256)


def test_lego_clora_and_trans_lora_defaults():
    """§6 open choices (canonicalise on, √s folding, concat feature, both reweightings with the norm
    rule); §8 pipeline defaults [code] (η 20, max_iter_to_alter 30, τ 0.5, κ 0.3, 50 steps, guidance 7.5,
    no morphology); §11 (5 seeds, p(real) > 0.5 filter)."""
    from lightning_lora.merge import lego
    from lightning_lora.merge.clora import CLoRAConfig
    from lightning_lora.transfer.pipeline import transfer

    sig = inspect.signature(lego.lego_merge).parameters
    assert {k: sig[k].default for k in ("canonicalize", "folding", "feature", "parameter_reweight", "output_reweight")} == \
        dict(canonicalize=True, folding="sqrt", feature="concat", parameter_reweight=True, output_reweight="norm")
    c = {f.name: f.default for f in dataclasses.fields(CLoRAConfig)}
    assert {k: c[k] for k in ("step_size", "max_iter_to_alter", "temperature", "mask_threshold_alpha",
                              "num_inference_steps", "guidance_scale", "mask_morphology", "latent_update")} == dict(
        step_size=20.0, max_iter_to_alter=30, temperature=0.5, mask_threshold_alpha=0.3, num_inference_steps=50,
        guidance_scale=7.5, mask_morphology=None, latent_update=True)
    t = inspect.signature(transfer).parameters
    assert t["n_seed"].default == 5 and t["threshold"].default == 0.5 and t["filter"].default is True
