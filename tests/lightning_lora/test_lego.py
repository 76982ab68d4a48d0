"""LoRA-LEGO (METHODS.md §6): minimal semantic units, canonicalisation, k-means, dual reweighting,
and the merge of named adapters of a model (invariants 1-11 of §6)."""

from __future__ import annotations

import pytest
import torch

import lightning_lora as ll
from lightning_lora.core import multi
from lightning_lora.merge import baselines as mb
from lightning_lora.merge import lego


def _lora(m: int, n: int, r: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), scale


def _delta(lora) -> torch.Tensor:
    b, a, s = lora
    return s * b @ a


def _close(x: torch.Tensor, y: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(x, y, atol=atol * max(1.0, float(y.abs().max())), rtol=0)


@pytest.mark.parametrize("folding", ["sqrt", "b"])
@pytest.mark.parametrize("scale", [0.5, -2.0])
def test_units_reconstruct_delta_and_permutation(folding, scale):
    b, a, s = _lora(6, 9, 4, seed=0, scale=scale)
    ua, ub = lego.minimal_semantic_units(b, a, s, folding)
    assert ua.shape == (4, 9) and ub.shape == (4, 6)
    _close(ub.t() @ ua, s * b @ a)  # invariant 1
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(1))
    _close(s * b[:, perm] @ a[perm], s * b @ a)  # invariant 2
    ca, cb = lego.canonicalize_units(ua, ub)
    _close(cb.t() @ ca, s * b @ a)
    torch.testing.assert_close(ca.norm(dim=1), cb.norm(dim=1))
    assert (cb.gather(1, cb.abs().argmax(1, keepdim=True)) > 0).all()


def test_canonical_form_ignores_sign_and_scale_of_units():
    b, a, _ = _lora(6, 9, 4, seed=2)
    ua, ub = lego.minimal_semantic_units(b, a)
    c = torch.tensor([-1.0, 3.0, -0.25, 1.0])[:, None]
    ca, cb = lego.canonicalize_units(ua, ub)
    ca2, cb2 = lego.canonicalize_units(ua * c, ub / c)
    _close(ca2, ca)
    _close(cb2, cb)
    za, zb = lego.canonicalize_units(torch.zeros(1, 3), torch.ones(1, 2))  # a zero factor: a zero unit
    assert za.abs().max() == 0 and zb.abs().max() == 0


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(5)
    x = centers[truth] + 0.1 * torch.randn(15, 3, generator=g)
    cent, labels = lego.kmeans(x, 3, seed=4)
    for c in range(3):  # each true cluster maps to one label, and the centroid is its mean
        assert labels[truth == c].unique().numel() == 1
        _close(cent[labels[truth == c][0]], x[truth == c].mean(0))
    cent2, labels2 = lego.kmeans(x, 3, seed=4)
    assert torch.equal(labels, labels2) and torch.equal(cent, cent2)
    _, own = lego.kmeans(x, 15, seed=0)  # k = U: every point its own cluster
    assert own.unique().numel() == 15
    with pytest.raises(ValueError, match=r"k must be in \[1, 15\]"):
        lego.kmeans(x, 16)


def test_kmeans_with_duplicates_leaves_no_member_twice():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cent, labels = lego.kmeans(x, 3, seed=0)  # two identical points cannot fill three clusters
    assert labels[0] == labels[1] and labels[2] != labels[0]


def test_k_equals_total_units_without_reweighting_is_the_sum():
    loras = [_lora(6, 9, 3, seed=1, scale=2.0), _lora(6, 9, 2, seed=2, scale=0.5)]
    res = lego.lego_merge(loras, k=5, parameter_reweight=False, output_reweight="none")  # invariant 4
    assert res.B.shape == (6, 5) and res.A.shape == (5, 9)  # invariant 7
    _close(res.B @ res.A, _delta(loras[0]) + _delta(loras[1]))
    torch.testing.assert_close(res.B @ res.A, mb.task_arithmetic([_delta(x) for x in loras]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("canonicalize", [True, False])
def test_one_lora_with_k_equal_r_is_reproduced(canonicalize):
    lora = _lora(6, 9, 4, seed=3, scale=1.5)  # invariant 5, with both reweightings on (the defaults)
    res = lego.lego_merge([lora], k=4, canonicalize=canonicalize)
    _close(res.B @ res.A, _delta(lora))
    assert res.lam == pytest.approx(1.0, abs=1e-6)


def test_identical_copies_give_the_original():
    lora = _lora(6, 9, 3, seed=4, scale=0.7)  # invariant 6
    res = lego.lego_merge([lora, lora, lora], k=3)
    _close(res.B @ res.A, _delta(lora))
    assert res.lam == pytest.approx(1.0, abs=1e-5)
    assert sorted(torch.bincount(res.labels).tolist()) == [3, 3, 3]


def test_parameter_reweighting_restores_member_norms():
    loras = [_lora(6, 9, 4, seed=s) for s in (5, 6, 7)]  # invariant 8
    res = lego.lego_merge(loras, k=3, output_reweight="none")
    ua = torch.cat([lego.minimal_semantic_units(b, a, s)[0] for b, a, s in loras])
    ub = torch.cat([lego.minimal_semantic_units(b, a, s)[1] for b, a, s in loras])
    ua, ub = lego.canonicalize_units(ua, ub)
    assert torch.bincount(res.labels, minlength=3).min() >= 1
    for c in range(3):
        members = res.labels == c
        assert float(res.A[c].norm()) == pytest.approx(float(ua[members].norm(dim=1).mean()), rel=1e-5)
        assert float(res.B[:, c].norm()) == pytest.approx(float(ub[members].norm(dim=1).mean()), rel=1e-5)
    plain = lego.lego_merge(loras, k=3, output_reweight="none", parameter_reweight=False)
    assert torch.equal(plain.labels, res.labels)
    assert (plain.A.norm(dim=1) <= res.A.norm(dim=1) + 1e-6).all()  # averaging shrinks, reweighting undoes it


def test_output_reweighting_matches_mean_source_norm_and_calibration():
    loras = [_lora(6, 9, 4, seed=s, scale=0.5 * s) for s in (1, 2, 3)]
    res = lego.lego_merge(loras, k=4)  # invariant 9
    target = sum(float(_delta(x).pow(2).sum()) for x in loras) / 3
    assert float((res.B @ res.A).pow(2).sum()) == pytest.approx(target, rel=1e-5)
    assert res.lam != pytest.approx(1.0, abs=1e-3)
    x = torch.randn(50, 9, generator=torch.Generator().manual_seed(0))
    cal = lego.lego_merge(loras, k=4, output_reweight="calibration", calibration_inputs=x)
    want = sum(float((x @ _delta(lo).t()).pow(2).sum()) for lo in loras) / 3
    assert float((x @ (cal.B @ cal.A).t()).pow(2).sum()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="calibration_inputs"):
        lego.lego_merge(loras, k=4, output_reweight="calibration")


def test_sign_flips_of_units_do_not_change_the_merge():
    loras = [_lora(6, 9, 4, seed=s) for s in (8, 9)]  # invariant 10
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0])
    flipped = [(b * flip, flip[:, None] * a, s) for b, a, s in loras]
    r1, r2 = lego.lego_merge(loras, k=3, seed=1), lego.lego_merge(flipped, k=3, seed=1)
    assert torch.equal(r1.labels, r2.labels)
    _close(r1.B @ r1.A, r2.B @ r2.A)


