"""Shared GLUE harness for the method benchmarks: one MiniLM fine-tuning run per ``GlueRun``.

Every method benchmark (DyLoRA, IncreLoRA, Flexora, the structure/initialisation table, LEGO, ...)
trains the same way, so results are comparable: all-MiniLM-L6-v2 with a fresh classification head,
``AdapterCallback(method, target="model", target_modules=TARGETS, modules_to_save=["classifier",
"pooler"], **method_kwargs)``, :class:`~lightning_lora.tasks.SequenceClassifier` (AdamW over the
trainable parameters, linear warmup/decay), a plain ``pl.Trainer``.

Which data is used for what (nothing reported is ever used to choose anything):

- ``holdout=False``: train on the GLUE train split; no validation during fit; the reported scores
  are on the GLUE dev set (SST-2, RTE, CoLA: no labelled test set exists) or the MRPC test set.
- ``holdout=True``: the Trainer's validation set is a seeded, label-stratified 10% slice carved
  from train (the model trains on the other 90%), for methods that use validation batches during
  fit (Flexora's gates); the reported scores are on the same held-out sets as above.

``run_many`` runs a list of runs in worker processes that share one GPU (MiniLM is small: a single
run leaves an H200 mostly idle) and appends one JSON line per finished run to a file, so an
interrupted benchmark resumes where it stopped.

    python benchmarks/glue_harness.py --method lora --task rte --epochs 3 --seed 0   # one run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_lora import AdapterCallback, make_config  # noqa: E402
from lightning_lora.tasks import SequenceClassifier, load_minilm  # noqa: E402
from lightning_lora.tasks.glue import GLUEDataModule, get_task, read_split, split_dev, subsample  # noqa: E402
from lightning_lora.tasks.modules import classification_metrics  # noqa: E402

#: every Linear of MiniLM's encoder (not pooler.dense: the whole pooler trains with the head)
TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
MODULES_TO_SAVE = ["classifier", "pooler"]


@dataclass
class GlueRun:
    """One fine-tuning run.

    Attributes:
        method: registered adapter method (``lightning_lora.available_methods()``).
        task: ``sst2``, ``rte``, ``mrpc`` or ``cola``.
        seed: seeds the head, the adapter init, dropout and the data order.
        method_kwargs: config fields of the method (``r``, ``alpha``, ...), passed to AdapterCallback.
        lr: peak learning rate of AdamW (linear warmup over ``warmup_ratio`` of the steps, then decay).
        epochs / steps: training length; ``steps`` wins when both are given.
        eval_ranks: also evaluate at these ranks (methods with nested ranks: DyLoRA's ``rank_context``).
        holdout: carve the Trainer's validation set from train (see the module docstring).
        tag: free label that distinguishes otherwise equal runs in a results file.
        max_samples / max_eval_samples: seeded subsets of train / the evaluated sets (smoke runs).
        grad_clip: clip the gradients' global norm to this (Lightning's ``gradient_clip_val``); None,
            the default and every run before session 14, clips nothing.
        head_lr: peak lr of the head and pooler (``SequenceClassifier(head_lr=)``); None: ``lr``, as
            every run before session 14.
    """

    method: str
    task: str
    seed: int = 0
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 5e-4
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 32
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    eval_ranks: list[int] | None = None
    holdout: bool = False
    tag: str = ""
    max_samples: int | None = None
    max_eval_samples: int | None = None
    grad_clip: float | None = None
    head_lr: float | None = None

    def __post_init__(self) -> None:
        # Lightning skips clipping at 0 and below, silently: a run tagged as clipped would not be
        for name in ("grad_clip", "head_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{self.key}: {name} must be > 0 (or None), got {value}")

    @property
    def key(self) -> str:
        """Identity of the run in a results file: tag (or method), task, seed. Not the config or the
        learning rate: a benchmark that changes either for a tag must use a new tag, or the raw
        file's old run counts as done."""
        return f"{self.tag or self.method}/{self.task}/seed{self.seed}"


