"""Known values of the session-8 candidate features (benchmarks/lncrna_peers/stage1_s8.py) on tiny
hand-made sequences. They were not adopted (no candidate passed the pre-registered rule); the test
keeps the recorded experiment reproducible."""

import math

import numpy as np

from benchmarks.lncrna_peers.stage1_s8 import fit_kmer_lr, kmer_lr_features, orf_ctx_features


def test_orf_ctx_known_values():
    # perfect Kozak GCCACC ATG G, ORF ATG GCT TAA, no upstream ATG
    assert orf_ctx_features("GCCACCATGGCTTAA").tolist() == [0.0, 1.0, 0.0, 7.0]
    # one upstream ATG (ATG TAA at 1), longest ORF ATG (CCC)x4 TGA at 7; context ATGTAA atg C
    # matches none of GCCRCC atg G
    assert orf_ctx_features("CATGTAAATGCCCCCCCCCCCCTGAAA").tolist() == [1.0, 0.0, 2.0, 0.0]
    # ORF at 3: context cut off at -6 -> NaN
    f = orf_ctx_features("CCCATGGCCTAG")
    assert f[:3].tolist() == [0.0, 1.0, 1.0] and math.isnan(f[3])
    # Kozak: -3 = G (R), +4 = A: GCCGCC ATG A -> 6 of 7; ORF without stop -> stop_type -1
    assert orf_ctx_features("GCCGCCATGACC").tolist() == [0.0, 1.0, -1.0, 6.0]
    assert np.isnan(orf_ctx_features("CCCCTTT")).all()  # no ATG


def test_kmer_lr_known_values():
    tabs = fit_kmer_lr(["AAAA"], ["CCCC"], ks=(3,))
    # coding: AAA x2 of 2; noncoding: CCC x2; add-one over 64 k-mers
    lr_aaa = math.log(3 / 66) - math.log(1 / 66)
    lr_ccc = math.log(1 / 66) - math.log(3 / 66)
    assert np.isclose(tabs[3][0], lr_aaa) and np.isclose(tabs[3][21], lr_ccc)
    assert np.isclose(kmer_lr_features("AAACCC", tabs)[0], (lr_aaa + 0 + 0 + lr_ccc) / 4)
    assert np.isclose(kmer_lr_features("AAAN", tabs)[0], lr_aaa)  # windows with N are skipped
    assert np.isnan(kmer_lr_features("AN", tabs)[0])
