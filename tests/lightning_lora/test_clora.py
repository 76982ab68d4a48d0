"""CLoRA (METHODS §8): loss, masks, fusion, attention recording and sampling on a tiny diffusers UNet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusers import DDIMScheduler, UNet2DConditionModel  # the test extra installs diffusers

from lightning_lora import adapter_layers, inject_adapter, save_adapter, unload
from lightning_lora.merge.clora import (
    AttentionStore,
    CLoRAConfig,
    DenseDeltaLinear,
    DiffusersAdapterBranches,
    LoRABranches,
    average_adapters,
    clora_sample,
    concept_masks,
    contrastive_loss,
    fuse_noise,
    ntxent_loss,
    recording_attention,
    sample,
    update_latent,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
T, D = 5, 16  # prompt tokens, text dim
CONCEPTS = [[[1], [1], [1]], [[3], [3], [3]]]  # concept 0 at token 1, concept 1 at token 3, in 3 branches
MASKS = [[], [1], [3]]


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """16×16×3 UNet; cross-attention at 16×16 (3 layers) and 8×8 (mid block)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    return unet.requires_grad_(False)


def random_lora(unet: nn.Module, seed: int, scale: float = 0.5) -> dict[str, nn.Module]:
    """A LoRA with non-zero B on the attention projections, taken out as separate layers."""
    torch.manual_seed(seed)
    inject_adapter(unet, "lora", r=4, alpha=4.0, target_modules=TARGETS)
    layers = adapter_layers(unet)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, scale)
    unload(unet)
    return layers


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet()
    loras = [random_lora(unet, 1), random_lora(unet, 2)]
    torch.manual_seed(3)
    cond = torch.randn(3, T, D)
    uncond = torch.randn(T, D)
    return unet, loras, cond, uncond


def fast_cfg(**kw) -> CLoRAConfig:
    base = dict(num_inference_steps=3, guidance_scale=3.0, step_size=1.0, max_iter_to_alter=2, attention_res=(16, 16))
    base.update(kw)
    return CLoRAConfig(**base)


def branch_maps(unet, branches, z, cond, uncond, res=(16, 16)):
    """(P, B, h, w, T) maps (conditional half) and (P, 2B, C, H, W) eps for latent z."""
    store = AttentionStore(res)
    maps, eps = [], []
    b = z.shape[0]
    with recording_attention(unet, store):
        for p in range(len(branches)):
            with branches.activate(p):
                store.reset()
                enc = torch.cat([uncond.expand(b, -1, -1), cond[p].expand(b, -1, -1)])
                eps.append(unet(torch.cat([z, z]), 10, encoder_hidden_states=enc).sample)
                maps.append(store.aggregate()[b:])
    return torch.stack(maps), torch.stack(eps)


# ---- attention recording --------------------------------------------------------------------

def test_recorded_maps_are_per_branch_probabilities(setup):
    unet, loras, cond, uncond = setup
    branches = LoRABranches(unet, [None, loras[0], loras[1]])
    z = torch.randn(2, 3, 16, 16)
    store = AttentionStore((16, 16))
    with recording_attention(unet, store):
        with branches.activate(1):
            unet(z, 10, encoder_hidden_states=cond[1].expand(2, -1, -1))
        assert len(store.maps) == 3  # down_blocks.0 + two layers of up_blocks.1 at 16×16
        assert {8 * 8, 16 * 16} <= store.seen_query_lengths
    maps, _ = branch_maps(unet, branches, z, cond, uncond)
    assert maps.shape == (3, 2, 16, 16, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 16, 16))  # probabilities over tokens
    assert (maps[0] - maps[1]).abs().max() > 1e-3 and (maps[1] - maps[2]).abs().max() > 1e-3


def test_recording_processor_leaves_outputs_unchanged(setup):
    unet, loras, cond, _ = setup
    z = torch.randn(2, 3, 16, 16)
    enc = cond[0].expand(2, -1, -1)
    plain = unet(z, 5, encoder_hidden_states=enc).sample
    kinds = {k: type(v) for k, v in unet.attn_processors.items()}
    with recording_attention(unet, AttentionStore((16, 16))):
        recorded = unet(z, 5, encoder_hidden_states=enc).sample
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == kinds


