"""CLoRA vs naive LoRA averaging on a small conditional diffusion model trained here (METHODS §8, issue #7).

No pretrained diffusion model exists on this project's machines, so the script builds the whole
setting on the GPU in a few minutes:

1. Data: the 1,797 8×8 handwritten digits of scikit-learn (UCI, CC BY 4.0), carried as
   ``data/digits/digits_8x8.safetensors`` (see data/digits/PROVENANCE.md). Glyphs are upsampled to
   12×12 and pasted on a black 32×32 RGB canvas: two digits (one in each half, which digit goes left
   is random and independent of the prompt's word order) or one digit anywhere. Glyphs are split
   80/20: the generators and the classifier train on the 80 %, the classifier is checked on the 20 %.
2. Base model: a tiny diffusers ``UNet2DConditionModel`` (pixel space, 32×32×3, cross-attention at
   16×16 and 8×8) conditioned on a tiny transformer text encoder over 13 tokens
   (``<bos> 0..9 and <null>``), trained as a DDPM (ε-prediction, 10 % prompt dropout for CFG) on
   white digits: prompts ``<bos> a and b`` or ``<bos> a <null> <null>``.
3. Two concept LoRAs (this library's ``lora``, r = 8, on to_q/to_k/to_v/to_out.0 of every attention
   layer), DreamBooth-style on single-subject images: concept A = a *red 3* (prompt ``3``), concept
   B = a *green 7* (prompt ``7``). Text encoder frozen. 10 % prompt dropout (``--lora-p-uncond 0.1``):
   the LoRA acts on both CFG halves (its to_k/to_v read the null prompt too, its self-attention and
   to_out ignore the prompt), so without dropout its null-prompt prediction is never trained and
   drifts far off (session 6: ε-MSE on the concept images 0.049 vs the base's 0.0002 at t = 900) and
   guidance 3 turns every sample into colour noise or speckle (all six LoRAs of the 1e-4..1e-3 grid
   scored 0 on their own prompt, though the 1e-3 ones draw clean red 3s / green 7s at guidance 1).
   With 10 % dropout the null branch learns the concept as well (ε-MSE 0.0004 at t = 900) and a LoRA
   alone scored 0.125 (red 3) / 0.625 (green 7) at lr 1e-3, guidance 3. Which lr learns the concept
   in ``--lora-steps`` at this scale is unverified (DreamBooth-LoRA's usual 1e-4 may be too slow for
   600 steps), so one LoRA per concept is trained at each ``--lora-lr`` (default 1e-4 3e-4 1e-3, each
   its own resumable stage) and the lr is chosen per concept on the VALIDATION noise (the seeds that
   also choose CLoRA's step size, ``--val-samples`` samples): the LoRA alone, sampled with its own
   prompt (``3`` / ``7``), with the highest share of its concept (red 3 / green 7; ties -> the smaller
   lr); ``val_red3_share_lora_a/lr<lr>``, ``val_green7_share_lora_b/lr<lr>``, ``lora_a_lr`` and
   ``lora_b_lr`` report it. Only the chosen LoRAs are used from then on. They are sampled alone with
   their own prompt on the TEST noise too: ``red3_share_lora_a_own_prompt`` /
   ``green7_share_lora_b_own_prompt`` say whether they learned their concept at all (the comparison
   means little unless both are high).
4. A small CNN that says, for a canvas, whether it holds a red 3 and whether it holds a green 7
   (trained on composed canvases with random classes, colours incl. red/green mixtures, ink
   scaling, blur and noise; its accuracy on held-out glyphs is reported).
5. Generation for the prompt ``3 and 7`` from the same initial noise: base model, each LoRA alone,
   naive averaging (ΔW = ½ΔW_A + ½ΔW_B), the sum (ΔW_A + ΔW_B, an extra reference), and CLoRA
   (branches: base / LoRA A / LoRA B, concept tokens ``3`` and ``7``, masks from LoRA A's ``3`` and
   LoRA B's ``7``; DDIM 50 steps). CLoRA's latent step size (a few values, incl. 0 = masked fusion
   only) and the source of its maps (both CFG halves as the official code, or the conditional half)
   are chosen on separate validation noise; all reported shares use the test noise, the same
   initial noise for every method.

Resumable across GPU sessions: the base model, each LoRA and the classifier are saved to
``--ckpt-dir`` as they finish, with ``stages.json`` recording the options that shaped them; a rerun
with the same options loads the finished stages (`benchmarks/gpu_queue.sh` packs them as
``clora_ckpt.tgz`` and restores them from ``.carry/clora_ckpt``). Each stage reseeds and the base
UNet is used as its fp16 checkpoint rounds it, so a resumed run gives the figures of an
uninterrupted one (checked on CPU at toy sizes: equal but for the timings).

Metric: share of samples in which the classifier finds both concepts. Key:
``both_concepts_gain_vs_average`` = CLoRA's share − averaging's share (> 0 is the bar). Sample
grids go to ``--figures`` (docs/figures): ``clora_composition.png`` (``<--name>.png``), rows = base, LoRA A, LoRA B,
average, sum, CLoRA (fusion-only), CLoRA.

    pip install --no-deps --no-index .whl/diffusion/*.whl   # GPU image: diffusers is not installed
    python benchmarks/clora_composition.py                   # ~4-6 min on one H200
    python benchmarks/clora_composition.py --smoke           # CPU, < 1 min, writes nothing in the tree

Base architectures (``--base-arch``, issue #7). ``v1`` (the default) is the base of the recorded runs,
unchanged: session 7 (``clora_mask_diagnosis.py``) found its concept tokens' maps do not localize
(16×16: cos(map "3", map "7") 0.96, own-half share 0.50; both masks = the whole canvas), so every
method scored 0 on "both concepts" and the comparison says nothing about CLoRA. ``v2`` (:class:`BaseArch`)
is built so that the maps must localize: word order tied to layout (a pair's first digit word is
drawn left), prompts padded to 8 tokens with ``<null>``, cross-attention at 32×32 too, pixel
coordinates as input channels, and a text encoder without token mixing (:class:`BaseArch` says why
each).

The classifier is shared; v2's stages are stored apart in the same ``--ckpt-dir`` (``v2_base``,
``v2_lora_*``; files ``v2_base_unet_fp16.safetensors``, ``v2_text_encoder.safetensors``) and their
records carry ``base_arch``, so an old checkpoint is never loaded into the new architecture (a
mismatch would also fail the strict state-dict load). v2's result and figure are
``clora_composition_v2[_g<guidance>]``. CLoRA's maps stay at ``--attention-res 16`` unless the gate
says 32 is better. ``--stop-after base`` trains / loads the base and the classifier only.

Session 10 (one H200 of a two-GPU machine): the 6000-step v2 base (596 s, loss 0.0045) failed the gate at 16×16 and 32×32
(maps of "3" and "7" alike: cos 0.91 / 0.996, own-half shares 0.50, masks = the whole canvas), while
its 8×8 maps separate (own-half shares 0.80 / 0.78, cos 0.20, mask IoU 0.04); readable 0.234 < 0.25.
``--attention-res 8`` runs the whole path on 8×8 maps (masks nearest-upsampled to 32×32);
``benchmarks/clora_v2_r8.sh`` chains gate → (continuation) → LoRAs → comparison for gpu_queue.sh.

Continuing the base (``--base-continue-from STEPS`` with a larger ``--base-steps``): the finished base
stage of STEPS steps (same seed, width, batch size, arch) is loaded as its fp16 checkpoint and trained
``--base-steps`` − STEPS more steps. The optimizer state is not saved (only the fp16 weights come back
from the GPU), so this is a WARM RESTART, not the uninterrupted run of ``--base-steps``: a fresh AdamW
and a fresh warmup (5 % of the extra steps) + cosine schedule over the extra steps at
``--base-continue-lr`` (default 3e-4, below the base's own 1e-3: the first updates of a fresh AdamW are
~lr per weight whatever the gradient, and on CPU two extra steps at 1e-3 without warmup took the
6000-step base's loss from 0.004 to 0.48), data drawn from a seed of its own. The stage's record says so (``base_continue_from``,
``base_continue_lr`` in its shape; the record it continued under ``continued``), its file replaces the
old base's, and only commands with the same two flags reuse it (LoRA stages included): a plain
``--base-steps 10000`` would train an uninterrupted base anew. Chains work (6000 → 10000 → 14000).

Next GPU session (one H200), v2 -- gate first, then the comparison (stages resume across sessions):

    pip install --no-deps --no-index .whl/diffusion/*.whl
    # 1. base + classifier (~15-25 min: v1's 6000 steps took 751 s; v2's 32×32 cross-attention is
    #    ~2× v1's step time on CPU, so ≈ 1.5-2× on the GPU; the log prints seconds every 1200 steps)
    python benchmarks/clora_composition.py --base-arch v2 --ckpt-dir runs/clora_composition --stop-after base
    # 2. the gate (~1-2 min): exit 0 = pass, 3 = fail (then stop: do not train LoRAs on this base)
    python benchmarks/clora_mask_diagnosis.py --ckpt-dir runs/clora_composition --base-arch v2 --device cuda \
        --runs real base --samples 64 --gate --out /tmp/gate16
    python benchmarks/clora_mask_diagnosis.py --ckpt-dir runs/clora_composition --base-arch v2 --device cuda \
        --runs real base --samples 64 --attention-res 32 --gate --out /tmp/gate32   # the 32×32 maps
    # 3. only if a gate passed: LoRAs + comparison (four LoRAs at 1500 steps took ~445 s on v1; ×1.5-2
    #    ≈ 11-15 min, generation ≈ 3-5 min); add --attention-res 32 if only the 32×32 gate passed
    python benchmarks/clora_composition.py --base-arch v2 --ckpt-dir runs/clora_composition \
        --lora-steps 1500 --lora-lr 1e-3 2e-3
    # then the gate's numbers on the whole CLoRA run (masks of the LoRA branches):
    python benchmarks/clora_mask_diagnosis.py --ckpt-dir runs/clora_composition --base-arch v2 --device cuda \
        --lora-a v2_lora_a_red3_lr<chosen> --lora-b v2_lora_b_green7_lr<chosen> --runs base clora --samples 64

In all ≈ 35-45 GPU minutes; steps 1-2 fit one 30-min session, step 3 the next. v2 is unverified at
scale: on CPU (width 16, batch 32, 500 steps; 850 for v2 with a mixing encoder) neither arch uses
the prompt yet (ε-MSE with the prompt = with the null prompt within 1 %, per-token attention mass
≈ uniform) and every own-half share is 0.50, so only the GPU gate can say whether v2 localizes.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_lora import adapter_layers, inject_adapter, load_adapter, save_adapter, unload  # noqa: E402
from lightning_lora.merge.clora import (  # noqa: E402
    CLoRAConfig,
    LoRABranches,
    average_adapters,
    clora_sample,
    require_diffusers,
    sample,
)
from lightning_lora.results import current_command, write_result  # noqa: E402

BOS, AND, NULL = 0, 11, 12  # token ids; digit d is token d + 1
VOCAB, SEQ = 13, 4
CANVAS, GLYPH = 32, 12
RED = (1.0, 0.15, 0.1)
GREEN = (0.1, 1.0, 0.15)
CONCEPT_A, CONCEPT_B = 3, 7  # digit classes of the two concepts
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class BaseArch:
    """What shapes the base stage (data, text encoder, UNet) and how its stages are stored.

    ``v1``: the base of the recorded runs (sessions 6-7), kept bit-for-bit: 4-token prompts, the pair's
    sides independent of the word order, cross-attention at 16×16 and 8×8. Its cross-attention does
    not localize (session 7: maps of "3" and "7" at 16×16 have cosine 0.96, own-half share 0.50).
    ``v2``: built so that the concept tokens' maps must localize: 8-token prompts padded with
    ``<null>`` (sink tokens for the background, as SD's padding), pairs drawn with the FIRST digit
    token's digit in the left half and the second in the right half (position in the prompt <->
    position in the image is learnable; singles still anywhere, so the maps must also follow the
    content), cross-attention at every level incl. 32×32 (that level cross-attention only:
    ``only_cross_attention``, no 1024-query self-attention), the pixel's (x, y) as two extra
    input channels (:class:`CoordConvIn`: a convolutional UNet barely knows where a 32×32 query is,
    so "left half <-> first digit token" would otherwise have to be inferred from the borders), and
    a text encoder without token mixing (``text_mixing=False``: embedding_i = token_i + position_i).
    Why the last: with v1's transformer layer each token's vector depends on the others and on the
    order, so even UNIFORM attention (the sum of the values) tells every pixel "3 first, 7 second"
    and the maps never need to select; with a linear, unmixed encoder that sum is order-invariant
    (Σ token + Σ position), so the only way for a pixel to learn which digit is on its side is to
    attend to that token (its key carries the position): the binding must go through the maps.
    """

    name: str
    seq: int  # prompt length in tokens (``<bos> a and b`` then ``<null>`` padding)
    tied_layout: bool  # pairs: first digit token -> left half, second -> right half
    cross_attn_res: tuple[int, ...]  # resolutions (side) of the UNet's cross-attention layers
    attention_res: int  # default side of CLoRA's maps
    prefix: str  # stage-name / file-name prefix in --ckpt-dir ("" for v1: the recorded checkpoints)
    coords: bool  # the UNet's conv_in also sees the pixel coordinates (CoordConvIn)
    text_mixing: bool  # text encoder with a transformer layer (v1) or tokens + positions only (v2)


ARCHS = {
    "v1": BaseArch("v1", seq=4, tied_layout=False, cross_attn_res=(16, 8), attention_res=16, prefix="", coords=False,
                   text_mixing=True),
    "v2": BaseArch("v2", seq=8, tied_layout=True, cross_attn_res=(32, 16, 8), attention_res=16, prefix="v2_",
                   coords=True, text_mixing=False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run; writes only to a temp dir")
    p.add_argument("--out", default=None, help="result directory (default benchmarks/results)")
    p.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    p.add_argument("--ckpt-dir", default=str(ROOT / "runs" / "clora_composition"),
                   help="base model, LoRAs and classifier are saved here (small safetensors)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, default=6000)
    p.add_argument("--lora-steps", type=int, default=600)
    p.add_argument("--lora-lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                   help="concept-LoRA learning rates: one LoRA per concept and lr, the lr chosen per concept on "
                        "the validation noise (share of its concept, LoRA alone on its own prompt)")
    p.add_argument("--lora-p-uncond", type=float, default=0.1,
                   help="prompt dropout while training a concept LoRA; the LoRA also acts on CFG's unconditional "
                        "half, which drifts off untrained at 0 (CFG then yields colour noise: every LoRA scored 0)")
    p.add_argument("--clf-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--samples", type=int, default=512, help="test samples per method")
    p.add_argument("--val-samples", type=int, default=128, help="samples per step size when choosing it")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--name", default=None,
                   help="result and figure name (default clora_composition, or clora_composition_g<guidance> "
                        "when --guidance is not 3): a second guidance reuses every stage and keeps its own files")
    p.add_argument("--step-sizes", type=float, nargs="+", default=[0.0, 5.0, 50.0, 500.0],
                   help="CLoRA latent step sizes tried on the validation noise (0 = masked fusion only)")
    p.add_argument("--max-iter-to-alter", type=int, default=30)
    p.add_argument("--mask-alpha", type=float, default=0.3)
    p.add_argument("--attention-res", type=int, default=None,
                   help="side of the cross-attention maps CLoRA uses (default: the base arch's, 16)")
    p.add_argument("--attention-from", nargs="+", default=["cfg_batch", "cond"], choices=["cfg_batch", "cond"],
                   help="which CFG half the maps come from; several = chosen on the validation noise too")
    p.add_argument("--width", type=int, default=64, help="UNet base channels")
    p.add_argument("--base-arch", default="v1", choices=sorted(ARCHS),
                   help="v1: the recorded runs' base (maps do not localize); v2: padded prompts, word order tied "
                        "to the sides, cross-attention at 32×32 too (BaseArch). v2 stages are stored under their "
                        "own names (prefix v2_), so the two never share a checkpoint")
    p.add_argument("--base-continue-from", type=int, default=None, metavar="STEPS",
                   help="continue the finished base stage of STEPS steps in --ckpt-dir (same seed, width, batch size "
                        "and arch) to --base-steps: a WARM RESTART (fresh AdamW state and a fresh warmup + cosine "
                        "schedule over the extra steps at --base-continue-lr; the optimizer state is not saved), "
                        "recorded as base_continue_from; every later command on that base needs the same flags")
    p.add_argument("--base-continue-lr", type=float, default=3e-4,
                   help="peak lr of the warm restart (--base-continue-from; the base stage's own is 1e-3, which a "
                        "fresh AdamW turns into a kick to a converged base: sign-like first steps of ~lr per weight)")
    p.add_argument("--stop-after", default=None, choices=["base"],
                   help="base: train / load the base model and the classifier (what clora_mask_diagnosis.py needs "
                        "for its gate), then exit without LoRAs or generation")
    args = p.parse_args(argv)
    args.arch = ARCHS[args.base_arch]
    if args.attention_res is None:
        args.attention_res = args.arch.attention_res
    args.lora_lr = sorted(set(args.lora_lr))
    if args.name is None:  # v2 keeps its own result and figure (clora_composition_v2[_g<guidance>])
        suffix = "" if args.base_arch == "v1" else f"_{args.base_arch}"
        args.name = f"clora_composition{suffix}" if args.guidance == 3.0 else f"clora_composition{suffix}_g{args.guidance:g}"
    if args.smoke:
        args.base_steps, args.lora_steps, args.clf_steps = 4, 2, 4
        args.batch_size, args.samples, args.val_samples, args.steps = 4, 2, 2, 3
        args.step_sizes, args.max_iter_to_alter, args.width = [0.0, 10.0], 2, 16
        if len(args.lora_lr) > 2:  # still exercises the choice of the lr
            args.lora_lr = args.lora_lr[:2]
        if args.base_continue_from is not None:  # a 2-step base is trained first, then continued to 4
            args.base_continue_from = 2
    if args.base_continue_from is not None and not 0 < args.base_continue_from < args.base_steps:
        p.error(f"--base-continue-from {args.base_continue_from} must be > 0 and < --base-steps {args.base_steps}")
    return args


# ---------------------------------------------------------------------------------------------
# Data: digits pasted on a canvas
# ---------------------------------------------------------------------------------------------

def load_glyphs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12, 12) ink in [0, 1] and (N,) labels."""
    d = load_file(str(ROOT / "data" / "digits" / "digits_8x8.safetensors"))
    ink = d["images"].float().div(16.0).unsqueeze(1)
    ink = F.interpolate(ink, size=(GLYPH, GLYPH), mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1)
    return ink.to(device), d["labels"].to(device)


