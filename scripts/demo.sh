#!/usr/bin/env bash
# Quick start 1: install, then push one generated WAV through the queue on the tiny random model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m personaplex.demo "$@"
