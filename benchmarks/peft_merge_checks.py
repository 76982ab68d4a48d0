"""Where PEFT's merged model is not its unmerged one, and ours is: the figures docs/architecture.md and
lightning_lora/methods/lora_modules.py quote (CPU, seconds).

- a 3x3 ``nn.Conv2d`` adapted by LoRA (r = 2, random factors) with zero padding, reflect padding and
  dilation 2: max |merged − unmerged| output for PEFT (whose ``lora_A`` ignores dilation and padding
  mode; its dilated forward fails, recorded as ``peft_dilated_forward_fails`` = 1) and for ours;
- a small model whose output head is tied to its embedding (GPT-2's layout), LoRA on the embedding:
  PEFT's merge changes the output (``peft_tied_merge_max_diff``, with the number of warnings it gave),
  ours refuses to merge (``ours_tied_merge_refused`` = 1);
- an ``nn.TransformerEncoderLayer`` (E = 16, no dropout) with LoRA on ``linear1`` / ``linear2``: max
  |eval-mode output under no_grad − train-mode output| (the same function without dropout; eval runs
  torch's fused fast path, which reads the weights), beside the adapter's effect |train − base|
  (``encoder_adapter_effect``): PEFT's eval output is the base model's;
- a tiny LLaMA whose head is tied to ``embed_tokens``, LoRA on the embedding with
  ``ensure_weight_tying=True`` (both libraries give the head the embedding's update): max |merged −
  unmerged| output (PEFT's merge writes the update into the shared table from the embedding and again
  from the head);
- the same layer with LoRA on ``self_attn`` (``nn.MultiheadAttention``, PEFT's experimental layer and
  ours): max |output − the base with ``W + s·B A`` written into both projections by hand|, train mode.

    python benchmarks/peft_merge_checks.py [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import peft  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.results import write_result  # noqa: E402

CONVS = {"zeros": dict(padding=1), "reflect": dict(padding=1, padding_mode="reflect"), "dilated": dict(padding=2, dilation=2)}


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.body(self.wte(ids))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


def _peft_and_ours(targets: list[str]) -> tuple[nn.Module, nn.Module]:
    """PEFT's and our LoRA (r = 4, alpha 8) on a fresh :class:`Encoder`, the same random factors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: MultiheadAttention support is experimental
        pm = peft.get_peft_model(Encoder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize(pm, 5)
    ours = Encoder()
    ll.inject_adapter(ours, "lora", r=4, alpha=8, target_modules=targets)
    lookup = dict(pm.named_parameters())
    with torch.no_grad():  # copy PEFT's factors by its file names: the two name them alike
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = name.replace("lora_out_A", "base_layer.out_proj.lora_A").replace("lora_out_B", "base_layer.out_proj.lora_B")
                p.copy_(lookup[f"base_model.model.{key}.default.weight"])
    return pm, ours


def _encoder_checks(metrics: dict[str, float]) -> None:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(6))
    base = Encoder().eval()
    for label, model in zip(("peft", "ours"), _peft_and_ours(["linear1", "linear2"])):
        model.train()
        y_train = model(x).detach()
        model.eval()
        with torch.no_grad():
            metrics[f"{label}_encoder_eval_vs_train_max_diff"] = (model(x) - y_train).abs().max().item()
        if label == "ours":
            metrics["encoder_adapter_effect"] = (y_train - base(x)).abs().max().item()
    pm, ours = _peft_and_ours(["self_attn"])
    ref = Encoder().train()
    attn = pm.base_model.model.enc.self_attn
    with torch.no_grad():
        ref.enc.self_attn.in_proj_weight += 2.0 * attn.lora_B["default"].weight @ attn.lora_A["default"].weight
        out = attn.base_layer.out_proj
        ref.enc.self_attn.out_proj.weight += 2.0 * out.lora_B["default"].weight @ out.lora_A["default"].weight
    y_ref = ref(x)
    for label, model in (("peft", pm), ("ours", ours)):
        model.train()
        metrics[f"{label}_attention_vs_hand_merged_max_diff"] = (model(x) - y_ref).abs().max().item()
    metrics["attention_adapter_effect"] = (y_ref - Encoder().train()(x)).abs().max().item()


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _tying_checks(metrics: dict[str, float]) -> None:
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_tied_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                               ensure_weight_tying=True))
    _randomize(pm, 9)
    y = pm(ids).logits
    metrics["peft_ensure_tying_merge_max_diff"] = (pm.merge_and_unload()(ids).logits - y).abs().max().item()
    ours = _tied_llama()
    ll.inject_adapter(ours, "lora", r=4, target_modules=["embed_tokens"], ensure_weight_tying=True)
    _randomize(ours, 9)
    y = ours(ids).logits
    metrics["ensure_tying_adapter_effect"] = (y - _tied_llama()(ids).logits).abs().max().item()
    ll.merge_adapter(ours)
    metrics["ours_ensure_tying_merge_max_diff"] = (ours(ids).logits - y).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/peft_merge_checks.json"))
    args = ap.parse_args()
    metrics: dict[str, float] = {}
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    for name, kw in CONVS.items():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(4, 5, 3, **kw))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"]))
        _randomize(pm, 2)
        try:
            y = pm(x)
            metrics[f"peft_{name}_merge_max_diff"] = (pm.merge_and_unload()(x) - y).abs().max().item()
        except RuntimeError:  # the dilated kernel's output shape differs from lora_A's
            metrics[f"peft_{name}_forward_fails"] = 1
        ours = copy.deepcopy(base)
        ll.inject_adapter(ours, "lora", r=2, target_modules=["0"])
        _randomize(ours, 2)
        y = ours(x)
        ll.merge_adapter(ours)
        metrics[f"ours_{name}_merge_max_diff"] = (ours(x) - y).abs().max().item()
    ids = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    base = TiedLM()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["wte"]))
    _randomize(pm, 4)
    y = pm(ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = pm.merge_and_unload()
    metrics["peft_tied_merge_max_diff"] = (merged(ids) - y).abs().max().item()
    metrics["peft_tied_merge_warnings"] = len(caught)
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the injection's own tie warning
        ll.inject_adapter(ours, "lora", r=2, target_modules=["wte"])
    try:
        ll.merge_adapter(ours)
        metrics["ours_tied_merge_refused"] = 0
    except ValueError:
        metrics["ours_tied_merge_refused"] = 1
    _encoder_checks(metrics)
    _tying_checks(metrics)
    metrics["peft_version_major_minor"] = float(".".join(peft.__version__.split(".")[:2]))
    print(metrics)
    print(write_result(Path(args.out).stem, metrics, directory=Path(args.out).parent))


if __name__ == "__main__":
    main()
