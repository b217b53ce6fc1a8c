#!/usr/bin/env bash
# The GPU check, in one go (under 8 minutes on one H100): install, CUDA tests, short decode bench.
#
# On a machine with internet access it installs what it needs with pip. The lent GPU machines are
# offline: first run `bash benchmarks/gpu_check.sh --prepare` here, which puts the `gguf` wheel and
# a copy of the test fixtures in .gpu/ (git-ignored, about 5 MB), then run this script there with
# .gpu carried along. The SmolLM2 GGUF (98 MB) does not travel: the bench uses random weights in
# SmolLM2's and Llama-3.2-1B's shapes instead.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  rm -rf .gpu && mkdir -p .gpu/wheels
  $PY -m pip download -q --no-deps -d .gpu/wheels gguf
  cp -r "${LLAMARUN_FIXTURES:-../shared/fixtures}" .gpu/fixtures
  du -sh .gpu
  exit 0
fi

start=$(date +%s)
echo "== install"
if [ -d .gpu/wheels ]; then
  $PY -m pip install -q --no-index --find-links .gpu/wheels --no-deps gguf
else
  $PY -m pip install -q gguf
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export LLAMARUN_FIXTURES=${LLAMARUN_FIXTURES:-$PWD/.gpu/fixtures}
[ -d "$LLAMARUN_FIXTURES" ] || export LLAMARUN_FIXTURES=$PWD/../shared/fixtures
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== CUDA tests"
LLAMARUN_REQUIRE_FIXTURES=1 timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
tests=$?

echo "== decode bench (random weights, bfloat16, CUDA)"
timeout 300 $PY benchmarks/gpu_bench.py --device cuda --tokenizer "$LLAMARUN_FIXTURES/stories260K/meta"
bench=$?
echo "== done in $(( $(date +%s) - start )) s (tests exit $tests, bench exit $bench)"
[ $tests -eq 0 ] && [ $bench -eq 0 ]