def test_aggregation_of_identical_layers_returns_the_map():
    store = AttentionStore((2, 3))
    probs = torch.rand(2 * 4, 6, T).softmax(-1)  # (B·heads, h·w, T), heads = 4
    for _ in range(3):
        store.add(probs, heads=4)
    expected = probs.view(2, 4, 6, T).mean(1).view(2, 2, 3, T)
    torch.testing.assert_close(store.aggregate(), expected)


def test_missing_resolution_is_a_clear_error(setup):
    unet, _, cond, uncond = setup
    with pytest.raises(RuntimeError, match="no cross-attention layer at resolution 4x4"):
        clora_sample(unet, DDIMScheduler(num_train_timesteps=100), LoRABranches(unet, [None]), cond[:1], uncond,
                     [], [[]], torch.randn(1, 3, 16, 16), fast_cfg(attention_res=(4, 4)))


# ---- contrastive loss -----------------------------------------------------------------------

def blob_maps(overlap: bool, batch: int = 1) -> torch.Tensor:
    """(3, B, 8, 8, T): concept 0 (token 1) on the left half, concept 1 (token 3) on the right half,
    or both on the left when ``overlap``."""
    maps = torch.full((3, batch, 8, 8, T), 0.01)
    maps[..., :, :4, 1] = 1.0
    if overlap:
        maps[..., :, :4, 3] = 1.0
    else:
        maps[..., :, 4:, 3] = 1.0
    return maps


def test_loss_low_when_separated_higher_when_overlapping():
    tau = 0.5
    separated = contrastive_loss(blob_maps(False), CONCEPTS, tau)
    overlapping = contrastive_loss(blob_maps(True), CONCEPTS, tau)
    # 6 embeddings, each anchor: 2 positives (cos 1), 3 negatives (cos 0 when separated, 1 when overlapping)
    torch.testing.assert_close(separated, torch.tensor([math.log(1 + 3 * math.exp(-1 / tau))]))
    torch.testing.assert_close(overlapping, torch.tensor([math.log(4.0)]))
    assert separated.item() < 0.35 < overlapping.item()


def test_loss_guards_and_invariances():
    emb = torch.rand(4, 10, requires_grad=True)
    one_class = ntxent_loss(emb, torch.zeros(4, dtype=torch.long))
    singletons = ntxent_loss(emb, torch.arange(4))
    for loss in (one_class, singletons):
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, emb)
        assert torch.isfinite(g).all()
    assert contrastive_loss(blob_maps(False), [], 0.5).tolist() == [0.0]
    # min-max normalisation: positive affine rescaling of one map changes nothing
    maps = torch.rand(3, 2, 8, 8, T)
    scaled = maps.clone()
    scaled[1, :, :, :, 1] = 7.0 * scaled[1, :, :, :, 1] + 3.0
    torch.testing.assert_close(contrastive_loss(scaled, CONCEPTS), contrastive_loss(maps, CONCEPTS))
    # bf16 maps: the loss runs in fp32 and stays finite and close
    low = contrastive_loss(maps.bfloat16(), CONCEPTS)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, contrastive_loss(maps, CONCEPTS), atol=2e-2, rtol=2e-2)


def test_bad_token_specs_raise():
    with pytest.raises(ValueError, match="one per branch"):
        contrastive_loss(blob_maps(False), [[[1], [1]]])
    with pytest.raises(ValueError, match="outside"):
        contrastive_loss(blob_maps(False), [[[9], [1], [1]]])
    with pytest.raises(ValueError, match="one per branch"):
        concept_masks(blob_maps(False), [[], [1]], (8, 8))


# ---- masks and fusion -----------------------------------------------------------------------

