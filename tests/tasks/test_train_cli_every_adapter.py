"""`lightning-lora train adapter=<name>` trains end to end for every conf/adapter/*.yaml, on a
sequence-classification task (tiny BERT on MRPC) and on the causal-LM task (tiny Llama on Tiny
Shakespeare): 3 optimizer steps, one validation and one test batch, in process (``train.main``,
Hydra included) so that the run's callback, module and trainer can be inspected afterwards.

test_train_cli.py checks that each adapter config builds its callback; this checks the whole run:
the method injected, its own training hooks and optimizer used, the checkpoint, the exported
adapter (which must reload into a fresh base model and give the trained model's outputs) and
finite validation metrics.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_lora import train

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
ADAPTERS = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml"))
STEPS = 3

#: what a tiny model (hidden 32, MLP 64) needs, and what makes a method's schedule happen within 3 steps
ADAPTER_OPTIONS: dict[str, list[str]] = {
    "allora": ["adapter.eta=1.0"],                            # eta has no default
    "bat": ["adapter.r=4"],                                   # block width must divide 32 and 64
    "bone": ["adapter.r=4"],                                  # r <= in_features (32)
    "lq_lora": ["adapter.r=4"],                               # r <= min(out, in) (32)
    "flexora": ["adapter.search_steps=1"],                    # select after step 1, retrain in steps 2-3
    "increlora": ["adapter.init_warmup=1", "adapter.interval=2"],  # one rank allocation within 3 steps
}

#: data slices: 24 training examples in batches of 8 (3 steps, one epoch), 8 for evaluation
_SLICE = ["data.max_samples=24", "data.batch_size=8", "data.max_eval_samples=8", "data.eval_batch_size=8"]
TASKS: dict[str, list[str]] = {
    # MRPC has a labelled test split: select_best (auto) keeps the best checkpoint and reports test
    "classification": ["model=tiny_bert", "data=mrpc", "data.max_length=32", *_SLICE],
    # Shakespeare has none: select_best=true writes and reloads a checkpoint here too (WikiText-2's
    # extra test loop, eval_wikitext2, would double the run's time; test_train_cli runs it with LoRA)
    "causal_lm": ["model=tiny_llama", "data=shakespeare", "data.block_size=16", *_SLICE, "select_best=true"],
}
COMMON = [f"trainer.max_steps={STEPS}", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
          "trainer.log_every_n_steps=1"]

#: the Method hooks AdapterCallback forwards (callback.py) and the one the task modules call (modules.py)
HOOKS = ("on_fit_start", "on_train_batch_start", "on_after_backward", "on_train_batch_end", "on_fit_end",
         "make_optimizer")


#: Tiny Shakespeare's token ids by text: every causal-LM run tokenizes the same 1.1 MB corpus with the
#: same (MiniLM) tokenizer, half of such a run's time; the method under test never sees the difference
_TOKENIZED: dict[str, torch.Tensor] = {}


@dataclass
class Run:
    rc: int
    callback: Any
    module: Any
    metrics: dict[str, float]
    run_dir: Path
    export_dir: Path
    hook_calls: dict[str, int]
    #: names of the trainable parameters the fit's optimizers did not hold, read when fit ended
    #: (the evaluation after fit reloads the best checkpoint, which may rebuild layers: IncreLoRA)
    not_in_optimizer: list[str]


@functools.cache
def method_name(adapter: str) -> str:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"adapter={adapter}"]).adapter.method


def overridden_hooks(method_cls: type) -> list[str]:
    from lightning_lora.core.config import Method

    return [h for h in HOOKS if callable(getattr(method_cls, h, None)) and getattr(method_cls, h) is not getattr(
        Method, h, None)]


def train_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, adapter: str, *overrides: str) -> Run:
    """``lightning-lora train adapter=<adapter> ...`` through ``train.main``, with spies on the pieces."""
    from lightning_lora import AdapterCallback
    from lightning_lora.core.config import get_method
    from lightning_lora.tasks import lm

    # run() sets these process-wide (setdefault, seed_everything): restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    tokenize = lm.tokenize_corpus

    def tokenize_once(text: str, tokenizer: Any) -> torch.Tensor:
        if text not in _TOKENIZED:
            _TOKENIZED[text] = tokenize(text, tokenizer)
        return _TOKENIZED[text]

    monkeypatch.setattr(lm, "tokenize_corpus", tokenize_once)

    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}
    method_cls = get_method(method_name(adapter))
    for hook in overridden_hooks(method_cls):  # counted at class level: the method object stays picklable
        def counted(self: Any, *args: Any, _hook: str = hook, _fn: Any = getattr(method_cls, hook),
                    **kwargs: Any) -> Any:
            calls[_hook] = calls.get(_hook, 0) + 1
            return _fn(self, *args, **kwargs)

        monkeypatch.setattr(method_cls, hook, counted)

    def spy(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = fn(*args, **kwargs)
            return seen[name]

        return wrapper

    on_fit_end = AdapterCallback.on_fit_end

    def check_optimizer_at_fit_end(self: Any, trainer: Any, pl_module: Any) -> None:
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        seen["not_in_optimizer"] = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in held]
        on_fit_end(self, trainer, pl_module)

    monkeypatch.setattr(AdapterCallback, "on_fit_end", check_optimizer_at_fit_end)
    monkeypatch.setattr(train, "build_adapter_callback", spy("callback", train.build_adapter_callback))
    monkeypatch.setattr(train, "build_module", spy("module", train.build_module))
    monkeypatch.setattr(train, "run", spy("metrics", train.run))
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    try:
        rc = train.main(["train", f"adapter={adapter}", *ADAPTER_OPTIONS.get(adapter, []), *overrides, *COMMON,
                         f"hydra.run.dir={run_dir}", f"export_adapter={export_dir}"])
    except SystemExit as e:  # how the console script ends a refused run (exit status 2)
        rc = e.code
    return Run(rc, seen.get("callback"), seen.get("module"), seen.get("metrics", {}), run_dir, export_dir, calls,
               seen.get("not_in_optimizer", []))


def logged_values(run_dir: Path, column: str) -> list[float]:
    (path,) = run_dir.glob("logs/version_*/metrics.csv")
    with path.open() as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def method_effects(adapter: str, run: Run) -> None:
    """What each method's own training machinery must have done in the run."""
    method, layers = run.callback.method, run.callback.layers
    if adapter == "gradnorm_lorp":  # its projected AdamW, not the task module's plain AdamW
        from lightning_lora.optim.gradnorm_lorp import GradNormLoRPAdamW

        assert isinstance(run.module.trainer.optimizers[0], GradNormLoRPAdamW)
    else:
        assert type(run.module.trainer.optimizers[0]) is torch.optim.AdamW
    if adapter == "dylora":  # a rank sampled per step; validation at every rank (eval_ranks: all)
        assert method.last_rank is not None
        for b in range(1, method.config.r + 1):
            assert all(math.isfinite(v) for v in logged_values(run.run_dir, f"val_loss_rank{b}"))
    if adapter == "flexora":  # the search ended at step 1 and LoRA was retrained on the selection
        assert method.phase == "retrain" and method.selected and method.gate_steps >= 1
    if adapter == "increlora":  # ranks were added at the allocation step
        assert method.rounds, "no rank allocation happened"
    if adapter == "lora_sb":  # the gradient-SVD init ran in on_fit_start
        assert all(bool(layer.lora_sb_initialized) for layer in layers.values())
    if adapter == "smora":  # the load-balancing bias moved and routing was logged
        assert any(bool(layer.router_bias.abs().sum() > 0) for layer in layers.values())
        assert logged_values(run.run_dir, "smora/load_max_over_mean")
    if adapter == "lq_lora":  # the base is the quantized matrix, not the dense one
        from lightning_lora.quant.linear import QuantizedLinear

        assert all(isinstance(layer.base_layer, QuantizedLinear) for layer in layers.values())


