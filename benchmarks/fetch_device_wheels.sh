#!/usr/bin/env bash
# Download, on this machine, the wheels the GPU image lacks (it has torch, lightning, transformers,
# peft, pandas; it has Python 3.12 and reaches no registry). Ignored folders, rebuilt in each new
# checkout (session 11 found them gone):
#   .whl/            biopython, hydra-core, omegaconf, antlr4 (sdist only on PyPI: built here)
#   .whl/diffusion/  diffusers 0.36.0 (0.42 asks huggingface-hub >= 1.32; 0.36 asks >= 0.34, so it
#                    does not depend on the image's hub version), importlib_metadata
#   .whl_gguf/       gguf
#   .whl/pytest/     pytest 9 and its dependencies (the image has a pytest plugin that registers a
#                    float ini option, which pytest 8.3 refuses: session 25's device tests failed so)
# Install there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl_gguf/*.whl
#                python3 -m pip install -q --no-index --no-deps --target /tmp/site_diff .whl/diffusion/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q "${P[@]}" -d .whl biopython==1.88 hydra-core==1.3.8 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
python3 -m pip download -q "${P[@]}" -d .whl/diffusion diffusers==0.36.0 importlib_metadata==10.2.0
python3 -m pip download -q "${P[@]}" -d .whl_gguf gguf==0.19.0
python3 -m pip download -q "${P[@]}" -d .whl/pytest pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0
ls .whl .whl/diffusion .whl/pytest .whl_gguf
