#!/usr/bin/env bash
# The GPU check, in one go (at most about 8 minutes): install, CUDA tests, product
# kernels' GB/s, short decode bench.
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
LLAMARUN_REQUIRE_FIXTURES=1 timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
tests=$?

# The product kernels first (seconds), then eager decode (CUDA graphs) of both shapes, then the
# compiled steps of the small shape only (a 1B compile took 100 s a variant on the H200).
echo "== product kernels, eager decode (random weights, bfloat16 activations, CUDA)"
timeout 150 $PY benchmarks/gpu_bench.py --device cuda --tokenizer "$LLAMARUN_FIXTURES/stories260K/meta" \
  --variants eager,int8,int4
bench=$?
echo "== compiled decode (SmolLM2 shape)"
timeout 120 $PY benchmarks/gpu_bench.py --device cuda --tokenizer "$LLAMARUN_FIXTURES/stories260K/meta" \
  --shapes smollm2 --variants "compiled,int8 compiled,int4 compiled" --no-products
compiled=$?
echo "== done in $(( $(date +%s) - start )) s (tests exit $tests, bench exit $bench, compiled exit $compiled)"
[ $tests -eq 0 ] && [ $bench -eq 0 ] && [ $compiled -eq 0 ]
