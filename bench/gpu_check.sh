#!/usr/bin/env bash
# The prepared device check for a session that is lent an H100/H200: one call, under 7 minutes
# with the installs (caps below, 380 s); what fails can be rerun alone in the time left.
#
#   here:   make gpu-wheels            # pinned wheels the GPU image lacks -> .whl/ (56.4 MiB)
#   device: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=480)
#
# It installs the carried wheels beside the image's own torch (2.11, CUDA), then, each step
# fail-soft (a failing step or configuration prints its error and the rest still run), each
# under `timeout -k 10 <cap>`, its time in timings.txt:
#   1. the CUDA equality tests (packing with varlen_attn, the lean losses)
#      -> cuda_tests.log/.xml
#   2. bench/train_throughput.py, baseline / full / lora / qlora at the default settings
#      -> throughput_default.json/.log
#   3. the same at the lean settings (gradient checkpointing, the same tokens per step)
#      -> throughput_lean.json/.log
#   4. torch profiler, top 15 CUDA kernels of full (written after every profiled step)
#      -> profile_full.json/.txt/.log
#   5. training tests on CUDA: the packed-vs-padded curve, then the align tests (dpo/orpo/
#      simpo/kto, full and LoRA SFT) -> training_tests.log/.xml
#   6. bench/gpu_summary.py: gpu_check.json (GPU, versions, commands, every figure, the
#      targets met or missed, tests passed/failed, fast-path fallbacks, step timings) and
#      gpu_check.md (the table for docs/gpu.md)
# Everything goes to $OUT (bench/results/gpu_check/ when run by hand). Commit the JSON as
# bench/results/gpu_<gpu>.json and the table in docs/gpu.md.
#
# GPU_CHECK_CPU=1 runs the same python steps on a tiny model on CPU, without wheels or GPU,
# packed like the GPU (tests/test_gpu_check.py: a typo must not waste a GPU run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
CPU=${GPU_CHECK_CPU:-}
PY=${PYTHON:-python3}
if [ -z "$CPU" ] && [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    # One wheel at a time, fail-soft: a wheel this Python cannot take (another cp tag) is
    # skipped and said so, and the image's own version of that package is used.
    for whl in .whl/*.whl; do
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$whl" \
            || echo "gpu_check: could not install $(basename "$whl"); the image's own is used"
    done
    # The carried transformers may need a newer huggingface-hub or tokenizers than the image
    # has (5.23 needs hub >= 1.31): when it does not import, fall back to the image's.
    if ! PYTHONPATH=/tmp/site $PY -c "import transformers, peft" 2>"$OUT/wheels_import.log"; then
        echo "gpu_check: the carried transformers does not import here" \
             "($(tail -n 1 "$OUT/wheels_import.log")); using the image's own"
        rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false

if [ -n "$CPU" ]; then
    # bench/train_throughput.py's tiny CPU shape (its docstring). --packing true: the GPU's
    # default (auto = packs on CUDA), so the stand-in runs the packed path the GPU runs
    # (PackingCollator -> reprotune_packed attention, sdpa per sample here -> chunked loss)
    SHAPE=(--layers 1 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --head-dim 16
           --vocab 512 --max-len 64 --median 24 --min-len 4 --baseline-batch-size 4 --lr 1e-3
           --packing true)
    DEFAULT=(--steps 4 --warmup-steps 1 --tokens-per-batch 256)
    LEAN=(--steps 3 --warmup-steps 1 --tokens-per-batch 256 --gradient-checkpointing
          --methods full,lora,qlora)
    PROFILE=(--steps 3 --warmup-steps 1 --profile-steps 2 --tokens-per-batch 256)
    TESTS=(--collect-only)  # the selection must name real tests; they need a GPU to run
    T_CUDA=120 T_RUN=240 T_LEAN=240 T_PROFILE=120 T_TRAIN=120 T_SUMMARY=30
else
    SHAPE=()
    # 16,384 real tokens per optimizer step either way (train_throughput's defaults)
    DEFAULT=(--steps 15 --warmup-steps 5)
    # lean: the memory targets; the baseline's speed is measured at the default settings
    LEAN=(--steps 10 --warmup-steps 4 --gradient-checkpointing --methods full,lora,qlora)
    PROFILE=(--steps 8 --warmup-steps 5 --profile-steps 3)
    TESTS=()
    # Caps: each = the step's fixed cost + its GPU compute, with ~1.4x to spare, where
    #  * fixed cost = the step's time in the CPU stand-in (GPU_CHECK_CPU=1: the model is
    #    tiny, so it is nearly all imports, Trainer setup, evaluations and the profiler;
    #    the larger of two runs on 2 shared busy cores, 2026-12-07: cuda_tests 6 s
    #    (collection), default 25 s, lean 24 s, profile 14 s, training_tests 6 s
    #    (collection), summary 0 s), taken
    #    as it is on the GPU machine (16 cores, no slower), + the 0.6B model's own: ~10 s
    #    to build and save it once per step, ~3 s to load it per run;
    #  * GPU compute = optimizer steps x seconds per step estimated from FLOPs (~4.0 GFLOP per
    #    real token, train_throughput.flops_per_token; 16,384 tokens: 66 TFLOP a step) at 25%
    #    of the H100's 989 TFLOP/s: full 0.27 s, lora 0.2 s, qlora 0.5 s (dequantisation),
    #    the baseline ~1.5 s (padded rows, ~2.5x the real tokens, and the full logits);
    #    x 1.3 with gradient checkpointing; + ~2 s per profiled step for the profiler.
    #  default: (25 + 10 + 4 x 3 + 15 x 2.47) x 1.4 = 118 -> 120 s
    #  lean:    (24 + 10 + 3 x 3 + 10 x 0.97 x 1.3) x 1.4 = 78 -> 80 s
    #  profile: (14 + 10 + 3 + 8 x 0.27 + 3 x 2) x 1.4 = 49 -> 50 s
    #  cuda_tests: two checks of a few tiny forward/backward passes: (6 + ~5 s of CUDA
    #    start + ~5 s) x 1.4 = 22 -> 25 s
    #  training_tests: not scaled to fit: they train the tiny model for tens of steps each
    #    (the packed-vs-padded curve alone: 70 s on 2 busy CPU cores; the align tests with
    #    it ~316 s; launch-bound on a GPU, so not much faster), and 95 s is what the
    #    7 minutes leave. They run last, the curve first, each result printed as it
    #    happens, so a cut loses only the tests not yet run (rerun them alone with -k).
    #  summary: 10 s (0 s here).
    # The caps sum to 380 s (tests/test_gpu_check.py checks docs/gpu.md against this), +
    # ~20 s wheels and versions: one run fits 7 minutes; `-k 10` can add 10 s to a step
    # that ignores SIGTERM.
    T_CUDA=25 T_RUN=120 T_LEAN=80 T_PROFILE=50 T_TRAIN=95 T_SUMMARY=10
fi

step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "gpu_check: $name (cap ${limit}s)"
    # -k 10: a step that ignores SIGTERM at its cap is killed 10 s later
    timeout -k 10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "$name cap=${limit}s took=$((SECONDS - t0))s exit=$rc" >> "$OUT/timings.txt"
    [ $rc -eq 0 ] || echo "gpu_check: $name FAILED (exit $rc; 124/137 = over its ${limit}s); see $OUT/$name.log"
    return 0
}

# pytest prints every test's result and each failure's traceback as it happens (a step cut
# by its cap keeps them in its log), -rfE the failures again at the end, and a JUnit XML per
# step for bench/gpu_summary.py; no cache folder
PYTEST=(env "PYTHONPATH=$PWD/bench/pytest_plugins:$PYTHONPATH" $PY -m pytest -p live_failures
        -p no:cacheprovider -o console_output_style=classic -v --tb=short -rfE --durations=10)
: > "$OUT/timings.txt"

{
    if [ -z "$CPU" ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    $PY - <<'PY'
import importlib.metadata as md
import torch, transformers, peft
from reprotune.train import packed_attention
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "transformers", transformers.__version__, "peft", peft.__version__)
for pkg in ("bitsandbytes", "liger-kernel", "triton", "accelerate", "trl", "datasets", "pyarrow",
            "huggingface-hub", "tokenizers", "safetensors", "pytest"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
print("varlen:", packed_attention.installed_varlen()[2])
PY
} 2>&1 | tee "$OUT/env.txt"
if [ -z "$CPU" ]; then
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA device here"; exit 1; }
fi

# 1. Equality on CUDA: packed == alone (varlen_attn), chunked/liger loss == stock
step cuda_tests "$T_CUDA" "${PYTEST[@]}" --junitxml="$OUT/cuda_tests.xml" "${TESTS[@]}" \
    tests/test_packing.py tests/test_lean_loss.py -k cuda
# 2./3. Throughput and peak memory against a plain HF Trainer (each config fail-soft inside)
step throughput_default "$T_RUN" $PY bench/train_throughput.py "${SHAPE[@]}" "${DEFAULT[@]}" \
    --out "$OUT/throughput_default.json"
step throughput_lean "$T_LEAN" $PY bench/train_throughput.py "${SHAPE[@]}" "${LEAN[@]}" \
    --out "$OUT/throughput_lean.json"
# 4. Where full's time goes (the table is rewritten after every profiled step)
step profile_full "$T_PROFILE" $PY bench/kernel_profile.py "${SHAPE[@]}" "${PROFILE[@]}" \
    --methods full --out "$OUT/profile_full.json" --table "$OUT/profile_full.txt"
# 5. Training on CUDA: the packed-vs-padded training curve (device-aware: it asserts the
#    CUDA path on CUDA), then preference tuning (dpo full + lora, every method; their
#    asserted values): last, the longest and least certain step
step training_tests "$T_TRAIN" "${PYTEST[@]}" --junitxml="$OUT/training_tests.xml" \
    "${TESTS[@]}" tests/test_packing.py tests/test_align.py \
    -k "same_loss_curve or test_reward_accuracy or lora_sft_adapter"
# 6. One JSON, one table, the targets, the tests, the fast-path fallbacks, the timings
step summary "$T_SUMMARY" $PY bench/gpu_summary.py "$OUT"
echo "gpu_check: done; results in $OUT"
