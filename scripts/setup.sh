#!/usr/bin/env bash
# Create .venv and install the project with every extra. Safe to run again: it skips work already done.
# torch is pinned first: 2.13.0 has a CPU wheel on these machines, an unpinned torch pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[all]"
  touch "$stamp"
fi
# The tests start their own redis-server, and drive the conversation page in Debian's Chromium
# (playwright drives it; it cannot download its own browsers here).
for package in redis-server chromium; do
  if ! command -v "$package" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
      apt-get install -y -qq "$package" >/dev/null
    else
      echo "$package is missing: install it (apt-get install $package)" >&2
      exit 1
    fi
  fi
done
