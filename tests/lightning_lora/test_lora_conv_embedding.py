"""LoRA on ``nn.Embedding`` and ``nn.Conv1d/2d/3d`` (:mod:`lightning_lora.methods.lora_modules`): the
shared invariants of METHODS.md (S1 output equals the base at init, S2 merged equals unmerged and
unmerge restores the base, S3 only adapter parameters get gradients, S4 save/load round trip, S5 bf16
finite and close, S6 parameter counts, disabling reversible), the embedding's own rules (A = 0,
B ~ N(0, 1); padding_idx; embed_scale), DoRA's (magnitude = base norms per output feature, the
zero-magnitude unmerge, the norm's gradient), PEFT interop both ways (LoRA and DoRA), named
adapters, the Lightning callback, and the clear refusals."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.multi import adapter_delta_weights
from lightning_lora.methods.lora_modules import LoRAConv, LoRAEmbedding

import peft  # noqa: E402  (a test dependency)


class Net(nn.Module):
    """Token ids (N, L) -> embedding -> Conv1d -> Conv2d -> Conv3d -> linear head: every module kind."""

    def __init__(self, conv2d: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = conv2d or nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.conv3 = nn.Conv3d(5, 4, (1, 2, 2))
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (N, 6, L)
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 6).contiguous())  # (N, 5, L', 3)
        h = self.conv3(h.unsqueeze(2))  # (N, 4, 1, L'', 2)
        return self.head(h.flatten(2).mean(-1))


TARGETS = ["emb", "conv1", "conv2", "conv3"]
#: conv2 variants: the geometry the adapter's A must share with the base for merging to be exact
CONV2 = {
    "stride2": lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1),
    "dilated_reflect": lambda: nn.Conv2d(6, 5, 3, padding=2, dilation=2, padding_mode="reflect"),
    "same_circular_nobias": lambda: nn.Conv2d(6, 5, (3, 1), padding="same", padding_mode="circular", bias=False),
}
VARIANTS = {"plain": dict(r=2, alpha=4), "rslora_gaussian": dict(r=3, alpha=2, use_rslora=True, init="gaussian"),
            "dora": dict(r=2, alpha=4, use_dora=True), "dora_norm_grad": dict(r=2, alpha=4, use_dora=True,
                                                                                dora_detach_norm=False)}


def _net(conv2: str = "stride2", seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(CONV2[conv2]())


def _ids(seed: int = 1) -> torch.Tensor:
    ids = torch.randint(1, 20, (3, 12), generator=torch.Generator().manual_seed(seed))
    ids[0, -3:] = 0  # padding tokens
    return ids


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ll.trainable_parameters(model):
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _adapted(conv2: str = "stride2", kw: dict | None = None, targets=TARGETS) -> tuple[Net, Net, dict]:
    base = _net(conv2)
    model = copy.deepcopy(base)
    layers = ll.inject_adapter(model, "lora", target_modules=list(targets), **(kw or VARIANTS["plain"]))
    return base, model, layers


def test_layer_types_and_embedding_init_swaps_roles():
    _, _, layers = _adapted()
    assert isinstance(layers["emb"], LoRAEmbedding)
    assert all(isinstance(layers[n], LoRAConv) for n in ("conv1", "conv2", "conv3"))
    emb = layers["emb"]
    # METHODS.md §1: embedding layers swap roles, A = 0 and B ~ N(0, 1)
    assert torch.count_nonzero(emb.lora_embedding_A) == 0
    b = emb.lora_embedding_B
    assert b.shape == (8, 2) and torch.count_nonzero(b) == b.numel() and 0.3 < b.std().item() < 3
    conv = layers["conv2"]
    assert conv.lora_A.shape == (2, 6, 3, 3) and conv.lora_B.shape == (5, 2, 1, 1)
    assert torch.count_nonzero(conv.lora_B) == 0 and torch.count_nonzero(conv.lora_A) == conv.lora_A.numel()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("conv2", list(CONV2))
def test_s1_s2_init_equals_base_merge_equals_unmerged_unmerge_restores(conv2, variant):
    base, model, layers = _adapted(conv2, VARIANTS[variant])
    ids = _ids()
    y0 = base(ids)
    assert torch.equal(model(ids), y0)  # S1: bit-exact at init
    _perturb(model)
    y = model(ids)
    assert (y - y0).abs().max() > 1e-2  # every adapter now changes the output
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in layers.items()}
    ll.merge_adapter(model)
    assert all(not torch.equal(l.base_layer.weight, w0[n]) for n, l in layers.items())
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)
    ll.unmerge_adapter(model)
    for n, l in layers.items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_starts_at_the_base_norms_and_rescales_each_output_feature():
    """DoRA: m = ‖W0‖ per output feature (an embedding dimension; an output channel over its inputs
    and kernel), in PEFT's shapes; the merged weight is m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, so each merged
    output feature has norm m."""
    _, model, layers = _adapted(kw=VARIANTS["dora"])
    emb, conv = layers["emb"], layers["conv2"]
    assert emb.lora_magnitude.shape == (8,) and conv.lora_magnitude.shape == (1, 5, 1, 1)
    torch.testing.assert_close(emb.lora_magnitude, emb.base_layer.weight.norm(dim=0))
    torch.testing.assert_close(conv.lora_magnitude.flatten(), conv.base_layer.weight.flatten(1).norm(dim=1))
    _perturb(model)
    ll.merge_adapter(model)
    torch.testing.assert_close(emb.base_layer.weight.norm(dim=0), emb.lora_magnitude, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.base_layer.weight.flatten(1).norm(dim=1), conv.lora_magnitude.flatten(),
                               atol=1e-5, rtol=1e-5)


def test_dora_zero_magnitude_channel_unmerges_to_its_base_weights():
    base, model, layers = _adapted(kw=VARIANTS["dora"])
    _perturb(model)
    conv = layers["conv2"]
    with torch.no_grad():
        conv.lora_magnitude[0, 1] = 0.0  # this channel merges to 0 whatever W0 was
    ids = _ids()
    y = model(ids)
    ll.merge_adapter(model)
    assert torch.count_nonzero(conv.base_layer.weight[1]) == 0
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)
    ll.unmerge_adapter(model)
    torch.testing.assert_close(conv.base_layer.weight, base.conv2.weight, atol=1e-6, rtol=0)


def test_dora_norm_gradient_follows_dora_detach_norm():
    """With ``dora_detach_norm=False`` ν is differentiated too, so A and B get other gradients."""
    grads = {}
    for detach in (True, False):
        _, model, layers = _adapted(kw=dict(r=2, alpha=4, use_dora=True, dora_detach_norm=detach))
        _perturb(model)
        model(_ids()).pow(2).sum().backward()
        grads[detach] = layers["conv2"].lora_A.grad.clone()
    assert not torch.allclose(grads[True], grads[False])


def test_unload_with_merge_leaves_plain_modules_with_the_adapted_outputs():
    base, model, _ = _adapted(conv2="dilated_reflect")
    _perturb(model)
    ids = _ids()
    y = model(ids)
    ll.unload(model, merge=True)
    assert [type(m) for m in model.children()] == [type(m) for m in base.children()]
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_the_merged_kernel_difference():
    """ΔW in the kernel's own shape: conv(x, W + ΔW) equals the unmerged layer."""
    _, model, layers = _adapted()
    _perturb(model)
    conv = layers["conv2"]
    x = torch.randn(2, 6, 7, 5)
    dw = conv.delta_weight()
    assert dw.shape == conv.base_layer.weight.shape and dw.dtype == torch.float32
    w = conv.base_layer.weight + dw
    ref = conv.base_layer._conv_forward(x, w, conv.base_layer.bias)
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)
    emb = layers["emb"]
    assert emb.delta_weight().t().shape == emb.base_layer.weight.shape  # (out, in) = the table transposed