class HoldoutGLUEDataModule(GLUEDataModule):
    """GLUE task whose ``validation`` split is carved from train and whose ``test`` split is the
    reported held-out set (the GLUE dev set, or MRPC's labelled test set)."""

    def examples(self, split: str) -> list[Any]:
        spec = self.spec
        if split in ("train", "validation"):
            if spec.dev_from_train:  # MRPC: validation is already carved from train
                return super().examples(split)
            train, dev = split_dev(read_split(self.task, "train", self.data_dir), self.dev_fraction, self.dev_seed)
            rows = train if split == "train" else dev
        elif split == "test":
            rows = read_split(self.task, report_split(self.task), self.data_dir, self.dev_fraction, self.dev_seed)
        else:
            raise ValueError(f"unknown split {split!r}")
        n = self.max_samples if split == "train" else self.max_eval_samples
        return subsample(rows, n, self.seed)

    def setup(self, stage: str | None = None) -> None:
        from lightning_lora.tasks.glue import ListDataset

        for split in ("train", "validation", "test"):
            if split not in self.datasets:
                self.datasets[split] = ListDataset(self.encode(self.examples(split)))


def report_split(task: str) -> str:
    """The split scores are reported on: MRPC's labelled test set, else the GLUE dev set."""
    return "test" if "test" in get_task(task).files else "validation"


def make_datamodule(run: GlueRun, tokenizer: Any) -> GLUEDataModule:
    cls = HoldoutGLUEDataModule if run.holdout else GLUEDataModule
    return cls(tokenizer, task=run.task, max_length=run.max_length, batch_size=run.batch_size, eval_batch_size=256,
               seed=run.seed, max_samples=run.max_samples, max_eval_samples=run.max_eval_samples)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], task: str,
             device: torch.device) -> dict[str, float]:
    """Scores of ``model`` (a ``...ForSequenceClassification``) on ``loader``: the task's metrics."""
    spec = get_task(task)
    metrics = classification_metrics(spec.metrics, spec.num_labels).to(device)
    was_training = model.training
    model.eval()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        metrics.update(model(**batch).logits.float().argmax(-1), labels)
    model.train(was_training)
    return {k: float(v) for k, v in metrics.compute().items()}


def eval_loader(dm: GLUEDataModule, run: GlueRun) -> Iterable[dict[str, torch.Tensor]]:
    dm.setup("test")
    split = "test" if run.holdout or dm.has_test else "validation"
    return dm._loader(split, train=False)


def _rank_context(model: torch.nn.Module, b: int) -> contextlib.AbstractContextManager:
    from lightning_lora.methods.dylora import rank_context

    return rank_context(model, b)


