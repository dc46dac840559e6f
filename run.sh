#!/usr/bin/env bash
# run.sh: the whole flatchat pipeline, end to end.
#
#   bash run.sh                          # all stages; gpu preset on N GPUs (torchrun), cpu preset without
#   bash run.sh --preset smoke           # seconds per stage: checks that everything is wired up
#   bash run.sh sft rl                   # only these stages (rerun even if their output exists)
#   bash run.sh --from midtrain          # this stage and every later one
#   STAGES="sft rl" bash run.sh          # the same as naming them
#   FORCE=1 bash run.sh                  # rerun stages whose output already exists
#   PYTHON=venv/bin/python bash run.sh   # the interpreter to use (default: python, else python3)
#   TORCHRUN_ARGS="--nnodes=2 --node_rank=0 --rdzv-backend=c10d --rdzv-endpoint=host0:29500" bash run.sh
#
# Stages, in order: data tokenizer pretrain midtrain sft rl eval. Each training stage is followed by its
# evaluation. Everything lands in $FLATCHAT_HOME (default ~/.cache/flatchat); each stage's output is
# also written to $FLATCHAT_HOME/logs/run_<stage>.txt. A failing stage stops the run and says which.
set -euo pipefail
cd "$(dirname "$0")"
export FLATCHAT_HOME="${FLATCHAT_HOME:-$HOME/.cache/flatchat}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
ALL="data tokenizer pretrain midtrain sft rl eval"

# --- arguments
PRESET="" FROM="" NAMED="${STAGES:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --from) FROM="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) case " $ALL " in
         *" $1 "*) NAMED="$NAMED $1"; shift ;;
         *) echo "run.sh: unknown stage or flag '$1' (stages: $ALL)"; exit 2 ;;
       esac ;;
  esac
done

# --- hardware: N GPUs -> torchrun with N processes and the gpu preset; none -> python and the cpu preset
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -gt 0 ]; then
  PRESET="${PRESET:-gpu}"
  LAUNCH="$PY -m torch.distributed.run ${TORCHRUN_ARGS:---standalone} --nproc_per_node=$NGPU"  # torchrun
else
  PRESET="${PRESET:-cpu}"
  LAUNCH="$PY"
fi

# --- presets: the flags of every stage (a flag left out takes the script's default)
DATA="--preset $PRESET" CHAT="" MID="" SFT="" RL="" CHAT_EVAL=""
case "$PRESET" in
  smoke)
    CHAT="--num-spelling 200" TOK="--vocab-size 1024"
    PRE="--depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024
         --num-steps 30 --eval-every 10 --eval-tokens 4096 --sample-every -1 --compile 0"
    MID="--num-steps 10 --eval-every 5 --eval-rows 16"
    SFT="$MID --device-batch-size 2 --examples-per-step 4"
    RL="--num-steps 2 --eval-every 2 --examples-per-step 2 --num-samples 2 --max-new-tokens 16 --eval-examples 4"
    EVAL="--max-per-task 4 --bpb-tokens 4096 --max-new-tokens 16" ;;
  cpu)
    # bf16 autocast where the CPU multiplies bf16 natively (AVX-512 bf16 or AMX): ~2x the steps of fp32 in the
    # same time; torch.compile wherever inductor finds a working C++ compiler (else eager, ~1.15x slower steps)
    BF16=$("$PY" -c "import torch; print(int(torch.ops.mkldnn._is_mkldnn_bf16_supported()))" 2>/dev/null || echo 0)
    HAVE_CXX=$("$PY" -c "import torch._inductor.cpp_builder as c; c.get_cpp_compiler(); print(1)" 2>/dev/null || echo 0)
    if [ "$BF16" = 1 ]; then
      export FLATCHAT_DTYPE="${FLATCHAT_DTYPE:-bf16}"  # FLATCHAT_DTYPE=fp32 picks the fp32 path anywhere
      WHY="this CPU multiplies bf16 natively"
      [ "$FLATCHAT_DTYPE" = bf16 ] || WHY="$WHY but FLATCHAT_DTYPE=$FLATCHAT_DTYPE"
    else
      WHY="this CPU has no bf16 units (AVX-512 bf16 / AMX)"
    fi
    STEPS=$([ "${FLATCHAT_DTYPE:-fp32}" = bf16 ] && echo 720 || echo 240)
    COMPILE=$([ "$HAVE_CXX" = 1 ] && echo "+ torch.compile" || echo "eager (no working C++ compiler: apt install g++)")
    WHY="${FLATCHAT_DTYPE:-fp32} $COMPILE, $WHY: $STEPS pretraining steps"
    TOK="--vocab-size 8192"
    PRE="--depth 4 --max-seq-len 256 --device-batch-size 32 --total-batch-size 8192 --num-steps $STEPS
         --eval-every $((STEPS / 2)) --eval-tokens 32768 --sample-every $((STEPS / 2)) --compile $HAVE_CXX"
    # the chat stages: what a 7M-parameter model can learn (tinychat), tuned by tests/bench_tinychat.py
    MID="--mixture cpu --num-steps 350 --eval-every 175 --eval-rows 64"
    SFT="--mixture cpu --num-steps 120 --eval-every 60 --eval-rows 64 --init-lr-frac 0.1"
    RL="--task arithmetic --num-steps 20 --eval-every 10 --examples-per-step 4 --num-samples 4 --max-new-tokens 48
        --eval-examples 60"
    EVAL="--max-per-task 30 --bpb-tokens 32768 --max-new-tokens 224"
    CHAT_EVAL="--tasks arc,mmlu,tinychat" ;;  # GSM8K and HumanEval: far beyond this size, and slow
  gpu)
    DATA="--preset gpu --num-shards 240" TOK="--vocab-size 65536 --max-chars 2000000000"
    PRE="--depth 20" EVAL="--max-per-task 500" ;;
  *) echo "run.sh: unknown preset '$PRESET' (smoke, cpu, gpu)"; exit 2 ;;
