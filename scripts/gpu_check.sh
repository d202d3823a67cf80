#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a CUDA GPU and its own PyTorch/Triton (no network, no venv):
#   correctness of the compiled Triton kernels, zero-copy offload attention, the backend end to end, then the
#   offload and attention benchmarks. Logs and JSON go to $OUT (default ./gpu-out).
# Optional: wheels in .whl/ (e.g. the pinned transformers) are installed first, into a private temp folder
# (mktemp -d, removed on exit) that goes on PYTHONPATH; nothing is read from or left in a shared /tmp path.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PRIVATE=$(mktemp -d "${TMPDIR:-/tmp}/dsc-gpu-check.XXXXXXXX") || exit 1
trap 'rm -rf "$PRIVATE"' EXIT
trap 'exit 130' INT TERM
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=ci TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PRIVATE/inductor} DSC_CACHE=${DSC_CACHE:-$PRIVATE/dsc-cache}
SITE=$PRIVATE/site
mkdir -p "$SITE/dsc-0.1.0.dist-info"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
# the torch_dynamo_backends entry point without building the package: a dist-info beside the source tree
printf 'Metadata-Version: 2.1\nName: dsc\nVersion: 0.1.0\n' > "$SITE/dsc-0.1.0.dist-info/METADATA"
printf '[torch_dynamo_backends]\ndsparse = dsc.backend:dsparse\n' > "$SITE/dsc-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$SITE:$PWD"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, never stop the script
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? ($(date +%T))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.log"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/machine.log"

step kernels 210 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_paged.py -k "not gpu" \
  --junitxml="$OUT/kernels.xml"
tail -3 "$OUT/kernels.log"
step offload 120 python3 -m dsc.cli bench offload --contexts 64K,256K,1024K --layers 4 --json "$OUT/offload.json"
tail -22 "$OUT/offload.log"
step offload_head 40 python3 -m dsc.cli bench offload --contexts 256K --layers 4 --gqa head --json "$OUT/offload_head.json"
tail -9 "$OUT/offload_head.log"
step e2e 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "gpu" --junitxml="$OUT/e2e.xml"
tail -3 "$OUT/e2e.log"
step attention 80 python3 -m dsc.cli bench attention --lengths 16K,64K,128K --batch 1,8 --shapes 32x8x128,9x3x64 \
  --formats native,int4 --budgets 1/16,1/8 --max-gb 40 --no-progress --json "$OUT/attention.json"
tail -30 "$OUT/attention.log"
grep -h -E "passed|failed|error" "$OUT"/kernels.log "$OUT"/e2e.log | tail -4
