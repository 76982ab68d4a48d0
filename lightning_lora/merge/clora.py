"""CLoRA: contrastive test-time composition of several concept LoRAs in a diffusion model (METHODS §8).

Meral, Simsar, Tombari, Yanardag, "Contrastive Test-Time Composition of Multiple LoRA Models for
Image Generation" (https://arxiv.org/abs/2403.19776); official code ``gemlab-vt/clora`` @ 76def7c.

At every denoising step each *branch* (the base model, or the base plus one concept LoRA, each with
its own prompt) runs the UNet on the same latent ``z``. Their cross-attention maps of the concept
tokens feed a contrastive loss (NT-Xent: maps of the same concept attract, maps of different concepts
repel); during the first ``max_iter_to_alter`` steps ``z ← z − η ∇_z L``. Then each branch's noise
prediction is kept only inside its mask (thresholded attention of its own concept tokens; the base
branch fills the rest) and the masked predictions are averaged pixel by pixel, for the unconditional
and the conditional half alike, before classifier-free guidance and the scheduler step.

Pieces, from the inside out:

- model-agnostic tensor functions: :func:`ntxent_loss`, :func:`contrastive_loss`,
  :func:`concept_masks`, :func:`fuse_noise`, :func:`update_latent`;
- diffusers glue: :class:`AttentionStore` + :class:`CLoRAAttnProcessor` (record the cross-attention
  probabilities of the layers at one spatial resolution, differentiably) and
  :func:`recording_attention` (installs the processors on a ``UNet2DConditionModel`` and restores
  the original ones afterwards);
- branches (which adapter is active): :class:`LoRABranches` for this library's adapters (each
  LoRA's adapted layers kept as separate modules that wrap the *same* frozen base layers and are
  swapped in per branch), :class:`DiffusersAdapterBranches` for LoRAs loaded into diffusers with
  ``load_lora_weights(..., adapter_name=...)`` (PEFT backend), and :func:`average_adapters` for the
  naive-averaging baseline;
- samplers: :func:`clora_sample` (CLoRA with any diffusers scheduler) and :func:`sample` (plain
  classifier-free guidance, the baseline and the reference CLoRA must reduce to).

Batches: every function carries a sample axis ``B``; each sample has its own loss (summed, so its
gradient is its own since the UNet's GroupNorm never mixes samples), its own maps and masks.

Choices (METHODS §8 "Open choices"; defaults follow the official SD-1.5 pipeline):

- ``step_size`` 20, ``max_iter_to_alter`` 30, ``temperature`` 0.5, ``mask_threshold_alpha`` 0.3,
  50 steps, guidance 7.5 [code]. :data:`DEMO_PRESET` holds the official notebook's values.
- The maps are averaged over the layers at ``attention_res`` (default latent size // 4, i.e. 16×16
  for SD-1.5 at 512²), over heads and, as in the code, over both halves of the CFG batch
  (``attention_from="cfg_batch"``); ``"cond"`` uses the conditional half only.
- NT-Xent with fewer than two concepts or no positive pair returns 0 (the official code has no
  guard for empty lists); tested.
- Mask morphology: none by default; ``"erode" | "dilate" | "open" | "close"`` with a 3×3 window.
- Pixels no mask covers go to the branches without mask tokens (the base branch); when there is no
  such branch they go to every branch equally, so ``Σ_p M_p ≥ 1`` always holds [design].
- After a latent update the branches are run once more without gradients at the updated latent,
  and the noise predictions and masks come from that pass (as the official pipeline, inherited
  from Attend-and-Excite, re-runs the UNet after the update).

Using it with a full Stable Diffusion pipeline (a user who has one; the same functions)::

    pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5").to("cuda")
    pipe.load_lora_weights("cat_lora", adapter_name="cat")
    pipe.load_lora_weights("dog_lora", adapter_name="dog")
    prompts = ["a cat and a dog", "a sks cat and a dog", "a cat and a sks dog"]   # branch 0 = base
    cond, uncond = pipe.encode_prompt(prompts, "cuda", 1, True)               # (3, 77, 768) each
    cat = [token_indices(pipe.tokenizer, p, "cat") for p in prompts]           # concept 0, per branch
    dog = [token_indices(pipe.tokenizer, p, "dog") for p in prompts]           # concept 1, per branch
    branches = DiffusersAdapterBranches(pipe.unet, [None, "cat", "dog"])
    latents = torch.randn(1, 4, 64, 64, device="cuda", dtype=cond.dtype)
    out = clora_sample(pipe.unet, pipe.scheduler, branches, cond, uncond, [cat, dog],
                       mask_indices=[[], cat[1], dog[2]], latents=latents)
    image = pipe.vae.decode(out.latents / pipe.vae.config.scaling_factor).sample

With this library's LoRAs (saved by ``save_adapter`` after ``inject_adapter(unet, "lora", ...)``):
``branches = LoRABranches(unet, [None, "cat_lora_dir", "dog_lora_dir"])``. Text-encoder LoRAs act
only on the prompt embeddings: encode each branch's prompt with its own text-encoder LoRA active.

Limits: the recording processor forwards only the standard attention arguments to the layers'
original processors (diffusers drops keyword arguments a processor does not name, e.g. IP-Adapter
masks); the UNet runs every branch on the full batch in turn (P passes per step, 2P during updates).

Later: when ``core`` holds several named adapters on one model, :class:`LoRABranches` reduces to
``set_adapter(model, name)`` per branch and :func:`average_adapters` to its linear merge.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import _set_submodule, adapter_layers, get_adapter_method, unload
from ..core.layer import AdapterLayer
from ..core.state import load_adapter, read_adapter_config

DIFFUSERS_INSTALL = "pip install 'lightning-lora[diffusion]'  (or: pip install diffusers)"


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"CLoRA on diffusers models needs the diffusers package: {DIFFUSERS_INSTALL}") from exc
    return diffusers


# ----------------------------------------------------------------------------------------------
# Model-agnostic tensor functions
# ----------------------------------------------------------------------------------------------

def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise the last axis to [0, 1] (a constant row becomes zeros)."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def ntxent_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent / InfoNCE over labelled embeddings (pytorch-metric-learning's ``NTXentLoss``).

    For every positive pair ``(a, p)`` (same label, ``a ≠ p``):
    ``−log(exp(s_ap/τ) / (exp(s_ap/τ) + Σ_{n: label ≠ label_a} exp(s_an/τ)))`` with cosine
    similarity ``s``; the mean over positive pairs. Computed in fp32.

    Args:
        embeddings: (N, D), or (B, N, D) for B independent sets sharing the labels.
        labels: (N,) integer concept ids.
    Returns:
        scalar (or (B,)); 0 (still attached to ``embeddings``) when there is no positive pair, e.g.
        one embedding per concept; with a single concept there are no negatives and every term is 0.
    """
    if embeddings.ndim not in (2, 3) or labels.shape != embeddings.shape[-2:-1]:
        raise ValueError(f"embeddings must be (N, D) or (B, N, D) and labels (N,), "
                         f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    z = F.normalize(embeddings.float(), dim=-1)
    sim = z @ z.transpose(-1, -2) / temperature  # (..., N, N)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not bool(pos.any()):
        return embeddings.float().sum(dim=(-1, -2)) * 0.0  # empty-class guard: no positive pair
    # log-sum-exp over the negatives of each anchor (−inf where an anchor has none)
    neg_lse = torch.logsumexp(sim.masked_fill(same, float("-inf")), dim=-1)  # (..., N)
    a, p = pos.nonzero(as_tuple=True)
    s_ap = sim[..., a, p]
    losses = torch.logaddexp(s_ap, neg_lse[..., a]) - s_ap  # = −log(e^s / (e^s + Σ_n e^{s_n}))
    return losses.mean(dim=-1)


def concept_embeddings(maps: torch.Tensor, important_token_indices: Sequence[Sequence[Sequence[int]]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max normalised, flattened maps of every concept token of every branch, with concept labels.

    Args:
        maps: (P, B, h, w, T) attention maps, P branches, B samples.
        important_token_indices: ``[c][p]`` = token positions of concept c in branch p's prompt.
    Returns:
        (B, N, h·w) embeddings and (N,) labels, N = total number of listed tokens.
    """
    if maps.ndim != 5:
        raise ValueError(f"maps must be (P, B, h, w, T), got shape {tuple(maps.shape)}")
    num_branches, batch, h, w, num_tokens = maps.shape
    embs, labels = [], []
    for concept, per_branch in enumerate(important_token_indices):
        if len(per_branch) != num_branches:
            raise ValueError(f"important_token_indices[{concept}] has {len(per_branch)} entries, "
                             f"expected one per branch ({num_branches})")
        for branch, tokens in enumerate(per_branch):
            for tok in tokens:
                if not 0 <= tok < num_tokens:
                    raise ValueError(f"token index {tok} (concept {concept}, branch {branch}) is outside 0..{num_tokens - 1}")
                embs.append(maps[branch, :, :, :, tok].reshape(batch, h * w))
                labels.append(concept)
    if not embs:
        return maps.new_zeros(batch, 0, h * w), torch.zeros(0, dtype=torch.long, device=maps.device)
    return minmax(torch.stack(embs, dim=1).float()), torch.tensor(labels, device=maps.device)


def contrastive_loss(maps: torch.Tensor, important_token_indices: Sequence[Sequence[Sequence[int]]],
                     temperature: float = 0.5) -> torch.Tensor:
    """CLoRA's loss per sample.

    Args:
        maps: (P, B, h, w, T) aggregated cross-attention maps, P branches, B samples.
        important_token_indices: ``[c][p]`` token positions of concept c in branch p's prompt.
    Returns:
        (B,) NT-Xent of each sample's concept-token maps (labels = concept).
    """
    emb, labels = concept_embeddings(maps, important_token_indices)
    if labels.numel() == 0:
        return maps.float().sum(dim=(0, 2, 3, 4)) * 0.0
    return ntxent_loss(emb, labels, temperature)


def _morph(mask: torch.Tensor, op: str | None) -> torch.Tensor:
    """3×3 binary morphology on (N, 1, h, w) {0, 1} masks."""
    def dilate(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m, 3, stride=1, padding=1)

    def erode(m: torch.Tensor) -> torch.Tensor:
        return -F.max_pool2d(-m, 3, stride=1, padding=1)

    ops = {None: lambda m: m, "dilate": dilate, "erode": erode,
           "open": lambda m: dilate(erode(m)), "close": lambda m: erode(dilate(m))}
    if op not in ops:
        raise ValueError(f"mask_morphology must be one of {list(ops)}, got {op!r}")
    return ops[op](mask)


def concept_masks(maps: torch.Tensor, mask_indices: Sequence[Sequence[int]], size: tuple[int, int],
                  threshold_alpha: float = 0.3, morphology: str | None = None) -> torch.Tensor:
    """Binary fusion masks, one per branch, covering every pixel.

    ``M_p = ∪_{i ∈ mask_indices[p]} [A_p[:, :, i] ≥ α · max A_p[:, :, i]]``, optional 3×3 morphology,
    nearest-upsampled to ``size``. Branches with no mask tokens (the base branch) take every pixel
    no other mask covers; if there is none, such pixels go to every branch.

    Args:
        maps: (P, B, h, w, T).
        mask_indices: ``[p]`` token positions that define branch p's mask (empty for the base branch).
        size: (H, W) of the latent.
    Returns:
        (P, B, 1, H, W) float masks in {0, 1} with ``Σ_p M_p ≥ 1`` at every pixel.
    """
    num_branches, batch, h, w, num_tokens = maps.shape
    if len(mask_indices) != num_branches:
        raise ValueError(f"mask_indices has {len(mask_indices)} entries, expected one per branch ({num_branches})")
    maps = maps.detach().float()
    masks = torch.zeros(num_branches, batch, 1, h, w, device=maps.device)
    background = [p for p, toks in enumerate(mask_indices) if len(toks) == 0]
    for p, tokens in enumerate(mask_indices):
        for tok in tokens:
            if not 0 <= tok < num_tokens:
                raise ValueError(f"mask token index {tok} (branch {p}) is outside 0..{num_tokens - 1}")
            a = maps[p, :, :, :, tok]  # (B, h, w)
            peak = a.flatten(1).amax(dim=1).view(batch, 1, 1)
            masks[p, :, 0] = torch.maximum(masks[p, :, 0], (a >= threshold_alpha * peak).float())
        if tokens and morphology is not None:
            masks[p] = _morph(masks[p], morphology)
    masks = F.interpolate(masks.view(num_branches * batch, 1, h, w), size=size, mode="nearest")
    masks = masks.view(num_branches, batch, 1, *size)
    uncovered = (masks.sum(dim=0) == 0).float()  # (B, 1, H, W)
    fill = background or list(range(num_branches))
    for p in fill:
        masks[p] = torch.maximum(masks[p], uncovered)
    return masks


def fuse_noise(eps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``Σ_p M_p ε_p / Σ_p M_p``.

    Args:
        eps: (P, B, C, H, W) noise predictions of the branches.
        masks: (P, B, 1, H, W) from :func:`concept_masks` (``Σ_p M_p ≥ 1``).
    Returns:
        (B, C, H, W) in ``eps``'s dtype.
    """
    m = masks.to(eps.dtype)
    return (m * eps).sum(dim=0) / m.sum(dim=0)


def update_latent(latent: torch.Tensor, loss: torch.Tensor, step_size: float) -> torch.Tensor:
    """``z − η ∇_z L`` (detached). ``latent`` must be a leaf that ``loss`` was computed from."""
    (grad,) = torch.autograd.grad(loss, [latent])
    return (latent - step_size * grad).detach()


# ----------------------------------------------------------------------------------------------
# Recording cross-attention in a diffusers UNet
# ----------------------------------------------------------------------------------------------

class AttentionStore:
    """Cross-attention probabilities of the layers at one spatial resolution, from one UNet call.

    Each recorded layer adds a (N, h·w, T) map averaged over heads (N = UNet batch); the maps keep
    their autograd graph so the loss can be differentiated with respect to the latent.
    """

    def __init__(self, resolution: tuple[int, int]) -> None:
        self.resolution = resolution
        self.maps: list[torch.Tensor] = []
        self.seen_query_lengths: set[int] = set()

    def reset(self) -> None:
        self.maps = []
        self.seen_query_lengths = set()

    def wants(self, query_length: int) -> bool:
        self.seen_query_lengths.add(query_length)
        return query_length == self.resolution[0] * self.resolution[1]

    def add(self, probs: torch.Tensor, heads: int) -> None:
        n_heads_batch, q, t = probs.shape
        self.maps.append(probs.view(n_heads_batch // heads, heads, q, t).mean(dim=1))

    def aggregate(self) -> torch.Tensor:
        """Mean over the recorded layers: (N, h, w, T)."""
        if not self.maps:
            h, w = self.resolution
            sides = sorted(self.seen_query_lengths)
            raise RuntimeError(f"no cross-attention layer at resolution {h}x{w} (= {h * w} queries) was recorded; "
                               f"query lengths of the cross-attention layers seen: {sides}; pass attention_res accordingly")
        m = torch.stack(self.maps).mean(dim=0)
        return m.view(m.shape[0], *self.resolution, m.shape[-1])


class CLoRAAttnProcessor:
    """Records cross-attention probabilities at the store's resolution; other calls go to ``fallback``.

    The recorded path is diffusers' classic ``AttnProcessor`` computation (explicit softmax, so the
    probabilities exist as a tensor); every other attention call (self-attention, other
    resolutions) runs the layer's original processor unchanged.
    """

    def __init__(self, store: AttentionStore, fallback: Any) -> None:
        self.store = store
        self.fallback = fallback

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        query_length = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if encoder_hidden_states is None or not self.store.wants(query_length):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B·heads, Q, T)
        self.store.add(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def recording_attention(unet: nn.Module, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install :class:`CLoRAAttnProcessor` on every attention layer of ``unet``; restore on exit."""
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError("expected a diffusers UNet2DConditionModel (attn_processors / set_attn_processor), "
                        f"got {type(unet).__name__}")
    original = dict(unet.attn_processors)
    unet.set_attn_processor({k: CLoRAAttnProcessor(store, v) for k, v in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given


# ----------------------------------------------------------------------------------------------
# Branches: which adapter is active for each UNet pass
# ----------------------------------------------------------------------------------------------

class Branches(Protocol):
    """What :func:`clora_sample` needs: the number of branches and a context that activates one."""

    def __len__(self) -> int: ...

    def activate(self, index: int) -> Any: ...  # a context manager


class DenseDeltaLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus a fixed dense update ``ΔW`` (out, in): a merged combination of
    adapters (the naive-averaging baseline). Never trained."""

    adapter_buffer_names = ("delta",)

    def __init__(self, base_layer: nn.Module, delta: torch.Tensor) -> None:
        super().__init__(base_layer)
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"delta must be ({self.out_features}, {self.in_features}), got {tuple(delta.shape)}")
        self.register_buffer("delta", delta.detach().float().clone())

    def delta_weight(self) -> torch.Tensor:
        return self.delta


def adapter_layers_from_dir(model: nn.Module, directory: str | os.PathLike[str]) -> dict[str, AdapterLayer]:
    """The adapter layers of a saved adapter, built around ``model``'s own (shared, frozen) layers.

    ``model`` is left as it was: the adapter is loaded, its layers are taken out and the model's
    original modules are put back. The layers are in eval mode and frozen.
    """
    if get_adapter_method(model) is not None:
        raise RuntimeError("model already carries an adapter; pass the bare model (unload() it first)")
    _, cfg, _ = read_adapter_config(directory)
    _check_composable(cfg, str(directory))
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    load_adapter(model, directory)
    layers = adapter_layers(model)
    unload(model)
    for p, flag in requires_grad.items():
        p.requires_grad_(flag)
    return _frozen(layers)


def _check_composable(cfg: AdapterConfig, source: str) -> None:
    if cfg.modules_to_save:
        raise ValueError(f"{source}: adapters with modules_to_save cannot be composed per branch (they overwrite base modules)")


def _frozen(layers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    for layer in layers.values():
        layer.eval()
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.requires_grad_(False)
    return dict(layers)


class LoRABranches:
    """Branches made of this library's adapters on one model; one branch active at a time.

    Each entry of ``adapters`` is ``None`` (the base model), a directory written by
    :func:`lightning_lora.save_adapter`, or a mapping ``qualified module name -> module`` whose
    modules wrap the model's current module at that name (e.g. ``adapter_layers(model)`` captured
    before ``unload``, or :func:`average_adapters`). Activating a branch swaps its modules in;
    leaving it puts the original modules back, so the model is unchanged between passes.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[None | str | os.PathLike[str] | Mapping[str, nn.Module]]) -> None:
        if get_adapter_method(model) is not None:
            raise RuntimeError("model already carries an injected adapter; unload() it and pass the adapters here")
        self.model = model
        self.branches: list[dict[str, nn.Module]] = []
        for i, spec in enumerate(adapters):
            if spec is None:
                layers: dict[str, nn.Module] = {}
            elif isinstance(spec, (str, os.PathLike)):
                layers = adapter_layers_from_dir(model, spec)
            elif isinstance(spec, Mapping):
                layers = _frozen(spec)
            else:
                raise TypeError(f"adapter {i}: expected None, a directory or a mapping name -> module, got {type(spec).__name__}")
            for name, layer in layers.items():
                current = model.get_submodule(name)  # raises AttributeError for an unknown name
                if getattr(layer, "base_layer", None) is not current:
                    raise ValueError(f"adapter {i}: the module for {name!r} does not wrap the model's module at that name")
            self.branches.append(layers)

    def __len__(self) -> int:
        return len(self.branches)

    @contextmanager
    def activate(self, index: int) -> Iterator[None]:
        layers = self.branches[index]
        originals = {name: self.model.get_submodule(name) for name in layers}
        for name, layer in layers.items():
            _set_submodule(self.model, name, layer)
        try:
            yield
        finally:
            for name, module in originals.items():
                _set_submodule(self.model, name, module)


def average_adapters(adapters: Sequence[Mapping[str, AdapterLayer]], weights: Sequence[float] | None = None
                     ) -> dict[str, DenseDeltaLinear]:
    """Naive LoRA merging: ``ΔW = Σ_j w_j ΔW_j`` on every layer any adapter touches (default
    ``w_j = 1/M``: averaging). Returns modules for :class:`LoRABranches`."""
    if not adapters:
        raise ValueError("average_adapters needs at least one adapter")
    weights = [1.0 / len(adapters)] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    out: dict[str, DenseDeltaLinear] = {}
    names = {n for layers in adapters for n in layers}
    for name in sorted(names):
        bases = {id(layers[name].base_layer): layers[name].base_layer for layers in adapters if name in layers}
        if len(bases) != 1:
            raise ValueError(f"adapters wrap different base modules at {name!r}")
        base = next(iter(bases.values()))
        with torch.no_grad():
            delta = sum(w * layers[name].delta_weight().float() for w, layers in zip(weights, adapters) if name in layers)
        out[name] = DenseDeltaLinear(base, delta)
    return out


class DiffusersAdapterBranches:
    """Branches from LoRAs loaded into a diffusers model (PEFT backend), e.g. by
    ``pipe.load_lora_weights(path, adapter_name="cat")``. ``None`` = adapters disabled (base).
    The active adapters before composition are restored afterwards."""

    def __init__(self, unet: nn.Module, adapter_names: Sequence[str | None]) -> None:
        if not hasattr(unet, "set_adapters"):
            raise TypeError(f"{type(unet).__name__} has no set_adapters(); load LoRAs with diffusers' PEFT backend")
        self.unet = unet
        self.names = list(adapter_names)

    def __len__(self) -> int:
        return len(self.names)

    @contextmanager
    def activate(self, index: int) -> Iterator[None]:
        previous = list(self.unet.active_adapters())
        name = self.names[index]
        if name is None:
            self.unet.disable_adapters()
        else:
            self.unet.set_adapters([name])
        try:
            yield
        finally:
            self.unet.enable_adapters()
            if previous:
                self.unet.set_adapters(previous)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

@dataclass
class CLoRAConfig:
    """CLoRA sampling options (defaults: official SD-1.5 pipeline [code]).

    Attributes:
        num_inference_steps: scheduler steps.
        guidance_scale: classifier-free guidance ``w`` (``ε = ε_u + w(ε_t − ε_u)``).
        step_size: η of the latent update ``z ← z − η ∇_z L``.
        max_iter_to_alter: latent updates happen at step indices ``i < max_iter_to_alter``.
        iterative_steps: step indices at which the update is repeated ``iterative_steps_steps`` times.
        iterative_steps_steps: refinements at those steps (each re-runs every branch).
        temperature: NT-Xent τ.
        mask_threshold_alpha: κ, a token's mask is ``A ≥ κ·max A``.
        mask_morphology: None, "erode", "dilate", "open" or "close" (3×3).
        latent_update: False = masked fusion only.
        attention_res: (h, w) of the layers whose maps are used; None = latent size // 4.
        attention_from: "cfg_batch" (both CFG halves, as the code) or "cond" (conditional half).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    step_size: float = 20.0
    max_iter_to_alter: int = 30
    iterative_steps: tuple[int, ...] = ()
    iterative_steps_steps: int = 1
    temperature: float = 0.5
    mask_threshold_alpha: float = 0.3
    mask_morphology: str | None = None
    latent_update: bool = True
    attention_res: tuple[int, int] | None = None
    attention_from: str = "cfg_batch"

    def __post_init__(self) -> None:
        if self.attention_from not in ("cfg_batch", "cond"):
            raise ValueError(f"attention_from must be 'cfg_batch' or 'cond', got {self.attention_from!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.num_inference_steps < 1 or self.iterative_steps_steps < 1:
            raise ValueError("num_inference_steps and iterative_steps_steps must be >= 1")
        _morph(torch.zeros(1, 1, 1, 1), self.mask_morphology)  # validates the name


#: The official demo notebook's values (Realistic Vision 5.1, DDIM, 100 steps) [code].
DEMO_PRESET = CLoRAConfig(num_inference_steps=100, guidance_scale=10.0, step_size=20.0, max_iter_to_alter=50,
                          iterative_steps=(0, 10, 20), iterative_steps_steps=20, mask_threshold_alpha=0.4)


@dataclass
class CLoRAOutput:
    """latents: (B, C, H, W) final latents; masks: (P, B, 1, H, W) of the last step;
    losses: mean contrastive loss before each latent update, in order."""

    latents: torch.Tensor
    masks: torch.Tensor
    losses: list[float] = field(default_factory=list)


def _per_branch(embeds: torch.Tensor, num_branches: int, what: str) -> torch.Tensor:
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 3 or embeds.shape[0] not in (1, num_branches):
        raise ValueError(f"{what} must be (T, D), (1, T, D) or (P={num_branches}, T, D), got {tuple(embeds.shape)}")
    return embeds.expand(num_branches, -1, -1)


def _step_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    accepts = set(inspect.signature(scheduler.step).parameters)
    return {"generator": generator} if generator is not None and "generator" in accepts else {}


def _unet_eps(unet: nn.Module, scheduler: Any, z: torch.Tensor, t: Any, uncond: torch.Tensor, cond: torch.Tensor,
              unet_kwargs: Mapping[str, Any] | None) -> torch.Tensor:
    """Noise predictions for ``[uncond; cond]``: (2B, C, H, W). ``uncond``/``cond`` are (T, D)."""
    batch = z.shape[0]
    model_in = scheduler.scale_model_input(torch.cat([z, z]), t)
    enc = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
    return unet(model_in, t, encoder_hidden_states=enc, **(unet_kwargs or {})).sample


def sample(unet: nn.Module, scheduler: Any, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
           latents: torch.Tensor, num_inference_steps: int = 50, guidance_scale: float = 7.5,
           unet_kwargs: Mapping[str, Any] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain classifier-free-guidance sampling with whatever adapters are active.

    Args:
        prompt_embeds, negative_prompt_embeds: (T, D) or (1, T, D), shared by the batch.
        latents: (B, C, H, W) initial noise (scaled by ``scheduler.init_noise_sigma`` here).
    Returns:
        (B, C, H, W) final latents.
    """
    cond = _per_branch(prompt_embeds, 1, "prompt_embeds")[0]
    uncond = _per_branch(negative_prompt_embeds, 1, "negative_prompt_embeds")[0]
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    z = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_t = _unet_eps(unet, scheduler, z, t, uncond, cond, unet_kwargs).chunk(2)
            z = scheduler.step(eps_u + guidance_scale * (eps_t - eps_u), t, z, **step_kwargs).prev_sample
    return z


def clora_sample(unet: nn.Module, scheduler: Any, branches: Branches, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor, important_token_indices: Sequence[Sequence[Sequence[int]]],
                 mask_indices: Sequence[Sequence[int]], latents: torch.Tensor, config: CLoRAConfig | None = None,
                 unet_kwargs: Mapping[str, Any] | None = None, generator: torch.Generator | None = None) -> CLoRAOutput:
    """Compose the branches' concepts in one image per sample with CLoRA (METHODS §8 algorithm).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (frozen; no parameter gradient is accumulated).
        scheduler: any diffusers scheduler (``set_timesteps``, ``scale_model_input``, ``step``).
        branches: P branches (:class:`LoRABranches`, :class:`DiffusersAdapterBranches`).
        prompt_embeds: (P, T, D) text embeddings, one prompt per branch.
        negative_prompt_embeds: (P, T, D) or (T, D) unconditional embeddings.
        important_token_indices: ``[c][p]`` token positions of concept c in branch p's prompt.
        mask_indices: ``[p]`` token positions defining branch p's mask (empty for the base branch).
        latents: (B, C, H, W) initial noise.
        unet_kwargs: extra UNet arguments for every call, batched for 2B (e.g. SDXL's added_cond_kwargs).
    Returns:
        :class:`CLoRAOutput` with the final latents (B, C, H, W).
    """
    cfg = config or CLoRAConfig()
    num_branches = len(branches)
    if num_branches < 1:
        raise ValueError("clora_sample needs at least one branch")
    cond = _per_branch(prompt_embeds, num_branches, "prompt_embeds")
    uncond = _per_branch(negative_prompt_embeds, num_branches, "negative_prompt_embeds")
    if len(mask_indices) != num_branches:
        raise ValueError(f"mask_indices has {len(mask_indices)} entries, expected one per branch ({num_branches})")
    size = tuple(latents.shape[-2:])
    res = cfg.attention_res or (size[0] // 4, size[1] // 4)
    store = AttentionStore(res)
    batch = latents.shape[0]

    def run_branches(z: torch.Tensor, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 2B, C, H, W) noise predictions and (P, B, h, w, T) maps."""
        eps_all, maps_all = [], []
        for p in range(num_branches):
            with branches.activate(p):
                store.reset()
                eps_all.append(_unet_eps(unet, scheduler, z, t, uncond[p], cond[p], unet_kwargs))
                maps = store.aggregate()  # (2B, h, w, T)
            maps_all.append(maps[batch:] if cfg.attention_from == "cond" else 0.5 * (maps[:batch] + maps[batch:]))
        return torch.stack(eps_all), torch.stack(maps_all)

    scheduler.set_timesteps(cfg.num_inference_steps, device=latents.device)
    z = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator)
    losses: list[float] = []
    masks = torch.ones(num_branches, batch, 1, *size, device=latents.device)
    with recording_attention(unet, store):
        for i, t in enumerate(scheduler.timesteps):
            if cfg.latent_update and i < cfg.max_iter_to_alter:
                for _ in range(cfg.iterative_steps_steps if i in cfg.iterative_steps else 1):
                    z = z.detach().requires_grad_(True)
                    with torch.enable_grad():
                        _, maps = run_branches(z, t)
                        loss = contrastive_loss(maps, important_token_indices, cfg.temperature)
                        losses.append(float(loss.detach().mean()))
                        z = update_latent(z, loss.sum(), cfg.step_size)
            with torch.no_grad():
                eps, maps = run_branches(z, t)
                masks = concept_masks(maps, mask_indices, size, cfg.mask_threshold_alpha, cfg.mask_morphology)
                eps_u = fuse_noise(eps[:, :batch], masks)
                eps_t = fuse_noise(eps[:, batch:], masks)
                z = scheduler.step(eps_u + cfg.guidance_scale * (eps_t - eps_u), t, z, **step_kwargs).prev_sample
    return CLoRAOutput(latents=z.detach(), masks=masks, losses=losses)


def token_indices(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``tokenizer(prompt)`` (with special tokens, as the text
    encoder sees them), for a Hugging Face tokenizer such as SD's CLIP tokenizer."""
    ids = tokenizer(prompt).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise ValueError(f"{word!r} tokenizes to nothing")
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start:start + len(word_ids)] == word_ids:
            return list(range(start, start + len(word_ids)))
    raise ValueError(f"{word!r} does not occur in the tokenized prompt {prompt!r}")


__all__ = [
    "AttentionStore", "CLoRAAttnProcessor", "CLoRAConfig", "CLoRAOutput", "DEMO_PRESET", "DenseDeltaLinear",
    "DiffusersAdapterBranches", "LoRABranches", "adapter_layers_from_dir", "average_adapters", "clora_sample",
    "concept_embeddings", "concept_masks", "contrastive_loss", "fuse_noise", "minmax", "ntxent_loss",
    "recording_attention", "require_diffusers", "sample", "token_indices", "update_latent",
]
