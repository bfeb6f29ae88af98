#!/usr/bin/env bash
# The one-shot GPU check: everything this project needs to learn from a GPU, in one run.
#
#   benchmarks/gpu_check.sh                 # CUDA (one H200: about 9 minutes)
#   benchmarks/gpu_check.sh --device cpu    # the same sections on tiny shapes (tested in CI)
#
# Nothing is downloaded: models are random initialisations of real shapes (llm.shapes) built on
# the device in their dtype, or the built-in tiny models; tasks are small local JSONL files.
# Every section writes under $OUT (default runs/gpu_check): its log, its JSON, and one line
# "<section> <exit status> <seconds>" in status.txt. A failing section does not stop the others;
# the script exits 1 when any failed. Sections run in order of what matters most; with
# BUDGET_S=<seconds> set, each section's limit is cut to the time left, and a section that would
# start with under 15 s left is recorded as "skipped" (and counts as failed).
#
# Sections:
#   device_check   z on the device vs the CPU bit for bit; trajectories trained on the device
#                  replayed on the CPU and the device (benchmarks/device_check.py)
#   gpu_tests      the tests marked gpu (pytest -m gpu)
#   step_ops       aten ops and host syncs per step of every method (benchmarks/step_ops.py)
#   step_cost_*    step time / forwards and peak memory, SmolLM2-135M, Llama-3.2-1B, OPT-13B
#                  shapes in bfloat16 (benchmarks/step_cost.py)
#   finetune_bf16  finetune in bfloat16, interrupted at step 2 and resumed, against an
#                  uninterrupted run: the same weights (sha256)
#   pretrain_*     a short pretrain-tuner in bf16-mixed and bf16-true, under DDP and FSDP2 at
#                  world size 1 (NCCL on CUDA, gloo on the CPU); the tuner stays float32
#   profile_opt13b the device time of four OPT-13B layers' MeZO + tuner step, kernel by kernel
#                  (benchmarks/profile_step.py; CUDA only)
set -uo pipefail

DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "--device: cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
: > "$OUT/status.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FAILED=0
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-86400} ))

section() {  # section NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 start rc left
    shift 2
    start=$(date +%s)
    left=$(( DEADLINE - start ))
    if [ "$left" -lt 15 ]; then
        echo "$name skipped ${left}s-left" | tee -a "$OUT/status.txt"
        FAILED=1
        return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo "== $name: $*"
    if declare -F "$1" > /dev/null; then  # a function: its commands each run under $LIMIT
        LIMIT=$limit "$@" > "$OUT/$name.log" 2>&1
    else
        timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    fi
    rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" | tee -a "$OUT/status.txt"
    if [ "$rc" -ne 0 ]; then FAILED=1; tail -n 20 "$OUT/$name.log"; fi
}

{
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ) device $DEVICE commit $(git describe --always --dirty 2>/dev/null || echo none)"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} > "$OUT/machine.txt" 2>&1

section device_check 120 "$PY" benchmarks/device_check.py --device "$DEVICE" --json "$OUT/device_check.json"

if [ "$DEVICE" = cuda ]; then
    OPS=(--model llama-3.2-1b --layers 1 --batch 2 --seq 16 --dtype bfloat16)
    section step_ops 90 "$PY" benchmarks/step_ops.py "${OPS[@]}" --device cuda --json "$OUT/step_ops.json"
    ALL=mezo,hizoo,lozo,lozo-m
    # one process per method (about 13 s each on an H200, mostly start-up): hizoo and lozo-m
    # are timed on the Llama-3.2-1B shape
    section step_cost_smollm2 120 "$PY" benchmarks/step_cost.py --model smollm2-135m --dtype bfloat16 \
        --batch 16 --seq 512 --methods reference,mezo,lozo,mezo+tuner,lozo+tuner --repeats 3 --json "$OUT/step_cost_smollm2.json"
    section step_cost_llama1b 90 "$PY" benchmarks/step_cost.py --model llama-3.2-1b --dtype bfloat16 \
        --batch 16 --seq 512 --methods $ALL,mezo+tuner --repeats 3 --json "$OUT/step_cost_llama1b.json"
    section step_cost_opt13b 150 "$PY" benchmarks/step_cost.py --model opt-13b --dtype bfloat16 \
        --batch 8 --seq 512 --methods mezo,lozo,mezo+tuner --repeats 2 --json "$OUT/step_cost_opt13b.json"
    # test modules written for the CPU (e.g. Triton's interpreter patches) may not import here
    section gpu_tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
    ACCEL=(--accelerator gpu --devices 1)
