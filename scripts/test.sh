#!/usr/bin/env bash
# Quick start 2: install, then run the whole test suite (private redis-servers, real workers, real HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v npm >/dev/null 2>&1 && [ ! -x .cache/node/node_modules/.bin/mcp-inspector ]; then
  npm install --silent --no-audit --no-fund --prefix .cache/node @modelcontextprotocol/inspector >/dev/null 2>&1 \
    || echo "warning: could not install the MCP Inspector; its test will be skipped" >&2
fi
export MCP_INSPECTOR_BIN="$PWD/.cache/node/node_modules/.bin/mcp-inspector"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
