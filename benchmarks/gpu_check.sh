#!/usr/bin/env bash
# GPU check, for a machine with one CUDA GPU, in under 8 minutes:
#   1. the tests marked `cuda`: em_step, eval-lm and greedy generation on CUDA against the CPU;
#   2. notebook 01 at the smoke preset (headless, benchmarks/run_notebook.py);
#   3. `moelab bench` on the fairseq preset (hMoEup, K=10, transformer_lm, T=512, max-tokens 3584).
# Each figure is a JSON line written under $OUT (default: ./bench-out), plus the nvidia-smi and
# torch versions, the test log and the notebook's log.
#
#     OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# Needs torch with CUDA and moelab's dependencies; moelab itself is used from this checkout.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

echo "== cuda tests" | tee -a "$OUT/log.txt"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_precision.py \
  > "$OUT/cuda_tests.txt" 2>&1
echo "   exit $? ($(tail -n 1 "$OUT/cuda_tests.txt"))" | tee -a "$OUT/log.txt"

echo "== notebook 01, smoke preset" | tee -a "$OUT/log.txt"
NB=$(mktemp -d)
timeout 120 "$PY" benchmarks/run_notebook.py notebooks/01_train_experts.ipynb preset=smoke \
  "data_bin=$NB/data-bin" "runs_dir=$NB/runs" "results_dir=$OUT/notebook01" \
  > "$OUT/notebook01.txt" 2>&1
echo "   exit $?" | tee -a "$OUT/log.txt"

run() {  # name, time limit (s), bench flags...
  local name=$1 limit=$2; shift 2
  echo "== $name: moelab bench $*" | tee -a "$OUT/log.txt"
  timeout "$limit" "$PY" -m moelab bench --device cuda --preset fairseq --json "$OUT/$name.json" \
    "$@" >> "$OUT/log.txt" 2>&1
  echo "   exit $?" | tee -a "$OUT/log.txt"
}

# 1. the headline: eager (bf16 autocast, SDPA, chunked loss, fused Adam) vs the reference, with
#    every technique's own ratio, eval-lm and sampling figures
run seed_hMoEup 90 --method hMoEup --steps 8
# 2. soft EM (K forwards in the M-step too), no per-technique figures
run seed_sMoEup 40 --method sMoEup --steps 5 --no-techniques --no-eval-sample
# 3. torch.compile (falls back to eager, reported in "compile", if it cannot compile)
run seed_hMoEup_compile 60 --method hMoEup --steps 10 --compile --no-techniques --no-eval-sample
# 4. memory: the fairseq preset's batch with K = 32 (peak_memory_bytes), moelab's step only
run seed_hMoEup_K32_memory 50 --method hMoEup --num-experts 32 --steps 3 --no-reference \
  --no-techniques --no-eval-sample
cat "$OUT"/*.json 2>/dev/null
