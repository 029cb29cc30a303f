#!/usr/bin/env bash
# GPU readiness: the exactness and sampling tests, then the engine benchmark, on CUDA in bfloat16.
# Runs with the machine's own Python (needs torch with CUDA, transformers, pytest, scipy, click, tqdm).
# Results: gpu-check/ (pytest log, benchmark JSON and markdown); exit status is pytest's.
#   scripts/gpu_check.sh [extra pytest args]
# GPU_BENCH_ARGS adds options to the benchmark, e.g. "--prompts-per-domain 2" for a quick pass.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-gpu-check}
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
"$PY" -m cosine.cli bench engine --device cuda --dtype "$COSINE_TEST_DTYPE" --threads 4 --out "$OUT_DIR" ${GPU_BENCH_ARGS:-} 2>&1 \
  | grep -v '^bench engine' | tee "$OUT_DIR/bench.log"
exit "$status"