def test_deterministic_and_errors():
    loras = [_lora(6, 9, 4, seed=s) for s in (10, 11)]  # invariant 11
    r1, r2 = lego.lego_merge(loras, k=3, seed=7), lego.lego_merge(loras, k=3, seed=7)
    assert torch.equal(r1.B, r2.B) and torch.equal(r1.A, r2.A)
    with pytest.raises(ValueError, match="k must be"):
        lego.lego_merge(loras, k=9)
    with pytest.raises(ValueError, match="share"):
        lego.lego_merge([loras[0], _lora(5, 9, 2, 0)], k=2)
    with pytest.raises(ValueError, match="feature"):
        lego.lego_merge(loras, k=2, feature="ab")
    for feature in ("a", "b"):  # clustering on one factor: units still pair up, shapes hold
        res = lego.lego_merge(loras, k=3, feature=feature)
        assert res.B.shape == (6, 3) and torch.isfinite(res.B @ res.A).all()


# ---- named adapters of a model ------------------------------------------------------------
def _model_with_loras(model_builders, ranks=(4, 4)):
    m = model_builders["bert_cls"](0)
    for i, r in enumerate(ranks):
        multi.add_adapter(m, f"t{i}", "lora", r=r, alpha=2 * r, target_modules=["query", "value"],
                          modules_to_save=["classifier", "pooler"])
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for layer in multi.named_adapter_layers(m, f"t{i}").values():
                layer.lora_B.normal_(generator=g)
            for p in m.classifier.copies[f"t{i}"].parameters():
                p.add_(torch.randn(p.shape, generator=g))
    return m


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_model_lego_of_one_adapter_reproduces_it(model_builders):
    m = _model_with_loras(model_builders, ranks=(4,))
    lego.lego_merge_adapters(m, ["t0"], "lego", k=4, modules_to_save_from="t0")
    x = {"input_ids": torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(0))}
    multi.set_adapter(m, "t0")
    y = _logits(m, x)
    multi.set_adapter(m, "lego")
    torch.testing.assert_close(_logits(m, x), y, atol=1e-5, rtol=0)


def test_model_lego_per_layer_and_save_load(model_builders, tmp_path):
    m = _model_with_loras(model_builders, ranks=(4, 2))
    results = lego.lego_merge_adapters(m, ["t0", "t1"], "lego", seed=3, modules_to_save_from="t1")
    assert multi.adapter_method(m, "lego").config.r == 4  # k defaults to the largest source rank
    deltas = multi.adapter_delta_weights(m, "lego")
    for t, layer0 in multi.named_adapter_layers(m, "t0").items():
        layer1 = multi.named_adapter_layers(m, "t1")[t]
        ref = lego.lego_merge([mb.lora_factors(layer0), mb.lora_factors(layer1)], k=4, seed=3)
        _close(deltas[t], ref.B @ ref.A)
        assert results[t].lam == pytest.approx(ref.lam)
    x = {"input_ids": torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(1))}
    multi.set_adapter(m, "lego")
    y = _logits(m, x)
    multi.save_adapters(m, tmp_path, names=["lego"])
    fresh = model_builders["bert_cls"](0)
    multi.load_adapters(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, x), y, atol=0, rtol=0)
    torch.testing.assert_close(_logits(ll.load_adapter(model_builders["bert_cls"](0), tmp_path / "lego"), x), y,
                               atol=0, rtol=0)


def test_model_lego_calibration_and_too_large_k(model_builders):
    m = _model_with_loras(model_builders, ranks=(2, 2))
    x = {"input_ids": torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(2))}
    lego.lego_merge_adapters(m, ["t0", "t1"], "cal", k=3, output_reweight="calibration",
                             calibration=lambda model: model(**x))
    assert multi.active_adapters(m) == ["t0"]  # calibration restores the active set
    with pytest.raises(ValueError, match=r"layer .*query.*k must be"):
        lego.lego_merge_adapters(m, ["t0", "t1"], "big", k=5)
    assert "big" not in multi.adapter_names(m)
