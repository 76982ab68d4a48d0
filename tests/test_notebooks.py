"""The notebooks in notebooks/ run top to bottom and show what their text says.

nbclient executes each one in a kernel named ``python3``: jupyter_client runs a kernel spec whose command
is ``python`` with ``sys.executable`` (and ipykernel provides that spec when none is installed), so the
kernel is this interpreter with this environment's packages, as in CI's fresh ``.venv``. A probe cell
appended to the copy under test prints the notebook's variables as JSON for the assertions.
Run times on 2 shared cores: lightning_lora_quickstart 26 s, lncrna_quickstart 15 s.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# an absolute path of the machine that ran the notebook (repository, temporary folder, home, site-packages)
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:tmp|work|root|home|Users|private|var|opt|usr)/")


def _texts(cell: nbformat.NotebookNode) -> list[str]:
    """The text a code cell showed: streams, tracebacks and text/* data (images are base64, never paths)."""
    texts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            texts.append(out.text)
        elif out.output_type == "error":
            texts.append("\n".join(out.traceback))
        else:
            texts += [v for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return texts


def _execute(path: Path, cwd: Path, probe: str) -> tuple[nbformat.NotebookNode, dict]:
    """Run the notebook top to bottom in ``cwd`` plus a last cell ``probe`` that prints one JSON line."""
    nb = nbformat.read(path, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    # a cell that raises fails here with its traceback (CellExecutionError)
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    probe_out = "".join(o.text for o in nb.cells.pop().outputs if o.output_type == "stream" and o.name == "stdout")
    assert len(nb.cells) == n_cells
    return nb, json.loads(probe_out)


def _code_cells_not_showing(nb: nbformat.NotebookNode, folder: Path) -> list[nbformat.NotebookNode]:
    """The code cells of the executed notebook ``nb``, after checking no output names ``folder``
    (where the test ran it)."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        for text in _texts(cell):
            assert str(folder) not in text, f"code cell {i} shows the run's folder: {text!r}"
    return code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_its_code_compiles(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, path
    for i, cell in enumerate(code):
        # IPython syntax (magics, !shell) becomes get_ipython() calls, as the kernel would run it
        compile(TransformerManager().transform_cell(cell.source), f"{path.name}[code cell {i}]", "exec")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_outputs_are_one_clean_run_without_machine_paths(path: Path) -> None:
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    # executed top to bottom in one kernel (nbclient numbers the cells 1, 2, ...), and nothing failed
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    for i, cell in enumerate(code):
        assert all(o.output_type != "error" for o in cell.outputs), f"{path.name} code cell {i} saved an error"
        for text in _texts(cell):
            assert not MACHINE_PATH.search(text), f"{path.name} code cell {i} shows a local path: {text!r}"


def test_lightning_lora_quickstart_trains_saves_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import lightning_lora as ll
    from lightning_lora.tasks.models import minilm_path

    # The notebook's root is the first folder upwards holding pyproject.toml, and it writes under
    # ROOT/runs: a stand-in root in tmp_path, with the repository's data, keeps runs/ of the checkout as is.
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "data").symlink_to(ROOT / "data", target_is_directory=True)
    probe = ("import json\n"
             "print(json.dumps({'acc_before': acc_before, 'acc_after': acc_after, 'steps': trainer.global_step,\n"
             "    'trainable': trainable, 'lora': lora, 'total': total_after, 'losses': module.losses,\n"
             "    'sentences': [s for s, _ in val[:64]], 'logits': ours.tolist()}))\n")
    nb, got = _execute(ROOT / "notebooks" / "lightning_lora_quickstart.ipynb", tmp_path, probe)

    code = _code_cells_not_showing(nb, tmp_path)
    # 512 sentences in batches of 16, two epochs
    assert got["steps"] == 64
    assert got["acc_after"] >= 0.75 and got["acc_after"] - got["acc_before"] >= 0.15, got
    losses = got["losses"]
    assert sum(losses[-16:]) / 16 < sum(losses[:16]) / 16
    # only LoRA (r 8 on 6 query + 6 value projections, 384 wide) and the 2-way head train
    assert got["lora"] == 12 * 8 * (384 + 384)
    assert got["trainable"] - got["lora"] == 384 * 2 + 2
    assert got["trainable"] / got["total"] < 0.005
    # the loss plot
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)

    adapter = tmp_path / "runs" / "notebook_quickstart" / "adapter"
    for directory in (adapter, adapter.parent / "adapter_manual"):
        assert {p.name for p in directory.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    # the exported adapter reloads with lightning_lora onto a fresh base (another random head) and gives
    # the logits of the fine-tuned model
    torch.manual_seed(123)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    ll.load_adapter(model, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    enc = tokenizer(got["sentences"], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    torch.testing.assert_close(logits, torch.tensor(got["logits"]), atol=1e-4, rtol=0)


def test_lncrna_quickstart_predicts_and_evaluates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the notebook works in tempfile.mkdtemp(): the kernel inherits TMPDIR, so that folder is in tmp_path
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    probe = ("import json\n"
             "print(json.dumps({'work': str(work), 'truth': truth, 'correct': int((df.label == df.true).sum()),\n"
             "    'stages': df.stage.tolist(), 'no_cascade_stages': [p.stage for p in all_rows],\n"
             "    'rc': rc, 'metrics': report['metrics'], 'run': report['prediction_run']}))\n")
    nb, got = _execute(ROOT / "notebooks" / "lncrna_quickstart.ipynb", tmp_path, probe)

    code = _code_cells_not_showing(nb, tmp_path)
    work = Path(got["work"])
    assert work.parent == tmp_path
    # the bundled example: 10 lncRNA and 10 mRNA, none of them a hard case for the baseline
    assert sorted(got["truth"].values()) == ["lncRNA"] * 10 + ["mRNA"] * 10
    assert got["correct"] >= 18
    assert set(got["stages"]) == {"baseline"}
    assert set(got["no_cascade_stages"]) == {"transformer"} and len(got["no_cascade_stages"]) == 20
    assert (work / "example.tsv").read_text().count("\n") == 21  # header + 20 rows
    # lncrna evaluate on 1,000 human test transcripts: its files, good metrics, the transformer only on a few
    assert got["rc"] == 0
    assert {"metrics.json", "metrics.tsv", "roc.png", "pr.png", "predictions.tsv"} <= {
        p.name for p in (work / "eval").iterdir()}
    metrics, run = got["metrics"], got["run"]
    assert metrics["n"] == run["sequences"] == 1000
    assert metrics["accuracy"] >= 0.95 and metrics["auroc"] >= 0.98, metrics
    assert 0 < run["transformer"] < 200, run
    # the ROC and precision-recall images
    assert sum("image/png" in o.get("data", {}) for o in code[-1].outputs) == 2
