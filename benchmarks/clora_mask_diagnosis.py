"""Why CLoRA paints both digits olive in benchmarks/clora_composition.py (issue #7): do the concept
tokens' cross-attention maps localize, and what masks does CLoRA build from them?

Loads the checkpoints of a finished ``clora_composition.py`` run (``--ckpt-dir``: base UNet, text
encoder, classifier and the chosen concept LoRAs), samples ``--samples`` images of the prompt
``3 and 7`` from the script's TEST noise (seed 20000, DDIM ``--steps``), and re-runs CLoRA's
masked fusion step by step with every branch's cross-attention maps recorded at every
cross-attention level (``--map-res``; v1: 16×16 and 8×8, v2: 32×32 too) (both CFG halves). The trajectory is the one :func:`clora_sample` follows with ``latent_update=False``
(checked with ``--check``).

Per sample, the final image says which half of the canvas holds the 3 and which the 7 (each half is
cut out, turned to grey ink and recoloured red / green, and the script's classifier is asked "red 3?"
/ "green 7?": it was trained on single digits anywhere, so it serves as a digit reader); samples
with one 3 and one 7 in different halves are "readable". On those:

- ``<run>_<branch>_r<res>_tok<3|7>_share_own_half``: share of the token's attention mass (conditional
  half, mean over steps) that falls in its digit's half (0.5 = no localization, 1 = perfect);
- ``..._contrast_own_half``: the same for the positive part of (map of that token − map of the other);
- ``..._cos_3_7``: cosine similarity of the min-max normalised maps of "3" and "7";
- mask metrics of the CLoRA run (the masks :func:`concept_masks` builds, at the step they are used):
  area of mask A / B, IoU(A, B), share of mask A inside the 3's half and of mask B inside the 7's half;
- ``peak_over_mean`` / ``min_over_max``: how peaked each concept map is (the mask keeps A ≥ α·max, so
  ``min_over_max`` > α means a mask covering the whole canvas);
- ``both_share_<method>``: the script's "both concepts" share on these samples.

Alternative masks (runs ``clora_relative`` / ``clora_minmax``, diagnosis only, not CLoRA as
specified): ``relative`` = each concept's map minus the other concept's map at the same branch,
thresholded at α·max of the positive part; ``minmax`` = (A − min A) ≥ α·(max A − min A). Runs
``clora_update`` / ``clora_update_minmax`` call :func:`clora_sample` with latent updates
(``--step-size``) and record only the final images and last masks.

Base architectures: ``--base-arch v1`` (default; the recorded runs) or ``v2`` (clora_composition's
:class:`BaseArch`: 8-token prompts, the first digit token drawn left, cross-attention at 32×32 too);
the checkpoint files and token counts follow the arch.

Run ``real`` (no sampling, no classifier, no LoRA): held-out white 3 + 7 composites laid out as the
arch's training pairs (v2: 3 left), noised at each ``--real-t``, the base's maps of "3" and "7" at every
``--map-res``, from the CFG half(s) CLoRA would use (``--attention-from``):
``real_r<res>[_t<t>]_share_own_half_3/_7``, ``_cos_3_7``, ``_left_share_gap`` and the masks CLoRA's
rule would build (``_maskA_area``, ``_maskB_area``, ``_maskAB_iou``, ``_maskbase_area``). It shows
whether the base binds tokens to places even before it draws readable digits.

Gate (``--gate``, needs run ``base``; base + classifier suffice, e.g. right after
``clora_composition.py --stop-after base``): on the base's own samples of "3 and 7" and the maps CLoRA
thresholds (``--attention-res``, ``--attention-from``), ``gate_pass`` = readable share ≥ 0.25,
cos(minmax "3", minmax "7") < 0.5 and own-half share of both tokens > 0.7; exit status 3 when it
fails. ``gate_mask*`` are the masks CLoRA's rule builds from the base's maps. ``gate_readable`` is
``readable_base``: the share of the base's samples (``--samples`` of the test noise, DDIM ``--steps``,
``--guidance``) whose halves read as one 3 and one 7 -- a property of the base and the sampler, the
same at every ``--attention-res`` (the reader itself reads 0.96 of real held-out white 3 | 7
composites). Session 10's 6000-step v2 base: 0.234 on the GPU (64 samples, 50 steps, guidance 3); on
CPU, the first 8 of those noises: 8/8 at 10 steps, 4/8 at 20 and 3/8 at 50 with guidance 3 (the
50-step samples carry speckle and deformed digits), 8/8 at 50 steps with guidance 1.5; the 8×8 maps
pass at all four. ``base_steps`` / ``base_continue_from``: the base's record in ``stages.json``;
``ddim_steps``: ``--steps``.

CPU cost (2 shared cores, 16 samples, 50 steps): ~1.5-5 min per single-branch run, ~22 min for a
three-branch CLoRA run under load; ``--device cuda`` on a GPU.

    python benchmarks/clora_mask_diagnosis.py --ckpt-dir /tmp/ck/clora_composition --samples 16
    # writes only <--out>/clora_mask_diagnosis.json (default: a fresh temp dir)
    python benchmarks/clora_mask_diagnosis.py --ckpt-dir runs/clora_composition --base-arch v2 --device cuda \
        --runs real base --samples 64 --gate            # the v2 gate (see clora_composition.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchmarks.clora_composition as cc  # noqa: E402
from lightning_lora import adapter_layers, load_adapter, unload  # noqa: E402
from lightning_lora.merge.clora import (  # noqa: E402
    AttentionStore,
    CLoRAConfig,
    LoRABranches,
    average_adapters,
    clora_sample,
    concept_masks,
    fuse_noise,
    minmax,
    recording_attention,
    require_diffusers,
)
from lightning_lora.results import current_command, write_result  # noqa: E402

TOK3, TOK7 = 1, 3  # positions of "3" and "7" in "<bos> 3 and 7" (both base archs)
LORA_RUNS = {"lora_a", "lora_b", "average", "clora", "clora_relative", "clora_minmax", "clora_update", "clora_update_minmax"}
# the gate a base must pass before its CLoRA comparison means anything (session 7, issue #7), on the
# maps CLoRA uses (--attention-res, --attention-from) of the base's own samples of "3 and 7"
GATE_MAX_COS, GATE_MIN_SHARE, GATE_MIN_READABLE = 0.5, 0.7, 0.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", required=True, help="the clora_composition.py --ckpt-dir of a finished run")
    p.add_argument("--lora-a", default="lora_a_red3_lr0.002")
    p.add_argument("--lora-b", default="lora_b_green7_lr0.002")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--base-arch", default="v1", choices=sorted(cc.ARCHS), help="the run's clora_composition --base-arch")
    p.add_argument("--classifier", default=None, help="classifier file (default <ckpt-dir>/classifier.safetensors)")
    p.add_argument("--map-res", type=int, nargs="+", default=None,
                   help="sides at which maps are recorded (default: every cross-attention level of the arch)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=20_000, help="noise seed (clora_composition's test noise)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--mask-alpha", type=float, default=0.3)
    p.add_argument("--attention-res", type=int, default=None, help="side of CLoRA's maps (default: the arch's, 16)")
    p.add_argument("--attention-from", default="cfg_batch", choices=["cfg_batch", "cond"])
    p.add_argument("--runs", nargs="+", default=["base", "lora_a", "lora_b", "average", "clora"],
                   choices=["real", "base", "lora_a", "lora_b", "average", "clora", "clora_relative", "clora_minmax",
                            "clora_update", "clora_update_minmax"],
                   help="real: the base's maps on noised real composites of 3 and 7 (sides known, no sampling, no "
                        "classifier needed; --real-t); clora*: masked fusion traced step by step; clora_update*: "
                        "clora_sample with latent updates (--step-size; only final images and last masks); "
                        "*_minmax / *_relative: diagnosis masks. Runs other than real / base need the LoRAs")
    p.add_argument("--real-t", type=int, nargs="+", default=[900, 700, 500, 300, 100],
                   help="timesteps at which the real composites are noised (run real)")
    p.add_argument("--gate", action="store_true",
                   help=f"exit 3 unless the base run's maps pass the gate: readable >= {GATE_MIN_READABLE}, "
                        f"cos(minmax 3, minmax 7) < {GATE_MAX_COS}, own-half share of both tokens > {GATE_MIN_SHARE}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--step-size", type=float, default=50.0, help="latent step size of the clora_update runs")
    p.add_argument("--max-iter-to-alter", type=int, default=30)
    p.add_argument("--check", action="store_true", help="also run clora_sample and compare the final latents")
    p.add_argument("--name", default="clora_mask_diagnosis")
    p.add_argument("--out", default=None, help="result directory (default: a fresh temp dir)")
    p.add_argument("--save-tensors", default=None, help="optional .pt file for maps / masks / images (not in the tree)")
    args = p.parse_args(argv)
    args.arch = cc.ARCHS[args.base_arch]
    if args.attention_res is None:
        args.attention_res = args.arch.attention_res
    if args.map_res is None:
        args.map_res = list(args.arch.cross_attn_res)
    if args.attention_res not in args.map_res:
        args.map_res.append(args.attention_res)
    if args.gate and "base" not in args.runs:
        p.error("--gate reads the base run: add base to --runs")
    return args


def load(args):
    """Base UNet + text encoder of ``args.arch``, the two LoRAs (only if a run needs them, else []),
    and the classifier."""
    ckpt = Path(args.ckpt_dir)
    dev = args.device
    unet, text = cc.make_unet(args.width, arch=args.arch).to(dev), cc.text_encoder(args.arch).to(dev)
    cc.load_base(unet, text, ckpt, dev, args.arch)
    loras = []
    if LORA_RUNS & set(args.runs):
        for stage in (args.lora_a, args.lora_b):
            load_adapter(unet, ckpt / stage)
            loras.append(adapter_layers(unet))
            unload(unet)
    unet.requires_grad_(False)
    clf = cc.Classifier()
    clf.load_state_dict(load_file(args.classifier or str(ckpt / "classifier.safetensors"), device=dev))
    return unet, text, loras, clf.to(dev).eval()


def minmax_masks(maps: torch.Tensor, mask_indices, size, alpha: float) -> torch.Tensor:
    """Diagnosis only: thresholds min-max normalised maps, (A − min A) ≥ α·(max A − min A)."""
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    return concept_masks((maps - lo) / (hi - lo).clamp_min(1e-12), mask_indices, size, alpha)


def update_run(unet, scheduler, branches, cond, uncond, mask_indices, z0, args, minmax_rule: bool):
    """clora_sample with latent updates; with ``minmax_rule`` its masks use :func:`minmax_masks`
    (the module's concept_masks is swapped for the call). Returns final latents and last masks (1, P, B, 1, H, W)."""
    import lightning_lora.merge.clora as clora_mod

    cfg = CLoRAConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, step_size=args.step_size,
                      max_iter_to_alter=args.max_iter_to_alter, mask_threshold_alpha=args.mask_alpha,
                      latent_update=args.step_size > 0, attention_res=(args.attention_res,) * 2,
                      attention_from=args.attention_from)
    original = clora_mod.concept_masks
    if minmax_rule:
        clora_mod.concept_masks = lambda maps, mi, size, alpha, morph=None: minmax_masks(maps, mi, size, alpha)
    try:
        out = clora_sample(unet, scheduler, branches, cond.expand(3, -1, -1), uncond,
                           [[[TOK3]] * 3, [[TOK7]] * 3], mask_indices, z0, cfg)
    finally:
        clora_mod.concept_masks = original
    return out.latents, out.masks[None]


