"""Metric code paths against independent references (scikit-learn, hand formulas, GLUE's definitions):
the GLUE metrics as the LightningModules and the benchmark harness accumulate them, causal-LM
loss / perplexity, the lncRNA validation call, and the seed spread a benchmark reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn
from torch.utils.data import DataLoader

from lightning_lora.tasks import CausalLM, classification_metrics

REPO = Path(__file__).resolve().parents[2]


def _accumulate(names, num_labels, pred, true, batch):
    metrics = classification_metrics(names, num_labels)
    for i in range(0, len(true), batch):  # uneven final batch
        metrics.update(torch.as_tensor(pred[i : i + batch]), torch.as_tensor(true[i : i + batch]))
    return {k: float(v) for k, v in metrics.compute().items()}


# CoLA dev has 721 acceptable (1) and 322 unacceptable (0) sentences
COLA = np.array([1] * 721 + [0] * 322)
_rng = np.random.default_rng(0)
MCC_CASES = {
    "cola_all_acceptable": (COLA, np.ones_like(COLA)),  # a model stuck at the majority class
    "cola_all_unacceptable": (COLA, np.zeros_like(COLA)),
    "labels_one_class_all_right": (np.ones(40, int), np.ones(40, int)),
    "labels_one_class_all_wrong": (np.zeros(40, int), np.ones(40, int)),
    "labels_one_class_mixed_calls": (np.ones(40, int), _rng.integers(0, 2, 40)),
    "random": (_rng.integers(0, 2, 501), _rng.integers(0, 2, 501)),
    "perfect": (np.array([0, 1, 1, 0, 1]), np.array([0, 1, 1, 0, 1])),
}


@pytest.mark.parametrize("case", sorted(MCC_CASES))
def test_mcc_is_glues_matthews_corrcoef_also_when_undefined(case):
    true, pred = MCC_CASES[case]
    got = _accumulate(("mcc",), 2, pred, true, batch=64)["mcc"]
    # GLUE scores CoLA with sklearn's matthews_corrcoef, which is 0 when the denominator is 0
    assert got == pytest.approx(matthews_corrcoef(true, pred), abs=1e-6)


def test_mcc_multiclass_matches_sklearn():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, 1000)
    pred = np.where(rng.random(1000) < 0.6, true, rng.integers(0, 3, 1000))
    assert _accumulate(("mcc",), 3, pred, true, batch=97)["mcc"] == pytest.approx(matthews_corrcoef(true, pred),
                                                                                 abs=1e-6)


@pytest.mark.parametrize("case", sorted(MCC_CASES))
def test_accuracy_and_positive_class_f1_match_sklearn(case):
    true, pred = MCC_CASES[case]
    got = _accumulate(("accuracy", "f1"), 2, pred, true, batch=7)
    assert got["accuracy"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)
    # MRPC's F1: positive class 1 (paraphrase), 0 when there is no true or predicted positive
    assert got["f1"] == pytest.approx(f1_score(true, pred, pos_label=1, zero_division=0), abs=1e-6)


class _ConstantClassifier(nn.Module):
    """A ``...ForSequenceClassification`` stand-in whose logits always favour class ``label``."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(input_ids.shape[0], 2) + 0 * self.w
        logits[:, self.label] = 1.0
        return SimpleNamespace(logits=logits)


def test_glue_harness_scores_a_majority_class_cola_model_at_mcc_zero():
    from benchmarks.glue_harness import evaluate

    labels = torch.as_tensor(COLA)
    loader = [{"input_ids": torch.zeros(len(labels[i : i + 256]), 3, dtype=torch.long), "labels": labels[i : i + 256]}
              for i in range(0, len(labels), 256)]
    scores = evaluate(_ConstantClassifier(1), loader, "cola", torch.device("cpu"))
    assert scores["accuracy"] == pytest.approx(721 / 1043, abs=1e-6)
    assert scores["mcc"] == 0.0  # GLUE's figure; torchmetrics' limit value was +0.0256


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _validate(module, loader):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (out,) = trainer.validate(module, loader, verbose=False)
    return out


