"""The ``lncrna`` command line: predict (bad input, streaming, interruption), evaluate, Hydra train.

Most cases call ``lncrna.cli.main([...])`` in this process (a subprocess costs a torch import);
the Hydra training run and one predict run go through a real subprocess. Models are tiny random
ones saved to tmp dirs (``model_dir`` in conftest.py); the baseline is the shipped one.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_lora as ll

from lncrna import cli
from lncrna.fasta import FastaRecord, read_fasta, write_fasta
from lncrna.predict import EXAMPLE_FASTA, TSV_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
HEADER = "\t".join(TSV_COLUMNS)


def run(argv, capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def seq(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACGT") for _ in range(n))


def fasta_text(records) -> str:
    return "".join(f">{rid}\n{s}\n" for rid, s in records)


GOOD = [(f"tx{i}", seq(300 + 37 * i, i)) for i in range(10)]


def _broken_gzip_header(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))


def _truncated_gzip(path: Path) -> None:
    data = gzip.compress(fasta_text(GOOD * 1).encode() + fasta_text([("late", seq(50_000, 99))]).encode())
    path.write_bytes(data[: len(data) - 2000])


BAD_INPUTS = {
    # name: (writer, expected parts of the one-line error)
    "empty": (lambda p: p.write_text(""), ["empty file"]),
    "blank_lines": (lambda p: p.write_text("\n\n  \n"), ["empty file"]),
    "no_header": (lambda p: p.write_text("ACGTACGTACGT\n>x\nACGT\n"), ["not FASTA", "missing header"]),
    "protein": (lambda p: p.write_text(">p1 a protein\nMKVLAAGIVALLLAAGCSSEQPRTLEEFHKW\n"),
                ["no usable records", "record 1 'p1'", "looks like a protein"]),
    "non_nucleotide": (lambda p: p.write_text(">a\nACGT12ACGT--ACGT\n>b\nAC#GT\n"),
                       ["no usable records", "record 1 'a'", "non-nucleotide characters"]),
    "broken_gzip": (_broken_gzip_header, ["broken gzip"]),
    "truncated_gzip_first_record": (
        lambda p: p.write_bytes(gzip.compress(fasta_text([("big", seq(200_000, 5))]).encode())[:5000]),
        ["broken gzip"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exit_2_one_line_no_output(case, tmp_path, model_dir, capsys):
    writer, parts = BAD_INPUTS[case]
    path = tmp_path / (f"{case}.fa.gz" if "gzip" in case else f"{case}.fa")
    writer(path)
    out = tmp_path / "out.tsv"
    rc, stdout, err = run(["predict", path, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("lncrna predict: error: ")
    assert str(path) in errors[0] and all(p in errors[0] for p in parts), errors[0]
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()


def test_missing_input_file(tmp_path, model_dir, capsys):
    rc, _, err = run(["predict", tmp_path / "nope.fa", "-o", tmp_path / "o.tsv", "--model", model_dir], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {tmp_path / 'nope.fa'}: no such file"
    assert not (tmp_path / "o.tsv").exists()


def test_missing_model_dir(tmp_path, capsys):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    rc, _, err = run(["predict", fa, "-o", tmp_path / "o.tsv", "--model", tmp_path / "no_model"], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {tmp_path / 'no_model'}: no such model directory"
    assert not (tmp_path / "o.tsv").exists()


def test_missing_default_model(tmp_path, monkeypatch, capsys):
    import lncrna.predict

    monkeypatch.setattr(lncrna.predict, "DEFAULT_MODEL_DIR", tmp_path / "default")
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    rc, _, err = run(["predict", fa, "-o", tmp_path / "o.tsv"], capsys)
    assert rc == 2 and "default model is not installed" in err and str(tmp_path / "default") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.tsv").exists()


def test_output_folder_must_exist(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    rc, _, err = run(["predict", fa, "-o", tmp_path / "no" / "o.tsv", "--model", model_dir], capsys)
    assert rc == 2 and "does not exist" in err


def test_bad_records_warn_and_skip_the_rest_is_predicted(tmp_path, model_dir, capsys):
    records = [
        GOOD[0],
        ("prot", "MKVLAAGIVALLLAAGCSSEQPRTLEEFHKW"),
        GOOD[1],
        ("chars", "ACGTACGT1234ACGT"),
        (GOOD[0][0], GOOD[2][1]),  # duplicate id
        ("long", seq(1_000_000, 7)),  # 1 Mb: kept with a warning, windowed by the model
        ("rna", GOOD[3][1].replace("T", "U").lower()),
    ]
    fa = tmp_path / "mixed.fa"
    fa.write_text(fasta_text(records))
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("lncrna predict: warning: ")]
    assert len(warnings) == 4 and len(err.strip().splitlines()) == 4
    for rid, what in (("prot", "protein"), ("chars", "non-nucleotide"), ("tx0", "duplicate id"), ("long", "very long")):
        assert any(f"'{rid}'" in w and what in w and str(fa) in w for w in warnings), (rid, warnings)
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == ["tx0", "tx1", "long", "rna"]
    assert rows[2][1] == "1000000" and rows[3][1] == str(len(GOOD[3][1]))
    assert all(r[3] == ("lncRNA" if float(r[2]) >= 0.5 else "mRNA") for r in rows)


def test_predict_to_stdout_and_options(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa.gz"
    fa.write_bytes(gzip.compress(fasta_text(GOOD).encode()))
    rc, out, err = run(["predict", fa, "--model", model_dir, "--no-cascade", "--device", "cpu", "--batch-tokens", "500",
                        "--workers", "0", "--threshold", "0.9", "--chunk-size", "3"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == HEADER and [line.split("\t")[0] for line in lines[1:]] == [r for r, _ in GOOD]
    assert all(line.split("\t")[3] == ("lncRNA" if float(line.split("\t")[2]) >= 0.9 else "mRNA") for line in lines[1:])
    assert "10 sequences" in err and "10 (100.0%) through the transformer" in err  # summary line, --no-cascade


@pytest.mark.parametrize("argv, expected", [
    (["--batch-tokens", "0"], "--batch-tokens"),
    (["--workers", "-1"], "--workers"),
    (["--threshold", "1.5"], "--threshold"),
    (["--device", "tpu"], "unsupported device"),
])
def test_bad_options_exit_2(tmp_path, model_dir, capsys, argv, expected):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    rc, _, err = run(["predict", fa, "--model", model_dir, "-o", tmp_path / "o.tsv", *argv], capsys)
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "o.tsv").exists()


def test_rows_are_flushed_per_chunk(tmp_path, model_dir, capsys, monkeypatch):
    import lncrna.predict

    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    partial = out.with_name(out.name + ".partial")
    seen: list[list[str]] = []
    original = lncrna.predict._Stage1.__call__

    def spy(self, seqs):
        seen.append(partial.read_text().splitlines() if partial.exists() else [])
        return original(self, seqs)

    monkeypatch.setattr(lncrna.predict._Stage1, "__call__", spy)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "4", "-q"], capsys)
    assert rc == 0, err
    # when stage 1 of chunk k starts, OUT.partial holds the header and the rows of chunks 1..k-1
    assert [len(s) for s in seen] == [1, 1 + 4, 1 + 8]
    assert len(out.read_text().splitlines()) == 11 and not partial.exists()


@pytest.mark.parametrize("exc, code, text", [(KeyboardInterrupt(), 130, "interrupted")])
def test_interrupted_run_keeps_finished_rows(tmp_path, model_dir, capsys, monkeypatch, exc, code, text):
    import lncrna.predict

    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    calls = 0
    original = lncrna.predict._Stage1.__call__

    def fail_on_second_chunk(self, seqs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise exc
        return original(self, seqs)

    monkeypatch.setattr(lncrna.predict._Stage1, "__call__", fail_on_second_chunk)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "3", "-q"], capsys)
    assert rc == code
    assert text in err and f"3 finished rows kept in {out}" in err and "Traceback" not in err
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER and [line.split("\t")[0] for line in lines[1:]] == ["tx0", "tx1", "tx2"]


def test_gzip_broken_after_first_chunk_discards_rows(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa.gz"
    _truncated_gzip(fa)
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "2", "-q"], capsys)
    assert rc == 2 and "broken gzip" in err and str(fa) in err and "finished rows discarded" in err
    assert not out.exists() and not out.with_name("out.tsv.partial").exists()


def test_help_lists_every_option(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for command in ("predict", "evaluate", "train", "pretrain"):
        assert command in out
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("predict", "evaluate"):
        rc, out, _ = run([command, "--help"], capsys)
        assert rc == 0
        flat = " ".join(out.split())
        for action in sub.choices[command]._actions:
            assert action.help, (command, action.dest)
            for flag in action.option_strings:
                assert flag in out, (command, flag)
        if command == "predict":
            for flag in ("-o", "--no-cascade", "--device", "--batch-tokens", "--workers", "--model", "--threshold",
                         "--quiet", "--chunk-size", "--baseline"):
                assert flag in flat


def test_no_command_prints_usage(capsys):
    rc, _, err = run([], capsys)
    assert rc == 2 and "usage: lncrna" in err


def test_subprocess_predict_exit_codes(tmp_path, model_dir):
    """The console entry point end to end: a good run, then bad input without a traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "example.tsv"
    p = subprocess.run([sys.executable, "-m", "lncrna.cli", "predict", str(EXAMPLE_FASTA), "-o", str(out),
                        "--model", str(model_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(out.read_text().splitlines()) == 21
    empty = tmp_path / "empty.fa"
    empty.write_text("")
    p = subprocess.run([sys.executable, "-m", "lncrna.cli", "predict", str(empty), "--model", str(model_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"lncrna predict: error: {empty}: empty file"


# ---- evaluate -----------------------------------------------------------------------------------
def _check_report(out_dir: Path, n: int) -> dict:
    doc = json.loads((out_dir / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc"):
        assert key in doc["metrics"]
    assert doc["metrics"]["n"] == n
    for png in ("roc.png", "pr.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "metrics.tsv").read_text().startswith("metric\tvalue\n")
    return doc


def test_evaluate_predictions_with_labelled_truth(tmp_path, model_dir, capsys):
    pred = tmp_path / "pred.tsv"
    assert run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "-q"], capsys)[0] == 0
    rc, out, err = run(["evaluate", pred, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 0, err
    doc = _check_report(tmp_path / "ev", 20)
    assert doc["metrics"]["n_pos"] == 10
    assert "accuracy" in out and "auroc" in out and "mcc" in out


def test_evaluate_with_lnc_and_mrna_files(tmp_path, model_dir, capsys):
    recs = list(read_fasta(EXAMPLE_FASTA))
    lnc, mrna = tmp_path / "lnc.fa", tmp_path / "mrna.fa"
    write_fasta([FastaRecord(r.id, r.id, r.seq) for r in recs if "label=lncRNA" in r.description], lnc)
    write_fasta([FastaRecord(r.id, r.id, r.seq) for r in recs if "label=mRNA" in r.description], mrna)
    pred = tmp_path / "pred.tsv"
    assert run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "-q"], capsys)[0] == 0
    rc, _, err = run(["evaluate", pred, "--lnc", lnc, "--mrna", mrna, "-o", tmp_path / "a", "-q"], capsys)
    assert rc == 0, err
    a = _check_report(tmp_path / "a", 20)
    # no INPUT: predict both truth files, then score
    rc, _, err = run(["evaluate", "--lnc", lnc, "--mrna", mrna, "-o", tmp_path / "b", "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    b = _check_report(tmp_path / "b", 20)
    assert a["metrics"] == b["metrics"]
    assert (tmp_path / "b" / "predictions.tsv").is_file()


def test_evaluate_fasta_predicts_then_scores(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["evaluate", EXAMPLE_FASTA, "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    out_dir = tmp_path / "example_eval"  # default: <input name>_eval
    doc = _check_report(out_dir, 20)
    assert doc["prediction_run"]["sequences"] == 20
    assert len((out_dir / "predictions.tsv").read_text().splitlines()) == 21


def test_evaluate_reports_partial_overlap(tmp_path, model_dir, capsys):
    pred = tmp_path / "pred.tsv"
    assert run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "-q"], capsys)[0] == 0
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(lines[:15]) + "\n")  # 14 of 20 predicted
    rc, _, err = run(["evaluate", pred, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 0 and "6 truth records have no prediction" in err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["join"]["n_scored"] == 14


@pytest.mark.parametrize("case, expected", [
    ("tsv_without_truth", "predictions need truth labels"),
    ("unknown_kind", "neither FASTA nor a predictions TSV"),
    ("no_overlap", "no predicted id has a truth label"),
    ("unlabelled_fasta", "no truth labels"),
    ("lnc_without_mrna", "--lnc and --mrna go together"),
    ("missing", "no such file"),
    ("nothing", "nothing to evaluate"),
])
def test_evaluate_errors(tmp_path, model_dir, capsys, case, expected):
    pred = tmp_path / "pred.tsv"
    pred.write_text(f"{HEADER}\nzz\t300\t0.5\tlncRNA\n")
    plain = tmp_path / "plain.fa"
    plain.write_text(fasta_text(GOOD))
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    argv = {
        "tsv_without_truth": [pred],
        "unknown_kind": [other],
        "no_overlap": [pred, "--truth", EXAMPLE_FASTA],
        "unlabelled_fasta": [plain, "--model", model_dir],
        "lnc_without_mrna": [pred, "--lnc", plain],
        "missing": [tmp_path / "nope.tsv"],
        "nothing": [],
    }[case]
    rc, _, err = run(["evaluate", *argv, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


# ---- Hydra: train / pretrain --------------------------------------------------------------------
def test_train_unknown_adapter_lists_choices(capsys):
    rc, _, err = run(["train", "adapter=nonexistent"], capsys)
    assert rc == 2
    line = err.strip()
    assert line.startswith("lncrna train: error: unknown adapter 'nonexistent'; choose one of: ")
    assert "lora" in line and "registered methods: " in line and "\n" not in line


def test_train_unknown_method_inside_adapter(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["train", "adapter.method=nonexistent", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and "unknown adapter method 'nonexistent'; registered methods: " in err
    assert all(m in err for m in ll.available_methods())


def test_train_adapter_option_without_default_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ALLoRA's eta is `???` in conf/adapter/allora.yaml
    rc, _, err = run(["train", "adapter=allora", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1] == ("lncrna train: error: adapter: eta has no default and must be given: "
                                            "adapter.eta=<value>")


def test_train_unknown_group_option(capsys):
    rc, _, err = run(["train", "model=huge"], capsys)
    assert rc == 2 and "unknown model 'huge'; choose one of: default, tiny" in err


def test_train_composes_groups_and_sweeps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "run_train", lambda cfg: seen.append(cli._container(cfg)))
    assert run(["train", "adapter=lora", "data=mouse", "trainer=gpu"], capsys)[0] == 0
    assert seen[-1]["trainer"]["accelerator"] == "gpu" and seen[-1]["trainer"]["precision"] == "bf16-mixed"
    assert seen[-1]["adapter"]["method"] == "lora" and seen[-1]["data"]["species"] == "mouse"
    seen.clear()
    rc, _, err = run(["train", "-m", "adapter=lora,dora", "data=mouse,mixed", "experiment=smoke"], capsys)
    assert rc == 0, err
    combos = {(c["adapter"]["use_dora"], c["data"]["species"]) for c in seen}
    assert combos == {(False, "mouse"), (True, "mouse"), (False, "mixed"), (True, "mixed")}
    assert all(c["model"]["hidden_size"] == 32 for c in seen)  # experiment=smoke picks model=tiny
    assert (tmp_path / "runs" / "lncrna" / "train-multirun").is_dir()
    seen.clear()
    assert run(["train", "adapter=dora", "adapter.r=4"], capsys)[0] == 0
    assert seen[-1]["adapter"]["use_dora"] is True and seen[-1]["adapter"]["r"] == 4
    # the adapter options live in Hydra's process-wide ConfigStore only during a run: left there, they
    # would be taken as schemas of conf/adapter/*.yaml by a later `lightning-lora train` in this process
    from hydra.core.config_store import ConfigStore

    assert not ConfigStore.instance().repo.get("adapter")


def test_pretrain_composes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "run_pretrain", lambda cfg: seen.append(cli._container(cfg)))
    assert run(["pretrain", "model=tiny", "trainer=gpu", "epochs=2"], capsys)[0] == 0
    assert seen[-1]["model"]["k"] == 3 and seen[-1]["epochs"] == 2 and "adapter" not in seen[-1]


def test_train_help(capsys):
    rc, out, _ = run(["train", "--help"], capsys)
    assert rc == 0
    for text in ("lncrna train", "adapter:", "model: default, tiny", "data: mixed, mouse", "trainer: cpu, gpu"):
        assert text in out


def _tiny_split_root(root: Path) -> Path:
    recs = list(read_fasta(EXAMPLE_FASTA))
    out = []
    for r in recs:
        label = "lncRNA" if "label=lncRNA" in r.description else "mRNA"
        out.append(FastaRecord(r.id, f"{r.id} label={label} species=mouse source=example.fa", r.seq))
    root.mkdir(parents=True, exist_ok=True)
    write_fasta(out, root / "train.fa.gz")
    write_fasta(out[::2], root / "val.fa.gz")
    return root


def test_hydra_pretrain_then_train_subprocess(tmp_path):
    """`lncrna pretrain` then `lncrna train mlm_dir=...` on a 20-sequence slice, tiny model, CPU."""
    data = _tiny_split_root(tmp_path / "data")
    code = (
        "import sys; from lncrna.cli import main\n"
        f"rc = main(['pretrain', 'model=tiny', 'epochs=1', 'batch_size=8', 'data.root={data}',"
        f" 'hydra.run.dir={tmp_path / 'pre'}', 'trainer.enable_progress_bar=false'])\n"
        "assert rc == 0, rc\n"
        f"sys.exit(main(['train', 'experiment=smoke', 'adapter=dora', 'data.root={data}',"
        f" 'hydra.run.dir={tmp_path / 'ft'}', 'mlm_dir={tmp_path / 'pre' / 'mlm'}']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert (tmp_path / "pre" / "mlm" / "lncrna_config.json").is_file()
    from lncrna.model import NucleotideClassifier

    model = NucleotideClassifier.from_pretrained(tmp_path / "ft" / "classifier")
    assert model.cfg.hidden_size == 32
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((tmp_path / "ft" / "train_summary.json").read_text())
    assert summary["config"]["adapter"]["use_dora"] is True
