#!/usr/bin/env bash
# Make room in the working tree for weights before device calls (benchmarks/README.md, "Running the
# whole queue in one GPU session"): a call carries the tree plus its `carry` paths, 64 MiB in all.
#
#   bash benchmarks/slim_tree.sh slim      # move what no GPU job reads out of the tree, and the
#                                          # lncRNA FASTA, the shipped classifier and the committed
#                                          # CLoRA stages into ignored .carry/ folders
#   bash benchmarks/slim_tree.sh restore   # put everything back (git status is clean again)
#
# After `slim` the tracked tree is about 16 MB. Carry .carry/lnc_a, lnc_b, lnc_c and lnc_model with
# the wheels in call 1 (about 42 MB), and .carry/clora_ckpt (17 MB, read by gpu_queue.sh's smollm2
# group) with SmolLM2's last parts. Files held out of the tree wait in .carry/held.
set -euo pipefail
cd "$(dirname "$0")/.."
HELD=.carry/held
case "${1:-}" in
slim)
    [[ -d $HELD ]] && { echo "slim_tree: $HELD exists: already slimmed (run restore first)" >&2; exit 1; }
    mkdir -p $HELD/gsm8k $HELD/rte $HELD/cola .carry/lnc_a .carry/lnc_b .carry/lnc_c .carry/lnc_model .carry/gene_lnc
    mv data/nlp/gsm8k/*.jsonl $HELD/gsm8k/
    mv data/nlp/rte/test_unlabeled.tsv $HELD/rte/
    mv data/nlp/cola/test_unlabeled.tsv $HELD/cola/
    mv data/lncrna/train.fa.gz .carry/lnc_a/
    mv data/lncrna/test_human.fa.gz data/lncrna/val.fa.gz .carry/lnc_b/
    mv data/lncrna/test_mouse.fa.gz .carry/lnc_c/
    # the gene hold-out's splits (19 MB): carried in a call of their own, for gpu_queue.sh's lncgene group
    mv data/lncrna_gene/*.fa.gz .carry/gene_lnc/
    mv lncrna/weights/default/model.safetensors .carry/lnc_model/
    if [[ -d benchmarks/checkpoints/clora_v2 ]]; then rm -rf .carry/clora_ckpt; mv benchmarks/checkpoints/clora_v2 .carry/clora_ckpt; fi
    # the gene hold-out's lncRNA MLM, classifier and baseline (24 MB): carry .carry/lnc_gene_ckpt when a
    # job continues that MLM (benchmarks/checkpoints/README.md)
    if [[ -d benchmarks/checkpoints/lncrna_gene ]]; then rm -rf .carry/lnc_gene_ckpt; mv benchmarks/checkpoints/lncrna_gene .carry/lnc_gene_ckpt; fi
    # its continuations (a longer-pretrained MLM and its classifier, 24 MB each): .carry/lnc_gene<N>_ckpt
    for n in 2 3 4; do
        if [[ -d benchmarks/checkpoints/lncrna_gene$n ]]; then rm -rf .carry/lnc_gene${n}_ckpt; mv benchmarks/checkpoints/lncrna_gene$n .carry/lnc_gene${n}_ckpt; fi
    done
    ;;
restore)
    [[ -d $HELD ]] || { echo "slim_tree: nothing to restore ($HELD missing)" >&2; exit 1; }
    mv $HELD/gsm8k/*.jsonl data/nlp/gsm8k/
    mv $HELD/rte/test_unlabeled.tsv data/nlp/rte/
    mv $HELD/cola/test_unlabeled.tsv data/nlp/cola/
    mv .carry/lnc_a/*.fa.gz .carry/lnc_b/*.fa.gz .carry/lnc_c/*.fa.gz data/lncrna/
    mv .carry/gene_lnc/*.fa.gz data/lncrna_gene/
    mv .carry/lnc_model/model.safetensors lncrna/weights/default/
    if [[ -d .carry/clora_ckpt && ! -e benchmarks/checkpoints/clora_v2 ]]; then mv .carry/clora_ckpt benchmarks/checkpoints/clora_v2; fi
    if [[ -d .carry/lnc_gene_ckpt && ! -e benchmarks/checkpoints/lncrna_gene ]]; then mv .carry/lnc_gene_ckpt benchmarks/checkpoints/lncrna_gene; fi
    for n in 2 3 4; do
        if [[ -d .carry/lnc_gene${n}_ckpt && ! -e benchmarks/checkpoints/lncrna_gene$n ]]; then mv .carry/lnc_gene${n}_ckpt benchmarks/checkpoints/lncrna_gene$n; fi
    done
    rm -r $HELD
    ;;
*) echo "usage: bash benchmarks/slim_tree.sh slim|restore" >&2; exit 2 ;;
esac
git status --short