def test_unbatched_conv_input():
    _, model, layers = _adapted()
    _perturb(model)
    conv = layers["conv1"]
    x = torch.randn(8, 10)
    torch.testing.assert_close(conv(x), conv(x.unsqueeze(0)).squeeze(0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_s3_only_adapter_parameters_get_gradients(variant):
    _, model, layers = _adapted(kw=VARIANTS[variant])
    _perturb(model)
    model(_ids()).pow(2).sum().backward()
    expected = {f"{n}.{p}" for n, l in layers.items() for p in l.adapter_param_names
                if getattr(l, p) is not None}
    assert any(n.endswith("lora_magnitude") for n in expected) == (variant == "dora")
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected)


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_s4_save_load_round_trip_is_exact(tmp_path, variant):
    base, model, _ = _adapted(kw=VARIANTS[variant])
    _perturb(model)
    ll.save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    ll.load_adapter(fresh, tmp_path)
    ids = _ids()
    assert torch.equal(fresh(ids), model(ids))
    a, b = ll.adapter_state_dict(model), ll.adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["plain", "dora"])
@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_s5_bf16_finite_and_close(mode, variant):
    _, model, _ = _adapted(kw=VARIANTS[variant])
    _perturb(model)
    ids = _ids()
    y32 = model(ids)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = model(ids)
    else:
        y16 = model.to(torch.bfloat16)(ids)
    assert torch.isfinite(y16).all()
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 2e-2


