"""IncreLoRA's own invariants (METHODS.md §15); the shared S1-S6 suite runs it via SPECS."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.methods.increlora import (
    IncreLoRA,
    IncreLoRALinear,
    _GroupSchedule,
    active_param_count,
    lora_param_count,
    orthogonality_regularizer,
    total_rank,
)

TARGETS = ["0", "2", "4"]


def stack(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def adapted(seed: int = 0, **kw) -> tuple[nn.Module, dict[str, IncreLoRALinear]]:
    m = stack(seed)
    layers = ll.inject_adapter(m, "increlora", target_modules=TARGETS, **kw)
    return m, layers  # type: ignore[return-value]


# ---- init (invariant 1) -------------------------------------------------------------------------
def test_output_equals_base_without_advance_learning_and_is_bounded_with_it():
    x = torch.randn(5, 8)
    base = stack()
    m, _ = adapted(advance_learning=False, r=2)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))
    m, layers = adapted(alpha=16)
    for layer in layers.values():
        A, B, e, s = layer.factors()
        assert e[0] == 0 and e[1] == 1e-5
        bound = 1e-5 * s * B[:, 1].norm() * A[1].norm()  # |ΔW| ≤ Σ_reserves 1e-5·(α/ρ)‖b‖‖a‖
        dw = layer.delta_weight()
        assert dw.abs().max() > 0 and torch.linalg.matrix_norm(dw, 2) <= bound * (1 + 1e-5)


# ---- importance (invariant 3) ---------------------------------------------------------------------
def test_sensitivity_is_sum_abs_dw_times_grad_and_accumulates_micro_batches():
    m, layers = adapted(r=2)
    layer = layers["2"]
    with torch.no_grad():
        for p in ll.trainable_parameters(m):
            p.normal_()
    m.train()
    xs = [torch.randn(4, 8), torch.randn(3, 8)]
    for x in xs:
        m(x).pow(2).sum().backward()
    s = layer.take_sensitivity()
    # reference: ∂L/∂ΔW by autograd through an explicit leaf ΔW (sum over both micro-batches)
    dw = layer.delta_weight().detach().requires_grad_(True)
    g = torch.zeros_like(dw)
    for x in xs:
        h = torch.tanh(layers["0"](x))
        y = layer.base_layer(h) + h @ dw.t()
        (gi,) = torch.autograd.grad(layers["4"](torch.tanh(y)).pow(2).sum(), dw)
        g += gi
    ref = (dw.detach().abs() * g.abs()).sum() / math.sqrt(dw.numel())
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=0)
    assert layer.take_sensitivity() is None  # consumed


def test_ema_of_sensitivity_and_uncertainty_follows_the_scripted_sequence():
    m, layers = adapted()
    method = ll.get_adapter_method(m)
    scripted = [0.5, 2.0, 1.0, 0.25]
    ipt = unc = 0.0
    for s in scripted:
        for layer in layers.values():
            layer.take_sensitivity = lambda s=s: torch.tensor(s)  # type: ignore[method-assign]
        method.update_scores(layers)
        ipt = 0.85 * ipt + 0.15 * s
        unc = 0.85 * unc + 0.15 * abs(s - ipt)
    for layer in layers.values():
        torch.testing.assert_close(layer.score_state[:2], torch.tensor([ipt, unc]), rtol=1e-6, atol=0)
    assert method.scores(layers)["0"] == pytest.approx(ipt * unc, rel=1e-6)


def _set_scores(layers, scores):
    for layer, s in zip(layers.values(), scores):
        layer.score_state.copy_(torch.tensor([s, 1.0, 0.0]))


def test_choose_takes_top_h_exactly_or_by_threshold_and_respects_the_budget():
    m, layers = adapted(top_h=2, target_rank=2)  # budget 6 ranks, 3 used
    method = ll.get_adapter_method(m)
    _set_scores(layers, [1.0, 3.0, 2.0])
    assert method.choose(layers) == [("2", 1), ("4", 1)]
    _set_scores(layers, [2.0, 3.0, 2.0])
    assert method.choose(layers) == [("2", 1), ("0", 1)]  # tie at the h-th score: module order
    m, layers = adapted(top_h=2, target_rank=2, tie_break="threshold")
    _set_scores(layers, [2.0, 3.0, 2.0])
    assert ll.get_adapter_method(m).choose(layers) == [("2", 1), ("0", 1), ("4", 1)]  # code: all ≥ threshold
    m, layers = adapted(top_h=3, target_total_rank=4)  # 1 rank left: never exceeded, also with ties
    _set_scores(layers, [2.0, 2.0, 2.0])
    assert ll.get_adapter_method(m).choose(layers) == [("0", 1)]


# ---- growth instant (invariant 7) -----------------------------------------------------------------
@pytest.mark.parametrize("advance", [True, False])
def test_growth_rescales_by_rho_and_adds_only_the_new_reserve(advance):
    m, layers = adapted(r=2, advance_learning=advance)
    method = ll.get_adapter_method(m)
    with torch.no_grad():
        for p in ll.trainable_parameters(m):
            p.normal_()
    layer = layers["2"]
    before = layer.delta_weight()
    s_old = layer.factors()[3]
    old_params = {n: p for n, p in layer.named_parameters()}
    method.grow(layers, [("2", 1)], step=10)
    s_new = layer.factors()[3]
    assert layer.rank == 3 and s_new / s_old == pytest.approx((2 + 1e-5) / (3 + 1e-5))
    expected = before * (s_new / s_old)
    if advance:  # the activated reserve keeps e = 1e-5; a fresh reserve is appended with e = 1e-5
        assert layer.activated == [0, 1, None] and layer.created == [0, 0, 1]
        assert torch.equal(layer.lora_E_1.detach(), torch.tensor([1e-5]))
        expected = expected + s_new * 1e-5 * layer.lora_B_2.detach() @ layer.lora_A_2.detach()
    else:  # the new component starts with e = 0
        assert layer.activated == [0, 1] and torch.equal(layer.lora_E_1.detach(), torch.zeros(1))
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-6, atol=1e-9)
    for n, p in old_params.items():  # no parameter object is replaced
        assert layer.get_parameter(n) is p


# ---- regulariser (invariant 4) --------------------------------------------------------------------
def test_regularizer_is_zero_for_orthonormal_factors_and_its_gradient_is_added():
    m, layers = adapted(r=2)
    with torch.no_grad():
        for layer in layers.values():
            A, B, _, _ = layer.factors()
            qa = torch.linalg.qr(torch.randn(layer.in_features, A.shape[0]))[0].t()  # orthonormal rows
            qb = torch.linalg.qr(torch.randn(layer.out_features, B.shape[1]))[0]  # orthonormal columns
            for i in range(len(layer.ranks)):
                getattr(layer, f"lora_A_{i}").copy_(qa[sum(layer.ranks[:i]): sum(layer.ranks[: i + 1])])
                getattr(layer, f"lora_B_{i}").copy_(qb[:, sum(layer.ranks[:i]): sum(layer.ranks[: i + 1])])
    assert orthogonality_regularizer(layers).item() == pytest.approx(0.0, abs=1e-5)
    m, layers = adapted(r=2, orth_reg=0.3)
    reg = orthogonality_regularizer(layers)
    assert reg.item() > 0.5  # a, b ~ N(0, 0.02²): AAᵀ ≈ 0
    method = ll.get_adapter_method(m)
    params = [p for n, p in m.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]
    ref = torch.autograd.grad(0.3 * orthogonality_regularizer(layers), params)
    method.add_regularizer_grad(layers)
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad, g)
    squared = orthogonality_regularizer(layers, squared=True)
    assert squared.item() != pytest.approx(reg.item())


def test_lora_equivalent_budget_helpers():
    m, layers = adapted(r=1)
    assert lora_param_count(layers, 8) == 8 * ((8 + 16) + (16 + 12) + (12 + 3))
    assert active_param_count(layers) == (8 + 16 + 1) + (16 + 12 + 1) + (12 + 3 + 1)
    assert total_rank(m) == 3


def test_group_schedule_restarts_warmup_then_decays_to_zero_at_the_end():
    g = _GroupSchedule(start=10, warmup=4, total=30)
    assert [g(t) for t in (10, 11, 12, 14)] == [0.0, 0.25, 0.5, 1.0]
    assert g(22) == pytest.approx(0.5) and g(30) == 0.0 and g(40) == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="tie_break"):
        adapted(tie_break="random")
    with pytest.raises(ValueError, match="target_rank"):
        adapted(r=4, target_rank=2)
    with pytest.raises(ValueError, match="incre_rank_num"):
        adapted(incre_rank_num=0, target_rank=3)
    assert ll.make_config("increlora", incre_rank_num=0, target_rank=8).incre_rank_num == 4  # code's mapping


# ---- training through AdapterCallback (invariants 2, 5, 6; optimizer groups; resume) -------------
class Net(pl.LightningModule):
    def __init__(self, scheduler: bool = True) -> None:
        super().__init__()
        self.net = stack(0)
        self.use_scheduler = scheduler
        self.log_ranks: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(ll.trainable_parameters(self), lr=0.01, weight_decay=0.01)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / 16))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Record(pl.Callback):
    """Total rank, group count and group lrs after every step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.rows.append((trainer.global_step, total_rank(pl_module.net), len(opt.param_groups),
                          [g["lr"] for g in opt.param_groups]))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=2)


