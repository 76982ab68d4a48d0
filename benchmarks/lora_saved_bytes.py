"""What one LoRA training step saves for backward, ours against PEFT, per module type (CPU, exact).

    python benchmarks/lora_saved_bytes.py                        # scaled-down LLaMA (hidden 256)
    python benchmarks/lora_saved_bytes.py --hidden 2048 --inter 5632 --heads 32 --kv 4 --layers 2 \\
        --batch 1 --seq 256                                      # the 1.1B widths, two layers

One forward of a bf16 LLaMA-style model (frozen base, rank-16 LoRA on every linear layer of the
decoder, as ``benchmarks/lora_vs_peft.py``); then every tensor held for backward is counted once
per storage (a storage saved twice, or by two modules, costs once: the earliest saver is charged)
and charged to the innermost module that saved it. ``--method graph`` (default) walks the autograd
graph after the forward and reads every node's saved tensors (plain training; our fused functions'
ctx attributes included); ``--method hooks`` counts what ``torch.autograd.graph.saved_tensors_hooks``
sees packed (our LoRA input replay is off while saved-tensor hooks are active, so this shows the
path taken under checkpointing / offloading, which is what the library saved before the replay; the
sibling plan is learned in warm-up passes without hooks, as it is only learned outside them).
Parameters and buffers are left out; the adapter-weight copies our layers cache between optimizer
steps (bf16 casts of fp32 A and B, sibling sets' stacked A) are reported on their own line.

Variants: ``frozen`` (no adapter, input gradients on), ``ours`` (fp32 adapters), ``ours_bf16``,
``ours_nosib`` (no sibling fusion), ``ours_replay_all`` (``replay_inputs="all"``: RMSNorm outputs
replayed too), ``ours_noreplay`` (``replay_inputs="none"``: every adapter input
saved), ``peft_default`` (fp32 adapters) and ``peft_bf16`` (``autocast_adapter_dtype=False``). Then one
backward runs on what was saved (checks it is enough).

Writes ``benchmarks/results/lora_saved_bytes.json`` (``--out``): ``<variant>_saved_bytes`` (the
graph's total), ``<variant>_weight_copy_bytes`` and ``saved_ratio_ours_vs_peft_bf16`` (ours' saved
bytes plus its weight copies over PEFT bf16's saved bytes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_lora as ll  # noqa: E402

VARIANTS = ("frozen", "ours", "ours_bf16", "ours_nosib", "ours_noreplay", "ours_replay_all", "peft_default", "peft_bf16")
#: the input-replay A/B variants and their ``replay_inputs`` (``ours`` and the others: the default, "products")
REPLAY = {"ours_noreplay": "none", "ours_replay_all": "all"}


def llama(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv, intermediate_size=args.inter, vocab_size=args.vocab,
                      max_position_embeddings=max(512, args.seq))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def build(args: argparse.Namespace, variant: str) -> nn.Module:
    model = llama(args).to(torch.bfloat16)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "frozen":
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif variant.startswith("ours"):
        ll.inject_adapter(model, "lora", r=args.r, alpha=2 * args.r, target_modules="all-linear",
                          adapter_dtype="bfloat16" if variant == "ours_bf16" else "float32",
                          fuse_siblings=variant != "ours_nosib", replay_inputs=REPLAY.get(variant, "products"))
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(model, cfg, autocast_adapter_dtype=variant == "peft_default")
    return model


_LAYER = re.compile(r"^(?:base_model\.model\.)?model\.layers\.\d+\.")


def label(name: str) -> str:
    """``model.layers.3.mlp.down_proj.lora_A.default`` -> ``mlp.down_proj`` (PEFT's and ours alike)."""
    name = _LAYER.sub("", name)
    name = re.sub(r"\.(base_layer|lora_A|lora_B|lora_dropout)(\.default)?$", "", name)
    name = re.sub(r"\.(base_layer|lora_A|lora_B|lora_dropout)(\.default)?\.", ".", name)
    name = re.sub(r"^base_model\.model\.", "", name)
    return "(top: loss)" if name in ("", "base_model.model") else name


def _probe() -> int:
    """The autograd sequence number the next node will get (a throwaway node reads the counter)."""
    return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


def _node_tensors(node: object) -> list[torch.Tensor]:
    """Tensors an autograd node holds for backward: a C++ node's ``_saved_*`` fields, a custom
    Function's ``saved_tensors`` and the tensors its ctx holds as attributes (one level into tuples)."""
    out: list[torch.Tensor] = []

    def add(v: object, depth: int = 0) -> None:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)) and depth < 2:
            for e in v:
                add(e, depth + 1)

    if hasattr(node, "saved_tensors"):  # custom autograd.Function
        add(list(node.saved_tensors))
        for v in vars(node).values():
            add(v)
        return out
    for attr in dir(node):
        if attr.startswith("_saved_"):
            add(getattr(node, attr))
    return out