@pytest.mark.parametrize("dora", [False, True])
def test_s6_parameter_counts(dora):
    _, model, _ = _adapted(kw=dict(r=3, alpha=3, use_dora=dora))
    counts = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in model.named_children()}
    assert counts["emb"] == 3 * (20 + 8) + dora * 8  # DoRA: one magnitude per output feature
    assert counts["conv1"] == 3 * 8 * 3 + 6 * 3 + dora * 6
    assert counts["conv2"] == 3 * 6 * 9 + 5 * 3 + dora * 5
    assert counts["conv3"] == 3 * 5 * 4 + 4 * 3 + dora * 4
    assert counts["head"] == 0


def test_disable_is_reversible():
    base, model, _ = _adapted()
    _perturb(model)
    ids = _ids()
    y = model(ids)
    with ll.disable_adapter(model):
        assert torch.equal(model(ids), base(ids))
    assert torch.equal(model(ids), y)


def test_embedding_padding_row_keeps_the_base_output():
    """The adapter's lookup takes the base's padding_idx: A's padding column gets no gradient, so the
    padding token's embedding stays the base's through training."""
    base, model, layers = _adapted()
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=0.05)
    ids = _ids()
    for _ in range(3):
        model(ids).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    emb = layers["emb"]
    assert torch.count_nonzero(emb.lora_embedding_A[:, 0]) == 0
    assert torch.count_nonzero(emb.lora_embedding_A[:, 1:]) > 0
    pad = torch.zeros(1, 4, dtype=torch.long)
    assert torch.equal(emb(pad), base.emb(pad))


class ScaledEmbedding(nn.Embedding):
    """transformers' scaled word embeddings (Gemma): the lookup times a scalar ``embed_scale``."""

    def __init__(self, *args, embed_scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def test_embed_scale_multiplies_the_adapter_term_as_the_merged_table():
    model = nn.Sequential(ScaledEmbedding(20, 8, embed_scale=math.sqrt(8)))
    layer = ll.inject_adapter(model, "lora", r=2, alpha=4, target_modules=["0"])["0"]
    _perturb(model)
    ids = _ids()
    y = model(ids)
    ll.merge_adapter(model)
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)
    ll.unmerge_adapter(model)
    base_rows = layer.base_layer(ids)
    unscaled = layer.scaling * nn.functional.embedding(ids, layer.lora_embedding_A.t()) @ layer.lora_embedding_B.t()
    torch.testing.assert_close(y - base_rows, math.sqrt(8) * unscaled, atol=1e-5, rtol=1e-5)


