"""How far a few optimizer steps move MiniLM under NLoRA's inits, against LoRA (issue #5, NLoRA's collapse).

One batch of 32 MRPC training pairs (max length 64), every encoder Linear adapted at r = 8, the
classifier trained too, AdamW at ``--lr`` for ``--steps`` steps on that batch, seed 0. Reported per
variant: the relative change of the encoder's last hidden states on that batch,
``‖h_after − h_before‖ / ‖h_before‖``, and the training losses. A stable adapter moves the model a
little; the paper's random-index Nyström core (U⁺, ill-conditioned on MiniLM) moves it far.

Keys: ``<variant>_hidden_change`` and ``<variant>_loss_<k>`` for variants lora, nlora_paper,
nlora_paper_rtol0.05 (``pinv_rtol``), nlora_reference (the official code's init).

    python benchmarks/nlora_stability.py        # CPU, about a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning_lora as ll  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks.glue import read_split  # noqa: E402
from lightning_lora.tasks.models import load_minilm  # noqa: E402

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
VARIANTS = {
    "lora": ("lora", {"r": 8, "alpha": 16}),
    "nlora_paper": ("nlora", {"r": 8}),
    "nlora_paper_rtol0.05": ("nlora", {"r": 8, "pinv_rtol": 0.05}),
    "nlora_reference": ("nlora", {"r": 8, "init": "reference"}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = read_split("mrpc", "train")[:32]
    _, tok = load_minilm()
    batch = tok([r.text_a for r in rows], [r.text_b for r in rows], truncation=True, max_length=64, padding=True,
                return_tensors="pt")
    labels = torch.tensor([r.label for r in rows])
    m: dict[str, float] = {"lr": args.lr, "steps": args.steps}
    for name, (method, kw) in VARIANTS.items():
        torch.manual_seed(0)
        model, _ = load_minilm()
        ll.inject_adapter(model.bert, method, target_modules=TARGETS, **kw)
        model.classifier.requires_grad_(True)
        model.eval()  # no dropout: the change comes from the steps alone
        opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=args.lr)
        with torch.no_grad():
            before = model.bert(**batch).last_hidden_state
        for k in range(args.steps):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            m[f"{name}_loss_{k}"] = loss.item()
        with torch.no_grad():
            after = model.bert(**batch).last_hidden_state
        m[f"{name}_hidden_change"] = ((after - before).norm() / before.norm()).item()
        print(f"{name:22s} hidden-state change {m[f'{name}_hidden_change']:.3f}", flush=True)
    print("wrote", write_result("nlora_stability", m, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