else
    echo "gpu_tests skipped: no CUDA" | tee -a "$OUT/status.txt"
    OPS=(--model smollm2-135m --layers 1 --batch 2 --seq 16 --methods mezo,mezo+tuner,lozo)
    section step_ops 240 "$PY" benchmarks/step_ops.py "${OPS[@]}" --device cpu --policy device --json "$OUT/step_ops.json"
    section step_cost_tiny 120 "$PY" benchmarks/step_cost.py --model tiny --dtype bfloat16 \
        --methods mezo,hizoo,lozo,mezo+tuner --repeats 1 --json "$OUT/step_cost_tiny.json"
    ACCEL=(--accelerator cpu --devices 1)
fi

TASK="$OUT/task.jsonl"
"$PY" -c "import sys; sys.path.append('tests'); from pathlib import Path; from helpers import write_classification_task as w; w(Path('$TASK'), n=48)"

FT=(--model tiny-llama --task "$TASK" --dtype bfloat16 --batch_size 4 --n_train 32 --n_dev 4
    --n_test 8 --eval_examples 4 --lr 1e-3 --checkpoint_every 1 --no_progress "${ACCEL[@]}")
finetune_resume() {
    rm -rf "$OUT/ft_whole" "$OUT/ft_parts"
    timeout "$LIMIT" "$PY" -m finetune.cli "${FT[@]}" --steps 4 --output "$OUT/ft_whole" || return 1
    timeout "$LIMIT" "$PY" -m finetune.cli "${FT[@]}" --steps 2 --output "$OUT/ft_parts" || return 1
    timeout "$LIMIT" "$PY" -m finetune.cli "${FT[@]}" --steps 4 --output "$OUT/ft_parts" --resume ||
        return 1
    "$PY" - "$OUT" <<'EOF'
import json, sys
whole, parts = (json.load(open(f"{sys.argv[1]}/{d}/results.json")) for d in ("ft_whole", "ft_parts"))
same = whole["weights_sha256"] == parts["weights_sha256"] and whole["train_loss"] == parts["train_loss"]
print("resumed == uninterrupted:", same, whole["weights_sha256"][:16], parts["weights_sha256"][:16])
sys.exit(0 if same else 1)
EOF
}
section finetune_bf16 90 finetune_resume

PT=(--model tiny-llama --task "$TASK" --steps 2 --batch_size 4 --n_train 16 --lr_update 1e-3
    --checkpoint_every 1 --name none --no_progress "${ACCEL[@]}")
pretrain() {  # pretrain PRECISION STRATEGY
    local dir="$OUT/pt_$1_$2"
    rm -rf "$dir"
    timeout "$LIMIT" "$PY" -m pretrain_tuner.cli "${PT[@]}" --precision "$1" --strategy "$2" \
        --output "$dir" || return 1
    "$PY" - "$dir" <<'EOF'
import sys
from safetensors.torch import load_file
tensors = load_file(f"{sys.argv[1]}/model.safetensors")
dtypes = sorted({str(t.dtype) for t in tensors.values()})
print("saved tuner dtypes:", dtypes)
sys.exit(0 if dtypes == ["torch.float32"] else 1)
EOF
}
# each precision and each strategy once before the fourth pair, so a short budget skips that one
for run in bf16-mixed:ddp bf16-true:fsdp bf16-true:ddp bf16-mixed:fsdp; do
    section "pretrain_${run%%:*}_${run##*:}" 90 pretrain "${run%%:*}" "${run##*:}"
done

if [ "$DEVICE" = cuda ]; then  # last: a diagnosis, not a check
    # where an OPT-13B step's device time goes, kernel by kernel, with the tuner
    section profile_opt13b 60 "$PY" benchmarks/profile_step.py --device cuda --dtype bfloat16 \
        --model opt-13b --layers 4 --batch 8 --seq 512 --method mezo+tuner --rows 25
fi

echo "status ($OUT/status.txt):"
cat "$OUT/status.txt"
exit $FAILED