# ---- PEFT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_saved_directory_loads_in_peft_with_the_same_outputs(tmp_path, dora):
    base, model, _ = _adapted(kw=dict(r=2, alpha=4, dropout=0.1, use_dora=dora), targets=[*TARGETS, "head"])
    _perturb(model)
    model.eval()
    ll.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = _ids()
    torch.testing.assert_close(pm(ids), model(ids), atol=1e-5, rtol=0)
    # and PEFT's merge gives the same model as ours
    torch.testing.assert_close(pm.merge_and_unload()(ids), model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init,dora", [(True, False), ("gaussian", False), (True, True)])
def test_peft_directory_loads_here_with_the_same_outputs(tmp_path, init, dora):
    base = _net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=init,
                                                                  use_dora=dora, target_modules=[*TARGETS, "head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # (magnitudes jittered, not shifted: they stay positive)
                p.mul_(1 + 0.1 * torch.randn_like(p)) if "magnitude" in n else p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    ll.load_adapter(model, tmp_path)
    ids = _ids()
    torch.testing.assert_close(model(ids), pm(ids), atol=1e-5, rtol=0)
    assert isinstance(ll.adapter_layers(model)["emb"], LoRAEmbedding)


# ---- named adapters, the callback ------------------------------------------------------------
def test_two_named_adapters_add_up_and_merge_together():
    base = _net()
    model = copy.deepcopy(base)
    ll.add_adapter(model, "a", "lora", r=2, target_modules=TARGETS)
    ll.add_adapter(model, "b", "lora", r=3, target_modules=["emb", "conv2"])
    _perturb(model)
    ids = _ids()
    ll.set_adapter(model, "a")
    ya = model(ids)
    ll.set_adapter(model, "b")
    _perturb(model, seed=9)
    yb = model(ids)
    ll.set_adapter(model, ["a", "b"])
    y = model(ids)
    assert not torch.allclose(y, ya) and not torch.allclose(y, yb)
    # the two updates add, layer by layer: conv2 runs W + ΔW_a + ΔW_b, emb the table + ΔE_a + ΔE_b
    da, db = adapter_delta_weights(model, "a"), adapter_delta_weights(model, "b")
    conv2, x = model.conv2, torch.randn(2, 6, 7, 5)
    ref = conv2.base_layer._conv_forward(x, conv2.base_layer.weight + da["conv2"] + db["conv2"], conv2.base_layer.bias)
    torch.testing.assert_close(conv2(x), ref, atol=1e-5, rtol=1e-5)
    table = model.emb.base_layer.weight + (da["emb"] + db["emb"]).t()
    torch.testing.assert_close(model.emb(ids), table[ids], atol=1e-5, rtol=1e-5)
    y0 = base(ids)
    with ll.disable_adapter(model):
        assert torch.equal(model(ids), y0)
    ll.merge_adapter(model)
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)
    ll.unmerge_adapter(model)
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)


