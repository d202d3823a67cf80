#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a CUDA GPU and its own PyTorch/Triton (no network, no venv):
#   correctness of the compiled Triton kernels, zero-copy offload attention, the backend end to end, then the
#   offload and attention benchmarks, then end-to-end decode of a Llama-3.1-8B-shaped model (random bf16 weights,
#   64K context, batch 8) against dense eager / inductor / CUDA graphs. Logs and JSON go to $OUT (default ./gpu-out).
# Arguments pick steps (default: all, in this order): kernels offload e2e attention breakdown decode. The steps'
# limits sum to 22 minutes; a 15-minute device budget (machine start included) fits one of
# `scripts/gpu_check.sh kernels e2e attention breakdown` (limits 10.3 min) or `scripts/gpu_check.sh decode` (9 min).
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

STEPS=" ${*:-kernels offload e2e attention breakdown decode} "
want() { [[ $STEPS == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.log"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/machine.log"

if want kernels; then
  step kernels 210 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_paged.py \
    tests/test_kernels_plan.py::test_plan_on_cuda_runs_the_op -k "not gpu" --junitxml="$OUT/kernels.xml"
  tail -3 "$OUT/kernels.log"
fi
if want offload; then
  step offload 120 python3 -m dsc.cli bench offload --contexts 64K,256K,1024K --layers 4 --json "$OUT/offload.json"
  tail -22 "$OUT/offload.log"
  step offload_head 40 python3 -m dsc.cli bench offload --contexts 256K --layers 4 --gqa head --json "$OUT/offload_head.json"
  tail -9 "$OUT/offload_head.log"
fi
if want e2e; then
  step e2e 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "gpu" --junitxml="$OUT/e2e.xml"
  tail -3 "$OUT/e2e.log"
fi
if want attention; then
  step attention 80 python3 -m dsc.cli bench attention --lengths 16K,64K,128K --batch 1,8 --shapes 32x8x128,9x3x64 \
    --formats native,int4 --budgets 1/16,1/8 --max-gb 40 --no-progress --json "$OUT/attention.json"
  tail -30 "$OUT/attention.log"
fi
if want breakdown; then
  step breakdown 90 python3 scripts/gpu_breakdown.py
  tail -3 "$OUT/breakdown.log"
fi
if want decode; then
  # rows print as they finish, the cheap eager ones last, so a timeout keeps what matters: dense under CUDA graphs
  # vs dsparse under CUDA graphs (experimental cuda_graphs=True; a failure is reported, the rest go on) and vs the
  # default dsparse (inductor inner)
  step decode 540 python3 -m dsc.cli bench decode --device cuda --model examples/llama-3-8b-shape --random-weights \
    --dtype bfloat16 --contexts 64K --batch 8 --compile cudagraphs,inductor,eager --policy dense,dsparse \
    --steps 8 --warmup 3 --json "$OUT/decode.json"
  tail -25 "$OUT/decode.log"
fi
grep -h -E "passed|failed|error" "$OUT"/kernels.log "$OUT"/e2e.log 2>/dev/null | tail -4
