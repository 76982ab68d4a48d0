"""lncrna.data: the build rules on a tiny synthetic raw folder, and the committed real splits."""

from __future__ import annotations

import gzip
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lncrna import data
from lncrna.data import LABELS, MIN_LENGTH, RAW_FILES, SPLITS, build, load_split

DATA = Path(__file__).resolve().parents[2] / "data"


# --- the rules, on a synthetic raw folder ------------------------------------------------------
def _seqs(n: int, seed: int, length: int = 250) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACGT"), length)) for _ in range(n)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    raw = tmp_path_factory.mktemp("raw")
    s = iter(_seqs(200, seed=7))
    test_mrna = [next(s) for _ in range(4)]
    test_lnc = [next(s) for _ in range(4)]
    mouse_test_lnc = [next(s) for _ in range(3)]
    shared_human = next(s)  # in both human lnc train files: cross-file duplicate
    conflicts = [next(s) for _ in range(3)]  # in mouse pc and mouse lnc train: label conflicts
    mouse_pc = [next(s) for _ in range(7)] + conflicts
    short = _seqs(1, seed=8, length=MIN_LENGTH - 1)[0]
    files = {
        "cpat/Human_test_coding_mRNA.fa.gz": test_mrna + [test_mrna[0]],  # within-file duplicate
        "cpat/Human_test_noncoding_RNA.fa.gz": test_lnc + [short],
        "cpat/Human_noncoding_transcripts_RNA.fa.gz": [test_lnc[0], shared_human, next(s), short],
        "prelncdata/human_lnc_train.fa.gz": [shared_human.lower(), test_mrna[1], next(s), next(s)],
        "prelncdata/mouse_pc_train.fa.gz": mouse_pc,
        "prelncdata/mouse_lnc_train.fa.gz": [
            *(c.replace("T", "U") for c in conflicts), next(s), next(s), mouse_test_lnc[0]],
        "prelncdata/mouse_lnc_test.fa.gz": mouse_test_lnc,
    }
    assert set(files) == set(RAW_FILES)
    for rel, seqs in files.items():
        (raw / rel).parent.mkdir(exist_ok=True)
        stem = Path(rel).name.split(".")[0]
        text = "".join(f">{stem}_{i} desc\n{q}\n" for i, q in enumerate(seqs))
        (raw / rel).write_bytes(gzip.compress(text.encode(), mtime=0))
    out = raw.parent / "built" / "lncrna"
    counts = build(raw, out)
    splits = {name: load_split(name, out) for name in SPLITS}
    return dict(raw=raw, out=out, counts=counts, splits=splits, test_mrna=test_mrna,
                test_lnc=test_lnc, conflicts=conflicts, shared_human=shared_human,
                mouse_test_lnc=mouse_test_lnc, mouse_pc=mouse_pc)


def test_synthetic_test_sets(synthetic: dict) -> None:
    th, tm = synthetic["splits"]["test_human"], synthetic["splits"]["test_mouse"]
    assert sorted(th.seq[th.label == 0]) == sorted(synthetic["test_mrna"])  # within-file dup dropped
    assert sorted(th.seq[th.label == 1]) == sorted(synthetic["test_lnc"])  # short one dropped
    assert sorted(tm.seq[tm.label == 1]) == sorted(synthetic["mouse_test_lnc"])
    held = tm[tm.label == 0]
    assert len(held) == 2 and set(held.seq) <= set(synthetic["mouse_pc"])  # 20% of 10
    assert set(th.species) == {"human"} and set(tm.species) == {"mouse"}


