"""Audit of less-travelled user paths of merge, named adapters, federated, transfer and LQ-LoRA
quantization: bad arguments fail early with one clear line naming the argument, never as a deep
error or a silently wrong result, and a failed call leaves nothing half-done."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora import transfer as tr
from lightning_lora.core import multi
from lightning_lora.core.state import AdapterFormatError
from lightning_lora.merge import baselines as mb
from lightning_lora.merge import lego
from lightning_lora.methods import lq_lora


# ---- merge ------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def _two_adapters() -> nn.Module:
    m = _mlp()
    multi.add_adapter(m, "a", "lora", r=2, target_modules=["0", "2"])
    multi.add_adapter(m, "b", "lora", r=3, target_modules=["0", "4"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("a", "b"):
            for layer in multi.named_adapter_layers(m, name).values():
                layer.lora_B.normal_(generator=g)
    return m


@pytest.mark.parametrize("merge", [
    lambda m: mb.merge_task_arithmetic(m, "ab", "out"),
    lambda m: mb.merge_task_arithmetic(m, "ab", "out", rank=2),
    lambda m: mb.merge_concat(m, "ab", "out"),
    lambda m: mb.merge_ties(m, "ab", "out"),
    lambda m: lego.lego_merge_adapters(m, "ab", "out"),
])
def test_sources_given_as_one_string_are_refused_not_read_as_characters(merge):
    """``"ab"`` silently merged the adapters ``a`` and ``b`` (a string is a sequence of names)."""
    m = _two_adapters()
    with pytest.raises(TypeError, match="sources must be a list of adapter names"):
        merge(m)
    assert multi.adapter_names(m) == ["a", "b"]


def test_non_finite_or_string_merge_weights_and_lam_are_refused():
    m = _two_adapters()
    with pytest.raises(ValueError, match=r"weights\[0\] must be a finite number"):  # gave an all-NaN adapter
        mb.merge_task_arithmetic(m, ["a", "b"], "nan_w", weights=[float("nan"), 1.0])
    with pytest.raises(TypeError, match="weights must be a sequence of numbers"):  # "12" read as [1.0, 2.0]
        mb.merge_task_arithmetic(m, ["a", "b"], "str_w", weights="12")
    with pytest.raises(ValueError, match="lam must be a finite number"):  # failed inside torch.linalg.svd
        mb.merge_ties(m, ["a", "b"], "nan_lam", lam=float("nan"))
    assert multi.adapter_names(m) == ["a", "b"]
    # weights as a tensor (or 0-d tensors) are numbers: the same merge as the list
    mb.merge_task_arithmetic(m, ["a", "b"], "t_w", weights=torch.tensor([0.3, 0.7]))
    mb.merge_task_arithmetic(m, ["a", "b"], "l_w", weights=[0.3, 0.7])
    mb.merge_task_arithmetic(m, ["a", "b"], "scalar_w", weights=[torch.tensor(0.3), torch.tensor(0.7)])
    deltas = {n: [layer.delta_weight() for layer in multi.named_adapter_layers(m, n).values()]
              for n in ("t_w", "l_w", "scalar_w")}
    for other in ("t_w", "scalar_w"):
        assert all(torch.equal(x, y) for x, y in zip(deltas[other], deltas["l_w"]))


@pytest.mark.parametrize("k", [2.5, 4.0, True])
def test_lego_k_must_be_an_int(k):
    """2.5 failed in ``range``/``torch.zeros``; True passed the range check as 1, then failed deep."""
    m = _two_adapters()
    with pytest.raises(ValueError, match=r"k \(the merged rank\) must be a whole number"):
        lego.lego_merge_adapters(m, ["a", "b"], "out", k=k)
    loras = [mb.lora_factors(layer) for layer in multi.named_adapter_layers(m, "a").values()][:1]
    with pytest.raises(ValueError, match=r"k \(the merged rank\) must be a whole number"):
        lego.lego_merge(loras, k=k)
    assert multi.adapter_names(m) == ["a", "b"]


def test_merge_rank_must_be_an_int():
    m = _two_adapters()
    for merge in (mb.merge_task_arithmetic, mb.merge_ties):
        with pytest.raises(ValueError, match="rank must be a whole number"):
            merge(m, ["a", "b"], "out", rank=2.5)
    assert multi.adapter_names(m) == ["a", "b"]


def test_lego_option_names_are_checked_before_the_merge_without_a_layer_prefix():
    m = _two_adapters()
    with pytest.raises(ValueError, match=r"^folding must be one of"):
        lego.lego_merge_adapters(m, ["a", "b"], "out", folding="zz")


@pytest.mark.parametrize("names", [None, 3, ["a", 3]])
def test_set_adapter_with_a_non_name_says_so(names):
    m = _two_adapters()
    with pytest.raises(TypeError, match="adapter names must be"):
        multi.set_adapter(m, names)
    assert multi.active_adapters(m) == ["a"]


# ---- loading several adapters: all or nothing -------------------------------------------------
def test_load_adapters_with_a_missing_name_loads_nothing_and_lists_what_is_there(tmp_path):
    multi.save_adapters(_two_adapters(), tmp_path)
    fresh = _mlp()
    with pytest.raises(AdapterFormatError, match=r"no saved adapter \['zz'\].*found: \['a', 'b'\]"):
        multi.load_adapters(fresh, tmp_path, names=["b", "zz"])
    assert multi.adapter_names(fresh) == []  # "b" used to stay loaded
    assert not multi.multi_layers(fresh)


def test_load_adapters_failing_late_removes_the_ones_it_loaded_and_restores_a_single_adapter(tmp_path):
    """A later adapter that does not fit the model (it targets module 4, which the smaller model
    lacks) must not leave the earlier ones in, nor the injected adapter converted to "default"."""
    multi.save_adapters(_two_adapters(), tmp_path)
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    ll.inject_adapter(small, "lora", r=2, target_modules=["0"])
    with torch.no_grad():
        small[0].lora_B.normal_()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = small(x)
    trainable = [n for n, p in small.named_parameters() if p.requires_grad]
    with pytest.raises(AdapterFormatError):
        multi.load_adapters(small, tmp_path, names=["a", "b"])
    assert multi.adapter_names(small) == [] and ll.get_adapter_method(small) is not None
    assert [n for n, p in small.named_parameters() if p.requires_grad] == trainable
    with torch.no_grad():
        torch.testing.assert_close(small(x), before, rtol=0, atol=0)
    # and a multi-adapter model keeps its adapters and active set
    other = _mlp()
    multi.add_adapter(other, "b", "lora", r=3, target_modules=["0"])
    with pytest.raises(AdapterFormatError, match="already exists"):
        multi.load_adapters(other, tmp_path, names=["a", "b"])
    assert multi.adapter_names(other) == ["b"] and multi.active_adapters(other) == ["b"]


# ---- federated command line ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["method=bogus"], "federated method must be one of"),
    (["num_clients=0"], "num_clients must be >= 1"),
    (["num_clients=2.5"], "num_clients must be a whole number"),
    (["dp.enabled=true", "dp.epsilon=-1"], "DP needs epsilon > 0"),
    (["dp.enabled=true", "dp.epsilon=nan"], "epsilon must be a finite number"),
    (["dp.enabled=true", "dp.epsilon=abc"], "epsilon must be a finite number"),
    (["eval_every=-1"], "eval_every must be >= 0"),
    (["min_client_size=0"], "min_client_size must be >= 1"),
    (["dirichlet_alpha=0"], "dirichlet_alpha must be > 0"),
    (["local.local_steps=1.5"], "local.local_steps must be a whole number"),
    (["device=tpu"], "device must be"),
])
def test_federated_cli_bad_options_are_one_line_errors_and_leave_no_run_folder(tmp_path, capsys, overrides, message):
    from lightning_lora.federated.__main__ import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["simulate", *overrides, f"hydra.run.dir={run_dir}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not run_dir.exists()  # Hydra's .hydra/ and log are removed with the refused run


def test_federated_cli_without_flower_names_the_pip_command(tmp_path, capsys, monkeypatch):
    import lightning_lora.federated as fed

    monkeypatch.setitem(sys.modules, "flwr", None)  # "import flwr" raises ImportError(name="flwr")
    for mod in ("simulation", "client", "strategy"):
        monkeypatch.delitem(sys.modules, f"lightning_lora.federated.{mod}", raising=False)
        monkeypatch.delattr(fed, mod, raising=False)
    from lightning_lora.federated.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["simulate", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'lightning-lora[federated]'" in err and "Traceback" not in err


# ---- transfer -----------------------------------------------------------------------------------
def _tokenizer():
    from lightning_lora.tasks import load_tiny_bert

    return load_tiny_bert(num_labels=2, seed=0)


@pytest.mark.parametrize("template, message", [
    ("Review:\nSentiment:", r"has no \{text\} field"),  # every input encoded to the same prompt
    ("{text} {label}", r"field\(s\) \['label'\]"),
    ("{0}", r"field\(s\) \['0'\]"),
    ("{text} {", "not a valid format string"),
])
def test_hf_text_encoder_checks_the_template_when_built(template, message):
    _, tok = _tokenizer()
    with pytest.raises(ValueError, match=message):
        tr.hf_text_encoder(tok, template=template)
    enc = tr.hf_text_encoder(tok, template="{{x}} {text}")  # escaped braces stay allowed
    assert enc(["good"])["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="max_length must be (a whole number|>= 1)"):
        tr.hf_text_encoder(tok, max_length=0)


def test_text_classifier_refuses_one_string():
    model, tok = _tokenizer()
    clf = tr.TextClassifier(model, tr.hf_text_encoder(tok))
    with pytest.raises(TypeError, match="wrap it in a list"):  # gave one row per character
        clf("good movie")


def _pair(num_student_labels: int = 2):
    from lightning_lora.tasks import load_tiny_bert

    out = []
    for seed, labels in ((0, 2), (1, num_student_labels)):
        model, tok = load_tiny_bert(num_labels=labels, seed=seed)
        ll.inject_adapter(model, "lora", r=2, target_modules=["query"], modules_to_save=["classifier"])
        out.append(tr.TextClassifier(model, tr.hf_text_encoder(tok, max_length=16)))
    return out


class _Refuse:
    """A generator that must never be called: argument errors come before generation."""

    def __call__(self, seeds, n, r):
        raise AssertionError("generated before the arguments were checked")


def _disc(n_out: int) -> tr.TextClassifier:
    return tr.TextClassifier(nn.Linear(1, n_out), lambda texts: {"input": torch.ones(len(texts), 1)})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(seed_examples=[]), ValueError, "seed_examples is empty"),
    (dict(seed_examples="good film"), TypeError, "one string"),
    (dict(n_seed=0), ValueError, "n_seed must be"),
    (dict(n_samples=0), ValueError, "n_samples must be"),
    (dict(max_rounds=0), ValueError, "max_rounds must be"),
    (dict(round_size=-1), ValueError, "round_size must be"),
    (dict(threshold=2.0), ValueError, "threshold must be in"),
    (dict(loss="mse"), ValueError, "unknown distillation loss"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(stepz=3), TypeError, r"unknown distillation option\(s\) \['stepz'\]"),
])
def test_transfer_checks_its_arguments_before_generating(kwargs, error, message):
    teacher, student = _pair()
    args = dict(seed_examples=["a good film", "a bad plot"], generate=_Refuse(), discriminator=_disc(2),
                n_samples=4, steps=1)
    args.update(kwargs)
    seeds = args.pop("seed_examples")
    with pytest.raises(error, match=message):
        tr.transfer(teacher, student, seeds, **args)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(instruction=[]), ValueError, "instruction is an empty list"),  # was a ZeroDivisionError
    (dict(seed_texts="abc"), TypeError, "one string"),  # prompted with single letters
    (dict(top_p=2.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(n=2.5), ValueError, "n must be a whole number"),
    (dict(instruction=["x", "y"], demo_pools=["ab", "cd"]), TypeError, "one pool is a string"),
])
def test_generate_synthetic_checks_its_arguments_before_generating(kwargs, error, message):
    args = dict(seed_texts=["a good film"], n=2)
    args.update(kwargs)
    # generator and tokenizer are never touched: the checks come first
    with pytest.raises(error, match=message):
        tr.generate_synthetic(None, None, args.pop("seed_texts"), args.pop("n"), **args)


# ---- LQ-LoRA budgets ----------------------------------------------------------------------------
def _no_decomposition(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decomposed before the budget was checked")

    monkeypatch.setattr(lq_lora, "build_cost_table", refuse)


@pytest.mark.parametrize("budget, message", [
    (1.0, "below the smallest achievable"),
    (-1.0, "below the smallest achievable"),
    (float("nan"), r"budget \(bits per parameter\) must be a finite number"),  # reached HiGHS as a "model error"
    ("3", r"budget \(bits per parameter\) must be a finite number"),  # a numpy ufunc error
])
def test_quantize_model_checks_the_budget_before_decomposing(monkeypatch, budget, message):
    _no_decomposition(monkeypatch)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match=message):
        lq_lora.quantize_model(net, r=2, budget=budget, configs=["nf2", "nf4"], target_modules=["0", "2"])
    assert isinstance(net[0], nn.Linear)


def test_quantize_model_empty_configs_and_unsupported_module_are_named(monkeypatch):
    _no_decomposition(monkeypatch)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="configs is empty"):
        lq_lora.quantize_model(net, r=2, budget=3.0, configs=[], target_modules=["0"])
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(16, 16))
    with pytest.raises(TypeError, match="cannot adapt module '0' of type Conv2d"):
        lq_lora.quantize_model(conv, r=2, budget=3.0, configs=["nf2", "nf4"], target_modules=["0", "1"])
    from lightning_lora.quant import ilp

    table = ilp.CostTable(names=["w"], numels=[4], configs=[], cost=np.zeros((1, 0)),
                          storage=np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(ValueError, match="configs is empty"):  # numpy's zero-size reduction error before
        ilp.solve_ilp(table, 3.0)
