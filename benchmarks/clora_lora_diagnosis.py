"""Why CLoRA's concept LoRAs fail under guidance: each saved concept LoRA's noise prediction with its
own prompt, with the null prompt and after classifier-free guidance (METHODS §8, issue #7).

Reads the stages ``benchmarks/clora_composition.py`` saved in ``--ckpt-dir`` (base UNet, text encoder
and every concept LoRA directory: ``lora_a_red3*`` / ``lora_b_green7*``) and, for each LoRA, noises 64
training-style images of its concept (red 3 / green 7) at t = 900, 500 and 100 and reports the
ε-prediction MSE of the base model and of base + LoRA with the concept's own prompt (``_cond``), with
the null prompt (``_uncond``, the unconditional half of guidance) and after guidance 3
(``_cfg3``: ε_u + 3 (ε_c − ε_u)), and the LoRA's size ``delta_rel`` = ‖ΔW‖ / ‖W‖ over its layers.
A LoRA trained without prompt dropout leaves its null-prompt prediction untrained: ``_uncond`` and
``_cfg3`` far above the base's. CPU, about a minute.

    python benchmarks/clora_lora_diagnosis.py --ckpt-dir runs/clora_composition
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_lora import adapter_layers, load_adapter, unload  # noqa: E402
from lightning_lora.merge.clora import LoRABranches  # noqa: E402
from lightning_lora.results import write_result  # noqa: E402


def _composition_module():
    spec = importlib.util.spec_from_file_location("clora_composition", ROOT / "benchmarks" / "clora_composition.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", default=str(ROOT / "runs" / "clora_composition"))
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    cc = _composition_module()
    diffusers = cc.require_diffusers()

    ckpt = Path(args.ckpt_dir)
    if not (ckpt / "base_unet_fp16.safetensors").exists():
        raise SystemExit(f"{ckpt}: no base_unet_fp16.safetensors (run clora_composition.py first)")
    torch.manual_seed(0)
    unet, text = cc.make_unet(args.width), cc.TinyTextEncoder()
    cc.load_base(unet, text, ckpt, "cpu")
    ink, labels = cc.load_glyphs(torch.device("cpu"))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train = cc.Composer(ink[perm[: int(0.8 * len(labels))]], labels[perm[: int(0.8 * len(labels))]])
    with torch.no_grad():
        uncond = text(cc.null_tokens("cpu"))
        own = {d: text(cc.prompt_tokens(torch.tensor([d]), None)) for d in (cc.CONCEPT_A, cc.CONCEPT_B)}
    alphas = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    base_w = {n: m.weight.detach().clone() for n, m in unet.named_modules() if hasattr(m, "weight")}
    metrics: dict[str, float] = {}
    stages = json.loads((ckpt / "stages.json").read_text()) if (ckpt / "stages.json").exists() else {}
    for lora_dir in sorted(d for d in ckpt.iterdir() if d.is_dir() and d.name.startswith(("lora_a_red3", "lora_b_green7"))):
        digit, colour = (cc.CONCEPT_A, cc.RED) if lora_dir.name.startswith("lora_a") else (cc.CONCEPT_B, cc.GREEN)
        load_adapter(unet, lora_dir)
        layers = adapter_layers(unet)
        num = den = 0.0
        for name, layer in layers.items():
            num += float(layer.delta_weight().float().norm()) ** 2
            den += float(base_w[name].norm()) ** 2
        unload(unet)
        tag = lora_dir.name
        metrics[f"{tag}/delta_rel"] = (num / den) ** 0.5
        shape = stages.get(tag, {}).get("shape", {})
        for key in ("lora_lr", "lora_p_uncond", "lora_steps"):
            if key in shape:
                metrics[f"{tag}/{key}"] = shape[key]
        torch.manual_seed(7)
        x0, _ = cc.concept_batch(train, args.images, digit, colour)
        n = x0.shape[0]
        for t_int in (900, 500, 100):
            t = torch.full((n,), t_int)
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_int))
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            for who, ly in (("base", None), ("lora", layers)):
                with torch.no_grad(), LoRABranches(unet, [ly]).activate(0):
                    ec = unet(xt, t, encoder_hidden_states=own[digit].expand(n, -1, -1)).sample
                    eu = unet(xt, t, encoder_hidden_states=uncond.expand(n, -1, -1)).sample
                for part, pred in (("cond", ec), ("uncond", eu), ("cfg3", eu + 3 * (ec - eu))):
                    metrics[f"{tag}/t{t_int}_{who}_{part}"] = float(((pred - eps) ** 2).mean())
        print(tag, {k.split("/")[1]: round(v, 5) for k, v in metrics.items() if k.startswith(tag + "/t900")
                    or k == f"{tag}/delta_rel"}, flush=True)
    cmd = "python benchmarks/clora_lora_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("wrote", write_result("clora_lora_diagnosis", metrics, command=cmd, directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
