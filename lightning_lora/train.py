"""``lightning-lora train``: Hydra entry point for experiments.

    lightning-lora train experiment=sst2_lora adapter=lora adapter.r=16 trainer=gpu
    lightning-lora train -m experiment=sst2_lora adapter=lora,dora        # Hydra multirun
    lightning-lora train experiment=smoke results_name=smoke              # + benchmarks/results/smoke.json
    lightning-lora train --cfg job                                        # print the composed config

The first word selects the command (only ``train`` exists); everything after it is Hydra's.

Configs: the canonical files are the repository's top-level ``conf/`` (config groups
``adapter/ model/ data/ trainer/ experiment/``). A wheel carries a copy as package data,
``lightning_lora/conf/``, put there at build time by ``setup.py`` (so ``pip install .`` works
without a checkout). Lookup order: ``$LIGHTNING_LORA_CONF``, the checkout's ``conf/``, the
installed copy.

One run: build the adapter callback (an unknown method fails here, before any weights load),
load the base model, build the data module and the LightningModule, ``fit``, then evaluate:
the final model on validation, or (``select_best``, tasks with a labelled test split) the best
validation checkpoint on test. Outputs (logs, checkpoints) go to Hydra's run directory.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

USAGE = """usage: lightning-lora train [HYDRA OVERRIDES ...]

  lightning-lora train experiment=sst2_lora adapter=lora adapter.r=16 trainer=gpu
  lightning-lora train -m experiment=sst2_lora adapter=lora,dora    (multirun)
  lightning-lora train --help                                        (config groups and options)
"""

COMMANDS = ("train",)


class ConfigError(Exception):
    """A configuration the run cannot start with; reported as one line, exit status 2."""


def config_dir() -> Path:
    """Folder of ``config.yaml``: ``$LIGHTNING_LORA_CONF``, the checkout's ``conf/``, or the installed copy."""
    candidates = []
    if os.environ.get("LIGHTNING_LORA_CONF"):
        candidates.append(Path(os.environ["LIGHTNING_LORA_CONF"]))
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "conf", here / "conf"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise ConfigError(f"no config.yaml in {', '.join(map(str, candidates))}; reinstall lightning-lora")


# ---- building the pieces ---------------------------------------------------------------------------
def _container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def check_required(node: Any, group: str) -> None:
    """Raise ``ValueError`` naming every ``???`` (no default, e.g. ALLoRA's ``eta``) left in config
    group ``group``, with the override that sets it. Shared by ``lightning-lora`` and ``lncrna``."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(node):
        return
    # OmegaConf names a key by its full path when the node is part of a larger config
    missing = sorted(k.removeprefix(f"{group}.") for k in OmegaConf.missing_keys(node))
    if missing:
        given = " ".join(f"{group}.{k}=<value>" for k in missing)
        raise ValueError(f"{group}: {', '.join(missing)} has no default and must be given: {given}")


def build_adapter_callback(cfg: Any, export_dir: str | None = None):
    """``AdapterCallback`` from ``cfg.adapter``; ``target_modules`` / ``modules_to_save`` left null
    take the model's defaults (``cfg.model``)."""
    from .callback import AdapterCallback

    try:
        check_required(cfg.adapter, "adapter")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    options = dict(_container(cfg.adapter))
    method = options.pop("method", None)
    if not method:
        raise ConfigError("the adapter config has no 'method' (e.g. adapter=lora, or adapter.method=lora)")
    for key in ("target_modules", "modules_to_save"):
        if options.get(key) is None:
            default = _container(cfg.model).get(key)
            if default is None:
                options.pop(key, None)
            else:
                options[key] = default
    try:
        return AdapterCallback(method, target="model", export_dir=export_dir, **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"adapter: {e}") from None


