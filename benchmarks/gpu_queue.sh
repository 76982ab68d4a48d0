#!/usr/bin/env bash
# The GPU benchmark queue, run in the background on the lent H200 while weights are still being
# staged (see benchmarks/README.md, "Getting model weights onto the GPU machine").
#
#   bash benchmarks/gpu_queue.sh start ddp     DEADLINE   # 2 GPUs only: DDP scaling (#2), before the rest
#   bash benchmarks/gpu_queue.sh start quiet   DEADLINE   # step-time benchmarks (#2, #5): alone, first
#   bash benchmarks/gpu_queue.sh start minilm  DEADLINE   # MiniLM benchmarks (#4, #5, #6, #7)
#   bash benchmarks/gpu_queue.sh start smollm2 DEADLINE   # SmolLM2, diffusion, federated, lncRNA
#   JOB=name GPU_CMD='...' bash benchmarks/gpu_queue.sh start cmd DEADLINE  # one command line as a job
#   bash benchmarks/gpu_queue.sh status                   # one line per job, tails of the logs
#   bash benchmarks/gpu_queue.sh watch SECONDS            # wait (not past DEADLINE), status, snapshot
#   bash benchmarks/gpu_queue.sh collect                  # stop everything, pack results into $OUT
#   ONLY="smora lncrna" bash benchmarks/gpu_queue.sh start ...  # only these jobs of the group
#
# Keep a device call in flight the whole time (`watch 540` back to back): the machine is handed
# back about 30 s after a call ends, background jobs or not, and everything on it is lost (session
# 3 lost its first 7 minutes that way). Each `watch`/`snapshot` returns results.tgz, so what has
# finished survives a lost machine; unpack it over the checkout and the resumable jobs continue.
# Slimming the checkout to make room for weights: ffa_federated.py's lncRNA task needs
# lncrna/weights/default (the shipped model is its base), so keep that file in the tree.
#
# DEADLINE is a Unix time: every job gets SIGINT then (resumable ones keep their finished runs in
# their raw JSONL files). Jobs run in a private copy of the repo (/tmp/w), because each device call
# re-copies the checkout over the working tree and would clobber files the jobs are appending to.
# Model packages must already be installed under /tmp/site (the staged parts' install.sh), with
# biopython and gguf; Flower/Opacus under /tmp/site_fed and diffusers under /tmp/site_diff, kept
# apart because their pinned needs (protobuf, requests, ...) would shadow the image's own for every job.
set -u
W=/tmp/w
LOGS=$W/logs

launch() {  # name, then the command
    local name=$1; shift
    # ONLY="a b": start just the named jobs of a group (a session too short for all of them)
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then echo "skip $name: not in ONLY"; return; fi
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 30 )); then echo "skip $name: deadline passed"; return; fi
    # a new session whose leader (pid in $name.pid) becomes `timeout`: the job outlives the device
    # call, and `kill -- -PID` reaches it and every worker process it spawned
    ( cd $W && setsid -f bash -c 'echo $$ >"$0"; exec timeout -s INT -k 30 "$@"' "$LOGS/$name.pid" $left "$@" \
        >"$LOGS/$name.log" 2>&1 </dev/null )
    echo "started $name (${left}s)"
}

clora_tars() {
    # v1's and v2's stages in two archives (each under the 16 MiB a returned file may have; both bases
    # together are not); stages.json, the classifier and the text encoder of v1 go in both
    [[ -f $W/runs/clora_composition/stages.json ]] || return 0
    # v2's LoRAs in a third (0.48 MB each compressed): with the v2 base (13.65 MB compressed) four come
    # to 15.6 MB and six to 16.5 MB of the 16 MiB (16.78 MB) a returned file may have, no margin left
    (cd $W/runs && tar -czf $OUT/clora_ckpt.tgz --exclude='clora_composition/v2_*' clora_composition \
        && tar -czf $OUT/clora_v2_ckpt.tgz clora_composition/stages.json clora_composition/classifier.safetensors \
            $(ls -d clora_composition/v2_* 2>/dev/null | grep -v '^clora_composition/v2_lora_') \
        && if compgen -G 'clora_composition/v2_lora_*' >/dev/null; then tar -czf $OUT/clora_v2_loras.tgz \
            clora_composition/stages.json clora_composition/v2_lora_*; fi)
}

