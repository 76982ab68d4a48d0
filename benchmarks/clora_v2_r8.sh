#!/usr/bin/env bash
# CLoRA on the v2 base with 8×8 maps (issue #7), as one job of benchmarks/gpu_queue.sh (`clora_v2_r8`):
#
#   1. the v2 base + classifier: loaded from --ckpt-dir (gpu_queue.sh copies benchmarks/checkpoints/clora_v2
#      there: session 11's 6000-step base, classifier and four LoRAs), trained only if absent;
#   2. the gate at --attention-res $CLORA_V2_RES (default 8; session 10: r8 maps separate, r16 / r32
#      do not), clora_mask_diagnosis.py --gate, thresholds unchanged: exit 0 pass, 3 fail;
#   3. gate failed on readable ONLY (maps separate, the base draws "3 | 7" too rarely; with
#      CLORA_V2_CONTINUE_ON=any: on any failure) and CLORA_V2_CONTINUE_TO set (e.g. 10000): the base is
#      continued from its recorded steps to that many (clora_composition.py --base-continue-from, a
#      warm restart), then gated again;
#   4. gate passed: the concept LoRAs and the comparison at that map side, then the diagnosis of the
#      CLoRA run (masks of the LoRA branches) with the chosen LoRAs.
#
# Env: PY (python3), CLORA_CKPT (runs/clora_composition), CLORA_V2_RES (8), CLORA_V2_BASE (options
# of the base for every command, e.g. "--base-steps 10000 --base-continue-from 6000" once continued),
# CLORA_V2_CONTINUE_TO (unset: no continuation), CLORA_V2_GATE_ARGS ("--device cuda --samples 64"),
# CLORA_V2_ARGS (the LoRA recipe and generation: "--lora-steps 1500 --lora-lr 1e-3 2e-3"),
# CLORA_V2_SAMPLER (DDIM steps / guidance for the gate AND the comparison, which must sample alike:
# unset = both scripts' defaults, --steps 50 --guidance 3), CLORA_V2_READABLE_SWEEP (diagnosis only,
# e.g. "10x3 25x3 50x1.5": the gate's figures on the base at other DDIM steps x guidance, each in
# logs/clora_readable_v2_s<base steps>_d<steps>_g<guidance>; they decide nothing in this job).
# Gate results: logs/clora_gate_v2_r<res>_s<base steps>/clora_mask_diagnosis.json (results.tgz);
# the comparison: benchmarks/results/clora_composition_v2.json and docs/figures/clora_composition_v2.png.
# Exit status: 0 comparison done, 3 gate failed (no LoRAs trained), other = an error.
set -u
PY=${PY:-python3}
CK=${CLORA_CKPT:-runs/clora_composition}
RES=${CLORA_V2_RES:-8}
BASE=${CLORA_V2_BASE:-}
GATE_ARGS=${CLORA_V2_GATE_ARGS:---device cuda --samples 64}
ARGS=${CLORA_V2_ARGS:---lora-steps 1500 --lora-lr 1e-3 2e-3}
SAMPLER=${CLORA_V2_SAMPLER:-}

base_steps() {  # steps of the v2 base recorded in $CK/stages.json
    $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['v2_base']['shape']['base_steps'])" "$CK/stages.json"
}

gate() {  # the gate on the base now in $CK; sets rc and out
    local steps; steps=$(base_steps) || return 2
    out=logs/clora_gate_v2_r${RES}_s${steps}
    $PY benchmarks/clora_mask_diagnosis.py --ckpt-dir "$CK" --base-arch v2 --runs real base --attention-res "$RES" \
        --gate --out "$out" $GATE_ARGS $SAMPLER
    rc=$?
    echo "clora_v2_r8: gate r$RES on the ${steps}-step base: rc=$rc ($out)"
}

only_readable_failed() {  # maps pass (cos, own-half shares), the readable share does not
    $PY - "$out/clora_mask_diagnosis.json" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from clora_mask_diagnosis import GATE_MAX_COS, GATE_MIN_READABLE, GATE_MIN_SHARE
m = json.load(open(sys.argv[1]))["metrics"]
maps_ok = m["gate_cos_3_7"] < GATE_MAX_COS and min(m.get("gate_share_own_half_3", 0), m.get("gate_share_own_half_7", 0)) > GATE_MIN_SHARE
sys.exit(0 if maps_ok and m["gate_readable"] < GATE_MIN_READABLE else 1)
EOF
}

chosen_lrs() {  # the LoRAs the comparison chose, from its result file (--name / --out as it parses them)
    $PY - "$@" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
import clora_composition as cc
from lightning_lora.results import results_dir
a = cc.parse_args(sys.argv[1:])
m = json.load(open(results_dir(a.out) / f"{a.name}.json"))["metrics"]
print("%g %g" % (m["lora_a_lr"], m["lora_b_lr"]))
EOF
}

$PY benchmarks/clora_composition.py --base-arch v2 --ckpt-dir "$CK" $BASE --stop-after base || exit $?
gate
for sg in ${CLORA_V2_READABLE_SWEEP:-}; do  # diagnosis only: readable (and maps) at other sampler settings
    $PY benchmarks/clora_mask_diagnosis.py --ckpt-dir "$CK" --base-arch v2 --runs base --attention-res "$RES" --gate \
        --out "logs/clora_readable_v2_s$(base_steps)_d${sg%x*}_g${sg#*x}" $GATE_ARGS --steps "${sg%x*}" --guidance "${sg#*x}"
    echo "clora_v2_r8: readable sweep ${sg%x*} steps, guidance ${sg#*x}: rc=$?"
done
if [[ $rc == 3 && -n ${CLORA_V2_CONTINUE_TO:-} ]]; then
    if [[ ${CLORA_V2_CONTINUE_ON:-readable} == any ]] || only_readable_failed; then
        from=$(base_steps) || exit 2
        # the base's other options as before; the continued base's steps and origin replace --base-steps
        BASE="$(sed -E 's/--base-(steps|continue-from) [0-9]+//g' <<<"$BASE") --base-steps $CLORA_V2_CONTINUE_TO --base-continue-from $from"
        echo "clora_v2_r8: gate failed (CLORA_V2_CONTINUE_ON=${CLORA_V2_CONTINUE_ON:-readable}): continuing the base $from -> $CLORA_V2_CONTINUE_TO steps ($BASE)"
        $PY benchmarks/clora_composition.py --base-arch v2 --ckpt-dir "$CK" $BASE --stop-after base || exit $?
        gate
    else
        echo "clora_v2_r8: the maps fail the gate (not only readable): no continuation"
    fi
fi
(( rc == 0 )) || exit $rc
echo "clora_v2_r8: gate passed; LoRAs + comparison with $BASE --attention-res $RES $ARGS $SAMPLER"
$PY benchmarks/clora_composition.py --base-arch v2 --ckpt-dir "$CK" $BASE --attention-res "$RES" $ARGS $SAMPLER || exit $?
lrs=$(chosen_lrs --base-arch v2 $BASE $ARGS $SAMPLER) || exit 2
read -r lra lrb <<<"$lrs"
$PY benchmarks/clora_mask_diagnosis.py --ckpt-dir "$CK" --base-arch v2 --lora-a "v2_lora_a_red3_lr$lra" \
    --lora-b "v2_lora_b_green7_lr$lrb" --runs base clora --attention-res "$RES" --out logs/clora_diag_v2_r$RES $GATE_ARGS $SAMPLER