def _trainer_and_module(net: nn.Module, callback, max_steps: int):
    """A CPU Trainer with ``callback`` and a LightningModule holding ``net`` as ``net`` (loss: cross
    entropy against the batch's labels, or the output's mean square for an unlabelled batch)."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            out = self.net(batch[0])
            return nn.functional.cross_entropy(out, batch[1]) if len(batch) > 1 else out.float().pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(ll.trainable_parameters(self), lr=0.05)

    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    return trainer, Module()


def test_adapter_callback_trains_only_the_conv_and_embedding_adapters(tmp_path):
    ids = torch.randint(0, 20, (16, 12), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=8)
    callback = ll.AdapterCallback("lora", r=2, alpha=4, target="net", target_modules=TARGETS,
                                  export_dir=tmp_path / "adapter")
    trainer, module = _trainer_and_module(_net(), callback, max_steps=4)
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    trainer.fit(module, loader)
    layers = ll.adapter_layers(module.net)
    assert set(layers) == set(TARGETS)
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"])  # frozen
    assert not torch.equal(layers["emb"].lora_embedding_A, torch.zeros_like(layers["emb"].lora_embedding_A))
    assert not torch.equal(layers["conv2"].lora_B, torch.zeros_like(layers["conv2"].lora_B))
    assert torch.equal(module.net.head.weight, before["head.weight"])
    loaded = _net()
    ll.load_adapter(loaded, tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids), module.net(ids), atol=1e-6, rtol=0)


def test_trace_of_an_adapted_conv_model_equals_eager():
    _, model, _ = _adapted()
    _perturb(model)
    model.eval()
    ids = _ids()
    traced = torch.jit.trace(model, (ids,))
    torch.testing.assert_close(traced(_ids(seed=4)), model(_ids(seed=4)), atol=1e-6, rtol=0)


# ---- grouped convolutions --------------------------------------------------------------------
GROUPED = {
    "grouped_dilated_reflect": (lambda: nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"), 8),
    "depthwise_1d": (lambda: nn.Conv1d(6, 6, 5, padding=2, groups=6), 6),
    "grouped_3d_stride": (lambda: nn.Conv3d(4, 6, (1, 3, 3), stride=2, groups=2), 4),
}


def _grouped(kind: str, **kw) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    make, r = GROUPED[kind]
    torch.manual_seed(0)
    base = nn.Sequential(make())
    model = copy.deepcopy(base)
    ll.inject_adapter(model, "lora", r=r, alpha=r, target_modules=["0"], **kw)
    conv = base[0]
    x = torch.randn(2, conv.in_channels, *(9,) * (conv.weight.dim() - 2), generator=torch.Generator().manual_seed(3))
    return base, model, x


@pytest.mark.parametrize("kind", list(GROUPED))
@pytest.mark.parametrize("use_dora", [False, True])
def test_grouped_convolution_update_is_one_lora_per_group_and_merges_exactly(kind, use_dora):
    base, model, x = _grouped(kind, use_dora=use_dora)
    layer = model[0]
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    assert layer.lora_A.shape[1] == base[0].weight.shape[1]  # C_in / groups
    _perturb(model)
    g, r, out = layer.groups, layer.r, layer.out_features
    blocks = [layer.scaling * layer.lora_B[G * out // g:(G + 1) * out // g].flatten(1)
              @ layer.lora_A[G * r // g:(G + 1) * r // g].flatten(1) for G in range(g)]
    by_group = torch.cat(blocks).reshape(base[0].weight.shape)
    torch.testing.assert_close(layer._scaled_ba(), by_group, atol=1e-6, rtol=0)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected[0].weight += layer.delta_weight()
    out_unmerged = model(x)
    torch.testing.assert_close(out_unmerged, expected(x), atol=1e-5, rtol=0)
    out_unmerged.pow(2).mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    ll.merge_adapter(model)
    torch.testing.assert_close(model(x), out_unmerged, atol=1e-5, rtol=0)
    ll.unmerge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight, base[0].weight, atol=1e-6, rtol=0)


def test_grouped_convolution_saves_in_this_librarys_format_and_refuses_peft_form(tmp_path):
    base, model, x = _grouped("grouped_dilated_reflect")
    _perturb(model)
    ll.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["lightning_lora"]["method"] == "lora"
    loaded = copy.deepcopy(base)
    ll.load_adapter(loaded, tmp_path / "ours")
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # PEFT's form for a grouped base (A over every input channel) is another function: a named mismatch
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=4, target_modules=["0"])).save_pretrained(tmp_path / "peft")
    with pytest.raises(ll.AdapterFormatError, match=r"lora_A.weight has shape \(4, 8, 3, 3\), the model expects \(4, 2, 3, 3\)"):
        ll.load_adapter(plain, tmp_path / "peft")
    assert not ll.adapter_layers(plain)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(GROUPED))
def test_cuda_bf16_grouped_convolution_trains_and_merges(kind):
    base, model, x = _grouped(kind)
    _perturb(model)
    model.cuda()
    x = x.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's default TF32 convs differ by ~1e-3 between paths
    try:
        with torch.no_grad():
            expected = model(x)
            ll.merge_adapter(model)
            torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


# ---- transposed convolutions ------------------------------------------------------------------
TRANSPOSED = {
    "2d_stride_output_padding": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), 4, None, 2),
    "1d_grouped_dilated": (lambda: nn.ConvTranspose1d(6, 8, 4, stride=2, padding=1, groups=2, dilation=2), 4, None, 2),
    "3d_depthwise": (lambda: nn.ConvTranspose3d(4, 4, (1, 3, 3), stride=(1, 2, 2), groups=4, bias=False), 4, None, 2),
    "2d_output_size": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1), 4, [10, 10], 0),
    "1d_unbatched": (lambda: nn.ConvTranspose1d(6, 5, 3, stride=3), 2, None, 0),
}


def _transposed(kind: str, **kw):
    make, r, output_size, batch = TRANSPOSED[kind]
    torch.manual_seed(0)
    base = nn.ModuleDict({"up": make()})
    model = copy.deepcopy(base)
    layers = ll.inject_adapter(model, "lora", r=r, alpha=r, target_modules=["up"], **kw)
    conv = base["up"]
    shape = (conv.in_channels, *(5,) * (conv.weight.dim() - 2))
    x = torch.randn(*((batch,) if batch else ()), *shape, generator=torch.Generator().manual_seed(3))
    if output_size is not None:
        x = x.unsqueeze(0).expand(2, *shape).contiguous()
        return base, model, layers["up"], x, lambda m: m["up"](x, output_size)
    return base, model, layers["up"], x, lambda m: m["up"](x)


@pytest.mark.parametrize("kind", list(TRANSPOSED))
def test_transposed_convolution_lora_is_exact_and_mergeable(kind, tmp_path):
    base, model, layer, x, run = _transposed(kind)
    torch.testing.assert_close(run(model), run(base), atol=0, rtol=0)
    _perturb(model)
    g, r = layer.groups, layer.r
    n_in, n_out = layer.in_features // g, layer.out_features // g
    blocks = [layer.scaling * layer.lora_A[G * r // g:(G + 1) * r // g].flatten(1).t()
              @ layer.lora_B[G * r // g:(G + 1) * r // g].flatten(1) for G in range(g)]
    torch.testing.assert_close(layer.delta_weight(), torch.cat(blocks).reshape(base["up"].weight.shape), atol=1e-6, rtol=0)
    assert all(torch.linalg.matrix_rank(b) <= r // g for b in blocks) and blocks[0].shape == (n_in, n_out * math.prod(base["up"].kernel_size))
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected["up"].weight += layer.delta_weight()
    out = run(model)
    torch.testing.assert_close(out, run(expected), atol=1e-5, rtol=0)
    out.pow(2).mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    ll.save_adapter(model, tmp_path)
    assert "peft_type" not in json.loads((tmp_path / "adapter_config.json").read_text())  # PEFT has no such layer
    loaded = copy.deepcopy(base)
    ll.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(run(loaded), out, atol=0, rtol=0)
    ll.merge_adapter(model)
    torch.testing.assert_close(run(model), out, atol=1e-5, rtol=0)
    ll.unmerge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight, base["up"].weight, atol=1e-6, rtol=0)


def test_named_adapters_on_grouped_and_transposed_convolutions_merge_their_sum():
    torch.manual_seed(0)
    model = nn.ModuleDict({"up": nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2), "conv": nn.Conv2d(6, 6, 3, groups=3)})
    base = copy.deepcopy(model)

    def run(m: nn.Module) -> torch.Tensor:
        return m["conv"](m["up"](x))

    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    for name in ("a", "b"):
        ll.add_adapter(model, name, "lora", ll.LoRAConfig(r=6, target_modules=["up", "conv"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # both adapters' factors (the inactive one's are frozen)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    ll.set_adapter(model, ["a", "b"])
    both = run(model)
    with torch.no_grad():  # each adapter's update added to the base by hand
        for name in ("a", "b"):
            for target, delta in adapter_delta_weights(model, name).items():
                base[target].weight += delta
    torch.testing.assert_close(both, run(base), atol=1e-5, rtol=0)
    ll.merge_adapter(model)
    torch.testing.assert_close(run(model), both, atol=1e-5, rtol=0)


def test_transposed_convolution_refusals():
    with pytest.raises(ValueError, match="DoRA is not implemented for ConvTranspose2d"):
        ll.inject_adapter(nn.Sequential(nn.ConvTranspose2d(4, 4, 3)), "lora", r=2, target_modules=["0"], use_dora=True)
    with pytest.raises(ValueError, match=r"ConvTranspose1d with groups=4: .* r must be a multiple of 4 \(got r=2\)"):
        ll.inject_adapter(nn.Sequential(nn.ConvTranspose1d(4, 4, 3, groups=4)), "lora", r=2, target_modules=["0"])


# ---- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("module,match", [
    (nn.Conv2d(4, 4, 3, groups=4), r"Conv2d with groups=4: LoRA gives each group rank r/groups, so r must be "
                                   r"a multiple of 4 \(got r=2\)"),
    (nn.Embedding(10, 4, max_norm=1.0), r"max_norm=1.0 renormalises its table in place"),
])
def test_unsupported_bases_are_refused_and_the_model_is_left_as_it_was(module, match):
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(ValueError, match=match):
        ll.inject_adapter(model, "lora", r=2, target_modules=["0", "1"])
    assert type(model[0]) is nn.Linear and model[1] is module
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["dylora", "ffa_lora", "bone"])
def test_methods_built_for_linear_layers_name_the_supported_types(method):
    with pytest.raises(TypeError, match=rf"method {method!r} cannot adapt module '0' of type Conv2d; supported: \['Linear'\]"):
        ll.inject_adapter(nn.Sequential(nn.Conv2d(4, 4, 3)), method, r=2, target_modules=["0"])


def test_an_unsupported_module_lists_loras_targets():
    with pytest.raises(TypeError, match=r"type LayerNorm; supported: \['Linear', 'Embedding', 'Conv1d', 'Conv2d', "
                                        r"'Conv3d', 'ConvTranspose1d', 'ConvTranspose2d', 'ConvTranspose3d', "
                                        r"'MultiheadAttention'\]"):
        ll.inject_adapter(nn.Sequential(nn.LayerNorm(4)), "lora", r=2, target_modules=["0"])


def test_compiled_matches_eager_in_one_graph():
    """``torch.compile`` (aot_eager) gives eager's output and adapter gradients, with no graph break at
    the embedding or convolution layers."""
    torch._dynamo.reset()
    _, model, _ = _adapted()
    _perturb(model)
    ids = _ids()
    y = model(ids)
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    yc = torch.compile(model, backend="aot_eager")(ids)
    yc.pow(2).sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


# ---- tied weights ----------------------------------------------------------------------------
class TiedLM(nn.Module):
    """GPT-2's layout: the output head is the input embedding's table (one parameter)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.body(self.wte(ids))))


