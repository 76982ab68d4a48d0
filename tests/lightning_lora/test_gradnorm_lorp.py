"""GradNormLoRP optimizer invariants (METHODS.md §3, invariants 1-9) and its Lightning wiring."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.optim.gradnorm_lorp import (
    Blockwise8bit,
    GradNormLoRPAdamW,
    compute_projector,
    gradnorm_lorp_param_groups,
    project,
    project_back,
)

pytestmark = [pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers.*")]


def _param(m: int = 24, n: int = 16, seed: int = 0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(m, n, generator=g))


def _set_grad(p: nn.Parameter, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    p.grad = torch.randn(p.shape, generator=g)


def test_weight_norm_layer_exact_at_init():
    lin = nn.Linear(16, 8)
    w = lin.weight.detach().clone()
    g, v = w.norm(dim=1, keepdim=True), w
    torch.testing.assert_close(g * v / v.norm(dim=1, keepdim=True), w, atol=1e-6, rtol=0)
    base = nn.Sequential(nn.Linear(16, 8))
    torch.manual_seed(0)
    adapted = nn.Sequential(nn.Linear(16, 8))
    adapted.load_state_dict(base.state_dict())
    ll.inject_adapter(adapted, "gradnorm_lorp", r=4, dropout=0.0, target_modules=["0"])
    x = torch.randn(3, 16)
    assert torch.equal(adapted(x), base(x))


def test_textbook_direction_gradient_is_orthogonal_to_v():
    p = _param()
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "weight_norm": True}], lr=1e-2)
    v_hat = p.detach() / p.detach().norm(dim=1, keepdim=True)
    grad = torch.randn_like(p)
    grad_g = (grad * v_hat).sum(dim=1, keepdim=True)
    grad_v = grad - grad_g * v_hat  # (g/‖v‖ = 1 at init)
    assert (grad_v * v_hat).sum(dim=1).abs().max() < 1e-5
    p.grad = grad
    opt.step()
    state = opt.state[p]
    # p = g · v/‖v‖ holds after the step, with g and ‖v‖ the stored vectors
    torch.testing.assert_close(p.detach().norm(dim=1), state["wn_g"].abs(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("proj_type,shape", [("std", (24, 16)), ("std", (16, 24)), ("full", (24, 16))])
def test_projectors_orthonormal_and_refresh_only_every_T(proj_type, shape):
    p = _param(*shape)
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "update_proj_gap": 3, "proj_type": proj_type}], lr=1e-3)
    seen = []
    for t in range(7):
        _set_grad(p, t)
        opt.step()
        seen.append({k: v.clone() for k, v in opt.state[p]["proj"].items()})
    for proj in seen:
        if "P" in proj:
            torch.testing.assert_close(proj["P"].t() @ proj["P"], torch.eye(4), atol=1e-5, rtol=0)
        if "Q" in proj:
            torch.testing.assert_close(proj["Q"] @ proj["Q"].t(), torch.eye(4), atol=1e-5, rtol=0)
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:])]
    assert same == [True, True, False, True, True, False]  # refresh at steps 1, 4, 7 (t mod 3 == 0)


def test_full_rank_projection_is_lossless_for_sgd():
    g = torch.randn(12, 9)
    for proj_type in ("std", "full"):
        proj = compute_projector(g, 9, proj_type)
        torch.testing.assert_close(project_back(project(g, proj), proj), g, atol=1e-5, rtol=0)


def test_identity_projection_equals_plain_adamw():
    p1, p2 = _param(seed=1), _param(seed=1)
    ours = GradNormLoRPAdamW([{"params": [p1], "rank": 4, "proj_type": "identity"}], lr=1e-2, eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([p2], lr=1e-2, eps=1e-8, weight_decay=0.1, foreach=False)
    for t in range(4):
        _set_grad(p1, t)
        _set_grad(p2, t)
        ours.step()
        ref.step()
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


def test_plain_groups_equal_torch_adamw_exactly():
    p1, p2 = _param(seed=2), _param(seed=2)
    ours = GradNormLoRPAdamW([p1], lr=3e-3, eps=1e-8, weight_decay=0.05)
    ref = torch.optim.AdamW([p2], lr=3e-3, eps=1e-8, weight_decay=0.05, foreach=False)
    for t in range(5):
        _set_grad(p1, t)
        _set_grad(p2, t)
        ours.step()
        ref.step()
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_update_has_rank_at_most_r_and_lies_in_the_subspace(optim_bits, proj_type):
    p = _param(32, 20)
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 3, "proj_type": proj_type, "update_proj_gap": 100}],
                            lr=1e-2, optim_bits=optim_bits)
    for t in range(3):
        before = p.detach().clone()
        _set_grad(p, t)
        opt.step()
        delta = p.detach() - before
        assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 3
        proj = opt.state[p]["proj"]
        if "Q" in proj:  # row space ⊆ span(Q)
            torch.testing.assert_close(delta @ proj["Q"].t() @ proj["Q"], delta, atol=1e-6, rtol=0)
        if "P" in proj:
            torch.testing.assert_close(proj["P"] @ proj["P"].t() @ delta, delta, atol=1e-6, rtol=0)


def test_state_sizes():
    m, n, r = 64, 40, 4
    for proj_type, bits, expect in (("std", 32, 2 * r * m * 4), ("full", 32, 2 * r * r * 4)):
        p = _param(m, n)
        opt = GradNormLoRPAdamW([{"params": [p], "rank": r, "proj_type": proj_type}], lr=1e-3, optim_bits=bits)
        _set_grad(p, 0)
        opt.step()
        st = opt.state[p]
        moments = sum(v.numel() * v.element_size() for k, v in st.items() if k.startswith("exp_avg"))
        assert moments == expect
    p = _param(m, n)
    opt8 = GradNormLoRPAdamW([{"params": [p], "rank": r}], lr=1e-3, optim_bits=8, block_size=64)
    _set_grad(p, 0)
    opt8.step()
    st = opt8.state[p]
    codes = sum(st[k].numel() for k in ("exp_avg_q", "exp_avg_sq_q"))
    scales = sum(st[k].numel() * 4 for k in ("exp_avg_scale", "exp_avg_sq_scale"))
    assert codes == 2 * r * m and scales == 2 * 4 * ((r * m + 63) // 64)
    assert opt8.state_bytes() < 0.2 * 2 * m * n * 4


def test_8bit_round_trip_bounds():
    x = torch.randn(1000) * torch.logspace(-3, 0, 1000)
    c, s = Blockwise8bit.quantize_signed(x, 128)
    back = Blockwise8bit.dequantize_signed(c, s, x.shape, 128)
    step = s.repeat_interleave(128)[:1000] / 127
    assert torch.all((back - x).abs() <= step / 2 + 1e-7)
    v = x.square()
    c, s = Blockwise8bit.quantize_sqrt(v, 128)
    back = Blockwise8bit.dequantize_sqrt(c, s, v.shape, 128)
    assert torch.all((back.sqrt() - v.sqrt()).abs() <= s.repeat_interleave(128)[:1000] / 255 / 2 + 1e-7)


def test_weight_decay_once_per_step():
    p = _param()
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "scale": 1.0}], lr=0.1, weight_decay=0.5)
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)  # zero gradient: the update is pure decay
    opt.step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5), atol=1e-6, rtol=0)


def test_optimizer_state_round_trip():
    p = _param()
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "update_proj_gap": 2}], lr=1e-2, optim_bits=8)
    for t in range(3):
        _set_grad(p, t)
        opt.step()
    sd = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    opt2 = GradNormLoRPAdamW([{"params": [q], "rank": 4, "update_proj_gap": 2}], lr=1e-2, optim_bits=8)
    opt2.load_state_dict(sd)
    _set_grad(p, 9)
    _set_grad(q, 9)
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_param_groups_split():
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    ll.inject_adapter(net, "gradnorm_lorp", r=2, target_modules=["0"], modules_to_save=["1"])
    groups = gradnorm_lorp_param_groups(net, rank=2)
    assert len(groups[0]["params"]) == 2 and groups[0]["rank"] == 2  # lora_A, lora_B
    assert len(groups[1]["params"]) == 3  # magnitude + head weight and bias


def test_sequence_classifier_uses_the_method_optimizer(tmp_path):
    from lightning_lora.tasks import SequenceClassifier

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.dense = nn.Linear(8, 16)
            self.classifier = nn.Linear(16, 2)

        def forward(self, input_ids=None, attention_mask=None, labels=None):
            from types import SimpleNamespace
            logits = self.classifier(torch.tanh(self.dense(input_ids.float())))
            return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels) if labels is not None else None)

    module = SequenceClassifier(Tiny(), num_labels=2, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=lambda b: {
        "input_ids": torch.stack([t[0] for t in b]), "labels": torch.stack([t[1] for t in b])})
    cb = ll.AdapterCallback("gradnorm_lorp", r=2, proj_rank=2, update_proj_gap=2, target="model",
                            target_modules=["dense"], modules_to_save=["classifier"])
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[cb])
    trainer.fit(module, data)
    opt = trainer.optimizers[0]
    assert isinstance(opt, GradNormLoRPAdamW)
    assert "proj" in opt.state[module.model.dense.lora_A] and opt.state[module.model.dense.lora_A]["step"] == 4