def test_synthetic_pool_removals(synthetic: dict) -> None:
    pool = pd.concat([synthetic["splits"]["train"], synthetic["splits"]["val"]])
    tests = set(synthetic["splits"]["test_human"].seq) | set(synthetic["splits"]["test_mouse"].seq)
    assert not set(pool.seq) & tests
    held_out = set(synthetic["splits"]["test_mouse"].seq)
    in_pool_candidates = [c for c in synthetic["conflicts"] if c not in held_out]
    assert in_pool_candidates  # else this synthetic case would not exercise the conflict rule
    assert not set(synthetic["conflicts"]) & set(pool.seq)  # label conflicts: dropped from training
    assert (pool.seq == synthetic["shared_human"]).sum() == 1  # cross-file duplicate kept once
    kept = pool[pool.seq == synthetic["shared_human"]]
    assert kept.source.item() == "Human_noncoding_transcripts_RNA.fa.gz"  # the earlier file wins
    assert pool.seq.map(len).min() >= MIN_LENGTH
    # 8 mouse pc candidates minus conflicts not held out for test; mouse lnc train 6 - 3 conflicts
    # - test copy = 2; cpat 4 - short - test copy = 2; prelnc human 4 - shared - test mRNA = 2
    assert len(pool) == (8 - len(in_pool_candidates)) + 2 + 2 + 2
    assert len(pool) == synthetic["counts"]["train"] + synthetic["counts"]["val"]
    assert (pool.label.values == pool.seq.isin(synthetic["mouse_pc"]).map({True: 0, False: 1}).values).all()


def test_synthetic_build_is_byte_reproducible(synthetic: dict, tmp_path: Path) -> None:
    build(synthetic["raw"], tmp_path / "again")
    for name in SPLITS:
        a = (synthetic["out"] / f"{name}.fa.gz").read_bytes()
        b = (tmp_path / "again" / f"{name}.fa.gz").read_bytes()
        assert a == b, name


def test_load_split_rejects_unknown_name(synthetic: dict) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_split("test", synthetic["out"])


def test_round_half_up() -> None:
    assert [data._round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]


# --- the committed real splits ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> dict[str, pd.DataFrame]:
    return {name: load_split(name) for name in SPLITS}


@pytest.fixture(scope="module")
def provenance() -> str:
    return (DATA / "PROVENANCE.md").read_text()


