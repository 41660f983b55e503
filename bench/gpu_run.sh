#!/usr/bin/env bash
# One call on a lent GPU machine: install carried wheels, then run the engine benchmarks.
# Usage (device tool): bash bench/gpu_run.sh  (with .whl carried; results under $OUT)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/engine.py ${BENCH_ARGS:---size real --seconds 10 --repeat 3} --json "$OUT/engine_real_b1.json" 2>&1 | tee "$OUT/engine_real_b1.log"