KW = dict(r=1, target_rank=3, init_warmup=1, interval=2, top_h=1, group_warmup_steps=2, total_steps=16,
          alpha=4, seed=5, orth_reg=0.1)


def _fit(tmp_path, steps, module=None, ckpt=None, scheduler=True, **kw):
    """``steps`` (a multiple of 4) as whole epochs: a checkpoint written when ``max_steps`` stops a run
    at an epoch's last batch resumes with a repeated batch (Lightning's loop state), whole epochs do not."""
    assert steps % 4 == 0
    pl.seed_everything(0, verbose=False)
    module = module or Net(scheduler)
    cb = ll.AdapterCallback("increlora", target="net", target_modules=TARGETS, **{**KW, **kw})
    rec = Record()
    t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=steps // 4, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   callbacks=[cb, rec])
    t.fit(module, _loader(), ckpt_path=ckpt)
    return t, module, cb, rec


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_growth_schedule_budget_groups_and_final_phase(tmp_path):
    t, module, cb, rec = _fit(tmp_path, 16)
    method: IncreLoRA = cb.method  # type: ignore[assignment]
    ranks = [r for _, r, _, _ in rec.rows]
    assert ranks == sorted(ranks) and ranks[-1] == 9 and max(ranks) <= 9  # budget 3 × 3 modules
    # allocations after steps t = 2, 4, ..., 12 (t > init_warmup, t % interval == 0), one module each
    changed = [step - 1 for (step, r, _, _), (_, r0, _, _) in zip(rec.rows, [(0, 3, 0, [])] + rec.rows) if r != r0]
    assert changed == [2, 4, 6, 8, 10, 12] and method.rounds == [3, 5, 7, 9, 11, 13]
    assert [n for (_, _, n, _) in rec.rows] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7, 7]
    # a group added after step t has lr 0 for step t+1, then its own warm-up (2 steps) and decay
    lrs = {step: lr for step, _, _, lr in rec.rows}
    start = method.rounds[0]
    assert lrs[start][1] == 0.0 and lrs[start + 1][1] == pytest.approx(0.005) and lrs[start + 2][1] == pytest.approx(0.01)
    assert lrs[start + 3][1] == pytest.approx(0.01 * 10 / 11)  # decay to 0 at total_steps = 16
    # final phase: no reserves, no dense scoring, parameter count Σρ(m+n+1), reserves out of the optimizer
    layers = cb.layers
    assert method.finished and all(layer.n_reserve == 0 and not layer.scoring for layer in layers.values())
    trainable = {id(p) for p in ll.trainable_parameters(module)}
    assert sum(p.numel() for p in ll.trainable_parameters(module)) == active_param_count(layers)
    opt = t.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    # AdamW states survive growth: the oldest parameters took every step
    assert opt.state[layers["0"].lora_A_0]["step"] == 16
    assert method.allocations and all(len(a) == 1 for a in method.allocations)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.parametrize("advance,scheduler", [(True, True), (False, False)])
