"""Defects found by a user-side audit of ``lncrna predict / evaluate / train / pretrain``.

Each test failed before its fix: a gzip OUT name written as plain text, ``-o folder/`` writing a
file named ``folder``, bzip2/xz/zstd input reported as binary noise, unknown options reported by the
top-level parser, ``--model FILE`` called a missing directory, a non-atomic evaluate report, the
evaluate command line recorded without ``evaluate``, Hydra run settings (``epochs=abc``,
``epochs=2.5``, ``out_dir=<a file>``) crashing with a traceback or silently truncated.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
import zlib
from pathlib import Path

import pytest

from lncrna import cli
from lncrna.predict import EXAMPLE_FASTA

from test_cli import HEADER, run  # the test directory is on sys.path


def one_error_line(err: str, cmd: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lncrna {cmd}: error: ") and "Traceback" not in err
    return lines[0]


# ---- predict -o OUT.gz ---------------------------------------------------------------------------
def test_gz_output_name_is_gzip_compressed_and_evaluate_reads_it(tmp_path, model_dir, capsys):
    plain, packed = tmp_path / "p.tsv", tmp_path / "p.tsv.gz"
    for out in (plain, packed):
        rc, _, err = run(["predict", EXAMPLE_FASTA, "-o", out, "--model", model_dir, "-q", "--chunk-size", "7"], capsys)
        assert rc == 0, err
    assert packed.read_bytes()[:2] == b"\x1f\x8b"  # was plain text under a .gz name
    assert gzip.decompress(packed.read_bytes()).decode() == plain.read_text()
    assert plain.read_text().startswith(HEADER + "\n")
    assert not list(tmp_path.glob("*.partial"))
    rc, out, err = run(["evaluate", packed, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["n"] == 20


def test_gz_output_rows_are_readable_after_each_chunk_and_kept_on_ctrl_c(tmp_path, model_dir, capsys, on_chunk):
    out = tmp_path / "p.tsv.gz"
    partial = tmp_path / "p.tsv.gz.partial"
    seen: list[int] = []

    def at_third_chunk():
        # a sync flush per chunk: what is in the partial file so far decompresses without the trailer
        text = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(partial.read_bytes()).decode()
        seen.append(len(text.splitlines()))
        raise KeyboardInterrupt

    on_chunk(3, at_third_chunk)
    rc, _, err = run(["predict", EXAMPLE_FASTA, "-o", out, "--model", model_dir, "-q", "--chunk-size", "4"], capsys)
    assert rc == 130, err
    assert seen == [1 + 8]
    rows = gzip.decompress(out.read_bytes()).decode().splitlines()  # a complete gzip file (trailer written)
    assert rows[0] == HEADER and len(rows) == 1 + 8
    assert not partial.exists()


# ---- predict -o folder/ --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["results/", "existing_file/"])
def test_output_name_ending_in_a_slash_is_refused(tmp_path, model_dir, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing_file").write_text("keep\n")
    rc, _, err = run(["predict", EXAMPLE_FASTA, "-o", name, "--model", model_dir, "-q"], capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1] == (
        f"lncrna predict: error: argument -o/--output: {name!r} ends with '/', which names a folder; give a "
        f"file name for the output TSV (e.g. {name}predictions.tsv)")
    assert not (tmp_path / "results").exists()  # was: a TSV *file* named results, exit 0
    assert (tmp_path / "existing_file").read_text() == "keep\n"


# ---- other compressors ---------------------------------------------------------------------------
ZSTD_FRAME = b"\x28\xb5\x2f\xfd" + b"\x00" * 16  # the magic is all that is looked at


@pytest.mark.parametrize("name, pack, tool", [
    ("in.fa.bz2", bz2.compress, "bunzip2"),
    ("in.fa.xz", lzma.compress, "unxz"),
    ("in.fa.zst", lambda data: ZSTD_FRAME, "unzstd"),
])
@pytest.mark.parametrize("cmd", ["predict", "evaluate"])
def test_non_gzip_compression_is_named_in_one_line(tmp_path, model_dir, capsys, name, pack, tool, cmd):
    path = tmp_path / name
    path.write_bytes(pack(EXAMPLE_FASTA.read_bytes()))
    rc, out, err = run([cmd, path, "--model", model_dir, "-q", "-o", tmp_path / "out"], capsys)
    assert rc == 2 and out == ""
    kind = name.rsplit(".", 1)[1].replace("bz2", "bzip2").replace("zst", "zstd")
    line = one_error_line(err, cmd)
    assert line == (f"lncrna {cmd}: error: {path}: {kind}-compressed file; only plain or gzip-compressed input is "
                    f"supported (decompress it first, e.g. {tool} {path})")
    assert "\\x" not in line  # no binary noise
    assert not (tmp_path / "out").exists()


def test_non_gzip_compressed_truth_file_is_named(tmp_path, capsys):
    pred = tmp_path / "p.tsv"
    pred.write_text(HEADER + "\na\t300\t0.9\tlncRNA\n")
    truth = tmp_path / "truth.fa.bz2"
    truth.write_bytes(bz2.compress(b">a label=lncRNA\nACGT\n"))
    rc, _, err = run(["evaluate", pred, "--truth", truth, "-o", tmp_path / "ev"], capsys)
    assert rc == 2
    assert "truth.fa.bz2: bzip2-compressed file" in one_error_line(err, "evaluate")


# ---- unknown options -----------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["predict", "evaluate"])
def test_unknown_option_names_the_command_and_shows_its_usage(tmp_path, capsys, cmd):
    rc, _, err = run([cmd, EXAMPLE_FASTA, "--bogus"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: lncrna {cmd} ")  # was: the top-level "usage: lncrna [-h] ..."
    assert lines[-1] == f"lncrna {cmd}: error: unrecognized arguments: --bogus"


# ---- --model naming a file -----------------------------------------------------------------------
def test_model_option_naming_a_file_says_not_a_directory(tmp_path, model_dir, capsys):
    weights = model_dir / "model.safetensors"
    rc, _, err = run(["predict", EXAMPLE_FASTA, "--model", weights, "-q"], capsys)
    assert rc == 2
    line = one_error_line(err, "predict")
    assert line.startswith(f"lncrna predict: error: {weights}: not a directory; --model needs the model directory")
    assert "no such" not in line


# ---- evaluate report -----------------------------------------------------------------------------
def test_evaluate_records_its_own_command_line(tmp_path, model_dir, capsys, monkeypatch):
    argv = ["evaluate", str(EXAMPLE_FASTA), "-o", str(tmp_path / "ev"), "--model", str(model_dir), "-q"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lncrna", *argv])
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    command = json.loads((tmp_path / "ev" / "metrics.json").read_text())["command"]
    assert command.split()[:2] == ["lncrna", "evaluate"]  # was "lncrna <INPUT> ...": not rerunnable
    assert command.split()[2] == str(EXAMPLE_FASTA)


def _predictions(tmp_path: Path, probs: list[float]) -> Path:
    pred = tmp_path / "p.tsv"
    pred.write_text(HEADER + "\n" + "".join(f"r{i}\t300\t{p}\t{'lncRNA' if p >= 0.5 else 'mRNA'}\n"
                                            for i, p in enumerate(probs)))
    return pred


def _truth(tmp_path: Path, n: int) -> Path:
    truth = tmp_path / "t.fa"
    truth.write_text("".join(f">r{i} label={'lncRNA' if i % 2 else 'mRNA'}\nACGT\n" for i in range(n)))
    return truth


def test_a_failed_report_leaves_the_old_report_untouched(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    probs = [0.1, 0.9, 0.2, 0.8, 0.7, 0.3]
    pred, truth, ev = _predictions(tmp_path, probs), _truth(tmp_path, len(probs)), tmp_path / "ev"
    rc, _, err = run(["evaluate", pred, "--truth", truth, "-o", ev, "-q"], capsys)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in ev.iterdir()}
    assert sorted(before) == ["metrics.json", "metrics.tsv", "pr.png", "roc.png"]

    pred.write_text(pred.read_text().replace("0.9\tlncRNA", "0.4\tmRNA"))  # a new run with other scores
    calls = 0
    original = matplotlib.figure.Figure.savefig

    def full_disk_on_second_plot(self, *a, **kw):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device", "pr.png")
        return original(self, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk_on_second_plot)
    rc, _, err = run(["evaluate", pred, "--truth", truth, "-o", ev, "-q"], capsys)
    assert rc == 2 and "No space left on device" in one_error_line(err, "evaluate")
    # was: a new roc.png next to the old pr.png / metrics.json
    assert {p.name: p.read_bytes() for p in ev.iterdir()} == before


def test_a_failed_report_in_a_new_folder_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import lncrna.evaluate

    probs = [0.1, 0.9, 0.2, 0.8]
    pred, truth, ev = _predictions(tmp_path, probs), _truth(tmp_path, len(probs)), tmp_path / "new_ev"

    def broken_plots(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lncrna.evaluate, "plot_curves", broken_plots)
    rc, _, err = run(["evaluate", pred, "--truth", truth, "-o", ev, "-q"], capsys)
    assert rc == 2 and "No space left on device" in one_error_line(err, "evaluate")
    assert not ev.exists()


# ---- Hydra run settings --------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["train", "pretrain"])
@pytest.mark.parametrize("setting, shown", [
    ("epochs=abc", "epochs must be a whole number, got 'abc'"),  # was a ValueError traceback, exit 1
    ("seed=abc", "seed must be a whole number, got 'abc'"),
    ("lr=fast", "lr must be a finite number, got 'fast'"),
    ("batch_size=2.5", "batch_size must be a whole number, got 2.5"),  # was int(2.5) = 2, silently
])
def test_run_setting_of_the_wrong_type_is_one_error_line(cmd, setting, shown, tmp_path, capsys, monkeypatch):
    import lncrna.train

    def must_not_run(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(lncrna.train, "finetune", must_not_run)
    monkeypatch.setattr(lncrna.train, "pretrain", must_not_run)
    rc = cli.main([cmd, setting, f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert one_error_line(err, cmd) == f"lncrna {cmd}: error: {shown}"
    assert not (tmp_path / "out").exists()


def test_epochs_given_as_a_fraction_is_refused_not_truncated(tmp_path, capsys, monkeypatch):
    import lncrna.train

    seen: list[object] = []
    monkeypatch.setattr(lncrna.train, "finetune", lambda *a, **kw: seen.append(kw["epochs"]))
    rc = cli.main(["train", "epochs=2.5", f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert rc == 2 and seen == []
    assert one_error_line(capsys.readouterr().err, "train") == "lncrna train: error: epochs must be a whole number, got 2.5"


@pytest.mark.parametrize("cmd", ["train", "pretrain"])
@pytest.mark.parametrize("where", ["a_file", "a_file/sub"])
def test_out_dir_that_cannot_be_a_folder_is_one_error_line(cmd, where, tmp_path, capsys, monkeypatch):
    import lncrna.train

    def must_not_run(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(lncrna.train, "finetune", must_not_run)
    monkeypatch.setattr(lncrna.train, "pretrain", must_not_run)
    (tmp_path / "a_file").write_text("keep\n")
    out = tmp_path / where
    rc = cli.main([cmd, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err  # was FileExistsError / NotADirectoryError with a traceback, exit 1
    line = one_error_line(err, cmd)
    assert line.startswith(f"lncrna {cmd}: error: out_dir={out}: cannot create the output folder (")
    assert (tmp_path / "a_file").read_text() == "keep\n"


def test_predict_help_names_the_length_limit_and_gzip_output(capsys):
    rc, out, _ = run(["predict", "--help"], capsys)
    text = " ".join(out.split())
    assert rc == 0
    assert "longer than 2,000,000 nt) are skipped" in text
    assert "an OUT ending in .gz is written gzip-compressed" in text


@pytest.mark.parametrize("cmd", ["train", "pretrain"])
def test_lightning_trainer_misconfiguration_is_one_error_line_and_leaves_no_folder(cmd, tmp_path, capsys, monkeypatch):
    # what `lncrna train trainer=gpu` raises inside pl.Trainer on a machine without a GPU (simulated
    # here so that the test means the same on a GPU machine)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    import lncrna.train

    def no_gpu(*a, **kw):
        raise MisconfigurationException("No supported gpu backend found!")

    monkeypatch.setattr(lncrna.train, "finetune", no_gpu)
    monkeypatch.setattr(lncrna.train, "pretrain", no_gpu)
    out = tmp_path / "out"
    rc = cli.main([cmd, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err  # was a Lightning traceback, exit 1
    assert one_error_line(err, cmd) == (f"lncrna {cmd}: error: trainer: No supported gpu backend found! "
                                        f"(trainer=gpu needs a CUDA GPU; trainer=cpu runs anywhere)")
    assert not out.exists()  # was left behind, empty


@pytest.mark.parametrize("cmd", ["train", "pretrain"])
def test_a_refused_run_leaves_no_hydra_run_folder(cmd, tmp_path, capsys):
    """Without out_dir the run writes into Hydra's run folder, which Hydra creates (with .hydra/ and
    the job log) before the task starts; a run refused with one error line left it behind."""
    run_dir = tmp_path / "runs" / "x"
    rc = cli.main([cmd, "epochs=abc", f"hydra.run.dir={run_dir}"])
    assert rc == 2
    assert one_error_line(capsys.readouterr().err, cmd) == f"lncrna {cmd}: error: epochs must be a whole number, got 'abc'"
    assert not run_dir.exists()


def test_a_hydra_run_folder_holding_output_is_kept(tmp_path, capsys, monkeypatch):
    import lncrna.train

    def writes_then_fails(out, **kw):
        (out / "partial.txt").write_text("kept\n")
        raise lncrna.train.PretrainedDirError("mlm: broken")

    monkeypatch.setattr(lncrna.train, "finetune", writes_then_fails)
    run_dir = tmp_path / "runs" / "x"
    rc = cli.main(["train", f"hydra.run.dir={run_dir}"])
    assert rc == 2, capsys.readouterr().err
    assert (run_dir / "partial.txt").read_text() == "kept\n"


def test_weight_decay_setting_reaches_adamw(tmp_path, capsys, monkeypatch):
    """METHODS.md §10 leaves stage 2's weight decay open (LoRA-BERT's README 0.001, its code 0.01):
    ``weight_decay=`` picks it, and the fine-tuning optimizer uses it."""
    import lncrna.train
    from lncrna.model import ModelConfig, NucleotideClassifier

    seen: list[float] = []
    monkeypatch.setattr(lncrna.train, "finetune", lambda *a, **kw: seen.append(kw["weight_decay"]))
    cli.main(["train", "weight_decay=0.001", f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert seen == [0.001], capsys.readouterr().err
    module = lncrna.train.ClassifierModule(NucleotideClassifier(ModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                                            intermediate_size=32)), weight_decay=0.001)
    opt = module.configure_optimizers()["optimizer"]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.001}
    with pytest.raises(lncrna.train.RunConfigError, match="weight_decay must be a finite number >= 0"):
        lncrna.train._check_run_args(epochs=1, batch_size=1, lr=1e-3, max_minutes=None, weight_decay=-0.1)