def test_masks_partition_the_latent():
    masks = concept_masks(blob_maps(False, batch=2), MASKS, (16, 16), threshold_alpha=0.3)
    assert masks.shape == (3, 2, 1, 16, 16)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(masks.sum(0), torch.ones(2, 1, 16, 16))  # disjoint concepts: exact partition
    assert masks[1, :, :, :, :8].all() and not masks[1, :, :, :, 8:].any()  # branch 1 = left (token 1)
    assert masks[2, :, :, :, 8:].all() and not masks[2, :, :, :, :8].any()  # branch 2 = right (token 3)
    assert not masks[0].any()  # nothing left for the base branch
    # a concept map that covers only the top-left quarter leaves the rest to the base branch
    maps = blob_maps(False)
    maps[..., 4:, :, 1] = 0.01
    maps[..., 3] = 0.01
    maps[2, 0, 0, 7, 3] = 1.0  # branch 2 covers one cell (the top-right corner)
    m = concept_masks(maps, MASKS, (8, 8))
    torch.testing.assert_close(m[0, 0, 0], 1 - torch.maximum(m[1, 0, 0], m[2, 0, 0]))
    # overlapping concepts: the union still covers every pixel, overlaps count twice
    m = concept_masks(blob_maps(True), MASKS, (8, 8))
    assert (m.sum(0) >= 1).all() and m[1:, 0, 0, :, :4].all()
    # no background branch: uncovered pixels go to every branch
    m = concept_masks(blob_maps(False)[1:], [[1], [1]], (8, 8))
    assert m[:, 0, 0, :, 4:].all() and (m.sum(0) >= 1).all()


def test_fusion_properties():
    eps = torch.randn(3, 2, 3, 16, 16)
    masks = concept_masks(blob_maps(False, batch=2), MASKS, (16, 16))
    fused = fuse_noise(eps, masks)
    # disjoint masks: every pixel is exactly one branch's prediction
    torch.testing.assert_close(fused[..., :8], eps[1, ..., :8])
    torch.testing.assert_close(fused[..., 8:], eps[2, ..., 8:])
    # identical predictions: fused equals them whatever the masks (overlaps included)
    same = eps[:1].expand(3, -1, -1, -1, -1)
    overlapping = concept_masks(blob_maps(True, batch=2), MASKS, (16, 16))
    torch.testing.assert_close(fuse_noise(same, overlapping), eps[0])
    # one branch: fused == that branch
    single = concept_masks(blob_maps(False, batch=2)[1:2], [[1]], (16, 16))
    torch.testing.assert_close(fuse_noise(eps[:1], single), eps[0])


# ---- latent update and sampling -------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_latent_update_lowers_the_loss(setup, seed):
    unet, loras, cond, uncond = setup
    branches = LoRABranches(unet, [None, loras[0], loras[1]])
    torch.manual_seed(seed)
    z = torch.randn(2, 3, 16, 16).requires_grad_(True)
    maps, _ = branch_maps(unet, branches, z, cond, uncond)
    loss = contrastive_loss(maps, CONCEPTS)
    z_new = update_latent(z, loss.sum(), step_size=2.0)
    with torch.no_grad():
        new_maps, _ = branch_maps(unet, branches, z_new, cond, uncond)
        new_loss = contrastive_loss(new_maps, CONCEPTS)
    assert (new_loss < loss.detach()).all(), (loss, new_loss)


def test_one_lora_without_latent_update_is_plain_lora_sampling(setup):
    unet, loras, cond, uncond = setup
    z = torch.randn(2, 3, 16, 16)
    branches = LoRABranches(unet, [loras[0]])
    out = clora_sample(unet, DDIMScheduler(num_train_timesteps=100), branches, cond[1:2], uncond, [[[1]]], [[1]], z,
                       fast_cfg(latent_update=False, num_inference_steps=4))
    with branches.activate(0):
        ref = sample(unet, DDIMScheduler(num_train_timesteps=100), cond[1], uncond, z, num_inference_steps=4,
                     guidance_scale=3.0)
    torch.testing.assert_close(out.latents, ref, atol=1e-5, rtol=1e-5)
    assert out.losses == []