def test_causal_lm_loss_is_the_mean_token_nll_over_batches_and_rows_without_targets():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (7, 10), generator=g)
    labels = x.clone()
    for i in range(7):  # right padding of different lengths: unequal token counts per row and batch
        if i % 4:
            labels[i, 10 - 2 * (i % 4):] = -100
    labels[2] = -100  # a row with nothing to predict: alone in its batch at batch size 1
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    # reference: labels shift by one, ignored tokens left out, one mean over all predicted tokens
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum")
    mean_nll = float(nll / (labels[:, 1:] != -100).sum())
    for batch in (1, 3, 7):
        loader = DataLoader(list(range(7)), batch_size=batch,
                            collate_fn=lambda i: {"input_ids": x[i], "labels": labels[i]})
        out = _validate(CausalLM(model), loader)
        assert out["val_loss"] == pytest.approx(mean_nll, rel=1e-5), batch
        assert out["val_ppl"] == pytest.approx(math.exp(mean_nll), rel=1e-5), batch


_DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from types import SimpleNamespace
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from lightning_lora.tasks import SequenceClassifier

    class Model(nn.Module):  # logits from the first two input ids: a fixed, known classifier
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(logits=input_ids[:, :2].float() / 10 + 0 * self.w)

    data = torch.load(sys.argv[2], weights_only=True)
    ids, labels = data["ids"], data["labels"]
    loader = DataLoader(list(range(len(labels))), batch_size=7,
                        collate_fn=lambda i: {"input_ids": ids[i], "labels": labels[i]})
    module = SequenceClassifier(Model(), num_labels=2, metrics=("accuracy", "f1", "mcc"))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (out,) = trainer.validate(module, loader, verbose=False)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({k: float(v) for k, v in out.items()}, f)
''')


def test_sequence_classifier_scores_all_ddp_ranks_examples(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 100  # even: DistributedSampler pads nothing, each rank scores 50 (batches of 7, 7, ..., 1)
    ids = torch.randint(0, 30, (n, 3), generator=g)
    ids[::2, 0] += 20  # rank 0 gets the even rows: its shard's loss differs from rank 1's
    labels = torch.randint(0, 2, (n,), generator=g)
    torch.save({"ids": ids, "labels": labels}, tmp_path / "data.pt")
    script = tmp_path / "ddp_validate.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "data.pt")], cwd=REPO,
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = ids[:, :2].float() / 10
    pred = logits.argmax(-1)
    reference = {"val_loss": float(F.cross_entropy(logits, labels)), "val_accuracy": accuracy_score(labels, pred),
                 "val_f1": f1_score(labels, pred), "val_mcc": matthews_corrcoef(labels, pred)}
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, value in reference.items():
            assert out[key] == pytest.approx(value, abs=1e-5), (rank, key)


def test_ffa_benchmark_reports_the_sample_std_over_seeds(tmp_path, monkeypatch):
    import lightning_lora.federated as federated
    from benchmarks import ffa_federated

    raw = tmp_path / "raw.jsonl"
    args = ffa_federated.parse_args(["--smoke", "--seeds", "0,1,2", "--raw", str(raw)])
    accuracy = {("ffa_lora", s): a for s, a in enumerate((0.60, 0.70, 0.65))}
    accuracy.update({("lora", s): 0.50 for s in range(3)})  # gains 10, 20, 15 points
    row = {"balanced_accuracy": 0.5, "loss": 0.7, "message_bytes_per_round": 1.0, "down_tensor_bytes_per_round": 1.0,
           "up_tensor_bytes_per_round": 1.0, "exchanged_params": 1, "seconds": 1.0, "client_sizes": [4, 4],
           "max_client_epsilon": 6.0, "noise_multiplier": 1.0}
    with open(raw, "w") as f:  # every federation already finished: run_task only reads them
        for method in ("ffa_lora", "lora"):
            for seed in range(3):
                for dp in (False, True):
                    key = ffa_federated.run_key(args, "sst2", method, seed, dp)
                    f.write(json.dumps({"key": key, **row, "accuracy": accuracy[method, seed]}) + "\n")
    monkeypatch.setattr(federated, "build_task", lambda *a, **k: SimpleNamespace(train=[0] * 4, eval=[0] * 2))
    monkeypatch.setattr(ffa_federated.torch, "set_num_threads", lambda n: None)
    res = ffa_federated.run_task("sst2", args)
    assert res["dp_eps6_gain_vs_lora"] == pytest.approx(15.0)
    assert res["dp_eps6_gain_vs_lora_std"] == pytest.approx(5.0)  # statistics.stdev([10, 20, 15])