class InjectionErrorsAsConfigErrors:
    """``AdapterCallback.setup`` for the CLI: a ``ValueError`` / ``TypeError`` that leaves the model
    without an adapter (the injection refused it: no module matches ``target_modules``, a rank the
    layer shapes do not allow, a module type the method cannot adapt) becomes a :class:`ConfigError`,
    so it is reported as one line, exit status 2, like the config errors found before the model loads.
    The injection itself runs where it always did (in ``trainer.fit``'s setup, same RNG state); errors
    raised after a successful injection pass through unchanged. A module-level class, not a closure,
    so the callback still pickles (``ddp_spawn``)."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def __call__(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from .core import get_adapter_method

        cb = self.callback
        module = cb.target_module(pl_module)
        fresh = get_adapter_method(module) is None
        try:
            type(cb).setup(cb, trainer, pl_module, stage)
        except (ValueError, TypeError) as e:
            if fresh and get_adapter_method(module) is None:  # not injected: the adapter config's fault
                raise ConfigError(f"adapter: {e}") from None
            raise


def check_options(fn: Any, options: dict[str, Any], what: str, skip: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` naming every key of ``options`` that ``fn`` (a function or class) has
    no parameter for, with the ones it has (``skip``: those the caller fills itself). Checked before
    the call, so that a typo added with ``+group.key=...`` is one line, exit status 2, and not a
    ``TypeError`` traceback from inside the run, while a ``TypeError`` the call itself raises keeps its
    traceback. A ``fn`` that takes ``**kwargs`` accepts any key."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if n not in skip and n != "self"
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {unknown}; known: {sorted(known)}")


def build_datamodule(data_cfg: dict[str, Any], tokenizer: Any, seed: int):
    from .tasks import DATAMODULES

    options = {k: v for k, v in data_cfg.items() if k not in ("name", "task_type", "eval_wikitext2")}
    name = data_cfg.get("name")
    if name not in DATAMODULES:
        raise ConfigError(f"unknown data set {name!r}; available: {', '.join(sorted(DATAMODULES))}")
    try:
        return DATAMODULES[name](tokenizer, seed=seed, **options)
    except TypeError as e:
        raise ConfigError(f"data={name}: {e}") from None


def build_module(task_type: str, model: Any, datamodule: Any, optim: dict[str, Any]):
    from .tasks import CausalLM, SequenceClassifier

    if task_type == "classification":
        return SequenceClassifier(model, num_labels=datamodule.num_labels, metrics=datamodule.metrics, **optim)
    if task_type == "causal_lm":
        return CausalLM(model, **optim)
    raise ConfigError(f"unknown data.task_type {task_type!r}; expected 'classification' or 'causal_lm'")


def run(cfg: Any, command: str | None = None) -> dict[str, float]:
    """Train and evaluate one composed config; returns the flat metrics (also written if ``results_name``)."""
    import lightning.pytorch as pl
    import torch
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .results import write_result
    from .tasks import CausalLM, ModelPackageMissing, SequenceClassifier, WikiText2DataModule, load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    try:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra
        out_dir = Path("outputs")
    data_cfg = dict(_container(cfg.data))
    task_type = data_cfg.get("task_type", "classification")

    # 1. config-only checks first: nothing heavy has happened if these fail
    callback = build_adapter_callback(cfg, export_dir=cfg.get("export_adapter"))
    # errors the injection finds (it needs the model) are config errors too: one line, exit 2
    callback.setup = InjectionErrorsAsConfigErrors(callback)
    optim = dict(_container(cfg.optim))
    module_cls = {"classification": SequenceClassifier, "causal_lm": CausalLM}.get(task_type)
    if module_cls is not None:  # another task_type is build_module's error
        check_options(module_cls.__init__, optim, "optim", skip=("model", "num_labels", "metrics"))
    trainer_kwargs = dict(_container(cfg.trainer))
    # the run sets these four itself
    check_options(pl.Trainer.__init__, trainer_kwargs, "trainer",
                  skip=("default_root_dir", "callbacks", "enable_checkpointing", "logger"))

    # 2. model, data, module
    pl.seed_everything(int(cfg.seed), workers=True)
    model_cfg = _container(cfg.model)
    try:
        from .tasks import MODELS, TASKS

        num_labels = TASKS[data_cfg["name"]].num_labels if data_cfg.get("name") in TASKS else None
        if model_cfg.get("name") in MODELS:  # an unknown name is load_model's ValueError below
            check_options(MODELS[model_cfg["name"]], model_cfg.get("kwargs", {}), f"model={model_cfg['name']} kwargs",
                          skip=("task", "num_labels"))
        model, tokenizer = load_model(model_cfg["name"], task=task_type, num_labels=num_labels,
                                      **model_cfg.get("kwargs", {}))
    except ModelPackageMissing as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(f"model={model_cfg.get('name')}: {e}") from None
    datamodule = build_datamodule(data_cfg, tokenizer, int(cfg.seed))
    module = build_module(task_type, model, datamodule, optim)

    # 3. trainer
    select = cfg.get("select_best", "auto")
    select_best = bool(datamodule.has_test) if select == "auto" else bool(select)
    higher_is_better = datamodule.monitor != "loss"
    callbacks: list[Any] = [callback]
    checkpoint: ModelCheckpoint | None = None
    if select_best:
        checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", monitor=f"val_{datamodule.monitor}",
                                     mode="max" if higher_is_better else "min", save_top_k=1, save_last=False)
        callbacks.append(checkpoint)
    try:
        trainer = pl.Trainer(default_root_dir=str(out_dir), callbacks=callbacks, enable_checkpointing=select_best,
                             logger=CSVLogger(str(out_dir), name="logs"), **trainer_kwargs)
    except (MisconfigurationException, ValueError, TypeError) as e:  # how the Trainer refuses a bad argument
        # value (trainer=gpu on a machine without one, precision=..., devices=0): the config's fault
        raise ConfigError(f"trainer: {e}") from None

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start

    # 4. evaluation
    metrics: dict[str, float] = {}
    ckpt = "best" if select_best else None
    if checkpoint is not None and not checkpoint.best_model_path:
        # no validation ran inside fit (max_steps ended it before the first one, limit_val_batches=0,
        # check_val_every_n_epoch > max_epochs), so none was kept: Lightning's "best" raised after the
        # whole training; the final model is the one candidate left
        print("lightning-lora: warning: select_best: no validation ran during fit, so no checkpoint was kept; "
              "evaluating the final model", file=sys.stderr, flush=True)
        ckpt = None
    (val,) = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    metrics.update({k: float(v) for k, v in val.items()})
    if datamodule.has_test:
        (test,) = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics.update({k: float(v) for k, v in test.items()})
    if task_type == "causal_lm" and data_cfg.get("eval_wikitext2"):
        wt2 = WikiText2DataModule(tokenizer, block_size=data_cfg.get("block_size", 256),
                                  eval_batch_size=data_cfg.get("eval_batch_size"),
                                  max_eval_samples=data_cfg.get("max_eval_samples"), seed=int(cfg.seed))
        (test,) = trainer.test(module, datamodule=wt2, verbose=False)
        metrics.update({f"wikitext2_{k}": float(v) for k, v in test.items()})
    metrics.update(
        steps=int(trainer.global_step),
        train_seconds=seconds,
        trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
    )
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    summary = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))
    print(f"lightning-lora: {summary}", flush=True)
    if cfg.get("results_name"):
        path = write_result(str(cfg.results_name), metrics, command=command)
        print(f"lightning-lora: wrote {path}", flush=True)
    return metrics


# ---- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Console script ``lightning-lora``. ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"lightning-lora: error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}\n{USAGE}",
              file=sys.stderr, end="")
        return 2
    command = shlex.join(["lightning-lora", *args])
    try:
        conf = config_dir()
    except ConfigError as e:
        print(f"lightning-lora: error: {e}", file=sys.stderr)
        return 2

    def task(cfg: Any) -> float | None:
        from .tasks.paths import DataNotFound

        try:
            metrics = run(cfg, command=command)
        except (ConfigError, DataNotFound) as e:
            # DataNotFound: an installed copy has no data/nlp/; say where to point it, not a traceback
            discard_hydra_run_dir()  # a refused run leaves no folder behind (as lncrna's and federated's)
            print(f"lightning-lora: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        # a number for Hydra sweepers (Optuna etc.): the monitored validation metric
        from .tasks import TASKS

        spec = TASKS.get(cfg.data.get("name"))
        return metrics.get(f"val_{spec.monitor}") if spec is not None else metrics.get("val_loss")

    try:
        run_hydra(task, conf, "config", sys.argv[0] if sys.argv else "lightning-lora", args[1:])
    except ConfigError as e:
        print(f"lightning-lora: error: {e}", file=sys.stderr)
        return 2
    return 0


def _group_choices(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """``(group, options named)`` for every override that selects config-group options
    (``experiment=smoke``, ``+experiment=smoke``, ``-m adapter=lora,dora``), Hydra's own flags
    (``-m``, ``--cfg job``) set aside. Whether a key is a group is decided by the caller. Globs,
    ranges, deletions and ``null`` name no option; a command line Hydra cannot parse gives ``[]``
    (Hydra reports it)."""
    # Hydra's own command-line parser (a private module; hydra-core 1.3): if it changes, this returns []
    # and the group check goes quiet, which test_user_path_hardening's missing-option tests catch
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    def refuse(message: str) -> None:  # argparse would print its usage and exit; Hydra reports it
        raise ValueError(message)

    parser = get_args_parser()
    parser.error = refuse  # type: ignore[method-assign]
    try:
        parsed = OverridesParser.create().parse_overrides(parser.parse_args(overrides).overrides)
    except Exception:  # a bad flag or a malformed override: Hydra reports it
        return []
    out: list[tuple[str, list[str]]] = []
    for o in parsed:
        if o.is_delete():
            continue
        if o.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            values = list(o.sweep_string_iterator())
        elif o.value_type == ValueType.ELEMENT:
            value = o.value()
            values = [str(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
        else:
            continue
        out.append((o.key_or_group, values))
    return out


def _check_group_options(loader: Any, overrides: list[str]) -> None:
    """Raise :class:`ConfigError` when an override names a config-group option that does not exist,
    listing the group's options. Hydra's own report of a missing option spreads the list over lines
    that a one-line error drops, and for a group the defaults list marks ``optional``
    (``experiment``) Hydra skips a missing option without a word: ``experiment=sst2_lroa`` trained
    the default model on the default data set."""
    for group, values in _group_choices(overrides):
        options = loader.get_group_options(group)
        if not options:  # not a config group (a value override such as adapter.r=16)
            continue
        missing = [v for v in values if v not in options]
        if missing:
            raise ConfigError(f"Could not find '{group}/{missing[0]}'; available options in '{group}': "
                              f"{', '.join(options)}")


def _check_composes(conf: Path, config_name: str, overrides: list[str]) -> None:
    """Compose the config once before the run, so that an override Hydra cannot apply (an unknown
    key, a missing group option) is a :class:`ConfigError` (one line, exit status 2) rather than
    Hydra's report and exit status 1. Group options are checked for every run (sweeps too:
    :func:`_check_group_options`); the whole composition only for runs without Hydra's own flags
    (``-m``, ``--cfg``, ``--help``), which are left to Hydra: sweeps are not single configs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            _check_group_options(GlobalHydra.instance().config_loader(), overrides)
            if not any(o.startswith("-") for o in overrides):
                compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition and override-parsing errors, OmegaConf's
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(" ".join(lines[:2]) or type(e).__name__) from None


def discard_hydra_run_dir() -> None:
    """Inside a Hydra task: remove the run's folder (``runs/.../<time>``) when it holds only what Hydra
    wrote into it before the task started (``.hydra/``, the job's log), so that a run refused with a
    one-line error leaves no folder behind, while one holding any output of the run is kept."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
    except ValueError:  # not under Hydra
        return
    run_dir = Path(hc.runtime.output_dir)
    hydras_own = {str(hc.output_subdir), f"{hc.job.name}.log"}
    if run_dir.is_dir() and all(p.name in hydras_own for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def run_hydra(task: Any, conf: Path, config_name: str, prog: str, overrides: list[str]) -> None:
    """Run ``task(cfg)`` as a Hydra app over ``conf/<config_name>.yaml`` with ``overrides`` (and
    Hydra's own flags such as ``-m``). Hydra reads them from ``sys.argv``, so it is swapped for the
    call and restored after. Used by ``lightning-lora``, ``lncrna`` and ``lightning_lora.federated``."""
    import hydra

    _check_composes(conf, config_name, overrides)
    saved = sys.argv
    sys.argv = [prog, *overrides]
    try:
        hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)(task)()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
