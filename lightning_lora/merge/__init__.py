"""Merging and composition of several adapters of one model (METHODS.md §6, §8).

The adapters live side by side as named adapters (:mod:`lightning_lora.core.multi`); each merge
adds a new named LoRA adapter. ``baselines``: task arithmetic, TIES, concatenation; ``lego``:
LoRA-LEGO. Import the submodules directly (``from lightning_lora.merge.lego import ...``).
"""
