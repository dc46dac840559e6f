#!/usr/bin/env bash
# tests/gpu_check.sh: every GPU check of the GPU-path issue in one run, for a session that is lent a GPU.
# Each step has its own timeout; logs go to $OUT. Prepare on the CPU machine (a git-ignored .gpu/ folder,
# named in the device tool's `carry`):
#   python tests/bench_gpu.py --prepare .gpu/home        # the mirror's cpu corpus + a 32768 tokenizer
#   cp -r ../shared/bench/gpu .gpu/nanochat              # nanochat's own pretraining, ready to run offline
# then on the GPU machine:  bash tests/gpu_check.sh     (about 10 minutes on one H100/H200)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/flatchat_gpu}"
mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...: run, log, and say how it ended
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s ($OUT/$name.txt)" | tee -a "$OUT/summary.txt"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/summary.txt" 2>&1
step flatchat_bench 330 python tests/bench_gpu.py --home .gpu/home --steps 30    # depth 12 and 20, then the loader
step nanochat_d12 150 bash .gpu/nanochat/run_nanochat.sh 12 30 32 131072
step nanochat_d20 200 bash .gpu/nanochat/run_nanochat.sh 20 30 32 131072
step smoke 300 env FLATCHAT_HOME=/tmp/flatchat_smoke FLATCHAT_DATA_MIRROR=tests/fixtures/mirror bash run.sh --preset smoke
grep -h "depth \|nanochat:\|=== all done\|failed" "$OUT"/*.txt | tee -a "$OUT/summary.txt"
