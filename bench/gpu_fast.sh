#!/usr/bin/env bash
# One call on a lent GPU (issue 6): the fast loop against the eager loop, random weights at the real size.
#   eager B=1 (the baseline), then captured (CUDA graphs) B=1 and 32, each with --check (token
#   agreement: captured vs eager, batched rows vs alone); WITH_B8=1 adds batch 8. Every step is
#   guarded by its own timeout, so one failure does not stop the rest; if captured B=1 fails, the
#   fast loop runs once without graphs to tell a capture problem from a loop problem. Results:
#   $OUT/<step>.json, .log, steps.txt, summary.txt. About 3-4 minutes on an H200 (targets: B=1
#   <= 12 ms/frame, B=32 >= 200x real time). WITH_PROMPT=1 adds issue 14's prompt rows (about 3
#   minutes more), WITH_SERVICE=1 the scheduler and live-loop benchmarks at the real size (up to 8).
# Usage (device tool): bash bench/gpu_fast.sh, carrying .whl: wheels the GPU image lacks or has in
# other versions (transformers 5.24, soundfile + cffi + pycparser, soxr, pyloudnorm), downloaded with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION`.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
INPUT_SECONDS=${INPUT_SECONDS:-8}
SIZE=${SIZE:-real}  # SIZE=tiny INPUT_SECONDS=1 smoke-tests this script on a CPU
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed" | tee -a "$OUT/steps.txt"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
(git rev-parse HEAD 2>/dev/null || echo "commit unknown") | tee -a "$OUT/gpu.txt"
date -u +%FT%TZ | tee -a "$OUT/gpu.txt"

step() {  # step NAME LIMIT_S ARGS...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: bench/engine.py $*"
  timeout -k 10 "$limit" python3 bench/engine.py --size "$SIZE" --seconds "$INPUT_SECONDS" "$@" \
    --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
  grep -v -E '^\s*("|[]{}[],?$)' "$OUT/$name.log" | tail -n 12
  return $rc
}

step eager_b1 100 --path eager --repeat 2 --prompt stepped
step captured_b1 90 --path captured --batch 1 --repeat 3 --prompt stepped --check --baseline "$OUT/eager_b1.json" \
  || step captured_b1_nograph 60 --path captured --batch 1 --repeat 1 --no-graph --baseline "$OUT/eager_b1.json"
if [ -n "${WITH_B8:-}" ]; then  # WITH_B8=1 adds batch 8 (about a minute more)
  step captured_b8 75 --path captured --batch 8 --repeat 2 --prompt stepped --check --baseline "$OUT/eager_b1.json"
fi
step captured_b32 90 --path captured --batch 32 --repeat 2 --prompt stepped --check --baseline "$OUT/eager_b1.json"
if [ -n "${WITH_PROMPT:-}" ]; then  # WITH_PROMPT=1: issue 14's rows (the prompt stepped, prefilled, cached)
  for mode in stepped prefill cached; do
    step "prompt_${mode}_b1" 60 --path captured --batch 1 --repeat 3 --prompt "$mode" --seconds 10
    step "prompt_${mode}_b32" 90 --path captured --batch 32 --repeat 2 --prompt "$mode" --seconds 10
  done
fi
if [ -n "${WITH_SERVICE:-}" ]; then  # WITH_SERVICE=1: issue 12's scheduler and issue 13's live loop
  for script in scheduler live; do
    start=$SECONDS
    echo "== $script"
    args=(--size "$SIZE" --device cuda)
    [ "$script" = live ] && args+=(--sessions "${LIVE_SESSIONS:-64}" --json "$OUT/live.json")
    [ "$script" = scheduler ] && args+=(--rounds 1 --repeat 1)  # two solo passes and two replays
    timeout -k 10 300 python3 "bench/$script.py" "${args[@]}" >"$OUT/$script.log" 2>&1
    echo "$script rc=$? $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
    tail -n 8 "$OUT/$script.log"
  done
  cp bench/results/*_scheduler_cuda.json "$OUT/" 2>/dev/null
fi

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("ms_per_frame_generate", "ms_per_frame_prompt", "prompt_ms_per_job", "rtf_total", "rtf_generate", "throughput_generate",
        "throughput_lm", "throughput_total", "peak_memory_mb", "capture_s", "speedup_ms_per_frame_generate",
        "speedup_throughput_generate")
names = ["eager_b1", "captured_b1", "captured_b1_nograph", "captured_b8", "captured_b32"]
names += [f"prompt_{mode}_b{b}" for mode in ("stepped", "prefill", "cached") for b in (1, 32)]
for name in names:
    path = out / f"{name}.json"
    if not path.is_file():
        continue
    r = json.loads(path.read_text())
    print(name, r.get("device"), "batch", r.get("batch"), "graphs", r.get("graphs"))
    print("  " + ", ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), (int, float))))
    check = r.get("check") or {}
    for label, value in check.items():
        print(f"  check {label}: {json.dumps(value)}")
EOF