def _table(text: str, header: str) -> list[list[str]]:
    """Rows (cells stripped) of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows


def test_no_test_sequence_in_train_or_val(real: dict[str, pd.DataFrame]) -> None:
    test = set(real["test_human"].seq) | set(real["test_mouse"].seq)
    assert not set(real["train"].seq) & test
    assert not set(real["val"].seq) & test
    assert not set(real["train"].seq) & set(real["val"].seq)
    ids = pd.concat(real.values()).id
    assert ids.is_unique


def test_lengths_labels_and_alphabet(real: dict[str, pd.DataFrame]) -> None:
    for name, df in real.items():
        assert df.seq.map(len).min() >= MIN_LENGTH, name
        assert set(df.label) <= set(LABELS.values()), name
        assert df.seq.is_unique, name
        assert df.seq.str.fullmatch("[ACGTN]+").all(), name
    th = real["test_human"]
    assert set(th.source[th.label == 0]) == {"Human_test_coding_mRNA.fa.gz"}
    assert set(th.source[th.label == 1]) == {"Human_test_noncoding_RNA.fa.gz"}


def test_counts_match_provenance(real: dict[str, pd.DataFrame], provenance: str) -> None:
    rows = _table(provenance, "| split | species | label | sequences |")
    documented = {(s, sp, lab): int(n) for s, sp, lab, n in rows}
    actual = {
        (name, sp, lab): int(((df.species == sp) & (df.label == LABELS[lab])).sum())
        for name, df in real.items() for sp in ("human", "mouse") for lab in LABELS
    }
    assert documented == {key: n for key, n in actual.items() if n}
    totals = {r[0]: int(r[1]) for r in _table(provenance, "| split | sequences |")}
    assert totals == {name: len(df) for name, df in real.items()}


def test_files_match_provenance_hashes(provenance: str) -> None:
    for name, *_, file_sha, content_sha in _table(provenance, "| split | sequences |"):
        path = DATA / "lncrna" / f"{name}.fa.gz"
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(file_sha)
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest().startswith(content_sha)


def test_mouse_held_out_is_20_percent(real: dict[str, pd.DataFrame], provenance: str) -> None:
    raw_rows = {r[0]: r for r in _table(provenance, "| raw file |")}
    kept_pc = int(raw_rows["prelncdata/mouse_pc_train.fa.gz"][6])
    tm = real["test_mouse"]
    held = tm[tm.label == 0]
    assert set(held.source) == {"mouse_pc_train.fa.gz"}
    assert len(held) == math.floor(0.2 * kept_pc + 0.5)
    assert re.search(rf"held out for test: {len(held)} of {kept_pc}", provenance)
    pool_pc = pd.concat([real["train"], real["val"]]).query("source == 'mouse_pc_train.fa.gz'")
    assert len(held) + len(pool_pc) <= kept_pc  # the rest went to the pool (minus removals)


def test_validation_is_10_percent_per_stratum(real: dict[str, pd.DataFrame]) -> None:
    for (sp, lab), n_val in real["val"].groupby(["species", "label"]).size().items():
        n_train = ((real["train"].species == sp) & (real["train"].label == lab)).sum()
        assert n_val == math.floor(0.1 * (n_val + n_train) + 0.5), (sp, lab)


@pytest.mark.slow  # needs ../shared/data/raw beside the checkout (CI has it)
def test_rebuild_gives_committed_bytes(tmp_path: Path) -> None:
    """About 15 s: rebuild from the raw files and compare with the committed splits."""
    build(data.DEFAULT_RAW, tmp_path / "lncrna")
    for name in SPLITS:
        rebuilt = (tmp_path / "lncrna" / f"{name}.fa.gz").read_bytes()
        assert rebuilt == (DATA / "lncrna" / f"{name}.fa.gz").read_bytes(), name


def test_provenance_section_keeps_other_datasets(tmp_path: Path) -> None:
    path = tmp_path / "PROVENANCE.md"
    path.write_text("# Data provenance\n\n## NLP\n\nglue stuff\n")
    data._write_section(path, "## lncRNA v1\n")
    data._write_section(path, "## lncRNA v2\n")  # replaced in place, not appended twice
    text = path.read_text()
    assert "## NLP\n\nglue stuff" in text and "v2" in text and "v1" not in text
    assert text.count(data._BEGIN) == 1 and text.count(data._END) == 1


# --- gene hold-out (build --mouse-holdout gene) -------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_genes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Mouse pc: 10 genes of 3 isoforms each; one mouse lnc train transcript belongs to pc gene G0
    (a gene with coding and noncoding transcripts); the rest have genes of their own or none."""
    raw = tmp_path_factory.mktemp("raw_genes")
    s = iter(_seqs(200, seed=11))
    headers: dict[str, list[tuple[str, str]]] = {rel: [] for rel in RAW_FILES}
    for g in range(10):
        headers["prelncdata/mouse_pc_train.fa.gz"] += [
            (f"pc_{g}_{i} cdna chromosome:GRCm38 gene:ENSMUSG{g:011d}.{i + 1}", next(s)) for i in range(3)]
    headers["prelncdata/mouse_lnc_train.fa.gz"] = [
        ("lnc_G0 ncrna gene:ENSMUSG00000000000.2", next(s))] + [
        (f"lnc_{i} ncrna gene:ENSMUSGL{i:010d}.1", next(s)) for i in range(6)]
    headers["prelncdata/mouse_lnc_test.fa.gz"] = [(f"lnct_{i} gene:ENSMUSGT{i:010d}.1", next(s)) for i in range(3)]
    for rel in ("cpat/Human_test_coding_mRNA.fa.gz", "cpat/Human_test_noncoding_RNA.fa.gz",
                "cpat/Human_noncoding_transcripts_RNA.fa.gz", "prelncdata/human_lnc_train.fa.gz"):
        stem = Path(rel).name.split(".")[0]
        headers[rel] = [(f"{stem}_{i}", next(s)) for i in range(4)]  # no gene ids (CPAT-like)
    for rel, recs in headers.items():
        (raw / rel).parent.mkdir(exist_ok=True)
        text = "".join(f">{h}\n{q}\n" for h, q in recs)
        (raw / rel).write_bytes(gzip.compress(text.encode(), mtime=0))
    out = raw.parent / "built_genes" / "lncrna_gene"
    counts = build(raw, out, holdout="gene")
    splits = {name: load_split(name, out) for name in SPLITS}
    genes = {}
    for name in SPLITS:
        with gzip.open(out / f"{name}.fa.gz", "rt") as fh:
            genes[name] = {line.split()[0][1:]: line.split("gene=")[1].split()[0]
                           for line in fh if line.startswith(">")}
    return dict(raw=raw, out=out, counts=counts, splits=splits, genes=genes, headers=headers)


