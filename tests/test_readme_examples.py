"""The README's python examples run as written, and do what their comments say.

Each ```python block of README.md is found by the heading it sits under (a moved block is still
found; a renamed or deleted one fails here by name) and run with ``exec`` in ``tmp_path`` as the
working directory (the snippets write ``my_adapter``, ``adapters/``, ``adapter_out``). The namespace
holds only what a snippet leaves to the reader: ``path`` (a tiny BERT saved to disk), ``ll`` and
``model`` for the second block (the first block's import and a freshly loaded model), ``datamodule``
for the Lightning block. A snippet's elided part (its ``...`` line) is textually replaced by a call
to a hook of this file that does what the reader would do there (train a few steps, run a batch)
and records what the assertions need; every other line runs verbatim. Trainer options the snippet
leaves to the reader (epochs, logging) come from Lightning's ``PL_TRAINER_*`` environment defaults.

docs/*.md hold no python blocks today; a new one (or a new README block) fails until it is run here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import VOCAB, build_tiny_bert

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TOUR = ("Adapters on any model", "Several adapters on one model, merging", "With Lightning: one callback",
        "torch's own modules and tied heads")
FENCE = re.compile(r"^\s*```")


def python_blocks(text: str) -> dict[str, list[str]]:
    """Heading -> the ```python (or ```py) blocks under it, in order. Lines inside any fence are not
    headings (a ``# comment`` in a bash block is not one)."""
    out: dict[str, list[str]] = {}
    heading, lang, body = "", None, []
    for line in text.splitlines():
        if FENCE.match(line):
            if lang is None:
                lang, body = line.strip()[3:].strip().lower(), []
            else:
                if lang in ("python", "py"):
                    out.setdefault(heading, []).append("\n".join(body) + "\n")
                lang = None
        elif lang is not None:
            body.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return out


def readme_block(heading: str) -> str:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert heading in blocks, (f"README.md has no ```python block under the heading {heading!r} (renamed or "
                               f"removed? blocks found under: {sorted(blocks)}); update tests/test_readme_examples.py")
    count = len(blocks[heading])
    assert count == 1, f"README.md has {count} python blocks under {heading!r}, expected 1"
    return blocks[heading][0]


def fill_elision(code: str, pattern: str, replacement: str) -> str:
    """Replace the one elided line matching ``pattern`` (a multiline regex); fail clearly if it moved."""
    found = re.findall(pattern, code, flags=re.M)
    assert len(found) == 1, f"expected one elided line matching {pattern!r} in the snippet, found {found}:\n{code}"
    return re.sub(pattern, replacement, code, flags=re.M)


# ---- the reader's side: a tiny model on disk, batches ------------------------------------------
def batch(seed: int = 0, size: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (size, length), generator=g),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=g)}


def logits(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().cpu()


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny BertForSequenceClassification (2 labels, no dropout) saved where ``path`` points; cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "base"
    build_tiny_bert(seed=0, classifier=True).save_pretrained(directory)
    return directory


def fresh(directory: Path) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2).eval()


def peft_logits(directory: Path, adapter: Path, b: dict[str, torch.Tensor]) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(fresh(directory), adapter), b)


def suffixes(names: list[str]) -> set[str]:
    """PEFT's target_modules as module-name suffixes (the config may list full names or short ones)."""
    return {n.rsplit(".", 1)[-1] for n in names}


def ll_layers(model: nn.Module) -> list[nn.Module]:
    import lightning_lora as ll

    return list(ll.adapter_layers(model).values())


def lora_B(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for n, p in model.named_parameters() if "lora_B" in n]