def train_glue(run: GlueRun, device: str | None = None, adapter_dir: str | os.PathLike | None = None,
               callbacks: list[pl.Callback] | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one run and score it on the held-out split.

    Returns a flat dict: the run's fields, ``accuracy`` (and ``f1`` for MRPC, ``mcc`` for CoLA),
    ``holdout_<metric>`` (``holdout=True``: on the slice carved from train, for choices such as the
    learning rate), ``<metric>_rank<b>`` for ``eval_ranks``, ``trainable_params`` (head included), ``adapter_params``, ``steps``, ``seconds`` (fit wall
    time), ``peak_mem_mib`` (CUDA only) and ``device``. ``adapter_dir``: also save the adapter there.
    """
    accelerator = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    pl.seed_everything(run.seed, workers=True, verbose=False)
    model, tokenizer = load_minilm(num_labels=get_task(run.task).num_labels)
    dm = make_datamodule(run, tokenizer)
    adapter = AdapterCallback(run.method, target="model", target_modules=TARGETS, modules_to_save=MODULES_TO_SAVE,
                              **run.method_kwargs)
    module = SequenceClassifier(model, num_labels=dm.num_labels, metrics=dm.metrics, lr=run.lr,
                                weight_decay=run.weight_decay, warmup_ratio=run.warmup_ratio, head_lr=run.head_lr)
    if run.steps is None and run.epochs is None:
        raise ValueError(f"{run.key}: give epochs or steps")
    if run.steps is not None:
        length = {"max_steps": run.steps}
    else:
        dm.setup("fit")
        steps_per_epoch = math.ceil(len(dm.datasets["train"]) / run.batch_size)
        length = {"max_steps": max(1, round(run.epochs * steps_per_epoch))}
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, max_epochs=-1,
        callbacks=[adapter, *(callbacks or [])], num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=progress, limit_val_batches=1.0 if run.holdout else 0,
        gradient_clip_val=run.grad_clip, **length,
    )
    dev = torch.device("cuda:0" if accelerator == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.init()  # a fresh (spawned) process: resetting stats before CUDA init fails
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {k: v for k, v in dataclasses.asdict(run).items() if k != "method_kwargs"}
    out["method_kwargs"] = json.dumps(run.method_kwargs, sort_keys=True)
    out["key"] = run.key
    module.to(dev)
    loader = eval_loader(dm, run)
    out.update(evaluate(module.model, loader, run.task, dev))
    if run.holdout:  # the carved validation slice: the only score a benchmark may choose by
        dm.setup("fit")
        held = evaluate(module.model, dm._loader("validation", train=False), run.task, dev)
        out.update({f"holdout_{k}": v for k, v in held.items()})
    for b in run.eval_ranks or []:
        with _rank_context(module.model, b):
            out.update({f"{k}_rank{b}": v for k, v in evaluate(module.model, loader, run.task, dev).items()})
            if run.holdout:  # lets a sweep choose by every rank, still on the carved slice only
                held = evaluate(module.model, dm._loader("validation", train=False), run.task, dev)
                out.update({f"holdout_{k}_rank{b}": v for k, v in held.items()})
    out.update(
        trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
        adapter_params=adapter_parameter_count(module),
        steps=int(trainer.global_step), seconds=seconds, device=accelerator,
        peak_mem_mib=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan"),
    )
    summary = getattr(adapter.method, "summary", None)
    if callable(summary):  # e.g. Flexora's selected layers and gate values
        out["adapter_summary"] = json.dumps(summary(), default=float)
    if adapter_dir is not None:
        adapter.save_adapter(module, adapter_dir)
    return out


def adapter_parameter_count(module: torch.nn.Module) -> int:
    """Trainable parameters inside adapter layers (the head and pooler in ``modules_to_save`` excluded)."""
    from lightning_lora.core.layer import AdapterLayer

    seen: set[int] = set()
    for layer in module.modules():
        if isinstance(layer, AdapterLayer):
            seen.update(id(p) for p in layer.parameters() if p.requires_grad)
    return sum(p.numel() for p in module.parameters() if id(p) in seen)


# ---- many runs, several processes on one GPU ----------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _glue_job(job: dict[str, Any], device: str | None) -> dict[str, Any]:
    return train_glue(GlueRun(**job), device=device)


def _worker(queue: Any, fn: Callable[[dict[str, Any], str | None], dict[str, Any]], out_jsonl: str,
            device: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    _quiet().__enter__()  # the worker's whole life: Lightning's per-run banners would drown the progress lines
    while (item := queue.get()) is not None:
        key, job = item
        try:
            result = {"key": key, **fn(job, device)}
        except Exception as exc:  # one failing run must not take the others down; it is recorded
            result = {"key": key, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        with open(out_jsonl, "a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps(result) + "\n")
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.endswith("accuracy") and isinstance(v, float))
        print(f"[{key}] " + (f"error {result['error']}" if "error" in result else
              f"{scores} {result.get('seconds', float('nan')):.0f} s"), flush=True)


def run_pool(jobs: dict[str, dict[str, Any]], fn: Callable[[dict[str, Any], str | None], dict[str, Any]],
             out_jsonl: str | os.PathLike, workers: int = 4, device: str | None = None,
             threads: int = 2) -> dict[str, dict[str, Any]]:
    """Run ``fn(job, device)`` for every ``key -> job`` not yet in ``out_jsonl`` on ``workers`` spawned
    processes (in the given order); return ``{key: result}`` for all ``jobs``.

    ``fn`` must be importable (a module-level function) and return a JSON-serialisable dict. Jobs that
    raised are recorded with an ``error`` field, retried on the next call, and reported here.
    """
    out_jsonl = str(out_jsonl)
    Path(out_jsonl).parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in read_jsonl(out_jsonl) if "error" not in r}
    todo = [(k, j) for k, j in jobs.items() if k not in done]
    if todo:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        queue = ctx.Queue()
        for item in todo:
            queue.put(item)
        n = max(1, min(workers, len(todo)))
        for _ in range(n):
            queue.put(None)
        procs = [ctx.Process(target=_worker, args=(queue, fn, out_jsonl, device, threads)) for _ in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    results = {r["key"]: r for r in read_jsonl(out_jsonl) if "error" not in r}
    missing = [k for k in jobs if k not in results]
    if missing:
        errors = {r["key"]: r["error"] for r in read_jsonl(out_jsonl) if "error" in r}
        raise RuntimeError(f"{len(missing)} run(s) failed: " + "; ".join(f"{k}: {errors.get(k, '?')}" for k in missing))
    return {k: results[k] for k in jobs}


def run_many(runs: list[GlueRun], out_jsonl: str | os.PathLike, workers: int = 4, device: str | None = None,
             threads: int = 2) -> list[dict[str, Any]]:
    """:func:`train_glue` for every run not yet in ``out_jsonl`` (see :func:`run_pool`), the longest first
    so the workers finish together; returns the results in the order of ``runs``."""
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("runs must have distinct keys (tag/task/seed)")
    check_stored_budgets(runs, out_jsonl)
    ordered = sorted(runs, key=lambda r: -(r.steps or (r.epochs or 1) * _TRAIN_SIZE.get(r.task, 1) / r.batch_size))
    results = run_pool({r.key: dataclasses.asdict(r) for r in ordered}, _glue_job, out_jsonl, workers, device, threads)
    return [results[k] for k in keys]


#: what a stored run must share with a requested run of the same key to count as that run (the key
#: names tag, task and seed only; session 10's IncreLoRA run at 3,000 SST-2 steps reused LoRA's
#: 1,000-step rows this way, so its comparison was not at the same budget)
BUDGET_FIELDS = ("method", "steps", "epochs", "lr", "batch_size", "max_length", "warmup_ratio", "weight_decay",
                 "holdout", "max_samples", "max_eval_samples", "grad_clip", "head_lr")


def check_stored_budgets(runs: Iterable[GlueRun], out_jsonl: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``out_jsonl`` holds a finished run under the key of one of ``runs`` but
    with another training budget or rate (:data:`BUDGET_FIELDS`) or another method config
    (``method_kwargs``): that row would be reused silently."""
    stored = {r["key"]: r for r in read_jsonl(str(out_jsonl)) if "error" not in r}
    for run in runs:
        row = stored.get(run.key)
        if row is None:
            continue
        asked = dataclasses.asdict(run)
        # an epoch-budget run (steps None) is stored with the step count its epochs came to
        fields = [f for f in BUDGET_FIELDS if not (f == "steps" and asked["steps"] is None)]
        diff = [f"{f}={row.get(f)!r} stored, {asked[f]!r} asked" for f in fields if row.get(f) != asked[f]]
        stored_kwargs = json.loads(row.get("method_kwargs") or "{}")  # train_glue stores it as JSON
        if _config_of(row.get("method"), stored_kwargs) != make_config(run.method, **run.method_kwargs):
            diff.append(f"method_kwargs={stored_kwargs} stored, {run.method_kwargs} asked")
        if diff:
            raise ValueError(f"{out_jsonl}: run {run.key!r} is stored with another budget ({'; '.join(diff)}); "
                             "give the new run its own tag or remove the stored row")


def _config_of(method: str | None, kwargs: dict[str, Any]) -> Any:
    """A stored row's full config (defaults filled in), so ``{"r": 8}`` and ``{"r": 8, "mode": "frozen"}``
    match where ``frozen`` is the default (session 4's DyLoRA rows left it out); the kwargs themselves
    where the stored config no longer builds (a method or option since removed): then it matches no
    requested config. (A requested config is built with ``make_config`` directly: its errors raise.)"""
    try:
        return make_config(method, **kwargs)
    except (KeyError, ValueError, TypeError):
        return (method, json.dumps(kwargs, sort_keys=True))


def budget_tag(steps: int, untagged: int) -> str:
    """Tag suffix of runs at a step budget other than ``untagged`` (the one a raw file's runs without a
    step tag were trained at): ``/s<steps>``, so :func:`check_stored_budgets` never meets them."""
    return "" if steps == untagged else f"/s{steps}"


def clip_tag(grad_clip: float | None) -> str:
    """Tag suffix of runs with gradient clipping, ``/c<norm>`` (none without): stored unclipped runs of
    the same tag must not count as done for them."""
    return "" if grad_clip is None else f"/c{grad_clip:g}"


def budget_name(steps: dict[str, int], untagged: dict[str, int]) -> str:
    """Result-name suffix of a run at other budgets than ``untagged``, per task: ``_sst2_steps3000``
    (the bar's file keeps the untagged budgets; another budget must not overwrite it)."""
    return "".join(f"_{task}_steps{n}" for task, n in steps.items() if n != untagged[task])


#: training examples per task (orders the queue: long runs first)
_TRAIN_SIZE = {"sst2": 67349, "cola": 8551, "mrpc": 3668, "rte": 2490}


def best_rate(results: list[dict[str, Any]], tag: str) -> float:
    """The learning rate of ``tag``'s sweep runs (tagged ``sweep/<tag>/lr<rate>``) with the best accuracy
    on the carved slice; ties go to the smaller rate."""
    mine = [r for r in results if r["tag"].startswith(f"sweep/{tag}/")]
    return max(mine, key=lambda r: (r["holdout_accuracy"], -r["lr"]))["lr"]


def sweep_rates(sweep_run: Callable[[str, float], GlueRun], grid: Iterable[float],
                extension: Callable[[float, list[float]], list[float]], tags: Iterable[str],
                out_jsonl: str | os.PathLike, workers: int = 4, device: str | None = None, threads: int = 2,
                extend: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each tag's learning rate: its sweep runs (``sweep_run(tag, lr)``, tagged ``sweep/<tag>/lr<rate>``)
    over ``grid``, then once over ``extension(best, grid)`` for a tag whose best rate sits on an edge
    (an empty list: none), when ``extend``. Returns ``({tag: best rate}, every sweep row)``; see
    :func:`best_rate`."""
    grid, tags = list(grid), list(tags)

    def run(grids: dict[str, list[float]]) -> list[dict[str, Any]]:
        return run_many([sweep_run(t, lr) for t, rates in grids.items() for lr in rates], out_jsonl,
                        workers=workers, device=device, threads=threads)

    swept = run({t: grid for t in tags})
    edge = {t: ext for t in tags if (ext := extension(best_rate(swept, t), grid))}
    if edge and extend:
        print("best rate at an edge of the grid, sweeping also:", edge, flush=True)
        swept += run(edge)
    return {t: best_rate(swept, t) for t in tags}, swept


def rate_tag(tag: str, lr: float, grid: Iterable[float]) -> str:
    """The tag of ``tag``'s main runs: the method's own at a rate of its first grid, else with the rate in
    it (``<tag>/lr<rate>``, a rate from an extended grid): the raw file keys runs by tag/task/seed, so
    runs at the old rate must not count as done."""
    return tag if lr in tuple(grid) else f"{tag}/lr{lr:g}"


def mean_std(values: list[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` (sample std; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def run_stats(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Figures of the seeds of one configuration, keys ``<prefix>_...``: accuracy (points) mean, std
    and per seed; mean trainable and adapter parameters (and adapter parameters per seed, which
    differ for methods that choose their own size); mean fit seconds; the learning rate."""
    acc = mean_std([100.0 * r["accuracy"] for r in rows])
    return {
        f"{prefix}_accuracy": acc["mean"], f"{prefix}_accuracy_std": acc["std"],
        f"{prefix}_accuracy_per_seed": {f"seed{r['seed']}": 100.0 * r["accuracy"] for r in rows},
        f"{prefix}_trainable_params": statistics.fmean(r["trainable_params"] for r in rows),
        f"{prefix}_adapter_params": statistics.fmean(r["adapter_params"] for r in rows),
        f"{prefix}_adapter_params_per_seed": {f"seed{r['seed']}": r["adapter_params"] for r in rows},
        f"{prefix}_seconds": statistics.fmean(r["seconds"] for r in rows),
        f"{prefix}_lr": rows[0]["lr"],
    }


def summarise(results: list[dict[str, Any]], metric: str = "accuracy") -> dict[str, dict[str, dict[str, float]]]:
    """``{tag: {task: mean_std(metric over seeds)}}``."""
    table: dict[str, dict[str, list[float]]] = {}
    for r in results:
        table.setdefault(r["tag"] or r["method"], {}).setdefault(r["task"], []).append(100.0 * r[metric])
    return {tag: {task: mean_std(v) for task, v in tasks.items()} for tag, tasks in table.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one GLUE fine-tuning run with MiniLM")
    p.add_argument("--method", default="lora")
    p.add_argument("--task", default="rte")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kwargs", default="{}", help="method config as JSON, e.g. '{\"r\": 8}'")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--holdout", action="store_true")
    p.add_argument("--eval-ranks", type=int, nargs="*", default=None, help="also score at these ranks (DyLoRA)")
    args = p.parse_args(argv)
    run = GlueRun(args.method, args.task, args.seed, json.loads(args.kwargs), lr=args.lr, epochs=args.epochs,
                  steps=args.steps, holdout=args.holdout, max_samples=args.max_samples,
                  max_eval_samples=args.max_eval_samples, eval_ranks=args.eval_ranks)
    with _quiet():
        print(json.dumps(train_glue(run), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