esac

# --- which stages: named ones always run; otherwise all, skipping those whose output exists
if [ -n "$FROM" ]; then NAMED="${ALL#*$FROM}"; NAMED="$FROM $NAMED"; fi
done_already() {  # does this stage's output exist?
  case "$1" in
    data) [ -d "$FLATCHAT_HOME/data/pretrain/train" ] && [ -d "$FLATCHAT_HOME/data/chat" ] ;;
    tokenizer) [ -f "$FLATCHAT_HOME/tokenizer/tokenizer.json" ] ;;
    pretrain|midtrain|sft|rl) ls "$FLATCHAT_HOME/checkpoints/$1"/step_*/meta.json >/dev/null 2>&1 ;;
    eval) return 1 ;;
  esac
}

run() {  # run STAGE CMD...: to the terminal and to logs/run_STAGE.txt; stop everything if it fails
  local stage="$1"; shift
  mkdir -p "$FLATCHAT_HOME/logs"
  echo "=== $stage: $*"
  local t0=$SECONDS
  if ! "$@" 2>&1 | tee "$FLATCHAT_HOME/logs/run_$stage.txt"; then
    echo "=== run.sh: stage '$stage' failed; its output is in $FLATCHAT_HOME/logs/run_$stage.txt"; exit 1
  fi
  echo "=== $stage done in $((SECONDS - t0)) s"
}

train() {  # train STAGE FLAGS...: a training stage, then the evaluation of its checkpoint
  local stage="$1"; shift
  local tasks=$([ "$stage" = pretrain ] || echo "$CHAT_EVAL")
  run $stage $LAUNCH $stage.py "$@" && run eval_$stage $LAUNCH evaluate.py --stage $stage $EVAL $tasks
}

if ! mkdir -p "$FLATCHAT_HOME/logs" 2>/dev/null || [ ! -w "$FLATCHAT_HOME/logs" ]; then
  echo "run.sh: error: cannot write in $FLATCHAT_HOME/logs: set FLATCHAT_HOME to a folder you can write" >&2; exit 2
fi
MIRROR_NOTE="${FLATCHAT_DATA_MIRROR:+, data mirror $FLATCHAT_DATA_MIRROR}"
echo "flatchat: preset $PRESET, $NGPU GPUs, base dir $FLATCHAT_HOME$MIRROR_NOTE${WHY:+; $WHY}"
T_START=$SECONDS
for stage in $ALL; do
  if [ -n "$NAMED" ]; then
    case " $NAMED " in *" $stage "*) ;; *) continue ;; esac
  elif [ -z "${FORCE:-}" ] && done_already "$stage"; then
    echo "=== $stage: output exists, skipped (name the stage or set FORCE=1 to rerun it)"; continue
  fi
  case "$stage" in
    data) run data "$PY" data/corpus.py $DATA && run chat_data "$PY" data/chat_data.py $CHAT ;;
    tokenizer) run tokenizer "$PY" tokenizer.py train $TOK && run tokenizer_eval "$PY" tokenizer.py eval ;;
    pretrain) train pretrain $PRE ;;
    midtrain) train midtrain $MID ;;
    sft) train sft $SFT ;;
    rl) train rl $RL ;;
    eval) run report "$PY" evaluate.py --report ;;
  esac
done
echo "=== all done in $(( (SECONDS - T_START) / 60 )) min $(( (SECONDS - T_START) % 60 )) s"
[ -f "$FLATCHAT_HOME/report.md" ] && cat "$FLATCHAT_HOME/report.md"
echo
echo "Chat with your model:  python chat.py      (one answer: python chat.py -p \"Why is the sky blue?\")"