def relative_masks(maps: torch.Tensor, mask_indices, size, alpha: float) -> torch.Tensor:
    """Diagnosis only: branch p's mask from (its token's map − the other concept token's map)+."""
    other = {TOK3: TOK7, TOK7: TOK3}
    rel = maps.clone()
    for p, toks in enumerate(mask_indices):
        for tok in toks:
            rel[p, ..., tok] = (maps[p, ..., tok] - maps[p, ..., other[tok]]).clamp_min(0)
    return concept_masks(rel, mask_indices, size, alpha)


@torch.no_grad()
def traced_run(unet, scheduler, branches, cond, uncond, mask_indices, z0, args, mask_fn=None):
    """CLoRA masked fusion (latent_update=False) with every branch's maps recorded at each of ``args.map_res``.

    Returns final latents, maps {res: (steps, P, 2B, r, r, T)}, masks (steps, P, B, 1, H, W)."""
    scheduler.set_timesteps(args.steps)
    z = z0 * scheduler.init_noise_sigma
    b = z.shape[0]
    stores = {r: AttentionStore((r, r)) for r in args.map_res}
    all_maps = {r: [] for r in args.map_res}
    all_masks = []
    with ExitStack() as stack:
        for s in stores.values():
            stack.enter_context(recording_attention(unet, s))
        for t in scheduler.timesteps:
            eps, maps = [], {r: [] for r in args.map_res}
            for p in range(len(branches)):
                with branches.activate(p):
                    for s in stores.values():
                        s.reset()
                    model_in = scheduler.scale_model_input(torch.cat([z, z]), t)
                    enc = torch.cat([uncond.expand(b, -1, -1), cond[p].expand(b, -1, -1)])
                    eps.append(unet(model_in, t, encoder_hidden_states=enc).sample)
                    for r, s in stores.items():
                        maps[r].append(s.aggregate())
            eps = torch.stack(eps)
            for r in stores:
                all_maps[r].append(torch.stack(maps[r]))
            m = torch.stack(maps[args.attention_res])  # (P, 2B, h, w, T)
            m = m[:, b:] if args.attention_from == "cond" else 0.5 * (m[:, :b] + m[:, b:])
            masks = (mask_fn or (lambda mm, mi, sz: concept_masks(mm, mi, sz, args.mask_alpha)))(m, mask_indices, tuple(z.shape[-2:]))
            all_masks.append(masks)
            eps_u, eps_t = fuse_noise(eps[:, :b], masks), fuse_noise(eps[:, b:], masks)
            z = scheduler.step(eps_u + args.guidance * (eps_t - eps_u), t, z).prev_sample
    return z, {r: torch.stack(v) for r, v in all_maps.items()}, torch.stack(all_masks)


