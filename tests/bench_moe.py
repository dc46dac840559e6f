"""
Benchmark: dense against mixture-of-experts pretraining on the cpu preset's model (depth 4, width 256,
context 256, vocab 8192, 32 rows a step), at equal active FLOPs per token and equal tokens: the same
steps of the same batch, every run a real `pretrain.py` in its own home sharing one corpus and tokenizer.
Not collected by pytest; run it on an idle machine:

    python tests/bench_moe.py --steps 240                 # builds the cpu corpus + tokenizer from the mirror
    python tests/bench_moe.py --steps 240 --home DIR      # reuses DIR's corpus and tokenizer

Runs: dense eager and dense compiled (the cpu preset's own path), and MoE with 4 and 8 experts of the dense
MLP's size, one of them a token (the same active FLOPs, 4x and 8x the MLP parameters), eager (a routed MLP's
shapes change every step). Each figure: the final val bpb, the median step time after the first 5 steps,
and the process's peak RSS.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ["--depth", "4", "--max-seq-len", "256", "--device-batch-size", "32", "--total-batch-size", "8192",
          "--eval-every", "-1", "--eval-tokens", "32768", "--sample-every", "-1", "--save-every", "-1"]
RUNS = {"dense, eager": ["--compile", "0"], "dense, compiled": ["--compile", "1"],
        "moe 4 experts, 1 a token": ["--num-experts", "4", "--experts-per-token", "1"],
        "moe 8 experts, 1 a token": ["--num-experts", "8", "--experts-per-token", "1"]}


def prepare(home):
    env = {**os.environ, "FLATCHAT_HOME": str(home)}
    env.setdefault("FLATCHAT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    for cmd in (["data/corpus.py", "--preset", "cpu"], ["tokenizer.py", "train", "--vocab-size", "8192"]):
        subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True, capture_output=True)


def run(home, flags, steps):
    """One pretraining run in a fresh home beside `home`: (val bpb, median s/step, peak RSS in MB, params line)."""
    run_home = Path(tempfile.mkdtemp(prefix="flatchat_moe_"))
    for d in ("data", "tokenizer"):
        (run_home / d).symlink_to(home / d)
    cmd = [sys.executable, "pretrain.py", *PRESET, "--num-steps", str(steps), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "FLATCHAT_HOME": str(run_home), "FLATCHAT_DTYPE":
                            os.environ.get("FLATCHAT_DTYPE", "fp32")}, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    rows = [json.loads(line) for line in (run_home / "logs" / "pretrain.jsonl").read_text().splitlines()]
    shutil.rmtree(run_home)
    dt = statistics.median(r["dt"] for r in rows if "loss" in r and r["step"] > 5)
    model = next(line for line in out.splitlines() if line.startswith("model:"))
    return [r["val_bpb"] for r in rows if "val_bpb" in r][-1], dt, usage.ru_maxrss / 1024, model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Dense against MoE at equal active FLOPs and tokens.")
    parser.add_argument("--steps", type=int, default=240, help="pretraining steps of 8,192 tokens per run")
    parser.add_argument("--home", default="", help="a FLATCHAT_HOME with the cpu corpus and a tokenizer")
    args = parser.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="flatchat_moe_home_"))
    if not args.home:
        prepare(home)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.steps} steps of 8,192 "
          f"tokens, dtype {os.environ.get('FLATCHAT_DTYPE', 'fp32')}")
    print(f"{'run':<28}{'val bpb':>9}{'ms/step':>9}{'peak MB':>9}  model")
    for name, flags in RUNS.items():
        bpb, dt, rss, model = run(home, flags, args.steps)
        print(f"{name:<28}{bpb:>9.4f}{dt * 1000:>9,.0f}{rss:>9,.0f}  {model[7:]}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
