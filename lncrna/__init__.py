"""lncrna: tell long non-coding RNA from mRNA with a small nucleotide BERT (LoRA-BERT style).

Kept light on purpose: importing ``lncrna`` imports nothing heavy (no torch, no transformers).
Import the submodules you need: ``lncrna.fasta``, ``lncrna.tokenization``, ``lncrna.data``.
"""

__version__ = "0.1.0"