@torch.no_grad()
def read_halves(clf, images: torch.Tensor):
    """Per sample and half (left, right): is it a 3, a 7 (digit identity, colour ignored), and its
    ink's red share r/(r+g). images (B, 3, 32, 32) in [-1, 1]."""
    x = (images.clamp(-1, 1) + 1) / 2
    out = {"is3": [], "is7": [], "red": []}
    red, green = torch.tensor(cc.RED, device=x.device), torch.tensor(cc.GREEN, device=x.device)
    for half in (slice(0, 16), slice(16, 32)):
        part = torch.zeros_like(x)
        part[..., half] = x[..., half]
        ink = part.amax(1, keepdim=True)  # grey ink
        ink = ink / ink.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)
        is3 = cc.detect(clf, (ink * red.view(1, 3, 1, 1)) * 2 - 1)[:, 0]
        is7 = cc.detect(clf, (ink * green.view(1, 3, 1, 1)) * 2 - 1)[:, 1]
        w = (ink[:, 0] > 0.3).float()
        r = (part[:, 0] * w).flatten(1).sum(1)
        g = (part[:, 1] * w).flatten(1).sum(1)
        out["is3"].append(is3)
        out["is7"].append(is7)
        out["red"].append(r / (r + g).clamp_min(1e-6))
    return {k: torch.stack(v, 1) for k, v in out.items()}  # (B, 2)


