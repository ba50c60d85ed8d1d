#!/usr/bin/env bash
# Every GPU check of this project in one run, sized for a lent GPU's few minutes (each step has its own time limit,
# so one slow step cannot eat the others): the cuda tests, skipping's cost eager and with the decode step compiled
# (CUDA graphs), an expert's matmul time against its rows, and the search's cost against its floor. Results land in $OUT (default /tmp/gpu_checks).
#
#   bash tools/gpu_checks.sh --prepare   # here, with network: wheels the GPU image lacks, into .whl/
#   bash tools/gpu_checks.sh             # there, in the repository root (carry .whl)
#   bash tools/gpu_checks.sh --speed     # there, a second call: decode speed of the real models' own layers
#
# The GPU image has torch, lightning and an older transformers; the wheels bring the versions CI tests against
# (constraints.txt) and the CLI's parser. Then copy the JSON files back into benchmarks/ and re-render RESULTS.md
# with each benchmark's --from.
set -uo pipefail
cd "$(dirname "$0")/.."
# the interpreter that runs every step: $PYTHON when set (a test passes its own), else python3 on PATH
PY="${PYTHON:-python3}"
WHEELS=(transformers jsonargparse docstring_parser typeshed_client)
case "${1:-}" in
  ""|--prepare|--speed) ;;
  *) echo "tools/gpu_checks.sh: unknown argument '$1' (none, --prepare or --speed)" >&2; exit 2 ;;
esac

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for name in "${WHEELS[@]}"; do
    pin=$(grep -i "^${name}==" constraints.txt) || { echo "tools/gpu_checks.sh: $name not pinned in constraints.txt"; exit 2; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin" || exit 1
  done
  ls .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "tools/gpu_checks.sh: the wheels in .whl did not install"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF' | tee "$OUT/env.txt" || exit 1
import sys
import torch, transformers, lightning
if not torch.cuda.is_available():
    sys.exit("tools/gpu_checks.sh: torch sees no GPU; run it on a machine that has one")
print(torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__,
      "lightning", lightning.__version__)
EOF
# the package as installed (diep_lightning.callbacks lives in callbacks/, mapped by pyproject's package-dir)
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$OUT/steps.log" 2>&1 \
  || { echo "tools/gpu_checks.sh: pip install -e . failed (see steps.log)"; exit 1; }

status=0
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log into $OUT/steps.log, remember a failure
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$OUT/steps.log" 2>&1
  local rc=$?
  echo "   $name: rc $rc after $((SECONDS - start))s" | tee -a "$OUT/steps.log"
  [ $rc -eq 0 ] || status=1
}

if [ "${1:-}" = "--speed" ]; then
  step 540 speed_full_width "$PY" -m benchmarks.speed --device cuda --shapes mixtral-8x7b,qwen3-30b-a3b \
    --dtypes bfloat16 --layers 4 --repeats 3 --out "$OUT/speed_full_width_cuda_bfloat16.json" --results ''
  exit $status
fi
step 140 cuda_tests "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
step 90 skip_eager "$PY" -m benchmarks.skip_overhead --models mixtral,qwen3 --device cuda --dtype bfloat16 \
  --rounds 3 --out "$OUT/skip_overhead_shapes_cuda_bfloat16.json" --results ''
step 160 skip_compiled "$PY" -m benchmarks.skip_overhead --models mixtral,qwen3 --device cuda --dtype bfloat16 \
  --paths off,lean --compile --rounds 3 --out "$OUT/skip_overhead_shapes_cuda_bfloat16_compiled.json" --results ''
step 40 expert_matmul "$PY" -m benchmarks.expert_matmul --device cuda --dtypes bfloat16 \
  --out "$OUT/expert_matmul_cuda.json" --results ''
step 140 search_cost "$PY" -m benchmarks.search_cost --device cuda --sizes 256x4,1024x4 --repeats 2 \
  --out "$OUT/search_cost_cuda.json" --results "$OUT/RESULTS.md"
exit $status