# ---- the blocks -----------------------------------------------------------------------------------
def test_adapters_on_any_model(base: Path, tmp_path: Path) -> None:
    """Inject, train (the elided loop), save in PEFT's format, merge: PEFT loads the saved adapter with
    the trained model's outputs, the merged model keeps them, only LoRA and the classifier trained."""
    x = batch(seed=1)
    seen: dict[str, Any] = {}

    def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:  # the reader's "..."
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["optimized"] = {id(p) for group in opt.param_groups for p in group["params"]}
        model.train()
        for step in range(4):
            model(**batch(seed=10 + step)).loss.backward()
            opt.step()
            opt.zero_grad()
        seen["trained"] = logits(model, x)

    code = fill_elision(readme_block(TOUR[0]), r"^\.\.\.[ \t]*(#.*)?$", "_train(model, opt)")
    ns: dict[str, Any] = {"path": str(base), "_train": train}
    exec(compile(code, "README.md: " + TOUR[0], "exec"), ns)
    model = ns["model"]

    # "freezes everything else": LoRA on query/value and the classifier train, all of it in the optimizer
    assert seen["trainable"] and all("lora_" in n or "classifier" in n for n in seen["trainable"]), seen["trainable"]
    assert any("classifier" in n for n in seen["trainable"])
    assert seen["optimized"] == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(b.abs().max() > 0 for b in lora_B(model)), "the elided training left LoRA's B at zero"
    base_out = logits(fresh(base), x)
    assert (seen["trained"] - base_out).abs().max() > 1e-5, "training did not move the outputs: checks below vacuous"
    # "PEFT format: loads in peft too"
    assert {p.name for p in (tmp_path / "my_adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    torch.testing.assert_close(peft_logits(base, tmp_path / "my_adapter", x), seen["trained"], rtol=1e-5, atol=1e-6)
    # "fold into the weights for inference": every layer merged, same outputs
    layers = ll_layers(model)
    assert layers and all(layer.merged for layer in layers)
    torch.testing.assert_close(logits(model, x), seen["trained"], rtol=1e-5, atol=1e-6)


def test_several_adapters_merging(base: Path, tmp_path: Path) -> None:
    """Two named adapters, one active, a batch under the other (the elided part trains it), both saved one
    folder per name in PEFT's layout, and LoRA-LEGO adds "merged"."""
    import lightning_lora as ll
    from lightning_lora.core.multi import active_adapters, adapter_names, named_adapter_layers

    x = batch(seed=1)
    seen: dict[str, Any] = {}

    def run_batch(model: nn.Module) -> None:  # the reader's "..." under use_adapter: a few training steps
        seen["active"] = active_adapters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for step in range(3):
            model(**batch(seed=10 + step)).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()

    code = fill_elision(readme_block(TOUR[1]), r"(?<=:) \.\.\.(?=\s*(#.*)?$)", " _batch(model)")
    model = fresh(base)
    exec(compile(code, "README.md: " + TOUR[1], "exec"), {"ll": ll, "model": model, "_batch": run_batch})

    assert seen["active"] == ["cola"], "use_adapter(model, 'cola') did not switch to cola"
    assert seen["trainable"] and all(".cola." in n for n in seen["trainable"]), seen["trainable"]
    assert active_adapters(model) == ["sst2"], "set_adapter(model, 'sst2') was not restored after use_adapter"
    assert adapter_names(model) == ["sst2", "cola", "merged"]
    targets = {t.rsplit(".", 1)[-1] for t in named_adapter_layers(model, "sst2")}
    assert targets == {"query", "value"}
    assert all(layer.lora_B.abs().max() == 0 for layer in named_adapter_layers(model, "sst2").values())
    assert all(layer.lora_B.abs().max() > 0 for layer in named_adapter_layers(model, "cola").values())

    # "PEFT layout: one folder per name": adapters/sst2 and adapters/cola, each loads in PEFT
    saved = tmp_path / "adapters"
    assert sorted(p.name for p in saved.iterdir()) == ["cola", "sst2"]
    for name in ("sst2", "cola"):
        config = json.loads((saved / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8
        assert suffixes(config["target_modules"]) == {"query", "value"}
        with ll.use_adapter(model, name):
            ours = logits(model, x)
        torch.testing.assert_close(peft_logits(base, saved / name, x), ours, rtol=1e-5, atol=1e-6)
    with ll.use_adapter(model, "cola"):
        assert (logits(model, x) - logits(fresh(base), x)).abs().max() > 1e-5, "cola's training step had no effect"

    # "LoRA-LEGO": a rank-8 LoRA "merged" on the sources' modules, carrying the trained source's update
    merged = named_adapter_layers(model, "merged")
    assert set(merged) == set(named_adapter_layers(model, "sst2"))
    assert all(layer.lora_A.shape[0] == 8 for layer in merged.values()), "merged rank is not the snippet's k=8"
    assert all(layer.delta_weight().abs().max() > 0 for layer in merged.values())


def tiny_datamodule() -> Any:
    """A LightningDataModule of 4 batches of 4 tiny-BERT inputs with labels (Lightning imported here, lazily)."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    class Tiny(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            rows = [{k: v[i] for k, v in batch(seed=s).items()} for s in range(4) for i in range(4)]
            return DataLoader(rows, batch_size=4)

    return Tiny()


def test_lightning_callback(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback injects LoRA into ``self.model``, trains it and exports ``adapter_out``, which PEFT
    loads onto a fresh base with the trained module's outputs."""
    # the Trainer options the snippet leaves to the reader, as Lightning's documented env defaults
    for key, value in {"MAX_EPOCHS": "4", "ACCELERATOR": "cpu", "DEVICES": "1", "LOGGER": "False",
                       "ENABLE_CHECKPOINTING": "False", "ENABLE_PROGRESS_BAR": "False",
                       "ENABLE_MODEL_SUMMARY": "False"}.items():
        monkeypatch.setenv(f"PL_TRAINER_{key}", value)
    # the elided body of the snippet's LightningModule: a model in self.model and a training step
    body = ("\\1def __init__(self):\n\\1    super().__init__()\n\\1    self.model = _fresh()\n"
            "\\1def training_step(self, batch, batch_idx):\n\\1    return self.model(**batch).loss")
    code = fill_elision(readme_block(TOUR[2]), r"^( +)\.\.\.[ \t]*(#.*)?$", body)
    ns: dict[str, Any] = {"datamodule": tiny_datamodule(), "_fresh": lambda: fresh(base).train()}
    exec(compile(code, "README.md: " + TOUR[2], "exec"), ns)

    trained = ns["trainer"].lightning_module.model
    assert ll_layers(trained), "AdapterCallback injected nothing into self.model"
    assert all(b.abs().max() > 0 for b in lora_B(trained)), "fit did not train LoRA's B"
    x = batch(seed=1)
    ours = logits(trained, x)
    assert (ours - logits(fresh(base), x)).abs().max() > 1e-5, "training did not move the outputs"
    export = tmp_path / "adapter_out"
    assert {p.name for p in export.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["r"] == 8 and suffixes(config["target_modules"]) == {"query", "value"}
    torch.testing.assert_close(peft_logits(base, export, x), ours, rtol=1e-5, atol=1e-6)


# ---- no untested python blocks -----------------------------------------------------------------
def test_every_python_block_is_run_here() -> None:
    """The README's python blocks are exactly the three above, and docs/*.md have none: a new block
    fails here until a test runs it."""
    assert sorted(python_blocks(README.read_text(encoding="utf-8"))) == sorted(TOUR)
    for doc in sorted((REPO / "docs").glob("*.md")):
        found = python_blocks(doc.read_text(encoding="utf-8"))
        assert found == {}, f"docs/{doc.name} has python blocks not run by this file, under: {sorted(found)}"


def test_python_blocks_parser() -> None:
    """Headings inside fences are ignored; untagged and bash fences are not python blocks."""
    text = ("# A\n```bash\n# not a heading\n```\n## B\n```python\nx = 1\n```\n```\ny\n```\n"
            "### C\n```py\n# comment\nz = 2\n```\n")
    assert python_blocks(text) == {"B": ["x = 1\n"], "C": ["# comment\nz = 2\n"]}


def test_torch_modules_and_tied_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder's attention and feed-forward layers are adapted and its fused eval path runs them;
    the tied LM's head shares the embedding's adapter, and merging keeps the outputs."""
    from transformers import LlamaForCausalLM

    from lightning_lora.methods.lora_modules import LoRAMultiheadAttention, TiedLoRALinear
    from tests.conftest import mha_fastpath_off, tiny_llama_config

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    LlamaForCausalLM(config).save_pretrained(tmp_path / "smollm2")
    ns: dict[str, Any] = {"smollm2_path": str(tmp_path / "smollm2")}
    exec(compile(readme_block(TOUR[3]), "README.md: " + TOUR[3], "exec"), ns)
    encoder, lm = ns["encoder"], ns["lm"]
    import lightning_lora as ll

    layers = ll.adapter_layers(encoder)
    assert len(layers) == 18 and sum(isinstance(m, LoRAMultiheadAttention) for m in layers.values()) == 6
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(lm.parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    encoder.eval()
    x = torch.randn(2, 5, 512, generator=g)
    with torch.no_grad():
        fused = encoder(x)
        with mha_fastpath_off():
            layer_by_layer = encoder(x)
    torch.testing.assert_close(fused, layer_by_layer, atol=1e-4, rtol=0)
    assert isinstance(lm.lm_head, TiedLoRALinear) and lm.lm_head.tied_source is lm.model.embed_tokens
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    lm.eval()
    with torch.no_grad():
        before = lm(ids).logits
        ll.merge_adapter(lm)
        torch.testing.assert_close(lm(ids).logits, before, atol=1e-4, rtol=0)
