"""``benchmarks/lncrna_split_integrity.py``'s containment search: a sequence inside another is found
on either strand, and only then (every split sequence is >= 200 nt, the search seeds on 32 nt)."""

from __future__ import annotations

import random

from benchmarks.lncrna_split_integrity import contained, revcomp


def _seq(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACGT") for _ in range(n))


def test_contained_finds_both_strands_and_nothing_else():
    host = _seq(1000, 0)
    inside = host[300:600]
    queries = [inside, revcomp(host[100:400]), _seq(300, 1), host[990:] + _seq(250, 2)]
    assert contained(queries, [_seq(800, 3), host]) == {(0, 1), (1, 1)}
    assert contained([host], queries) == set()  # the longer sequence is not inside the shorter