def reloaded_outputs_match(run: Run, task: str) -> None:
    """The exported adapter, loaded into a fresh base model, gives the trained model's outputs, which
    differ from the base model's (else an adapter lost in the export would pass unseen)."""
    from lightning_lora import load_adapter
    from lightning_lora.tasks import load_model

    model_name = "tiny_bert" if task == "classification" else "tiny_llama"
    base, _ = load_model(model_name, task=task, num_labels=2)  # the same seeded random weights as the run's
    fresh, _ = load_model(model_name, task=task, num_labels=2)
    load_adapter(fresh, run.export_dir)
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, untrained = (m.eval()(input_ids=ids).logits for m in (run.module.model, fresh, base))
    assert (expected - untrained).abs().max() > 1e-5  # 3 steps moved every method's outputs by 1e-4 or more
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_trains_end_to_end(tmp_path, monkeypatch, adapter, task):
    from lightning_lora.core import get_adapter_method
    from lightning_lora.core.config import get_method

    run = train_in_process(tmp_path, monkeypatch, adapter, *TASKS[task])
    assert run.rc == 0

    # the adapter of the config, injected into the task model
    name = method_name(adapter)
    assert run.callback.method_name == name and type(run.callback.method) is get_method(name)
    assert get_adapter_method(run.module.model) is run.callback.method and run.callback.layers
    # the method's own hooks ran (AdapterCallback forwards them; GradNormLoRP's optimizer is built)
    for hook in overridden_hooks(get_method(name)):
        assert run.hook_calls.get(hook, 0) >= 1, f"{name}.{hook} never ran"
    method_effects(adapter, run)
    # the optimizer holds every trainable parameter (IncreLoRA's new ranks, Flexora's rebuild included)
    assert run.not_in_optimizer == []

    # what the run reports and writes
    monitored = ["val_loss", "val_ppl"] if task == "causal_lm" else ["val_loss", "val_accuracy", "test_accuracy"]
    assert run.metrics["steps"] == STEPS and run.metrics["trainable_params"] > 0
    assert all(math.isfinite(run.metrics[k]) for k in monitored), run.metrics
    logged = logged_values(run.run_dir, "val_loss")  # metrics.csv; run() drops NaN metrics from its summary
    assert logged and all(math.isfinite(v) for v in logged)
    (ckpt,) = run.run_dir.glob("checkpoints/*.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["lightning_lora"]["method"] == name
    assert {p.name for p in run.export_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    reloaded_outputs_match(run, task)


@pytest.mark.parametrize("adapter", ["smora", "lq_lora"])
def test_merge_on_fit_end_is_refused_before_training_for_methods_that_cannot_merge(tmp_path, monkeypatch, capsys,
                                                                                  adapter):
    run = train_in_process(tmp_path, monkeypatch, adapter, *TASKS["classification"], "+adapter.merge_on_fit_end=true")
    assert run.rc == 2 and run.module is None  # refused before the model was built
    err = capsys.readouterr().err
    assert f"lightning-lora: error: adapter: merge_on_fit_end: method '{adapter}' cannot merge" in err
    assert "Traceback" not in err
    assert not run.run_dir.exists()  # the refused run left no folder (it held Hydra's .hydra/ and an empty log)


def test_select_best_without_a_validation_in_fit_evaluates_the_final_model(tmp_path, monkeypatch, capsys):
    # 48 MRPC examples in batches of 8 are 6 batches: max_steps=3 ends fit before the epoch's validation,
    # so ModelCheckpoint kept nothing and validate(ckpt_path="best") raised after the training
    run = train_in_process(tmp_path, monkeypatch, "lora", *TASKS["classification"], "data.max_samples=48")
    assert run.rc == 0
    assert "lightning-lora: warning: select_best: no validation ran during fit" in capsys.readouterr().err
    assert run.metrics["steps"] == STEPS and {"val_accuracy", "test_accuracy"} <= set(run.metrics)
    assert not list(run.run_dir.glob("checkpoints/*.ckpt"))