def test_latent_updates_only_before_max_iter_and_state_restored(setup):
    unet, loras, cond, uncond = setup
    z = torch.randn(1, 3, 16, 16)
    modules_before = dict(unet.named_modules())
    processors_before = {k: type(v) for k, v in unet.attn_processors.items()}
    branches = LoRABranches(unet, [None, loras[0], loras[1]])
    sched = DDIMScheduler(num_train_timesteps=100)
    out = clora_sample(unet, sched, branches, cond, uncond, CONCEPTS, MASKS, z,
                       fast_cfg(max_iter_to_alter=2, iterative_steps=(1,), iterative_steps_steps=3))
    assert len(out.losses) == 1 + 3  # step 0 once, step 1 three times, step 2 none
    assert all(math.isfinite(v) for v in out.losses)
    # max_iter_to_alter = 0 is exactly the masked-fusion-only trajectory
    a = clora_sample(unet, sched, branches, cond, uncond, CONCEPTS, MASKS, z, fast_cfg(max_iter_to_alter=0))
    b = clora_sample(unet, sched, branches, cond, uncond, CONCEPTS, MASKS, z, fast_cfg(latent_update=False))
    torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
    assert not torch.allclose(out.latents, b.latents)
    # no adapter or processor leaks out of the composition
    assert dict(unet.named_modules()) == modules_before
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors_before


def test_average_adapters_and_saved_adapter_branches(setup, tmp_path):
    unet, loras, cond, _ = setup
    name = next(iter(loras[0]))
    avg = average_adapters(loras)
    assert isinstance(avg[name], DenseDeltaLinear)
    expected = 0.5 * (loras[0][name].delta_weight() + loras[1][name].delta_weight())
    torch.testing.assert_close(avg[name].delta_weight(), expected)
    x = torch.randn(3, avg[name].in_features)
    base = unet.get_submodule(name)
    torch.testing.assert_close(avg[name](x), base(x) + x @ expected.t(), atol=1e-5, rtol=1e-5)
    # a branch from a saved adapter directory equals the injected adapter
    torch.manual_seed(7)
    inject_adapter(unet, "lora", r=4, alpha=4.0, target_modules=TARGETS)
    for layer in adapter_layers(unet).values():
        torch.nn.init.normal_(layer.lora_B, 0, 0.5)
    z = torch.randn(1, 3, 16, 16)
    enc = cond[0].expand(1, -1, -1)
    with torch.no_grad():
        injected = unet(z, 5, encoder_hidden_states=enc).sample
    save_adapter(unet, tmp_path / "a")
    unload(unet)
    branches = LoRABranches(unet, [None, tmp_path / "a"])
    with torch.no_grad(), branches.activate(1):
        loaded = unet(z, 5, encoder_hidden_states=enc).sample
    torch.testing.assert_close(loaded, injected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in unet.parameters())


def test_diffusers_adapter_branches():
    import peft  # the test extra installs peft
    unet = tiny_unet(5)
    z, enc = torch.randn(1, 3, 16, 16), torch.randn(1, T, D)
    with torch.no_grad():
        base = unet(z, 5, encoder_hidden_states=enc).sample
    for name, seed in (("cat", 1), ("dog", 2)):
        unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name=name)
    branches = DiffusersAdapterBranches(unet, [None, "cat", "dog"])
    with torch.no_grad():
        outs = []
        for p in range(3):
            with branches.activate(p):
                outs.append(unet(z, 5, encoder_hidden_states=enc).sample)
        unet.set_adapters(["dog"])
        dog_alone = unet(z, 5, encoder_hidden_states=enc).sample
    torch.testing.assert_close(outs[0], base)
    torch.testing.assert_close(outs[2], dog_alone)
    assert not torch.allclose(outs[1], outs[2]) and not torch.allclose(outs[1], base)
    assert unet.active_adapters() == ["dog"]
