"""Leakage audit of the lncRNA splits, independent of the build code: exact, reverse-complement and
near-duplicate sequences shared between training / validation and the tests.

    python benchmarks/lncrna_split_integrity.py   # writes benchmarks/results/lncrna_split_integrity.json

For ``data/lncrna`` (hold-out by transcript) and ``data/lncrna_gene`` (mouse hold-out by gene), with
its own FASTA reader (gzip, upper case, U -> T), per pair of splits: sequences identical (``exact``),
identical to the other's reverse complement (``revcomp``), and identical once a poly-A tail or a
poly-T head is trimmed (``polya``); label conflicts over all four files (also across strands); genes
shared with the mouse test (gene ids from the raw Ensembl headers, not the build's ``gene=`` tags);
CPAT human test records whose hg19 locus overlaps, on the same strand, a CPAT training lncRNA that is
in train or val (the human test carries no gene ids); and test sequences contained, as an exact
substring on either strand, in a training or validation sequence (``contained``), and the reverse.
``build`` removes exact duplicates on one strand (``lncrna/data.py``); the other counts are what is
left for a reader to weigh. For the human test, which is bar 1's, the shipped model is also scored
without every test record touched by any of these (``test_human_clean_*``: the records neither
identical on either strand, nor poly-A-identical, nor contained either way, nor on a training
lncRNA's locus), beside its score on the whole set (``test_human_all_*``). About a minute on 2 cores.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_lora.results import write_result  # noqa: E402
from lncrna.data import DEFAULT_RAW  # noqa: E402

SPLITS = ("train", "val", "test_human", "test_mouse")
PAIRS = (("train", "test_human"), ("train", "test_mouse"), ("val", "test_human"), ("val", "test_mouse"),
         ("train", "val"), ("test_human", "test_mouse"))
RAW_FILES = ("cpat/Human_test_coding_mRNA.fa.gz", "cpat/Human_test_noncoding_RNA.fa.gz",
             "cpat/Human_noncoding_transcripts_RNA.fa.gz", "prelncdata/human_lnc_train.fa.gz",
             "prelncdata/mouse_pc_train.fa.gz", "prelncdata/mouse_lnc_train.fa.gz",
             "prelncdata/mouse_lnc_test.fa.gz")
COMPLEMENT = str.maketrans("ACGTN", "TGCAN")
SEED_LEN = 32  # a contained sequence is found through its first 32 nt (every sequence is >= 200 nt)


def read(path: Path) -> list[tuple[str, str]]:
    """``(header, sequence)`` of a FASTA(.gz) file, the sequence upper-cased with U -> T."""
    records: list[tuple[str, str]] = []
    head, parts = None, []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if line.startswith(">"):
                if head is not None:
                    records.append((head, "".join(parts)))
                head, parts = line[1:], []
            else:
                parts.append(line.strip())
    if head is not None:
        records.append((head, "".join(parts)))
    return [(h, s.upper().replace("U", "T")) for h, s in records]


def md5(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


def revcomp(s: str) -> str:
    return s.translate(COMPLEMENT)[::-1]


def tags(header: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in header.split()[1:] if "=" in kv)


def contained(queries: list[str], targets: list[str]) -> set[tuple[int, int]]:
    """``(query, target)`` index pairs where the query is an exact substring of the target, on either strand."""
    index: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, q in enumerate(queries):
        for strand in (q, revcomp(q)):
            index[strand[:SEED_LEN]].append((i, strand))
    hits: set[tuple[int, int]] = set()
    for j, t in enumerate(targets):
        for p in range(len(t) - SEED_LEN + 1):
            for i, strand in index.get(t[p:p + SEED_LEN], ()):
                if t.startswith(strand, p):
                    hits.add((i, j))
    return hits


def audit(split_dir: Path, raw: dict[tuple[str, str], str]) -> tuple[dict[str, float], set[str]]:
    """The figures above for one folder of splits, and the ids of the human test records any of them
    touches; ``raw``: (raw file name, id) -> raw header."""
    sp = {n: read(split_dir / f"{n}.fa.gz") for n in SPLITS}
    out: dict[str, float] = {f"{n}_records": len(r) for n, r in sp.items()}
    exact = {n: {md5(s) for _, s in r} for n, r in sp.items()}
    rc = {n: {md5(revcomp(s)) for _, s in r} for n, r in sp.items()}
    polya = {n: {md5(s.rstrip("A").lstrip("T")) for _, s in r} for n, r in sp.items()}
    for a, b in PAIRS:
        out[f"{a}_vs_{b}_exact"] = len(exact[a] & exact[b])
        out[f"{a}_vs_{b}_revcomp"] = len(exact[a] & rc[b])
        out[f"{a}_vs_{b}_polya"] = len(polya[a] & polya[b])
    labels: dict[str, set[str]] = defaultdict(set)
    labels_rc: dict[str, set[str]] = defaultdict(set)
    for r in sp.values():
        for h, s in r:
            labels[md5(s)].add(tags(h)["label"])
            labels_rc[md5(revcomp(s))].add(tags(h)["label"])
    out["label_conflicts_exact"] = sum(len(v) > 1 for v in labels.values())
    out["label_conflicts_with_revcomp"] = sum(len(labels[k] | labels_rc[k]) > 1 for k in labels if k in labels_rc)

    def raw_header(h: str) -> str:
        return raw[(tags(h)["source"], h.split()[0])]

    def genes(n: str, label: str | None = None) -> set[str]:
        found = set()
        for h, _ in sp[n]:
            if label is None or tags(h)["label"] == label:
                m = re.search(r"gene:(\S+)", raw_header(h))
                if m:
                    found.add(m.group(1).split(".")[0])
        return found

    test_mouse_genes, test_mouse_mrna_genes = genes("test_mouse"), genes("test_mouse", "mRNA")
    out["test_mouse_genes_in_train"] = len(test_mouse_genes & genes("train"))
    out["test_mouse_genes_in_val"] = len(test_mouse_genes & genes("val"))
    out["test_mouse_mrna_genes"] = len(test_mouse_mrna_genes)
    out["test_mouse_mrna_genes_in_train"] = len(test_mouse_mrna_genes & genes("train"))

    def locus(header: str) -> tuple[str, str, int, int]:
        """(chromosome, strand, start, end) of a CPAT (UCSC table browser) header."""
        m = re.search(r"range=(\w+):(\d+)-(\d+).*strand=([+-])", header)
        if m is None:
            raise ValueError(f"no hg19 range=...strand= in the raw header {header!r}")
        return m.group(1), m.group(4), int(m.group(2)), int(m.group(3))

    def loci(n: str, source: str) -> list[tuple[str, str, int, int]]:
        return [locus(raw_header(h)) for h, _ in sp[n] if tags(h)["source"] == source]

    train_loci: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for n in ("train", "val"):
        for chrom, strand, a, b in loci(n, "Human_noncoding_transcripts_RNA.fa.gz"):
            train_loci[(chrom, strand)].append((a, b))
    def on_training_locus(header: str) -> bool:
        chrom, strand, a, b = locus(raw_header(header))
        return any(a < e and s < b for s, e in train_loci[(chrom, strand)])

    touched: set[str] = set()  # human test ids
    for key, source in (("lnc", "Human_test_noncoding_RNA.fa.gz"), ("mrna", "Human_test_coding_mRNA.fa.gz")):
        found = [h.split()[0] for h, _ in sp["test_human"] if tags(h)["source"] == source and on_training_locus(h)]
        out[f"test_human_{key}_locus_overlaps_train_lnc"] = len(found)
        touched.update(found)
    train_val = [s for n in ("train", "val") for _, s in sp[n]]
    seen = {md5(s) for s in train_val} | {md5(revcomp(s)) for s in train_val}
    seen_polya = {md5(s.rstrip("A").lstrip("T")) for s in train_val}
    for test in ("test_human", "test_mouse"):
        seqs = [s for _, s in sp[test]]
        inside, around = contained(seqs, train_val), contained(train_val, seqs)
        out[f"{test}_contained_in_train_val"] = len({i for i, _ in inside})
        out[f"train_val_contained_in_{test}"] = len({i for i, _ in around})
        if test == "test_human":
            ids = [h.split()[0] for h, _ in sp[test]]
            touched.update(ids[i] for i, _ in inside)
            touched.update(ids[j] for _, j in around)
            touched.update(i for i, s in zip(ids, seqs)
                           if md5(s) in seen or md5(s.rstrip("A").lstrip("T")) in seen_polya)
    out["test_human_touched"] = len(touched)
    return out, touched


def score_human_test(touched: set[str]) -> dict[str, float]:
    """The shipped cascade on the human test: on every record, and on those no split touches."""
    from lncrna.metrics import classification_metrics
    from lncrna.predict import Predictor

    records = read(ROOT / "data" / "lncrna" / "test_human.fa.gz")
    ids = [h.split()[0] for h, _ in records]
    y = np.array([int(tags(h)["label"] == "lncRNA") for h, _ in records])
    with Predictor() as predictor:
        prob = predictor.predict_sequences([s for _, s in records])
    clean = np.array([i not in touched for i in ids])
    out: dict[str, float] = {}
    for key, keep in (("all", np.ones(len(ids), bool)), ("clean", clean)):
        m = classification_metrics(y[keep], prob[keep])
        out.update({f"test_human_{key}_{k}": m[k] for k in ("n", "n_pos", "accuracy", "f1", "mcc", "auroc")})
    return out


def main() -> None:
    raw: dict[tuple[str, str], str] = {}
    for f in RAW_FILES:
        for h, _ in read(Path(DEFAULT_RAW) / f):
            raw.setdefault((Path(f).name, h.split()[0]), h)
    metrics: dict[str, dict[str, float]] = {}
    touched: dict[str, set[str]] = {}
    for name in ("lncrna", "lncrna_gene"):
        metrics[name], touched[name] = audit(ROOT / "data" / name, raw)
        print(name, metrics[name], flush=True)
    metrics["shipped"] = score_human_test(touched["lncrna"])  # the shipped model trained on data/lncrna
    print("shipped", metrics["shipped"], flush=True)
    print(write_result("lncrna_split_integrity", metrics, "python benchmarks/lncrna_split_integrity.py"))


if __name__ == "__main__":
    main()
