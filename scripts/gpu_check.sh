#!/usr/bin/env bash
# The CUDA checks of issue 17, on a machine with an NVIDIA GPU, in under 10 minutes:
#   1. the kernel and decode-graph tests on CUDA  pytest -m gpu tests/test_kernels
#                                                 tests/test_llm/test_decode_graphs.py          (<= 240 s)
#   2. greedy parity of llama, qwen_2, gpt_neox   scripts/gpu_parity.py (rtp-mm vs HF on CUDA) (<= 180 s)
#   3. decode throughput at batch 1, 8 and 32     scripts/gpu_decode_bench.py                  (<= 150 s)
# Everything (versions, the GPU, each step's output and exit status) goes to the file given as $1
# (default gpu_check_results.txt); the script exits 0 only when every step passed, 2 when there is no CUDA device.
# Without a GPU the CUDA paths are verified on CPU only, through the Triton interpreter (the normal test run).
#
#   scripts/gpu_check.sh [results-file]        PYTHON=/path/to/python scripts/gpu_check.sh   (default: python)
set -uo pipefail  # no -e: a failed step is recorded and the next one still runs

results=$(realpath -m "${1:-gpu_check_results.txt}")
python=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 1
: >"$results"
status=0

log() { echo "$*" | tee -a "$results"; }

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, appending its output and exit status to the results.
step() {
    local name=$1 limit=$2
    shift 2
    log ""
    log "## $name"
    log "\$ $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$results" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] && log "(timed out after ${limit} s)"
    log "-> exit $rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

log "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$results" 2>&1; then
    log "no CUDA device (torch.cuda.is_available() is False): nothing checked; run this on a machine with an NVIDIA GPU"
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$results" 2>&1
"$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    >>"$results" 2>&1

step "kernel and decode-graph tests on CUDA" 240 "$python" -m pytest -m gpu tests/test_kernels \
    tests/test_llm/test_decode_graphs.py -q -p no:cacheprovider -rs
step "greedy parity against HF transformers on CUDA" 180 "$python" scripts/gpu_parity.py
step "decode throughput (batch 1/8/32)" 150 "$python" scripts/gpu_decode_bench.py --batch-sizes 1,8,32

log ""
log "gpu_check: $([ "$status" -eq 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED") (results in $results)"
exit "$status"
