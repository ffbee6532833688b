#!/usr/bin/env bash
# The prepared device check for a session that is lent an H100/H200 (one call, under 10 min).
#
#   here:   make gpu-wheels            # pinned wheels the GPU image lacks -> .whl/ (~56 MB)
#   device: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# It installs the carried wheels beside the image's own torch (2.11, CUDA), runs the CUDA
# equality tests of packing and the lean loss, then bench/train_throughput.py (plain HF
# Trainer vs the train stage's full / lora / qlora on one seeded workload) and writes
# everything to $OUT (bench/results/gpu_check/ when run by hand). Commit the JSON under
# bench/results/ with the GPU name, versions and this command, and put its table in the
# docs/gpu.md ("Fast and lean on a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft',
peft.__version__, 'bitsandbytes', b.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device here"; exit 1; }

# 1. Equality on CUDA: packed == alone (varlen attention), chunked/liger loss == stock.
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_packing.py tests/test_lean_loss.py \
    2>&1 | tee "$OUT/cuda_tests.log"

# 2. Throughput and peak memory against a plain HF Trainer, in this same process and run.
timeout 330 python3 bench/train_throughput.py --steps 30 --warmup-steps 5 \
    --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
echo "gpu_check: done; results in $OUT"