def test_gene_holdout_takes_whole_genes(synthetic_genes: dict) -> None:
    tm, genes = synthetic_genes["splits"]["test_mouse"], synthetic_genes["genes"]
    held = tm[tm.label == 0]
    held_genes = {genes["test_mouse"][i] for i in held.id}
    assert len(held_genes) == 2  # 20 % of 10 genes
    assert len(held) == 3 * len(held_genes)  # every isoform of a held-out gene
    others = {g for name in ("train", "val") for g in genes[name].values() if g != "-"}
    assert not held_genes & others
    assert not set(genes["train"].values()) - {"-"} & set(genes["val"].values())  # train / val by gene too
    # the lncRNA transcript of pc gene G0 follows its gene: removed from the pool if G0 is a test gene
    g0_in_pool = any(g == "ENSMUSG00000000000" for name in ("train", "val") for g in genes[name].values())
    assert g0_in_pool == ("ENSMUSG00000000000" not in held_genes)


def test_gene_holdout_val_keeps_genes_together_across_strata(synthetic_genes: dict) -> None:
    genes = synthetic_genes["genes"]
    val_genes = {g for g in genes["val"].values() if g != "-"}
    train_genes = {g for g in genes["train"].values() if g != "-"}
    assert val_genes and not val_genes & train_genes
    # CPAT-like records without a gene id are each their own group and still split 10 % / 90 %
    assert set(genes["test_human"].values()) == {"-"}


def test_gene_holdout_differs_from_transcript_holdout_only_where_it_should(synthetic_genes: dict,
                                                                           tmp_path: Path) -> None:
    counts = build(synthetic_genes["raw"], tmp_path / "tx")
    tx = load_split("test_mouse", tmp_path / "tx")
    assert len(tx[tx.label == 0]) == 6  # 20 % of 30 transcripts, drawn one by one
    with gzip.open(tmp_path / "tx" / "train.fa.gz", "rt") as fh:
        assert "gene=" not in fh.read()  # the transcript build's headers are unchanged
    assert counts["test_human"] == synthetic_genes["counts"]["test_human"]
    again = build(synthetic_genes["raw"], tmp_path / "again", holdout="gene")
    assert again == synthetic_genes["counts"]
    for name in SPLITS:
        assert (tmp_path / "again" / f"{name}.fa.gz").read_bytes() == \
            (synthetic_genes["out"] / f"{name}.fa.gz").read_bytes(), name


def test_unknown_holdout_is_rejected(synthetic_genes: dict) -> None:
    with pytest.raises(ValueError, match="holdout must be one of"):
        data.make_splits(synthetic_genes["raw"], holdout="isoform")


def test_committed_gene_split_shares_no_gene(provenance: str) -> None:
    out = DATA / "lncrna_gene"
    genes = {}
    for name in SPLITS:
        with gzip.open(out / f"{name}.fa.gz", "rt") as fh:
            genes[name] = {line.split("gene=")[1].split()[0] for line in fh if line.startswith(">")} - {"-"}
    test = genes["test_human"] | genes["test_mouse"]
    assert genes["test_mouse"] and not genes["train"] & test and not genes["val"] & test
    assert not genes["train"] & genes["val"]
    section = provenance.split("--mouse-holdout gene: begin", 1)[1]
    for name, *_, file_sha, content_sha in _table(section, "| split | sequences |"):
        raw = (out / f"{name}.fa.gz").read_bytes()
        assert hashlib.sha256(raw).hexdigest().startswith(file_sha), name
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest().startswith(content_sha), name


@pytest.mark.slow  # needs ../shared/data/raw beside the checkout (CI has it)
def test_rebuild_gene_split_gives_committed_bytes(tmp_path: Path) -> None:
    build(data.DEFAULT_RAW, tmp_path / "lncrna_gene", tmp_path / "P.md", holdout="gene")
    for name in SPLITS:
        rebuilt = (tmp_path / "lncrna_gene" / f"{name}.fa.gz").read_bytes()
        assert rebuilt == (DATA / "lncrna_gene" / f"{name}.fa.gz").read_bytes(), name