@pytest.mark.parametrize("target", ["wte", "lm_head"])
def test_merging_into_a_tied_weight_is_refused_and_nothing_merges(target):
    """Merging writes the update into the tied tensor, so the other module would change too (the merged
    model would not compute the unmerged one): merge_adapter and unload(merge=True) refuse, in one
    line naming both modules, before touching any weight."""
    model = TiedLM()
    other = "lm_head" if target == "wte" else "wte"
    with pytest.warns(UserWarning, match=rf"the base weight of '{target}' is tied to '{other}': the adapter acts in "
                                         rf"'{target}' only \('{other}' keeps the frozen weight\), and it cannot be merged"):
        ll.inject_adapter(model, "lora", r=2, target_modules=[target, "body"])
    _perturb(model)
    ids = _ids()
    y = model(ids)
    message = rf"cannot merge the adapter of '{target}': its base weight is tied to '{other}'"
    with pytest.raises(ValueError, match=message):
        ll.merge_adapter(model)
    with pytest.raises(ValueError, match=message):
        ll.unload(model, merge=True)
    assert not any(layer.merged for layer in ll.adapter_layers(model).values())
    assert torch.equal(model(ids), y)
    ll.unload(model)  # without merging: fine
    assert model.lm_head.weight is model.wte.weight


def test_named_adapter_on_a_tied_weight_warns_and_refuses_to_merge():
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"the base weight of 'lm_head' is tied to 'wte'"):
        ll.add_adapter(model, "a", "lora", r=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"cannot merge the adapter of 'lm_head': its base weight is tied to 'wte'"):
        ll.merge_adapter(model)


def test_untied_targets_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.inject_adapter(TiedLM(), "lora", r=2, target_modules=["body"])


def test_adapter_callback_refuses_merge_on_fit_end_of_a_tied_weight_before_training():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_ids()), batch_size=3)
    callback = ll.AdapterCallback("lora", r=2, target="net", target_modules=["wte"], merge_on_fit_end=True)
    trainer, module = _trainer_and_module(TiedLM(), callback, max_steps=2)
    with pytest.raises(ValueError, match=r"cannot merge the adapter of 'wte': its base weight is tied to 'lm_head'"):
        trainer.fit(module, loader)
    assert trainer.global_step == 0
