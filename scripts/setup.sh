#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and hark installed (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() { "$@" >>"$log" 2>&1 || { cat "$log"; echo "setup failed: $*" >&2; exit 1; }; }
if [ ! -x .venv/bin/python ]; then run python3 -m venv .venv; fi
run .venv/bin/python -m pip install --upgrade pip
run .venv/bin/python -m pip install -c constraints-cpu.txt torch==2.13.0
run .venv/bin/python -m pip install -c constraints-cpu.txt -e ".[test,vad]"
# xgrammar (structured outputs) without triton: triton (1 GB) only serves its CUDA kernels
run .venv/bin/python -m pip install -c constraints-cpu.txt --no-deps xgrammar apache-tvm-ffi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