def saved_bytes(model: nn.Module, ids: torch.Tensor, method: str) -> tuple[dict[str, int], dict[str, list], int]:
    """``(bytes per module label, tensors per label, weight-copy bytes)`` of one forward, after two
    warm-up forwards + backwards (our sibling sets are learned from them).

    ``method="graph"``: after the forward, walk the autograd graph from the loss and read every
    node's saved tensors (what plain training keeps; nodes are charged to the innermost module whose
    forward created them, by autograd sequence number). ``method="hooks"``: count what is packed
    inside ``saved_tensors_hooks`` (our input replay is off under saved-tensor hooks, so this shows
    the path taken under checkpointing/offloading)."""
    for _ in range(2):  # our sibling plan completes at the second pass, and only outside saved-tensor hooks
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    casts: dict[int, int] = {}
    stack: list[str] = []
    spans: list[tuple[int, int, str]] = []  # (first seq nr, end seq nr, module name)
    starts: list[int] = []
    handles = []

    def enter(name: str) -> None:
        stack.append(name)
        if method == "graph":
            starts.append(_probe())

    def leave(m: nn.Module, a: object, o: object) -> None:
        name = stack.pop()
        if method == "graph":
            spans.append((starts.pop(), _probe(), name))

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: enter(n)))
        handles.append(mod.register_forward_hook(leave))
    seen: set[int] = set()
    per: dict[str, int] = defaultdict(int)
    tensors: dict[str, list] = defaultdict(list)

    def charge(t: torch.Tensor, lab: str) -> None:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in params or ptr in seen or st.nbytes() == 0:
            return
        seen.add(ptr)
        per[lab] += st.nbytes()
        tensors[lab].append((tuple(t.shape), str(t.dtype).replace("torch.", ""), st.nbytes()))

    def pack(t: torch.Tensor) -> torch.Tensor:
        charge(t, label(stack[-1]) if stack else "(top: loss)")
        return t

    if method == "hooks":
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
    else:
        out = model(input_ids=ids, labels=ids)
    for h in handles:
        h.remove()
    for m in model.modules():
        held = list(getattr(m, "_casts", ()))
        group = getattr(m, "_siblings", None)
        for st in (group.sets or {}).values() if group is not None else ():
            if st._a_cat is not None:  # the stacked [A_1; ...; A_k] (a copy when A is bf16)
                held.append(st._a_cat[1])
        for t in held:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                casts[ptr] = t.untyped_storage().nbytes()
    if method == "graph":
        params |= set(casts)  # held by the layers anyway: their own line below
        nodes, todo, ids_seen = [], [out.loss.grad_fn], set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in ids_seen:
                continue
            ids_seen.add(id(node))
            nodes.append(node)
            todo.extend(f for f, _ in node.next_functions)
        spans.sort(key=lambda s: s[1] - s[0])  # innermost (shortest) span first
        for node in sorted(nodes, key=lambda n: n._sequence_nr()):
            seq = node._sequence_nr()
            name = next((n for a, b, n in spans if a <= seq < b), "")
            for t in _node_tensors(node):
                charge(t, label(name))
    out.loss.backward()  # what was saved suffices
    return dict(per), dict(tensors), sum(casts.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=704)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--tensors", action="store_true", help="also list every saved tensor (shape, dtype, bytes)")
    ap.add_argument("--method", choices=("graph", "hooks"), default="graph",
                    help="graph: walk the autograd graph after the forward (plain training); hooks: "
                         "saved_tensors_hooks (the path taken under checkpointing / offloading hooks)")
    ap.add_argument("--json", default=None, help="also write the whole table here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder ('' : none)")
    args = ap.parse_args()
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    table: dict[str, dict[str, int]] = {}
    for v in args.variants:
        per, tensors, casts = saved_bytes(build(args, v), ids, args.method)
        per["TOTAL activations"] = sum(per.values())
        per["weight copies (ours)"] = casts
        table[v] = per
        if args.tensors:
            print(f"--- {v}")
            for lab, ts in sorted(tensors.items()):
                print(f"  {lab:28s} {ts}")
    rows = sorted({k for d in table.values() for k in d}, key=lambda k: (k.startswith(("TOTAL", "weight copies")), k))
    n_tok = args.batch * args.seq
    print(f"saved bytes ({args.method}; whole model, {args.layers} layers, {n_tok} tokens); per-layer rows sum all layers")
    print(f"{'module':28s}" + "".join(f"{v:>14s}" for v in args.variants))
    for k in rows:
        print(f"{k:28s}" + "".join(f"{table[v].get(k, 0):14,d}" for v in args.variants))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table}, indent=2) + "\n")
    if args.out:
        from lightning_lora.results import write_result

        metrics: dict[str, float] = {"layers": args.layers, "hidden": args.hidden, "tokens": n_tok, "r": args.r}
        for v, per in table.items():
            metrics[f"{v}_saved_bytes"] = per["TOTAL activations"]
            metrics[f"{v}_weight_copy_bytes"] = per["weight copies (ours)"]
        if "ours" in table and "peft_bf16" in table:
            metrics["saved_ratio_ours_vs_peft_bf16"] = (
                (table["ours"]["TOTAL activations"] + table["ours"]["weight copies (ours)"])
                / table["peft_bf16"]["TOTAL activations"])
        print("wrote", write_result("lora_saved_bytes", metrics, kind="benchmark", directory=args.out))


if __name__ == "__main__":
    main()