def test_checkpoint_mid_growth_resumes_to_the_uninterrupted_result(tmp_path, advance, scheduler):
    _, full, _, rec_full = _fit(tmp_path / "a", 16, advance_learning=advance, scheduler=scheduler)
    t1, part, cb1, _ = _fit(tmp_path / "b", 8, advance_learning=advance, scheduler=scheduler)
    assert 0 < len(cb1.method.rounds) < 6  # the checkpoint is taken between allocations
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    _, resumed, cb2, rec_res = _fit(tmp_path / "c", 16, ckpt=str(ckpt), advance_learning=advance, scheduler=scheduler)
    assert cb2.method.rounds == [3, 5, 7, 9, 11, 13]
    assert rec_res.rows == rec_full.rows[8:]  # same ranks, group count and learning rates per step
    sd_full, sd_res = ll.adapter_state_dict(full.net), ll.adapter_state_dict(resumed.net)
    assert sd_full.keys() == sd_res.keys()
    for k in sd_full:
        torch.testing.assert_close(sd_res[k], sd_full[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_save_load_of_a_grown_adapter_restores_ranks(tmp_path):
    _, module, cb, _ = _fit(tmp_path, 8)  # mid-growth: reserves present
    x = torch.randn(4, 8)
    module.eval()
    with torch.no_grad():
        y = module(x)
    ll.save_adapter(module.net, tmp_path / "adapter")
    fresh = stack(0)
    ll.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    layers = ll.adapter_layers(fresh)
    assert {n: l.ranks for n, l in layers.items()} == {n: l.ranks for n, l in cb.layers.items()}
    assert {n: l.rank for n, l in layers.items()} == {n: l.rank for n, l in cb.layers.items()}
    assert ll.get_adapter_method(fresh).rounds == cb.method.rounds
    ll.merge_adapter(fresh)  # merge includes the reserve term, as the forward
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_parameter_budget_matches_lora_of_rank_k(tmp_path):
    _, module, cb, _ = _fit(tmp_path, 16, budget_lora_r=2, top_h=2, interval=1)
    layers = cb.layers
    budget = lora_param_count(layers, 2)
    final = active_param_count(layers)
    largest = max(layer.in_features + layer.out_features + 1 for layer in layers.values())
    assert budget - largest < final <= budget and cb.method.finished
    assert sum(p.numel() for p in ll.trainable_parameters(module.net)) == final


def test_unsupported_scheduler_is_refused(tmp_path):
    class StepNet(Net):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(ll.trainable_parameters(self), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}

    with pytest.raises(TypeError, match="LambdaLR"):
        _fit(tmp_path, 4, module=StepNet())


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_gradient_accumulation_scores_once_per_step_and_resumes_exactly(tmp_path, monkeypatch):
    """With ``accumulate_grad_batches=2`` the scores update once per optimizer step, also on the first
    step (a fit-start sentinel took the first micro-batch for a step), and a checkpoint taken between
    steps resumes to the uninterrupted run (Lightning restores ``global_step`` after ``on_fit_start``,
    so the step is read at batch start)."""
    from lightning_lora.methods.increlora import IncreLoRA

    calls: list[int] = []
    original = IncreLoRA.update_scores

    def spy(self, layers, trainer=None):
        calls.append(int(trainer.global_step))
        return original(self, layers, trainer)

    monkeypatch.setattr(IncreLoRA, "update_scores", spy)

    def fit(root, epochs, ckpt=None):
        pl.seed_everything(0, verbose=False)
        module = Net(True)
        cb = ll.AdapterCallback("increlora", target="net", target_modules=TARGETS, **KW)
        t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=2, logger=False,
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                       default_root_dir=str(root), callbacks=[cb])
        t.fit(module, _loader(), ckpt_path=ckpt)
        return t, module

    t, full = fit(tmp_path / "a", 8)
    assert t.global_step == 16 and calls == sorted(set(calls)) and 0 not in calls
    t1, _ = fit(tmp_path / "b", 4)
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed = fit(tmp_path / "c", 8, ckpt=str(tmp_path / "mid.ckpt"))
    sf, sr = ll.adapter_state_dict(full.net), ll.adapter_state_dict(resumed.net)
    assert sf and sf.keys() == sr.keys()
    for k in sf:
        torch.testing.assert_close(sr[k], sf[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
