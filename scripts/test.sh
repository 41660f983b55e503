#!/usr/bin/env bash
# Quick start 2: install, then run the whole test suite (private redis-servers, real workers, real HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The MCP Inspector test installs @modelcontextprotocol/inspector from npm here once.
export PERSONAPLEX_INSPECTOR_DIR="$PWD/.cache/inspector"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