def half_share(m: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """m (..., B, r, r) non-negative; side (B,) 0 = left, 1 = right -> (..., B) share of mass in that half."""
    r = m.shape[-1]
    left = m[..., : r // 2].sum((-1, -2))
    total = m.sum((-1, -2)).clamp_min(1e-12)
    lshare = left / total
    return torch.where(side.bool(), 1 - lshare, lshare)


def map_metrics(prefix: str, maps: dict, side3: torch.Tensor, ok: torch.Tensor, branch_names, metrics: dict, b: int):
    """maps {res: (S, P, 2B, r, r, T)}; side3 (B,) half of the 3; ok (B,) readable samples."""
    if not bool(ok.any()):
        return
    side7 = 1 - side3
    for r, mm in maps.items():
        cond = mm[:, :, b:]  # conditional half (S, P, B, r, r, T)
        for p, bn in enumerate(branch_names):
            a3, a7 = cond[:, p, ..., TOK3], cond[:, p, ..., TOK7]  # (S, B, r, r)
            key = f"{prefix}_{bn}_r{r}"
            for tok, a, other, side in (("3", a3, a7, side3), ("7", a7, a3, side7)):
                metrics[f"{key}_tok{tok}_share_own_half"] = float(half_share(a, side)[:, ok].mean())
                metrics[f"{key}_tok{tok}_share_own_half_first10"] = float(half_share(a[:10], side)[:, ok].mean())
                metrics[f"{key}_tok{tok}_contrast_own_half"] = float(half_share((a - other).clamp_min(0), side)[:, ok].mean())
                metrics[f"{key}_tok{tok}_mass"] = float(a.mean((-1, -2))[:, ok].mean())
                flat = a.flatten(-2)
                metrics[f"{key}_tok{tok}_peak_over_mean"] = float((flat.amax(-1) / flat.mean(-1).clamp_min(1e-12))[:, ok].mean())
                metrics[f"{key}_tok{tok}_min_over_max"] = float((flat.amin(-1) / flat.amax(-1).clamp_min(1e-12))[:, ok].mean())
            e3, e7 = minmax(a3.flatten(-2)), minmax(a7.flatten(-2))
            metrics[f"{key}_cos_3_7"] = float(F.cosine_similarity(e3, e7, dim=-1)[:, ok].mean())


def clora_maps(mm: torch.Tensor, b: int, attention_from: str) -> torch.Tensor:
    """(..., 2B, r, r, T) maps of both CFG halves -> (..., B, r, r, T), the maps CLoRA thresholds
    (``cond``: the conditional half; ``cfg_batch``: the mean of both halves, as clora_sample)."""
    cond = mm.narrow(-4, b, b)
    return cond if attention_from == "cond" else 0.5 * (mm.narrow(-4, 0, b) + cond)


def gate_metrics(prefix: str, maps: torch.Tensor, side3: torch.Tensor, ok: torch.Tensor, alpha: float,
                 metrics: dict) -> None:
    """Localization figures of one branch's maps, as CLoRA would use them.

    maps (S, B, r, r, T): per step and sample; side3 (B,) 0/1 = the 3 in the left/right half;
    ok (B,) samples whose sides are known. Writes ``<prefix>_share_own_half_3/_7`` (share of the
    token's mass in its digit's half, ok samples; 0.5 = none), ``<prefix>_cos_3_7`` (cosine of the
    min-max maps, all samples), ``<prefix>_left_share_gap`` (|left share of "3" − left share of "7"|,
    all samples, needs no sides), and the masks CLoRA's rule builds from these maps for "3" / "7"
    (base branch = the rest): ``_maskA_area``, ``_maskB_area``, ``_maskAB_iou``, ``_maskbase_area``.
    """
    s, b, r = maps.shape[:3]
    a3, a7 = maps[..., TOK3].float(), maps[..., TOK7].float()  # (S, B, r, r)
    if bool(ok.any()):
        metrics[f"{prefix}_share_own_half_3"] = float(half_share(a3, side3)[:, ok].mean())
        metrics[f"{prefix}_share_own_half_7"] = float(half_share(a7, 1 - side3)[:, ok].mean())
    metrics[f"{prefix}_cos_3_7"] = float(F.cosine_similarity(minmax(a3.flatten(-2)), minmax(a7.flatten(-2)), dim=-1).mean())
    zeros = torch.zeros(b, dtype=torch.long, device=maps.device)
    metrics[f"{prefix}_left_share_gap"] = float((half_share(a3, zeros) - half_share(a7, zeros)).abs().mean())
    flat = maps.reshape(s * b, r, r, -1)
    m = concept_masks(torch.stack([flat, flat, flat]), [[], [TOK3], [TOK7]], (r, r), alpha)  # (3, S·B, 1, r, r)
    ma, mb = m[1, :, 0], m[2, :, 0]
    inter = (ma * mb).sum((-1, -2))
    union = ((ma + mb) > 0).float().sum((-1, -2)).clamp_min(1)
    metrics[f"{prefix}_maskA_area"] = float(ma.mean())
    metrics[f"{prefix}_maskB_area"] = float(mb.mean())
    metrics[f"{prefix}_maskAB_iou"] = float((inter / union).mean())
    metrics[f"{prefix}_maskbase_area"] = float(m[0].mean())


@torch.no_grad()
def real_run(unet, text_cond: torch.Tensor, uncond: torch.Tensor, args, metrics: dict) -> None:
    """The base's maps on noised REAL composites of a white 3 and 7 (held-out glyphs; sides drawn as
    the arch's training pairs: v2 = the 3, first in the prompt, on the left; v1 = random), at each
    ``--real-t``: no sampling and no classifier, so it also works on a barely trained base.

    text_cond, uncond: (T, D). Writes ``real_r<res>_...`` (all timesteps) and ``real_r<res>_t<t>_...``
    (:func:`gate_metrics` of the maps CLoRA would use)."""
    dev = torch.device(args.device)
    _, held = cc.composers(dev)
    n = args.samples
    torch.manual_seed(args.seed)
    pair = torch.ones(n, dtype=torch.bool, device=dev)
    glyphs = torch.stack([held.glyph_of(torch.full((n,), cc.CONCEPT_A, device=dev)),
                          held.glyph_of(torch.full((n,), cc.CONCEPT_B, device=dev))], 1)
    xs, ys = held.layout(n, pair, tied=args.arch.tied_layout)
    x0 = held.paint(glyphs, torch.ones(n, 2, 3, device=dev), xs, ys, torch.ones(n, 2, device=dev)) * 2 - 1
    side3 = (xs[:, 0] >= cc.CANVAS // 2).long()  # slot 0 is the 3
    ok = torch.ones(n, dtype=torch.bool, device=dev)
    alphas = require_diffusers().DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(dev)
    stores = {r: AttentionStore((r, r)) for r in args.map_res}
    per_res: dict[int, list[torch.Tensor]] = {r: [] for r in args.map_res}
    enc = torch.cat([uncond.expand(n, -1, -1), text_cond.expand(n, -1, -1)])
    with ExitStack() as stack:
        for st in stores.values():
            stack.enter_context(recording_attention(unet, st))
        for t in args.real_t:
            a = alphas[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
            for st in stores.values():
                st.reset()
            unet(torch.cat([xt, xt]), torch.full((2 * n,), t, device=dev), encoder_hidden_states=enc)
            for r, st in stores.items():
                m = clora_maps(st.aggregate(), n, args.attention_from)  # (B, r, r, T)
                per_res[r].append(m)
                gate_metrics(f"real_r{r}_t{t}", m[None], side3, ok, args.mask_alpha, metrics)
    for r, ms in per_res.items():
        gate_metrics(f"real_r{r}", torch.stack(ms), side3, ok, args.mask_alpha, metrics)


def mask_metrics(prefix: str, masks: torch.Tensor, side3: torch.Tensor, ok: torch.Tensor, metrics: dict):
    """masks (S, P, B, 1, H, W) with P = base, A, B."""
    ma, mb = masks[:, 1, :, 0], masks[:, 2, :, 0]  # (S, B, H, W)
    inter = (ma * mb).sum((-1, -2))
    union = ((ma + mb) > 0).float().sum((-1, -2)).clamp_min(1)
    sel = ok if bool(ok.any()) else torch.ones_like(ok)
    metrics[f"{prefix}_maskA_area"] = float(ma.mean((-1, -2))[:, sel].mean())
    metrics[f"{prefix}_maskB_area"] = float(mb.mean((-1, -2))[:, sel].mean())
    metrics[f"{prefix}_maskbase_area"] = float(masks[:, 0, :, 0].mean((-1, -2))[:, sel].mean())
    metrics[f"{prefix}_maskAB_iou"] = float((inter / union)[:, sel].mean())
    metrics[f"{prefix}_maskAB_iou_first10"] = float((inter / union)[:10, sel].mean())
    if bool(ok.any()):
        metrics[f"{prefix}_maskA_share_in_3_half"] = float(half_share(ma, side3)[:, ok].mean())
        metrics[f"{prefix}_maskB_share_in_7_half"] = float(half_share(mb, 1 - side3)[:, ok].mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    diffusers = require_diffusers()
    command = current_command() if argv is None else " ".join(["python", "benchmarks/clora_mask_diagnosis.py", *argv])
    unet, text, loras, clf = load(args)
    dev = torch.device(args.device)
    seq = args.arch.seq
    prompt = cc.prompt_tokens(torch.tensor([cc.CONCEPT_A], device=dev), torch.tensor([cc.CONCEPT_B], device=dev), seq)
    cond, uncond = text(prompt)[0], text(cc.null_tokens(dev, seq))[0]
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    z0 = torch.randn(args.samples, 3, cc.CANVAS, cc.CANVAS, generator=torch.Generator().manual_seed(args.seed)).to(dev)
    b = args.samples
    metrics: dict[str, float] = {"samples": b, "guidance_scale": args.guidance, "ddim_steps": args.steps, "mask_alpha": args.mask_alpha,
                                 "attention_res": args.attention_res, "maps_from_cond_half": int(args.attention_from == "cond"),
                                 "base_arch_v2": int(args.arch.name == "v2")}
    stages_file = Path(args.ckpt_dir) / "stages.json"
    if stages_file.exists():  # which base the figures describe: its steps (and, continued, where from)
        shape = json.loads(stages_file.read_text()).get(f"{args.arch.prefix}base", {}).get("shape", {})
        metrics.update({k: shape[k] for k in ("base_steps", "base_continue_from") if k in shape})
    saved = {}
    if loras:
        loras_avg = average_adapters(loras)
    else:  # base-only runs (e.g. the gate right after the base stage): no LoRA stage needed
        loras, loras_avg = [None, None], None
    runs = {
        "base": ([None], [[]], ["base"]),
        "lora_a": ([loras[0]], [[]], ["lora_a"]),
        "lora_b": ([loras[1]], [[]], ["lora_b"]),
        "average": ([loras_avg], [[]], ["average"]),
        "clora": ([None, loras[0], loras[1]], [[], [TOK3], [TOK7]], ["base", "lora_a", "lora_b"]),
        "clora_relative": ([None, loras[0], loras[1]], [[], [TOK3], [TOK7]], ["base", "lora_a", "lora_b"]),
        "clora_minmax": ([None, loras[0], loras[1]], [[], [TOK3], [TOK7]], ["base", "lora_a", "lora_b"]),
        "clora_update": ([None, loras[0], loras[1]], [[], [TOK3], [TOK7]], ["base", "lora_a", "lora_b"]),
        "clora_update_minmax": ([None, loras[0], loras[1]], [[], [TOK3], [TOK7]], ["base", "lora_a", "lora_b"]),
    }
    base_side3 = base_ok = None
    out = args.out or tempfile.mkdtemp(prefix="clora_mask_diagnosis_")
    for name in args.runs:
        t0 = time.perf_counter()
        if name == "real":
            real_run(unet, cond, uncond, args, metrics)
            metrics["seconds_real"] = time.perf_counter() - t0
            r = args.attention_res
            print(f"[real] r{r}: own-half share 3 {metrics[f'real_r{r}_share_own_half_3']:.3f} "
                  f"7 {metrics[f'real_r{r}_share_own_half_7']:.3f} cos {metrics[f'real_r{r}_cos_3_7']:.3f} "
                  f"({metrics['seconds_real']:.0f} s)", flush=True)
            write_result(args.name, metrics, command=command, directory=out)
            continue
        adapters, mask_idx, bnames = runs[name]
        branches = LoRABranches(unet, adapters)
        mask_fn = None
        if name == "clora_relative":
            mask_fn = lambda mm, mi, sz: relative_masks(mm, mi, sz, args.mask_alpha)  # noqa: E731
        elif name == "clora_minmax":
            mask_fn = lambda mm, mi, sz: minmax_masks(mm, mi, sz, args.mask_alpha)  # noqa: E731
        if name.startswith("clora_update"):
            z, masks = update_run(unet, scheduler, branches, cond, uncond, mask_idx, z0, args, name.endswith("minmax"))
            maps = {}
        else:
            z, maps, masks = traced_run(unet, scheduler, branches, cond.expand(len(adapters), -1, -1), uncond,
                                        mask_idx, z0, args, mask_fn)
        halves = read_halves(clf, z)
        found = cc.detect(clf, z)
        metrics[f"both_share_{name}"] = float(found.all(1).float().mean())
        metrics[f"red3_share_{name}"] = float(found[:, 0].float().mean())
        metrics[f"green7_share_{name}"] = float(found[:, 1].float().mean())
        # readable: one half a 3 (not a 7), the other a 7 (not a 3)
        l3 = halves["is3"][:, 0] & ~halves["is7"][:, 0] & halves["is7"][:, 1] & ~halves["is3"][:, 1]
        r3 = halves["is3"][:, 1] & ~halves["is7"][:, 1] & halves["is7"][:, 0] & ~halves["is3"][:, 0]
        ok, side3 = l3 | r3, r3.long()
        metrics[f"readable_{name}"] = float(ok.float().mean())
        if bool(ok.any()):
            idx = torch.arange(b, device=dev)
            metrics[f"red_share_of_3_{name}"] = float(halves["red"][idx, side3][ok].mean())
            metrics[f"red_share_of_7_{name}"] = float(halves["red"][idx, 1 - side3][ok].mean())
        if name == "base":
            base_side3, base_ok = side3, ok
        map_metrics(name, maps, side3, ok, bnames, metrics, b)
        if name == "base":  # the gate: the maps CLoRA would threshold (its resolution and CFG source)
            gate_metrics("gate", clora_maps(maps[args.attention_res][:, 0], b, args.attention_from), side3, ok,
                         args.mask_alpha, metrics)
            for r in args.map_res:  # the same figures at every recorded resolution (gate_r<res>_...)
                gate_metrics(f"gate_r{r}", clora_maps(maps[r][:, 0], b, args.attention_from), side3, ok,
                             args.mask_alpha, metrics)
            metrics["gate_readable"] = metrics["readable_base"]
            metrics["gate_pass"] = int(metrics["gate_readable"] >= GATE_MIN_READABLE
                                       and metrics["gate_cos_3_7"] < GATE_MAX_COS
                                       and min(metrics.get("gate_share_own_half_3", 0.0),
                                               metrics.get("gate_share_own_half_7", 0.0)) > GATE_MIN_SHARE)
        if base_side3 is not None and name != "base":  # layout of the base image (same noise)
            metrics[f"same_layout_as_base_{name}"] = float((ok & base_ok & (side3 == base_side3)).float().sum()
                                                           / (ok & base_ok).float().sum().clamp_min(1))
        if len(adapters) > 1:
            mask_metrics(name, masks, side3, ok, metrics)
        metrics[f"seconds_{name}"] = time.perf_counter() - t0
        print(f"[{name}] both {metrics[f'both_share_{name}']:.3f} readable {metrics[f'readable_{name}']:.3f} "
              f"({metrics[f'seconds_{name}']:.0f} s)", flush=True)
        if args.save_tensors:
            saved[name] = {"latents": z, **{f"maps{r}": v.half() for r, v in maps.items()},
                           "masks": masks.bool() if len(adapters) > 1 else None, "side3": side3, "ok": ok}
        path = write_result(args.name, metrics, command=command, directory=out)  # after every run: partial results survive
        if name == "clora" and args.check:
            cfg = CLoRAConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, latent_update=False,
                              mask_threshold_alpha=args.mask_alpha, attention_res=(args.attention_res,) * 2,
                              attention_from=args.attention_from)
            ref = clora_sample(unet, scheduler, branches, cond.expand(3, -1, -1), uncond,
                               [[[TOK3]] * 3, [[TOK7]] * 3], mask_idx, z0, cfg).latents
            metrics["check_max_abs_diff_vs_clora_sample"] = float((ref - z).abs().max())
            print(f"check vs clora_sample: max |diff| {metrics['check_max_abs_diff_vs_clora_sample']:.2e}", flush=True)
    for k in sorted(metrics):
        print(f"{k}: {metrics[k]:.4g}")
    if args.save_tensors:
        torch.save(saved, args.save_tensors)
    path = write_result(args.name, metrics, command=command, directory=out)
    print(f"wrote {path}")
    if args.gate:
        r = args.attention_res
        verdict = "PASS" if metrics["gate_pass"] else "FAIL"
        print(f"GATE {verdict} ({args.base_arch}, maps r{r} {args.attention_from}): readable {metrics['gate_readable']:.2f} "
              f"(>= {GATE_MIN_READABLE}), cos {metrics['gate_cos_3_7']:.3f} (< {GATE_MAX_COS}), own-half share "
              f"3 {metrics.get('gate_share_own_half_3', float('nan')):.3f} / 7 {metrics.get('gate_share_own_half_7', float('nan')):.3f} "
              f"(> {GATE_MIN_SHARE}); masks A {metrics['gate_maskA_area']:.2f} B {metrics['gate_maskB_area']:.2f} "
              f"IoU {metrics['gate_maskAB_iou']:.2f}", flush=True)
        return 0 if metrics["gate_pass"] else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
