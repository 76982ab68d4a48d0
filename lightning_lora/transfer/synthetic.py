"""Synthetic task inputs from a few seed examples (Trans-LoRA steps 2 and 4, METHODS.md §11).

Two generators:

- :func:`generate_synthetic`: a causal language model (SmolLM2 for text) continues a few-shot
  prompt, ``instruction`` then a bullet list of seed demos then ``"-"``; the first generated line
  is one sample. Each prompt takes its own random subset and order of the seeds, so 5 seeds still
  give varied prompts. With ``demo_pools`` each instruction draws its demos from its own pool
  (class-conditioned prompts: the positive instruction shows only positive seeds).
- :func:`generate_synthetic_mlm`: a masked language model (a nucleotide BERT) rewrites a random
  window of a seed: several rounds of "mask a random fraction of the tokens, sample each masked
  token from the MLM's softmax" (Gibbs-style resampling). With a fraction of 1 - 1/rounds or so,
  little of the seed survives.

Both are deterministic for a fixed ``seed`` (the prompts, masks and token draws use seeded
generators; on CUDA the usual kernel non-determinism aside).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.config import whole_number


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def build_prompt(instruction: str, demos: Sequence[str]) -> str:
    """``instruction`` + one ``- demo`` line per demo + ``"-"``: the model writes the next item."""
    lines = "".join(f"- {d.strip()}\n" for d in demos)
    return f"{instruction.strip()}\n{lines}-" if instruction.strip() else f"{lines}-"


@torch.no_grad()
def generate_synthetic(
    generator: nn.Module,
    tokenizer,
    seed_texts: Sequence[str],
    n: int,
    *,
    instruction: str | Sequence[str] = "",
    demos_per_prompt: int = 3,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 64,
    seed: int = 0,
    postprocess: Callable[[str], str] | None = None,
    max_batches: int | None = None,
    demo_pools: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """``n`` synthetic inputs sampled from a causal LM prompted with seed demos.

    Args:
        generator: a transformers causal LM (``generate``), on the device it should run on.
        tokenizer: its tokenizer; padding is set to the left for the call (decoder-only batching).
        seed_texts: the few real examples (D_seed).
        instruction: the task instruction; a sequence is cycled over the prompts (e.g. one per class).
        postprocess: applied to every generated line (e.g. put it in the task's input format);
            lines empty after it are dropped and more are drawn.
        max_batches: cap on generate calls (default ``4 * ceil(n / batch_size)``); fewer than ``n``
            samples come back when it is reached.
        demo_pools: one pool of demos per instruction, in the same order (e.g. the seeds of each
            class, the labelled D_seed of METHODS.md §11 step 4); an empty pool falls back to
            ``seed_texts``. Default: every instruction draws from ``seed_texts``.

    Returns:
        up to ``n`` non-empty strings (duplicates possible; :func:`filter_synthetic` removes them).
    """
    # a string is a sequence of its characters: as seed_texts (or a demo pool) it prompted with
    # single letters as demos, silently
    if isinstance(seed_texts, str):
        raise TypeError(f"seed_texts must be a list of texts, got one string {seed_texts[:40]!r}")
    if not seed_texts:
        raise ValueError("generate_synthetic needs at least one seed example")
    for name, v in (("n", n), ("demos_per_prompt", demos_per_prompt), ("batch_size", batch_size)):
        whole_number(v, name)
    if n < 0 or demos_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"need n >= 0, demos_per_prompt >= 1, batch_size >= 1; got {n}, {demos_per_prompt}, {batch_size}")
    # 0 (or less) made no generate call and returned [] as if the model had produced nothing; None is the default cap
    whole_number(max_batches, "max_batches", 1, optional=True)
    if not 0.0 < top_p <= 1.0:  # HF accepts top_p > 1 (no nucleus) and top_p = 0 (greedy) without a word
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    instructions = [instruction] if isinstance(instruction, str) else list(instruction)
    if not instructions:  # else a ZeroDivisionError when prompts cycle over the instructions
        raise ValueError("instruction is an empty list: give a string or at least one instruction")
    if demo_pools is not None and any(isinstance(pool, str) for pool in demo_pools):
        raise TypeError("demo_pools must be a list of lists of texts; one pool is a string")
    if demo_pools is None:
        pools = [list(seed_texts)] * len(instructions)
    else:
        if len(demo_pools) != len(instructions):
            raise ValueError(f"demo_pools needs one pool per instruction: got {len(demo_pools)} pools "
                             f"for {len(instructions)} instructions")
        pools = [list(pool) if len(pool) else list(seed_texts) for pool in demo_pools]
    rng = random.Random(seed)
    device = _device_of(generator)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_batches = max_batches if max_batches is not None else 4 * max(1, -(-n // batch_size))
    out: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = generator.training
    generator.eval()
    try:
        for b in range(max_batches):
            if len(out) >= n:
                break
            prompts = []
            for i in range(batch_size):
                j = (b * batch_size + i) % len(instructions)
                k = min(demos_per_prompt, len(pools[j]))
                prompts.append(build_prompt(instructions[j], rng.sample(pools[j], k)))
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # no token_type_ids
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 100_003 + b)
                ids = generator.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                         max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for t in texts:
                line = t.split("\n", 1)[0].strip()
                line = postprocess(line) if postprocess is not None else line
                if line:
                    out.append(line)
    finally:
        tokenizer.padding_side = side
        generator.train(was_training)
    return out[:n]


def stitch_overlapping_tokens(tokens: Sequence[str], stride: int) -> str:
    """The sequence that overlapping k-mer tokens (start every ``stride`` letters) spell.

    Token i contributes its first ``stride`` letters, the last token all of its letters; where
    neighbouring tokens disagree on the overlap, the later token loses (its head is kept, the
    previous token's tail is not). ``["ACGTAC", "TACGGA"]`` with stride 3 -> ``"ACGTACGGA"``.
    """
    if not tokens:
        return ""
    return "".join(t[:stride] for t in tokens[:-1]) + tokens[-1]


@torch.no_grad()
def sample_masked_lm(
    mlm: nn.Module,
    bodies: Sequence[torch.Tensor],
    *,
    mask_token_id: int,
    allowed_ids: torch.Tensor,
    prefix_ids: Sequence[int] = (),
    suffix_ids: Sequence[int] = (),
    pad_id: int = 0,
    mask_fraction: float = 0.3,
    rounds: int = 4,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    canonicalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Gibbs-style rewrite of token sequences with a masked LM (one batch).

    Args:
        mlm: a transformers masked LM (``mlm(input_ids=, attention_mask=).logits`` (B, T, V)).
        bodies: token ids (T_i,) without special tokens; each is rewritten.
        allowed_ids: (K,) token ids a masked position may be sampled from (no specials).
        prefix_ids / suffix_ids: tokens around each body for the model (``[CLS]`` / ``[SEP]``).
        mask_fraction: share of body positions masked and resampled in each round (at least one).
        generator: CPU generator for the masks and draws (determinism).
        canonicalize: applied to each body after every round (e.g. re-tokenise the decoded
            sequence so overlapping k-mers agree); may change its length.

    Returns:
        the rewritten bodies (CPU, int64).
    """
    if not 0 < mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
    device = _device_of(mlm)
    allowed = allowed_ids.to(torch.long)
    pre, suf = torch.tensor(list(prefix_ids), dtype=torch.long), torch.tensor(list(suffix_ids), dtype=torch.long)
    out = [b.to(torch.long).cpu().clone() for b in bodies]
    was_training = mlm.training
    mlm.eval()
    try:
        for _ in range(rounds):
            rows = [torch.cat([pre, b, suf]) for b in out]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
            att = torch.zeros(len(rows), T, dtype=torch.long)
            hit = torch.zeros(ids.shape, dtype=torch.bool)
            masked_pos: list[torch.Tensor] = []  # sorted, so they match the (row, position) order of ids[hit]
            for i, (r, b) in enumerate(zip(rows, out)):
                ids[i, : len(r)], att[i, : len(r)] = r, 1
                k = max(1, round(mask_fraction * len(b))) if len(b) else 0
                pos = torch.randperm(len(b), generator=generator)[:k].sort().values + len(pre)
                ids[i, pos], hit[i, pos] = mask_token_id, True
                masked_pos.append(pos)
            logits = mlm(input_ids=ids.to(device), attention_mask=att.to(device)).logits  # (B, T, V)
            # only the masked positions, only the allowed tokens: (M, K), sampled on the model's device
            logits = logits[hit.to(device)][:, allowed.to(device)].float() / max(temperature, 1e-6)
            device_gen = torch.Generator(device=device).manual_seed(
                int(torch.randint(2**62, (1,), generator=generator)))
            draw = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=device_gen).squeeze(1).cpu()
            new_ids = allowed[draw]
            offset = 0
            for i, pos in enumerate(masked_pos):
                out[i][pos - len(pre)] = new_ids[offset : offset + len(pos)]
                offset += len(pos)
                if canonicalize is not None:
                    out[i] = canonicalize(out[i]).to(torch.long).cpu()
    finally:
        mlm.train(was_training)
    return out


def generate_synthetic_mlm(
    mlm: nn.Module,
    seed_texts: Sequence[str],
    n: int,
    *,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[torch.Tensor], str],
    mask_token_id: int,
    allowed_ids: torch.Tensor,
    prefix_ids: Sequence[int] = (),
    suffix_ids: Sequence[int] = (),
    pad_id: int = 0,
    window: int = 254,
    mask_fraction: float = 0.3,
    rounds: int = 4,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """``n`` synthetic sequences: random ``window``-token windows of the seeds, rewritten by the MLM.

    ``encode`` maps a sequence to token ids without specials, ``decode`` token ids back to a
    sequence (for overlapping k-mers: :func:`stitch_overlapping_tokens`). After every round the
    body is re-encoded from its decoded sequence, so the next round sees consistent tokens.
    """
    if not seed_texts:
        raise ValueError("generate_synthetic_mlm needs at least one seed example")
    # its loop draws batch_size bodies per round: 0 failed deep in sample_masked_lm ("max() arg is an
    # empty sequence"); a float batch_size or n failed in range / len comparisons
    whole_number(n, "n", 0)
    whole_number(batch_size, "batch_size", 1)
    whole_number(window, "window", 1)
    seeds = [torch.as_tensor(list(encode(s)), dtype=torch.long) for s in seed_texts]
    if all(len(s) == 0 for s in seeds):
        raise ValueError("every seed example encodes to zero tokens")
    seeds = [s for s in seeds if len(s)]
    g = torch.Generator().manual_seed(seed)

    def canonical(ids: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(list(encode(decode(ids))), dtype=torch.long)

    out: list[str] = []
    while len(out) < n:
        bodies = []
        for _ in range(min(batch_size, n - len(out))):
            s = seeds[int(torch.randint(len(seeds), (1,), generator=g))]
            start = int(torch.randint(max(1, len(s) - window + 1), (1,), generator=g))
            bodies.append(s[start : start + window])
        new = sample_masked_lm(mlm, bodies, mask_token_id=mask_token_id, allowed_ids=allowed_ids,
                               prefix_ids=prefix_ids, suffix_ids=suffix_ids, pad_id=pad_id,
                               mask_fraction=mask_fraction, rounds=rounds, temperature=temperature,
                               generator=g, canonicalize=canonical)
        out.extend(decode(b) for b in new)
    return out