case "${1:-}" in
start)
    group=$2 DEADLINE=$3
    echo $DEADLINE >/tmp/deadline  # for `watch`
    if [[ ! -d $W ]]; then
        mkdir -p $W && tar -c --exclude=./.carry --exclude='./.whl*' --exclude=./.git . | tar -x -C $W
    else
        # a later group gets the code as it is now (results and raw files in $W stay as the jobs left them)
        tar -c benchmarks/*.py benchmarks/*.sh benchmarks/lncrna_peers lightning_lora lncrna/*.py | tar -x -C $W
    fi
    mkdir -p $LOGS
    export PYTHONPATH=/tmp/site OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    PY=python3
    # what is still to run (session 3 finished IncreLoRA, Flexora, LEGO, LQ-LoRA memory,
    # GradNormLoRP and Bone: benchmarks/results/gpu_sessions.md has their commands)
    if [[ $group == minilm ]]; then
        # LoRA-SB first (its bar), then everything (resumes from the raw file; writes the result)
        launch structure_init bash -c "$PY benchmarks/structure_init_glue.py --only lora_sb --workers 3 --threads 1; \
            $PY benchmarks/structure_init_glue.py --workers 3 --threads 1"
        launch smora $PY benchmarks/smora_multitask.py --workers 5 --threads 1
        launch dylora bash -c "$PY benchmarks/dylora_sst2.py --workers 2 --threads 1; \
            $PY benchmarks/dylora_sst2.py --mode full --workers 2 --threads 1"
        # rank 8 trains only in the ~1/8 of steps that sample it: the one DyLoRA run twice as long
        launch dylora_long $PY benchmarks/dylora_sst2.py --mode full --dylora-steps 2000 --workers 2 --threads 1
        # per-method rate grids extended past their edges (#4 bars 2 and 3)
        # INCRE_STEPS/INCRE_ARGS: e.g. 3000 and "--incre-rank-num 4 --increlora-dropout 0.3" (session 7 review)
        launch increlora $PY benchmarks/increlora_glue.py --sst2-steps ${INCRE_STEPS:-1000} ${INCRE_ARGS:-} --workers ${GLUE_WORKERS:-3}
        # FLEXORA_ARGS: e.g. "--retrain-budget full" (session 12: the official code's budget)
        launch flexora $PY benchmarks/flexora_glue.py --sst2-steps 1000 ${FLEXORA_ARGS:-} --workers ${GLUE_WORKERS:-3}
        # LEGO_ARGS: e.g. "--init-per-task" (session 12: each task's LoRA from its own seed)
        launch lego $PY benchmarks/lego_glue.py --workers ${GLUE_WORKERS:-3} --threads 1 --adapter-dir runs/lego_adapters ${LEGO_ARGS:-}
    elif [[ $group == smollm2 ]]; then
        # the lncRNA FASTA files may travel in .carry/lnc_* (the checkout slimmed to make room for weights)
        if compgen -G ".carry/lnc_*/*.fa.gz" >/dev/null; then mkdir -p $W/data/lncrna && cp .carry/lnc_*/*.fa.gz $W/data/lncrna/; fi
        for m in .carry/mlm*; do [[ -d $m ]] && mkdir -p $W/.carry && cp -r $m $W/.carry/; done
        # CLoRA's finished stages from an earlier session: committed in benchmarks/checkpoints/clora_v2
        # (session 11's v2 base, classifier and LoRAs), which benchmarks/slim_tree.sh moves to
        # .carry/clora_ckpt to make room; or a clora_ckpt.tgz of this session unpacked there
        for ck in .carry/clora_ckpt benchmarks/checkpoints/clora_v2; do
            [[ -d $ck && ! -d $W/runs/clora_composition ]] && mkdir -p $W/runs && cp -r $ck $W/runs/clora_composition
        done
        # the shipped classifier (ffa_federated's lncRNA base) when the slimmed checkout carried it apart
        [[ -f .carry/lnc_model/model.safetensors ]] && cp .carry/lnc_model/model.safetensors $W/lncrna/weights/default/
        # LQ-LoRA cost tables built on a CPU machine (--tables-only) after $W was copied for the quiet group
        lq=benchmarks/results/raw/lq_lora_smollm2.jsonl
        if [[ -f $lq ]] && (( $(wc -l <$lq) > $(cat $W/$lq 2>/dev/null | wc -l) )); then cp $lq $W/$lq; fi
        launch lq_smollm2 $PY benchmarks/lq_lora_smollm2.py
        # TRANS_LORA_ARGS: e.g. "--max-rounds 10 --seed 1" (each variant keeps its own parts and result)
        launch trans_lora $PY benchmarks/trans_lora.py ${TRANS_LORA_ARGS:-}
        launch trans_lora_bal $PY benchmarks/trans_lora.py --balance ${TRANS_LORA_ARGS:-}  # class-balanced distillation (ablation)
        # seeds 1 and 2 of the same recipe (TRANS_LORA_ARGS with any --seed taken out; both parts: a result
        # file is written only then): trans_lora_seed1.json, trans_lora_seed2.json, or with "--target
        # verbalizer" trans_lora_verbalizer_seed1.json...; about 12-20 minutes side by side on one H200
        recipe=$(sed -E 's/--seed[= ]+[0-9]+//g' <<<"${TRANS_LORA_ARGS:-}")
        launch trans_lora_seeds bash -c "$PY benchmarks/trans_lora.py $recipe --seed 1 & \
            $PY benchmarks/trans_lora.py $recipe --seed 2; wait"
        # CLORA_ARGS: the LoRA recipe (e.g. --lora-steps 1500 --lora-lr 3e-4 1e-3 2e-3); then the same stages
        # sampled at a second guidance scale (its own result and figure, clora_composition_g<scale>)
        launch clora env PYTHONPATH=/tmp/site:/tmp/site_diff bash -c "$PY benchmarks/clora_composition.py \
            --ckpt-dir runs/clora_composition ${CLORA_ARGS:-} && $PY benchmarks/clora_composition.py \
            --ckpt-dir runs/clora_composition ${CLORA_ARGS:-} --guidance ${CLORA_GUIDANCE2:-1.5}"
        # CLoRA's base v2 (cross-attention built to localise) and its gate at 16x16 and 32x32: the
        # diagnosis exits 3 when the maps do not localise; LoRAs and the comparison only after a pass
        launch clora_v2 env PYTHONPATH=/tmp/site:/tmp/site_diff bash -c "$PY benchmarks/clora_composition.py \
            --base-arch v2 --ckpt-dir runs/clora_composition --stop-after base && for r in 16 32; do \
            $PY benchmarks/clora_mask_diagnosis.py --ckpt-dir runs/clora_composition --base-arch v2 --device cuda \
            --runs real base --samples 64 --attention-res \$r --gate --out logs/clora_gate\$r; echo gate\$r rc=\$?; done"
        # CLoRA v2 with 8x8 maps (session 10: the r16 / r32 gates failed, the 8x8 maps separate; readable 0.234
        # < 0.25): gate at r8 on the carried base, LoRAs + comparison on a pass; CLORA_V2_CONTINUE_TO=10000
        # continues the base (warm restart) and gates again when only readable failed; CLORA_V2_BASE,
        # CLORA_V2_ARGS, CLORA_V2_RES: see benchmarks/clora_v2_r8.sh
        launch clora_v2_r8 env PYTHONPATH=/tmp/site:/tmp/site_diff PY=$PY bash benchmarks/clora_v2_r8.sh
        launch ffa env PYTHONPATH=/tmp/site:/tmp/site_fed $PY benchmarks/ffa_federated.py --workers 3 --seeds ${FFA_SEEDS:-0,1,2}
        [[ ${LNCRNA:-0} == 1 ]] && launch lncrna $PY benchmarks/lncrna_gpu_run.py --out runs/lncrna3 --mlm-init ${LNCRNA_MLM:-.carry/mlm2} \
            --pretrain-minutes ${LNCRNA_PRETRAIN_MIN:-10} --finetune-minutes 2.0 --finetune-epochs 20 \
            --species mouse --variants lora:32 full
    elif [[ $group == lncgene ]]; then
        # the lncRNA model on the gene hold-out (data/lncrna_gene; slim_tree.sh carries its FASTA in
        # .carry/gene_lnc, a name outside the .carry/lnc_* glob above): pretraining from scratch on
        # that split's train sequences (the earlier MLM saw sequences that are test transcripts there),
        # fine-tuning, evaluation; runs/lncrna3 so that `collect` brings back figures, MLM and classifier.
        # One GPU: CUDA_VISIBLE_DEVICES picks it.
        if compgen -G ".carry/gene_lnc/*.fa.gz" >/dev/null; then
            mkdir -p $W/data/lncrna_gene && cp .carry/gene_lnc/*.fa.gz $W/data/lncrna_gene/
        fi
        # LNCRNA_MLM_INIT=.carry/lnc_gene2_ckpt/mlm continues the latest gene MLM committed in
        # benchmarks/checkpoints/lncrna_gene2 (lncrna_gene: the first one; slim_tree.sh moves both into
        # .carry; carry the one needed in a call of its own).
        # The epochs size the LR schedule and the minutes only cut it: session 16 stopped at the default 40
        # epochs after 318 s of the 12 minutes asked (about 8 s an epoch), so 85 epochs fill about 11.5 of 12
        init=()
        if [[ -n ${LNCRNA_MLM_INIT:-} ]]; then
            mkdir -p $W/.carry && cp -r "$LNCRNA_MLM_INIT" $W/.carry/mlm_init && init=(--mlm-init .carry/mlm_init)
        fi
        launch lncrna $PY benchmarks/lncrna_gpu_run.py --data data/lncrna_gene --out runs/lncrna3 "${init[@]}" \
            --pretrain-minutes ${LNCRNA_PRETRAIN_MIN:-12} --pretrain-epochs ${LNCRNA_PRETRAIN_EPOCHS:-85} \
            --finetune-minutes 2.0 --finetune-epochs 20 --species mouse --variants lora:32 full
    elif [[ $group == quiet ]]; then
        # timings: alone on the GPU (random weights, nothing to stage); start the others after it ends
        # three rounds of every variant in turn (~8 min): session 4's single rounds moved by up to 20 ms with the host
        # then lncrna predict's throughput on the GPU (timed too: alone); its FASTA and the shipped
        # classifier may travel in .carry (the checkout slimmed to make room for weights)
        if compgen -G ".carry/lnc_*/*.fa.gz" >/dev/null; then mkdir -p $W/data/lncrna && cp .carry/lnc_*/*.fa.gz $W/data/lncrna/; fi
        [[ -f .carry/lnc_model/model.safetensors ]] && cp .carry/lnc_model/model.safetensors $W/lncrna/weights/default/
        launch quiet bash -c "$PY benchmarks/lora_vs_peft.py --rounds ${LVP_ROUNDS:-3} ${LVP_ARGS:-} && $PY benchmarks/method_overhead.py \
            && $PY benchmarks/lncrna_throughput.py --device cuda"
    elif [[ $group == ddp ]]; then
        # both GPUs, before anything else runs on them (random weights: needs nothing staged, so it can
        # start in the first call and run while the staging calls copy files). ddp_scaling.py writes
        # benchmarks/results/ddp_scaling.json in $W, which every snapshot brings back. DDP_PROFILE=1: then
        # the profiled run (ddp_scaling_profiled.json; runs/ddp_profile/*.txt and the gzipped timelines
        # *.json.gz, copied to the results). DDP_ARGS_NEXT="...": a second run right after the first (a
        # diagnostic flag set; it writes its own file), so the GPUs never idle between the two
        launch ddp bash -c "$PY benchmarks/ddp_scaling.py ${DDP_ARGS:-}; \
            if [[ -n '${DDP_ARGS_NEXT:-}' ]]; then $PY benchmarks/ddp_scaling.py ${DDP_ARGS_NEXT:-}; fi; \
            if [[ ${DDP_PROFILE:-0} == 1 ]]; then \
            $PY benchmarks/ddp_scaling.py --profile runs/ddp_profile --repeats 1 && mkdir -p benchmarks/results/raw/ddp_profile \
            && cp runs/ddp_profile/*.txt runs/ddp_profile/*.json.gz benchmarks/results/raw/ddp_profile/; fi"
    elif [[ $group == cmd ]]; then
        # any one command line, as a job named $JOB (e.g. timings queued on one GPU while another group
        # trains on the other): JOB=cpp GPU_CMD="python3 benchmarks/lora_vs_peft.py ..." ... start cmd DEADLINE
        [[ -n ${GPU_CMD:-} ]] || { echo "start cmd: GPU_CMD is empty" >&2; exit 2; }
        if [[ -f $LOGS/${JOB:-cmd}.pid ]] && kill -0 -- -$(cat $LOGS/${JOB:-cmd}.pid) 2>/dev/null; then
            echo "start cmd: job ${JOB:-cmd} is still running (another JOB name, or wait)" >&2; exit 2
        fi
        launch ${JOB:-cmd} bash -c "$GPU_CMD"
    elif [[ $group == probe ]]; then
        launch probe sleep 3600  # does a background job outlive the device call that started it?
    else
        echo "unknown group '$group' (ddp | quiet | minilm | smollm2 | lncgene | cmd | probe)" >&2; exit 2
    fi
    ;;
