"""Pretrained-MLM folders (``lncrna train mlm_dir=``, ``lncrna pretrain init_dir=``): every way one can
be unusable is found before training, in one line naming the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM

from lncrna.model import ModelConfig, make_tokenizer
from lncrna.predict import DEFAULT_MODEL_DIR
from lncrna.train import PretrainedDirError, load_mlm

TINY = ModelConfig(k=3, stride=3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   window_tokens=64, max_windows=4, dropout=0.0)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> Path:
    """A folder as ``pretrain`` writes it (fp16 transformers MLM + lncrna_config.json)."""
    d = tmp_path_factory.mktemp("mlm") / "mlm"
    torch.manual_seed(0)
    BertForMaskedLM(TINY.bert_config(len(make_tokenizer(TINY)))).half().save_pretrained(d)
    (d / "lncrna_config.json").write_text(json.dumps(TINY.__dict__))
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def test_a_good_folder_loads(mlm_dir):
    cfg, mlm = load_mlm(mlm_dir, expect=TINY)
    assert cfg == TINY and isinstance(mlm, BertForMaskedLM) and next(mlm.parameters()).dtype == torch.float32


def _truncated_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])


def _bad_json(d: Path) -> None:
    (d / "lncrna_config.json").write_text("{k: 3")


def _configs_disagree(d: Path) -> None:
    raw = json.loads((d / "lncrna_config.json").read_text())
    (d / "lncrna_config.json").write_text(json.dumps({**raw, "hidden_size": 64, "num_heads": 2}))


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _a_classifier(d: Path) -> None:
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "architectures": ["BertForSequenceClassification"]}))


@pytest.mark.parametrize("damage,expected", [
    (_truncated_weights, "cannot load the MLM weights"),
    (_bad_json, "unreadable config"),
    (_configs_disagree, "disagree (hidden_size 64 against hidden_size 32"),
    (_no_weights, "missing model.safetensors"),
    (_a_classifier, "holds a BertForSequenceClassification, not a pretrained MLM"),
])
def test_unusable_folders_are_named(mlm_dir, tmp_path, damage, expected):
    d = _copy(mlm_dir, tmp_path)
    damage(d)
    with pytest.raises(PretrainedDirError) as info:
        load_mlm(d)
    msg = str(info.value)
    assert msg.startswith(str(d)) and expected in msg and "\n" not in msg, msg


def test_the_shipped_classifier_is_not_an_mlm():
    with pytest.raises(PretrainedDirError, match="not a pretrained MLM folder"):
        load_mlm(DEFAULT_MODEL_DIR)


def test_an_mlm_of_another_shape_than_the_run(mlm_dir):
    with pytest.raises(PretrainedDirError, match=r"does not match this run's model config: k 3 \(run: 6\)"):
        load_mlm(mlm_dir, expect=ModelConfig())


def _cli(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of ``lncrna`` (test_cli.run, the test directory is on sys.path)."""
    from test_cli import run

    rc, _, err = run(argv, capsys)
    return rc, err


def test_train_with_an_unusable_mlm_dir_is_one_line_and_leaves_no_output(mlm_dir, tmp_path, capsys):
    d = _copy(mlm_dir, tmp_path)
    _truncated_weights(d)
    out = tmp_path / "run"
    rc, err = _cli(["train", "experiment=smoke", f"mlm_dir={d}", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}"],
                   capsys)
    assert rc == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"lncrna train: error: mlm_dir={d}: cannot load the MLM weights " + errors[0].split("weights ", 1)[1]]
    assert "Traceback" not in err and not out.exists()


def test_train_with_an_adapter_matching_nothing_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _cli(["train", "experiment=smoke", "adapter.target_modules=[nope]", f"out_dir={out}",
                    f"hydra.run.dir={tmp_path / 'h'}"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line][0].startswith(
        "lncrna train: error: adapter=lora: target_modules=['nope'] target_types=[] matched no module")
    assert not out.exists()


def test_pretrain_with_an_unusable_init_dir_is_one_line(mlm_dir, tmp_path, capsys):
    d = _copy(mlm_dir, tmp_path)
    _no_weights(d)
    out = tmp_path / "run"
    rc, err = _cli(["pretrain", "model=tiny", f"init_dir={d}", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}"],
                   capsys)
    assert rc == 2 and f"lncrna pretrain: error: init_dir={d}: not a pretrained MLM folder" in err
    assert "Traceback" not in err and not out.exists()
