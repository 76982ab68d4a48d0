"""User-facing paths found wanting in an audit: `lightning-lora train` with a config-group option or an
option key that does not exist, PEFT LoRA directories whose options change what the adapter computes,
and an AdapterCallback asked for one adapter on a module that already carries another."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import peft
import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.state import CONFIG_NAME
from lightning_lora.train import ConfigError, _check_composes, config_dir, run

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = "mrpc_lora, shakespeare_lora, smoke, sst2_lora"


# ---- lightning-lora train: config-group options ----------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # `experiment` is `optional` in the defaults list: Hydra skipped a missing one without a word
        (["experiment=sst2_lroa"], f"Could not find 'experiment/sst2_lroa'; available options in 'experiment': {EXPERIMENTS}"),
        (["+experiment=nope"], f"Could not find 'experiment/nope'; available options in 'experiment': {EXPERIMENTS}"),
        (["-m", "experiment=smoke,nope"], f"Could not find 'experiment/nope'; available options in 'experiment': {EXPERIMENTS}"),
        # a required group: Hydra's list of options was on lines the one-line error dropped
        (["adapter=lorra"], "Could not find 'adapter/lorra'; available options in 'adapter': allora, bat, bone, dora,"),
        (["model=nope"], "Could not find 'model/nope'; available options in 'model': minilm, smollm2, tiny_bert, tiny_llama"),
    ],
)
def test_a_missing_group_option_fails_listing_the_options(overrides, message):
    with pytest.raises(ConfigError) as exc:
        _check_composes(config_dir(), "config", overrides)
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides", [["experiment=smoke", "model=tiny_bert"], ["-m", "adapter=lora,dora", "adapter.r=4,8"],
                                       ["-m", "adapter=glob(*)"], ["--cfg", "job"], ["--help"]])
def test_existing_group_options_and_hydra_flags_pass(overrides, capsys):
    _check_composes(config_dir(), "config", overrides)
    assert capsys.readouterr().err == ""  # nothing printed (argparse's usage on a flag it parses)


def test_a_missing_experiment_does_not_train(train_cli, tmp_path):
    """Before: exit 0 after training the default config; now: one line, exit 2, nothing trained."""
    rc, _, err = train_cli("train", "experiment=smokee", "model=tiny_bert", "data.max_samples=32",
                           "data.max_eval_samples=16", "trainer.max_steps=1")
    assert rc == 2, err[-2000:]
    assert err.strip() == ("lightning-lora: error: Could not find 'experiment/smokee'; available options in "
                           f"'experiment': {EXPERIMENTS}")
    assert not list(tmp_path.glob("outputs/*/*/logs"))


# ---- lightning-lora train: option keys the run passes on as keyword arguments -----------------------
def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", "model=tiny_bert", *overrides])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.max_step=3", r"^trainer: unknown option\(s\) \['max_step'\]; known: \[.*'max_steps'"),
        ("+optim.learning_rate=0.1", r"^optim: unknown option\(s\) \['learning_rate'\]; known: \['betas', 'head_lr', 'lr',"),
        ("+model.kwargs.hidden=64", r"^model=tiny_bert kwargs: unknown option\(s\) \['hidden'\]; known: \['hidden_size',"),
        ("trainer.devices=0", r"^trainer: `Trainer\(devices=0\)` value is not a valid input"),
        ("trainer.precision=17", r"^trainer: Precision .*17.* is invalid"),
    ],
)
def test_unknown_or_invalid_run_options_are_config_errors(override, message):
    """Each was a TypeError / MisconfigurationException traceback with exit status 1."""
    with pytest.raises(ConfigError, match=message):
        run(_compose(override))


# ---- PEFT LoRA directories with options that change what the adapter computes -----------------------
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def _snapshot(model: nn.Module):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # Activated LoRA: PEFT adapts only the tokens after the invocation sequence; loaded as plain
        # LoRA every token was adapted (outputs 0.5 off PEFT's), without a word
        (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens=[5, 6] (Activated LoRA"),
        # PiSSA / OLoRA: PEFT rebuilds the residual base weight on load; plain LoRA on the original
        # base was 1e-2 off PEFT's outputs, without a word
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' (PEFT rewrites the base weight"),
        (dict(init_lora_weights="olora"), "init_lora_weights='olora' (PEFT rewrites the base weight"),
        # these failed on an "unexpected" tensor key that did not say why
        (dict(lora_bias=True), "lora_bias=True (lora_B has a bias)"),
        (dict(trainable_token_indices=[1, 2]), "trainable_token_indices=[1, 2]"),
        (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication=[[0, 2], [1, 2]]"),
    ],
)
def test_peft_lora_options_that_change_the_function_fail_clearly(tmp_path, options, message):
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **options))
    theirs.save_pretrained(str(tmp_path / "p"))
    model = _llama()
    names, params = _snapshot(model)
    with pytest.raises(ll.AdapterFormatError) as exc:
        ll.load_adapter(model, tmp_path / "p")
    text = str(exc.value)
    assert text.startswith(f"{tmp_path / 'p' / CONFIG_NAME}: PEFT LoRA option(s) lightning_lora does not support: "), text
    assert message in text and "\n" not in text
    after_names, after_params = _snapshot(model)
    assert after_names == names and all(torch.equal(params[n], after_params[n]) for n in params)


def test_plain_peft_options_still_load(tmp_path):
    """Options that do not change the function (a non-default dropout, gaussian init, QA-LoRA's flag on
    a plain Linear base, which PEFT ignores there) load and give PEFT's outputs."""
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, init_lora_weights="gaussian",
                          use_qalora=True, qalora_group_size=8)
    theirs = peft.get_peft_model(_llama(), cfg).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    theirs.save_pretrained(str(tmp_path / "p"))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    ours = ll.load_adapter(_llama(), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


# ---- AdapterCallback on a module that already carries an adapter of the same method ----------------
class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def validation_step(self, *args):
        pass


def test_callback_refuses_a_preinjected_adapter_with_another_config():
    """Before: the callback adopted the existing adapter (r=2 on fc1) and trained it in place of the
    one asked for (r=4 on fc1 and fc2), without a word."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=None, is_global_zero=True)
    module = _Module()
    ll.inject_adapter(module, "lora", r=2, target_modules=["fc1"])
    cb = ll.AdapterCallback("lora", r=4, target_modules=["fc1", "fc2"])
    with pytest.raises(RuntimeError, match=r"another config: r=2 \(callback: 4\), target_modules=\['fc1'\] "
                                           r"\(callback: \['fc1', 'fc2'\]\)"):
        cb.setup(trainer, module, "fit")
    # the same config (given with a class in target_types, kept by name) is adopted, as before
    same = _Module()
    ll.inject_adapter(same, "lora", r=2, target_modules=["fc1"], target_types=(nn.Conv2d,))
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc1"], target_types=("Conv2d",))
    cb.setup(trainer, same, "fit")
    assert cb.method is ll.get_adapter_method(same) and set(cb.layers) == {"fc1"}
    cb.setup(trainer, same, "validate")  # its own adapter on a later stage: no comparison needed
    # the same targets in another order (PEFT writes target_modules from a set) are the same config
    reordered = _Module()
    ll.inject_adapter(reordered, "lora", r=2, target_modules=["fc2", "fc1"])
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc1", "fc2"])
    cb.setup(trainer, reordered, "fit")
    assert cb.method is ll.get_adapter_method(reordered)


# ---- AdapterCallback on a submodule wrapped by torch.compile (README: compile under DDP) -------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class _Compiled(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # the eager backend: dynamo wraps and traces, no C++ compiler needed
        self.net = torch.compile(_Net(), backend="eager")

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(ll.trainable_parameters(self), lr=0.5)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_export_from_a_compiled_submodule_loads_into_the_plain_model(tmp_path):
    """Before: the exported keys and target_modules began with ``_orig_mod.`` (the compile wrapper's
    attribute), so neither PEFT nor load_adapter could put the adapter on the uncompiled model."""
    from safetensors import safe_open
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=4)
    module = _Compiled()
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc1", "fc2"], target="net", export_dir=tmp_path / "a")
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, callbacks=[cb]).fit(module, data)
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    assert keys == [f"base_model.model.{m}.lora_{t}.weight" for m in ("fc1", "fc2") for t in "AB"]
    x = torch.randn(5, 8, generator=g)
    with torch.no_grad():
        y = module.net(x)
        assert (y - _Net()(x)).abs().max() > 1e-4  # the adapter trained: the comparison below means something
        torch.testing.assert_close(ll.load_adapter(_Net(), tmp_path / "a")(x), y, atol=1e-6, rtol=0)
        theirs = peft.PeftModel.from_pretrained(_Net(), str(tmp_path / "a"))
        torch.testing.assert_close(theirs(x), y, atol=1e-6, rtol=0)


class _Plain(_Compiled):
    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = _Net()


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.parametrize("trained_cls, fresh_cls", [(_Compiled, _Plain), (_Plain, _Compiled)],
                         ids=["compiled_into_plain", "plain_into_compiled"])
def test_a_checkpoint_loads_across_the_compile_wrapper(tmp_path, trained_cls, fresh_cls):
    """A checkpoint of a module whose submodule was compiled has ``net._orig_mod.fc1...`` keys (the
    LightningModule's state dict goes through the wrapper); before, loading it into the plain module
    (or a plain checkpoint into a compiled one) failed on missing and unexpected keys."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=4)
    trained = trained_cls()
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc1", "fc2"], target="net")
    mc = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[cb, mc]).fit(trained, data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert any("_orig_mod" in k for k in saved) == (trained_cls is _Compiled)
    fresh = ll.load_adapter_checkpoint(fresh_cls(), tmp_path / "last.ckpt", target="net")
    # the adapter was injected into the module the wrapper runs, its layers named as in the plain model
    plain = fresh.net._orig_mod if fresh_cls is _Compiled else fresh.net
    assert ll.get_adapter_method(plain) is not None and sorted(ll.adapter_layers(plain)) == ["fc1", "fc2"]
    x = torch.randn(5, 8, generator=g)
    with torch.no_grad():
        y = trained.net(x)
        assert (y - _Net()(x)).abs().max() > 1e-4  # the adapter trained
        # under the compiler the layers take their plain formula, eagerly the fused one: not bit for bit
        torch.testing.assert_close(fresh.net(x), y, atol=1e-6, rtol=0)


def test_a_misspelt_tiny_llama_kwarg_is_a_config_error():
    """The causal-LM loaders took ``**kwargs`` (so that a classification request reached their task
    check), which swallowed any key: ``+model.kwargs.hiden_size=64`` trained the default width."""
    from lightning_lora.tasks import MODELS
    from lightning_lora.train import check_options

    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['hiden_size'\]"):
        check_options(MODELS["tiny_llama"], {"hiden_size": 64}, "model=tiny_llama kwargs", skip=("task", "num_labels"))
    with pytest.raises(ValueError, match="supports task 'causal_lm' only"):
        MODELS["tiny_llama"](task="classification", num_labels=2)