status)
    for p in $LOGS/*.pid; do
        n=$(basename $p .pid)
        if kill -0 $(cat $p) 2>/dev/null; then s=running; else s=ended; fi
        echo "== $n: $s | $(tail -c 300 $LOGS/$n.log | tr '\n\r' '  ' | tail -c 220)"
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    uptime
    ;;
collect)
    # SIGINT to the jobs' process groups, then anything left
    for p in $LOGS/*.pid; do kill -INT -- -$(cat $p) 2>/dev/null; done
    sleep 20
    for p in $LOGS/*.pid; do kill -KILL -- -$(cat $p) 2>/dev/null; done
    mkdir -p $W/docs/figures
    cd $W && tar -czf $OUT/results.tgz benchmarks/results docs/figures logs \
        $(ls -d runs/lncrna3/*.json runs/lncrna3/probs.npz 2>/dev/null)
    [[ -d runs/lncrna3/mlm ]] && tar -czf $OUT/lncrna_mlm.tgz -C runs/lncrna3 mlm
    # the fine-tuned classifier too (session 4 brought back only its figures and probabilities,
    # so the better transformer could not be shipped)
    [[ -d runs/lncrna3/classifier ]] && tar -czf $OUT/lncrna_classifier.tgz -C runs/lncrna3 classifier
    # CLoRA's finished stages (base UNet fp16 ~12.6 MiB, LoRAs, classifier): a rerun resumes from them
    clora_tars
    ls -la $OUT
    ;;
watch)
    DEADLINE=$(cat /tmp/deadline 2>/dev/null || echo 0)
    t=$2; left=$(( DEADLINE - $(date +%s) ))
    (( DEADLINE > 0 && left < t )) && t=$(( left > 0 ? left : 0 ))
    # poll with this, never with a bare sleep: every poll brings the results so far back in $OUT, so a
    # machine lost between two calls (30 s idle, session 9 lost two) loses only the time since the last
    sleep $t; bash "$0" status; bash "$0" snapshot >/dev/null
    ;;
snapshot)
    # results so far, without stopping anything
    cd $W && tar -czf $OUT/results.tgz benchmarks/results docs/figures logs 2>/dev/null
    clora_tars
    ls -la $OUT
    ;;
*)
    echo "usage: $0 start ddp|quiet|minilm|smollm2|lncgene|cmd|probe DEADLINE | status | watch SECONDS | snapshot | collect" >&2; exit 2
    ;;
esac