def composers(device: torch.device | str) -> tuple["Composer", "Composer"]:
    """Composers of the training glyphs (80 %) and of the held-out glyphs (20 %, fixed split)."""
    ink, labels = load_glyphs(torch.device(device))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234)).to(device)
    cut = int(0.8 * len(labels))
    return Composer(ink[perm[:cut]], labels[perm[:cut]]), Composer(ink[perm[cut:]], labels[perm[cut:]])


class Composer:
    """Random canvases from a glyph pool. Positions: pairs one per half, singles anywhere."""

    def __init__(self, ink: torch.Tensor, labels: torch.Tensor) -> None:
        self.ink, self.labels = ink, labels
        self.device = ink.device
        # glyph indices per class as one padded (10, max count) table, so that sampling needs no
        # host sync (a per-class loop syncs ~20 times a batch, which crawls on a GPU shared by many jobs)
        by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(10)]
        self.counts = torch.tensor([len(ix) for ix in by_class], device=self.device)
        self.table = torch.zeros(10, int(self.counts.max()), dtype=torch.long, device=self.device)
        for c, ix in enumerate(by_class):
            self.table[c, : len(ix)] = ix

    def glyph_of(self, classes: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """A random glyph index of each requested class (uniform within the class)."""
        counts = self.counts[classes]
        pick = (torch.rand(classes.shape, device=self.device, generator=g) * counts).long()
        return self.table[classes, torch.minimum(pick, counts - 1)]

    def paint(self, glyphs: torch.Tensor, colours: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
              present: torch.Tensor) -> torch.Tensor:
        """glyphs, xs, ys, present: (N, K); colours (N, K, 3) -> canvases (N, 3, 32, 32) in [0, 1]."""
        n, k = glyphs.shape
        canvas = torch.zeros(n, CANVAS, CANVAS, 3, device=self.device)
        ar = torch.arange(GLYPH, device=self.device)
        rows_n = torch.arange(n, device=self.device)[:, None, None]
        for s in range(k):
            patch = self.ink[glyphs[:, s]][..., None] * colours[:, s, None, None, :] * present[:, s, None, None, None]
            rows = (ys[:, s, None] + ar)[:, :, None]
            cols = (xs[:, s, None] + ar)[:, None, :]
            canvas[rows_n, rows, cols] = torch.maximum(canvas[rows_n, rows, cols], patch)
        return canvas.permute(0, 3, 1, 2).contiguous()

    def layout(self, n: int, pair: torch.Tensor, tied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of two slots (N, 2): pairs in different halves (random which first; with ``tied`` the
        first slot always left), singles anywhere. ``tied`` draws the same random numbers (v1 unchanged)."""
        span = CANVAS - GLYPH  # 20
        ys = torch.randint(0, span + 1, (n, 2), device=self.device)
        left = torch.randint(0, 5, (n,), device=self.device)
        right = torch.randint(16, span + 1, (n,), device=self.device)
        first_left = torch.rand(n, device=self.device) < 0.5
        if tied:
            first_left = torch.ones_like(first_left)
        x0 = torch.where(first_left, left, right)
        x1 = torch.where(first_left, right, left)
        x0 = torch.where(pair, x0, torch.randint(0, span + 1, (n,), device=self.device))
        return torch.stack([x0, x1], 1), ys


def prompt_tokens(a: torch.Tensor, b: torch.Tensor | None, seq: int = SEQ) -> torch.Tensor:
    """(N, seq) tokens: ``<bos> a and b`` or ``<bos> a <null> <null>`` where b is None / < 0, padded
    with ``<null>`` to ``seq`` tokens (v1: seq 4, no padding; v2: 8). a, b: (N,) digit classes."""
    n = a.shape[0]
    tok = torch.full((n, seq), NULL, dtype=torch.long, device=a.device)
    tok[:, 0] = BOS
    tok[:, 1] = a + 1
    if b is not None:
        has_b = b >= 0
        tok[:, 2] = torch.where(has_b, torch.full_like(a, AND), tok[:, 2])
        tok[:, 3] = torch.where(has_b, b + 1, tok[:, 3])
    return tok


def null_tokens(device: torch.device | str, seq: int = SEQ) -> torch.Tensor:
    """(1, seq) the unconditional prompt ``<bos> <null> ...`` (CFG's other half, prompt dropout)."""
    return torch.tensor([[BOS] + [NULL] * (seq - 1)], device=device)


def base_batch(comp: Composer, n: int, arch: BaseArch = ARCHS["v1"]) -> tuple[torch.Tensor, torch.Tensor]:
    """White digits: 75 % pairs of distinct classes, 25 % singles. Returns (images (N, 3, 32, 32) in
    [-1, 1], tokens (N, arch.seq)); with ``arch.tied_layout`` the prompt's first digit is the left one."""
    dev = comp.device
    pair = torch.rand(n, device=dev) < 0.75
    a = torch.randint(0, 10, (n,), device=dev)
    b = (a + torch.randint(1, 10, (n,), device=dev)) % 10
    glyphs = torch.stack([comp.glyph_of(a), comp.glyph_of(b)], 1)
    xs, ys = comp.layout(n, pair, tied=arch.tied_layout)
    colours = torch.ones(n, 2, 3, device=dev)
    present = torch.stack([torch.ones_like(pair), pair], 1).float()
    img = comp.paint(glyphs, colours, xs, ys, present)
    tokens = prompt_tokens(a, torch.where(pair, b, torch.full_like(b, -1)), arch.seq)
    return img * 2 - 1, tokens


def concept_batch(comp: Composer, n: int, digit: int, colour: tuple[float, float, float],
                  seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-subject images of the concept (DreamBooth-style): one coloured digit anywhere; prompt
    ``<bos> digit <null> ...`` of ``seq`` tokens. Returns (N, 3, 32, 32) in [-1, 1], (N, seq)."""
    dev = comp.device
    a = torch.full((n,), digit, device=dev)
    glyphs = torch.stack([comp.glyph_of(a), comp.glyph_of(a)], 1)
    xs, ys = comp.layout(n, torch.zeros(n, dtype=torch.bool, device=dev))
    colours = torch.tensor(colour, device=dev).expand(n, 2, 3)
    present = torch.tensor([1.0, 0.0], device=dev).expand(n, 2)
    return comp.paint(glyphs, colours, xs, ys, present) * 2 - 1, prompt_tokens(a, None, seq)


def is_red(c: torch.Tensor) -> torch.Tensor:
    c = c / c.amax(-1, keepdim=True).clamp_min(1e-6)
    return (c[..., 0] >= 0.99) & (c[..., 1:].amax(-1) <= 0.45)


def is_green(c: torch.Tensor) -> torch.Tensor:
    c = c / c.amax(-1, keepdim=True).clamp_min(1e-6)
    return (c[..., 1] >= 0.99) & (torch.maximum(c[..., 0], c[..., 2]) <= 0.45)


def classifier_batch(comp: Composer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvases with 1-2 digits (3 and 7 often), colours from white / red / green / red-green
    mixtures / random; labels (N, 2) = [has red 3, has green 7]. Ink scaling, blur and noise mimic
    generated samples. Returns images in [-1, 1]."""
    dev = comp.device
    pair = torch.rand(n, device=dev) < 0.7
    classes = torch.randint(0, 10, (n, 2), device=dev)
    favour = torch.rand(n, 2, device=dev)
    classes = torch.where(favour < 0.3, torch.full_like(classes, CONCEPT_A), classes)
    classes = torch.where((favour >= 0.3) & (favour < 0.6), torch.full_like(classes, CONCEPT_B), classes)
    glyphs = torch.stack([comp.glyph_of(classes[:, 0]), comp.glyph_of(classes[:, 1])], 1)
    xs, ys = comp.layout(n, pair)
    red, green = torch.tensor(RED, device=dev), torch.tensor(GREEN, device=dev)
    mode = torch.randint(0, 5, (n, 2), device=dev)
    lam = torch.rand(n, 2, 1, device=dev)
    mix = lam * red + (1 - lam) * green
    mix = mix / mix.amax(-1, keepdim=True)
    rand = torch.rand(n, 2, 3, device=dev)
    rand = rand / rand.amax(-1, keepdim=True)
    jitter = 1 + 0.15 * (torch.rand(n, 2, 3, device=dev) - 0.5)
    options = torch.stack([torch.ones(n, 2, 3, device=dev), red.expand(n, 2, 3) * jitter,
                           green.expand(n, 2, 3) * jitter, mix, rand], 0)  # (5, N, 2, 3)
    colours = options.gather(0, mode[None, :, :, None].expand(1, n, 2, 3))[0].clamp(0, 1)
    present = torch.stack([torch.ones_like(pair), pair], 1).float()
    img = comp.paint(glyphs, colours * (0.6 + 0.4 * torch.rand(n, 1, 1, device=dev)), xs, ys, present)
    blur = torch.rand(n, 1, 1, 1, device=dev) < 0.3
    img = torch.where(blur, F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False), img)
    img = img + 0.06 * torch.rand(n, 1, 1, 1, device=dev) * torch.randn_like(img)
    has_a = ((classes == CONCEPT_A) & is_red(colours) & (present > 0)).any(1)
    has_b = ((classes == CONCEPT_B) & is_green(colours) & (present > 0)).any(1)
    return (img.clamp(0, 1) * 2 - 1), torch.stack([has_a, has_b], 1).float()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class TinyTextEncoder(nn.Module):
    """Token + position embeddings and one transformer layer: (B, seq) tokens -> (B, seq, dim).

    v1: seq 4, with the layer. v2: seq 8, ``mixing=False``: no layer and no norm, each output is its
    token's embedding + its position's (position init N(0, 1) like the tokens', so keys differ by
    position from the start); see :class:`BaseArch` for why. A checkpoint of the other arch fails
    to load (``pos`` shape, missing / unexpected layer keys)."""

    def __init__(self, dim: int = 64, seq: int = SEQ, mixing: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim) if mixing else torch.randn(seq, dim))
        self.mixing = mixing
        if mixing:
            self.layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos
        return self.norm(self.layer(x)) if self.mixing else x


def text_encoder(arch: BaseArch = ARCHS["v1"]) -> TinyTextEncoder:
    """The text encoder of ``arch`` (untrained): (B, arch.seq) tokens -> (B, arch.seq, 64)."""
    return TinyTextEncoder(seq=arch.seq, mixing=arch.text_mixing)


def base_files(ckpt: Path, arch: BaseArch = ARCHS["v1"]) -> tuple[Path, Path]:
    """The base stage's UNet (fp16) and text-encoder files in ``ckpt`` (v2: ``v2_`` prefixed)."""
    return ckpt / f"{arch.prefix}base_unet_fp16.safetensors", ckpt / f"{arch.prefix}text_encoder.safetensors"


def load_base(unet: nn.Module, text: nn.Module, ckpt: Path, device: torch.device | str,
              arch: BaseArch = ARCHS["v1"]) -> None:
    """Load a run's base UNet (as its fp16 checkpoint rounds it) and text encoder of ``arch`` from
    ``ckpt`` into ``unet`` and ``text``, both then frozen in eval mode (every reader of a finished run's
    stages). Strict loading: a checkpoint of the other arch fails (other keys / shapes)."""
    unet_file, text_file = base_files(ckpt, arch)
    unet.load_state_dict({k: v.float() for k, v in load_file(str(unet_file), device=str(device)).items()})
    text.load_state_dict(load_file(str(text_file), device=str(device)))
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)


class CoordConvIn(nn.Module):
    """A UNet's ``conv_in`` that also sees the pixel's coordinates: (B, C, H, W) -> (B, out, H, W),
    the convolution reading C + 2 channels (x and y, each in [-1, 1]). Its weights are
    ``conv.weight`` / ``conv.bias`` (so a v1 checkpoint, ``conv_in.weight``, cannot load into it)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels + 2, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): channel 0 = x, 1 = y
        return self.conv(torch.cat([x, grid.expand(b, -1, -1, -1)], dim=1))


def make_unet(width: int, text_dim: int = 64, arch: BaseArch = ARCHS["v1"]) -> nn.Module:
    """Pixel-space UNet (B, 3, 32, 32) -> (B, 3, 32, 32) conditioned on (B, seq, text_dim).

    v1: cross-attention at 16×16 and 8×8 (and the 8×8 mid block). v2: every level has cross-attention,
    the 32×32 one cross-attention only (its attn1 attends to the prompt too, instead of 1024-query
    self-attention), so the 32×32 features can be bound to the tokens directly, and its conv_in sees
    the pixel coordinates (:class:`CoordConvIn`)."""
    diffusers = require_diffusers()
    if arch.name == "v1":
        blocks = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        blocks = dict(down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                      only_cross_attention=(True, False, False))  # per down block; up blocks mirror it
    unet = diffusers.UNet2DConditionModel(
        sample_size=CANVAS, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width), **blocks,
        cross_attention_dim=text_dim, attention_head_dim=4, norm_num_groups=min(32, width // 2),
    )
    if arch.coords:
        unet.conv_in = CoordConvIn(unet.conv_in)
    return unet


class Classifier(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> (B, 2) logits [red 3, green 7]."""

    def __init__(self) -> None:
        super().__init__()
        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128))
        self.head = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max over space: "is there a red 3 anywhere"
        return self.head(self.body(x).amax(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_diffusion(unet: nn.Module, text: nn.Module, batches, steps: int, lr: float, params: list[nn.Parameter],
                    device: torch.device, name: str, p_uncond: float = 0.1, seq: int = SEQ) -> float:
    """DDPM ε-prediction training on ``batches()`` -> (x0 (B, 3, 32, 32), tokens (B, seq)), dropping the
    prompt to the null prompt of ``seq`` tokens with probability ``p_uncond``; returns the mean loss of
    the last 10 % of steps."""
    diffusers = require_diffusers()
    noise_sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    alphas = noise_sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    tail: list[float] = []
    start = time.perf_counter()
    uncond = null_tokens(device, seq)[0]  # once: a copy per step would sync
    for step in range(steps):
        x0, tokens = batches()
        drop = torch.rand(x0.shape[0], device=device) < p_uncond
        tokens = torch.where(drop[:, None], uncond, tokens)
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast(device):
            pred = unet(xt, t, encoder_hidden_states=text(tokens)).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= steps * 0.9:
            tail.append(loss.detach())  # summed once at the end: float() here would sync every step
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"[{name}] step {step + 1}/{steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f} s", flush=True)
    return float(torch.stack(tail).mean()) if tail else 0.0


def train_classifier(clf: nn.Module, comp: Composer, steps: int, batch: int, device: torch.device) -> None:
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        x, y = classifier_batch(comp, batch)
        with autocast(device):
            logits = clf(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"[classifier] step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def classifier_accuracy(clf: nn.Module, comp: Composer, n: int) -> float:
    x, y = classifier_batch(comp, n)
    return float(((clf(x) > 0).float() == y).all(1).float().mean())


@torch.no_grad()
def detect(clf: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 2) bool: [red 3 found, green 7 found]."""
    return clf(images.clamp(-1, 1).float()) > 0


# ---------------------------------------------------------------------------------------------
# PNG grids (pure Python: no PIL / matplotlib needed on the GPU image)
# ---------------------------------------------------------------------------------------------

def write_png(path: Path, rgb: torch.Tensor) -> None:
    """rgb: (H, W, 3) uint8 tensor."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].flatten().tolist()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def grid(rows: list[torch.Tensor], scale: int = 2, pad: int = 2) -> torch.Tensor:
    """rows: list of (K, 3, H, W) in [-1, 1] -> (H', W', 3) uint8 with grey separators."""
    k = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    hs, ws = h * scale, w * scale
    out = torch.full(((hs + pad) * len(rows) + pad, (ws + pad) * k + pad, 3), 96, dtype=torch.uint8)
    for i, r in enumerate(rows):
        img = ((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        img = img.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1)
        for j in range(r.shape[0]):
            y, x = pad + i * (hs + pad), pad + j * (ws + pad)
            out[y:y + hs, x:x + ws] = img[j]
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers = require_diffusers()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    command = current_command() if argv is None else " ".join(["python", "benchmarks/clora_composition.py", *argv])
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if args.smoke else None
    figures = Path(tmp.name) if tmp else Path(args.figures)
    ckpt = Path(tmp.name) / "ckpt" if tmp else Path(args.ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)

    train_comp, held_comp = composers(device)

    # Resumable across GPU sessions: each stage's weights and figures go to --ckpt-dir with a record of
    # the options that shaped them (stages.json), and a rerun with the same options loads them instead
    # of training again. Each stage reseeds, and the base UNet is used as its fp16 checkpoint rounds it
    # (the file that comes back from the GPU), so a resumed run equals an uninterrupted one.
    stages_file = ckpt / "stages.json"
    stages = json.loads(stages_file.read_text()) if stages_file.exists() and not args.smoke else {}
    # the options each stage depends on (a LoRA on its base's too); a stage is reused when its record
    # agrees on those, so a changed LoRA recipe retrains the LoRAs only. Records of older runs carry
    # every option: only the stage's own keys are compared, and a key they lack (e.g. lora_lr, added
    # when the 1e-3 LoRAs turned out broken) counts as a mismatch. Each concept LoRA is one stage per
    # lr ("lora_a_red3_lr0.0001", its single lr in its shape); a record of a single-lr run (stage
    # "lora_a_red3") still serves as the stage of its lr when every other option matches too.
    # v2's stages are named and stored apart ("v2_base", "v2_lora_a_red3_lr...", files "v2_*") and their
    # records carry base_arch; v1's shape is left as the recorded runs wrote it, so their checkpoints
    # still load, and a record whose base_arch differs from --base-arch never matches (an old
    # checkpoint is never loaded into the new architecture, nor the reverse). The classifier does not
    # depend on the base and is shared.
    arch = args.arch
    base_shape = {"seed": args.seed, "width": args.width, "batch_size": args.batch_size, "base_steps": args.base_steps}
    if arch.name != "v1":
        base_shape["base_arch"] = arch.name
    source_shape = dict(base_shape)  # --base-continue-from: the finished base it continues
    if args.base_continue_from is not None:
        source_shape["base_steps"] = args.base_continue_from
        base_shape.update(base_continue_from=args.base_continue_from, base_continue_lr=args.base_continue_lr)
    clf_shape = {"seed": args.seed, "batch_size": args.batch_size, "clf_steps": args.clf_steps}

    def lora_shape(lr: float) -> dict:
        return {**base_shape, "lora_steps": args.lora_steps, "lora_lr": lr, "lora_p_uncond": args.lora_p_uncond}

    def done(stage: str, shape: dict, any_history: bool = False) -> dict | None:
        rec = stages.get(stage)
        if rec is None:
            return None
        have = rec.get("shape", {})
        if "base_steps" in shape and have.get("base_arch", "v1") != arch.name:
            return None  # a base-dependent stage of another base architecture
        if "base_steps" in shape and not any_history and have.get("base_continue_from") != shape.get("base_continue_from"):
            return None  # a warm-restarted base is not the uninterrupted base of as many steps, nor the reverse
        return rec if all(k in have and have[k] == v for k, v in shape.items()) else None

    def finish(stage: str, shape: dict, **figures: float) -> None:
        stages[stage] = {"shape": shape, **figures}
        stages_file.write_text(json.dumps(stages, indent=2) + "\n")

    # 1. base model
    torch.manual_seed(args.seed)
    unet, text = make_unet(args.width, arch=arch).to(device), text_encoder(arch).to(device)
    n_unet = sum(p.numel() for p in unet.parameters())
    base_file, text_file = base_files(ckpt, arch)

    def train_base(steps: int, lr: float, shape: dict, seconds_before: float = 0.0, **record) -> tuple[float, float]:
        """Trains unet + text ``steps`` steps from their current weights, saves and records the stage
        (its seconds: these steps' + ``seconds_before``, those of the base it continues)."""
        t0 = time.perf_counter()
        loss = train_diffusion(unet, text, lambda: base_batch(train_comp, args.batch_size, arch), steps, lr,
                               list(unet.parameters()) + list(text.parameters()), device, f"{arch.prefix}base",
                               seq=arch.seq)
        seconds = time.perf_counter() - t0
        save_file({k: v.detach().half().cpu().contiguous() for k, v in unet.state_dict().items()}, str(base_file))
        save_file({k: v.detach().cpu().contiguous() for k, v in text.state_dict().items()}, str(text_file))
        finish(f"{arch.prefix}base", shape, loss=loss, seconds=seconds + seconds_before, **record)
        return loss, stages[f"{arch.prefix}base"]["seconds"]

    if (rec := done(f"{arch.prefix}base", base_shape)) is not None:
        base_loss, base_seconds = rec["loss"], rec["seconds"]
        print(f"base model ({arch.name}): from {ckpt}", flush=True)
    elif args.base_continue_from is None:
        base_loss, base_seconds = train_base(args.base_steps, 1e-3, base_shape)
    else:
        # warm restart: the finished base of --base-continue-from steps (its fp16 weights, as every
        # reader uses them; no optimizer state was saved), trained --base-steps − that many more steps
        # with a fresh AdamW and warmup + cosine schedule, on a data stream of its own seed; the file
        # and the stage record are replaced (the record keeps the one it continued as "continued")
        if (src := done(f"{arch.prefix}base", source_shape, any_history=True)) is None:
            if not args.smoke:
                raise SystemExit(f"--base-continue-from {args.base_continue_from}: no finished {arch.name} base stage "
                                 f"of {args.base_continue_from} steps with these options in {ckpt}")
            train_base(args.base_continue_from, 1e-3, source_shape)  # smoke: the base it continues
            src = stages[f"{arch.prefix}base"]
        load_base(unet, text, ckpt, device, arch)
        unet.train().requires_grad_(True)
        text.train().requires_grad_(True)
        extra = args.base_steps - args.base_continue_from
        print(f"base model ({arch.name}): continuing the {args.base_continue_from}-step base in {ckpt} for {extra} "
              f"more steps (warm restart, lr {args.base_continue_lr:g})", flush=True)
        torch.manual_seed(args.seed + 7919 * args.base_continue_from)
        base_loss, base_seconds = train_base(extra, args.base_continue_lr, base_shape, continued=src,
                                             seconds_before=src["seconds"])
    load_base(unet, text, ckpt, device, arch)

    # 3. classifier (independent of the base; defined here so that --stop-after base can train it for
    # clora_mask_diagnosis.py's gate; it reseeds, so where it runs does not change its weights)
    def classifier_stage() -> tuple[nn.Module, float]:
        torch.manual_seed(args.seed + 3)
        clf = Classifier().to(device)
        clf_file = ckpt / "classifier.safetensors"
        if (rec := done("classifier", clf_shape)) is None:
            t0 = time.perf_counter()
            train_classifier(clf, train_comp, args.clf_steps, args.batch_size, device)
            clf_seconds = time.perf_counter() - t0
            save_file({k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}, str(clf_file))
            finish("classifier", clf_shape, seconds=clf_seconds)
        else:
            clf.load_state_dict(load_file(str(clf_file), device=str(device)))
            clf_seconds = rec["seconds"]
            print(f"classifier: from {ckpt}", flush=True)
        return clf.eval(), clf_seconds

    if args.stop_after == "base":
        classifier_stage()
        print(f"--stop-after base: {arch.name} base and classifier in {ckpt}; next: "
              f"python benchmarks/clora_mask_diagnosis.py --ckpt-dir {ckpt} --base-arch {arch.name} --width {args.width} "
              f"--runs real base --gate", flush=True)
        if tmp:
            tmp.cleanup()
        return 0

    # 2. concept LoRAs, one per concept and lr, each trained on the bare base model (same seed for
    # every lr) then taken out as separate layers; the lr is chosen per concept below (validation noise)
    candidates: list[dict[float, dict]] = [{}, {}]  # concept -> lr -> LoRA layers
    lora_seconds = 0.0
    for i, (name, digit, colour) in enumerate((("lora_a_red3", CONCEPT_A, RED), ("lora_b_green7", CONCEPT_B, GREEN))):
        name = arch.prefix + name  # v2: "v2_lora_a_red3_lr..."
        for lr in args.lora_lr:
            torch.manual_seed(args.seed + 1 + i)
            stage, shape = f"{name}_lr{lr:g}", lora_shape(lr)
            source = stage
            if (rec := done(stage, shape)) is None and (rec := done(name, shape)) is not None:
                source = name  # the stage of a single-lr run at this lr
            if rec is None:
                t0 = time.perf_counter()
                inject_adapter(unet, "lora", r=8, alpha=8.0, target_modules=TARGETS)
                params = [p for p in unet.parameters() if p.requires_grad]
                unet.train()
                train_diffusion(unet, text, lambda d=digit, c=colour: concept_batch(train_comp, args.batch_size, d, c, arch.seq),
                                args.lora_steps, lr, params, device, stage, p_uncond=args.lora_p_uncond, seq=arch.seq)
                unet.eval()
                save_adapter(unet, ckpt / stage)
                finish(stage, shape, seconds=time.perf_counter() - t0)
                lora_seconds += stages[stage]["seconds"]
            else:
                load_adapter(unet, ckpt / source)
                lora_seconds += rec["seconds"]
                print(f"{stage}: from {ckpt / source}", flush=True)
            candidates[i][lr] = adapter_layers(unet)
            unload(unet)
    unet.requires_grad_(False)

    # 3. classifier
    clf, clf_seconds = classifier_stage()
    torch.manual_seed(args.seed + 4)
    clf_acc = classifier_accuracy(clf, held_comp, 2048 if not args.smoke else 64)
    # sanity of the detector on real composites: red 3 + green 7 (should say both), white ones (neither)
    n_chk = 512 if not args.smoke else 16
    pair = torch.ones(n_chk, dtype=torch.bool, device=device)
    glyphs = torch.stack([held_comp.glyph_of(torch.full((n_chk,), CONCEPT_A, device=device)),
                          held_comp.glyph_of(torch.full((n_chk,), CONCEPT_B, device=device))], 1)
    xs, ys = held_comp.layout(n_chk, pair)
    present = torch.ones(n_chk, 2, device=device)
    good = held_comp.paint(glyphs, torch.tensor([RED, GREEN], device=device).expand(n_chk, 2, 3), xs, ys, present) * 2 - 1
    mixed_colour = torch.tensor(RED, device=device) * 0.5 + torch.tensor(GREEN, device=device) * 0.5
    mixed = held_comp.paint(glyphs, (mixed_colour / mixed_colour.max()).expand(n_chk, 2, 3), xs, ys, present) * 2 - 1
    clf_both_on_true = float(detect(clf, good).all(1).float().mean())
    clf_both_on_mixed = float(detect(clf, mixed).all(1).float().mean())
    print(f"classifier: held-out exact-match {clf_acc:.3f}, both on red3+green7 composites {clf_both_on_true:.3f}, "
          f"both on olive composites {clf_both_on_mixed:.3f}", flush=True)

    # 4. generation: prompt "3 and 7"
    prompt = prompt_tokens(torch.tensor([CONCEPT_A], device=device), torch.tensor([CONCEPT_B], device=device), arch.seq)
    with torch.no_grad():
        cond, uncond = text(prompt)[0], text(null_tokens(device, arch.seq))[0]  # (seq, 64) each
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)

    def noise(n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(seed)).to(device)

    def chunks(n: int) -> list[int]:
        size = 256
        return [min(size, n - i) for i in range(0, n, size)]

    def plain(layers: dict | None, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        branches = LoRABranches(unet, [layers])
        with branches.activate(0):
            return sample(unet, scheduler, cond if c is None else c, uncond, z, args.steps, args.guidance)

    with torch.no_grad():  # each LoRA's own training prompt: "3" / "7"
        own = [text(prompt_tokens(torch.tensor([d], device=device), None, arch.seq))[0] for d in (CONCEPT_A, CONCEPT_B)]

    def run(fn, n: int, seed: int) -> torch.Tensor:
        outs, offset = [], 0
        for k in chunks(n):
            outs.append(fn(noise(k, seed + offset)))
            offset += 1
        return torch.cat(outs)

    def shares(images: torch.Tensor) -> dict[str, float]:
        found = detect(clf, images)
        return {"both": float(found.all(1).float().mean()), "a": float(found[:, 0].float().mean()),
                "b": float(found[:, 1].float().mean())}

    # choose each concept LoRA's lr on the validation noise (seeds disjoint from the test noise): the
    # LoRA alone on its own prompt, highest share of its concept, ties -> the smaller lr
    t_sel = time.perf_counter()
    val_seed, test_seed = 10_000, 20_000
    lora_layers, chosen_lr, val_lora_share = [], [], {}
    for i, (key, col) in enumerate((("val_red3_share_lora_a", "a"), ("val_green7_share_lora_b", "b"))):
        per_lr = {}
        for lr, layers in candidates[i].items():
            per_lr[lr] = shares(run(lambda z, ly=layers, i=i: plain(ly, z, own[i]), args.val_samples, val_seed))[col]
            val_lora_share[f"{key}/lr{lr:g}"] = per_lr[lr]
            print(f"[val] {key} lr {lr:g}: {per_lr[lr]:.3f}", flush=True)
        best_lr = max(per_lr, key=lambda lr: (per_lr[lr], -lr))
        print(f"[val] LoRA {'ab'[i]}: lr {best_lr:g} chosen", flush=True)
        chosen_lr.append(best_lr)
        lora_layers.append(candidates[i][best_lr])
    lora_select_seconds = time.perf_counter() - t_sel

    concept_a_tok, concept_b_tok = 1, 3  # positions of "3" and "7" in "<bos> 3 and 7"
    branches = LoRABranches(unet, [None, lora_layers[0], lora_layers[1]])

    def clora(z: torch.Tensor, step_size: float, attention_from: str) -> torch.Tensor:
        cfg = CLoRAConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, step_size=step_size,
                          max_iter_to_alter=args.max_iter_to_alter, mask_threshold_alpha=args.mask_alpha,
                          latent_update=step_size > 0, attention_res=(args.attention_res, args.attention_res),
                          attention_from=attention_from)
        out = clora_sample(unet, scheduler, branches, cond.expand(3, -1, -1), uncond,
                           [[[concept_a_tok]] * 3, [[concept_b_tok]] * 3],
                           [[], [concept_a_tok], [concept_b_tok]], z, cfg)
        return out.latents

    # choose CLoRA's step size (and map source) on validation noise (seeds disjoint from the test noise)
    t0 = time.perf_counter()
    val_share = {}
    for source in args.attention_from:
        for eta in args.step_sizes:
            val_share[(eta, source)] = shares(run(lambda z, e=eta, s=source: clora(z, e, s), args.val_samples, val_seed))["both"]
            print(f"[val] step_size {eta:g} maps {source}: both {val_share[(eta, source)]:.3f}", flush=True)
    best_eta, best_source = max(val_share, key=lambda k: (val_share[k], -k[0]))

    averaged = average_adapters(lora_layers)
    summed = average_adapters(lora_layers, weights=[1.0, 1.0])
    methods = {
        "base": lambda z: plain(None, z),
        "lora_a": lambda z: plain(lora_layers[0], z),
        "lora_b": lambda z: plain(lora_layers[1], z),
        "average": lambda z: plain(averaged, z),
        "sum": lambda z: plain(summed, z),
        "clora_fusion_only": lambda z: clora(z, 0.0, best_source),
        "clora": lambda z: clora(z, best_eta, best_source),
    }
    images, results = {}, {}
    own_share = {}
    for i, (key, col) in enumerate((("red3_share_lora_a_own_prompt", "a"), ("green7_share_lora_b_own_prompt", "b"))):
        own_share[key] = shares(run(lambda z, i=i: plain(lora_layers[i], z, own[i]), args.samples, test_seed))[col]
        print(f"[test] {key}: {own_share[key]:.3f}", flush=True)
    for name, fn in methods.items():
        t1 = time.perf_counter()
        images[name] = run(fn, args.samples, test_seed)
        results[name] = shares(images[name])
        print(f"[test] {name}: both {results[name]['both']:.3f} red3 {results[name]['a']:.3f} "
              f"green7 {results[name]['b']:.3f} ({time.perf_counter() - t1:.1f} s)", flush=True)
    gen_seconds = time.perf_counter() - t0

    k = min(16, args.samples)
    png = figures / f"{args.name}.png"
    write_png(png, grid([images[m][:k] for m in methods]))
    print(f"wrote {png} (rows: {', '.join(methods)})")

    metrics: dict[str, float] = {
        "both_concepts_gain_vs_average": results["clora"]["both"] - results["average"]["both"],
        "both_concepts_gain_vs_sum": results["clora"]["both"] - results["sum"]["both"],
        "clora_step_size": best_eta,
        "clora_maps_from_cond_half": int(best_source == "cond"),
        "samples_per_method": args.samples,
        "classifier_heldout_exact_match": clf_acc,
        "classifier_both_on_true_composites": clf_both_on_true,
        "classifier_both_on_olive_composites": clf_both_on_mixed,
        "base_train_loss": base_loss,
        "unet_params": n_unet,
        "base_steps": args.base_steps, "lora_steps": args.lora_steps,
        "lora_a_lr": chosen_lr[0], "lora_b_lr": chosen_lr[1],
        "lora_p_uncond": args.lora_p_uncond, "ddim_steps": args.steps,
        "guidance_scale": args.guidance, "attention_res": args.attention_res,
        "seconds_base": base_seconds, "seconds_loras": lora_seconds,
        "seconds_lora_lr_choice": lora_select_seconds, "seconds_classifier": clf_seconds,
        "seconds_generation": gen_seconds, "seconds_total": time.perf_counter() - t_start,
    }
    if arch.name != "v1":  # v1's result keeps the recorded runs' keys
        metrics["base_arch_v2"] = int(arch.name == "v2")
    if args.base_continue_from is not None:  # a warm-restarted base (its steps: base_steps)
        metrics["base_continue_from"] = args.base_continue_from
        metrics["base_continue_lr"] = args.base_continue_lr
    for name, r in results.items():
        metrics[f"both_share_{name}"] = r["both"]
        metrics[f"red3_share_{name}"] = r["a"]
        metrics[f"green7_share_{name}"] = r["b"]
    metrics.update(own_share)
    metrics.update(val_lora_share)
    for (eta, source), v in val_share.items():
        metrics[f"val_both_share_step{eta:g}_{source}"] = v
    print(metrics, flush=True)
    if not args.smoke:
        path = write_result(args.name, metrics, command=command, directory=args.out)
        print(f"wrote {path}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
