#!/usr/bin/env bash
# GPU readiness in about 8 minutes, on CUDA in bfloat16: the exactness and sampling tests, then `cosine bench gpu`
# (the engine against HF generate on the zoo's target and on random-weight Llama-3-8B / Qwen2.5-7B shaped models),
# then, if time is left, a short `cosine bench engine`.
# Runs with the machine's own Python (needs torch with CUDA, transformers, pytest, scipy, click, tqdm).
# Results: gpu-check/ (pytest log, gpu-check.json and .md, benchmark logs and files); exit status is pytest's,
# else 4 when `bench gpu` failed or ran out of time.
#   scripts/gpu_check.sh [extra pytest args]
# GPU_CHECK_BUDGET_S (default 480): seconds for the whole run; the benchmarks get what the tests leave, and
# `bench engine` runs only with 90 s or more left. GPU_CHECK_ARGS adds options to `bench gpu` (e.g. "--layers 2");
# GPU_BENCH_ARGS replaces the options of `bench engine` (default: a short pass).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export COSINE_TEST_DEVICE=cuda COSINE_TEST_DTYPE=${COSINE_TEST_DTYPE:-bfloat16}
"$PY" - <<'PYEOF' || exit 3
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0))
PYEOF
"$PY" -m pytest -q -p no:cacheprovider tests/test_greedy_exactness.py tests/test_sampling_engine.py \
  tests/test_kv_cache.py "$@" 2>&1 | tee "$OUT_DIR/pytest.log"
status=${PIPESTATUS[0]}
echo "tests: ${SECONDS}s"

left=$((BUDGET - SECONDS))
if (( left < 30 )); then
  echo "bench gpu skipped: ${left}s left of ${BUDGET}s"
  gpu_status=124
else
  timeout "$left" "$PY" -m cosine.cli bench gpu --device cuda --dtype "$COSINE_TEST_DTYPE" --out "$OUT_DIR" \
    ${GPU_CHECK_ARGS:-} 2>&1 | grep -v 'bench gpu: ' | tee "$OUT_DIR/bench-gpu.log"
  gpu_status=${PIPESTATUS[0]}
  echo "bench gpu: exit ${gpu_status}, ${SECONDS}s in all"
fi

left=$((BUDGET - SECONDS))
if (( left >= 90 )); then
  timeout "$left" "$PY" -m cosine.cli bench engine --device cuda --dtype "$COSINE_TEST_DTYPE" --threads 4 \
    --out "$OUT_DIR" ${GPU_BENCH_ARGS:---prompts-per-domain 2 --micro-calls 20} 2>&1 \
    | grep -v 'bench engine: ' | tee "$OUT_DIR/bench.log"
  echo "bench engine: exit ${PIPESTATUS[0]}, ${SECONDS}s in all"
else
  echo "bench engine skipped: ${left}s left of ${BUDGET}s"
fi
if (( status == 0 && gpu_status != 0 )); then
  status=4
fi
exit "$status"
