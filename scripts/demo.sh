#!/usr/bin/env bash
# Sets everything up, then runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/generate_demo.py
