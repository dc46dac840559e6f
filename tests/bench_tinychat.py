"""
Benchmark: the cpu preset's chat stages, recipe against recipe, on one base model: each variant runs
midtrain and sft from the same pretraining checkpoint, then `evaluate.py --tasks tinychat` on the SFT
checkpoint (30 prompts a category, 224 new tokens, greedy), and prints each category, the mean and the
minutes it took. Not collected by pytest; run it on an idle machine, after a cpu-preset run:

    python tests/bench_tinychat.py --home ~/.cache/flatchat            # every variant below (~50 min)
    python tests/bench_tinychat.py --home ~/.cache/flatchat --only now

The variants are the steps and learning rate of the runs that chose run.sh's cpu preset.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (midtrain flags, sft flags); all on the cpu mixture
    "before (60 + 80 steps)": ("--num-steps 60", "--num-steps 80"),
    "200 + 300 steps": ("--num-steps 200", "--num-steps 300"),
    "350 + 120 steps": ("--num-steps 350", "--num-steps 120"),
    "now: 350 + 120 steps, sft lr x5": ("--num-steps 350", "--num-steps 120 --init-lr-frac 0.1"),
}


def variant(base, mid, sft):
    """midtrain + sft + tinychat in a fresh home beside base: ({metric: value}, minutes)."""
    home = Path(tempfile.mkdtemp(prefix="flatchat_tinychat_"))
    (home / "checkpoints").mkdir()
    for d in ("data", "tokenizer", "checkpoints/pretrain"):
        (home / d).symlink_to(base / d)
    env = {**os.environ, "FLATCHAT_HOME": str(home)}
    t0 = time.time()
    for cmd in (["midtrain.py", "--mixture", "cpu", "--eval-every", "-1", *mid.split()],
                ["sft.py", "--mixture", "cpu", "--eval-every", "-1", *sft.split()],
                ["evaluate.py", "--stage", "sft", "--tasks", "tinychat", "--max-per-task", "30",
                 "--max-new-tokens", "224"]):
        subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True, capture_output=True)
    metrics = json.loads((home / "report" / "metrics_sft.json").read_text())
    scores = {k[9:] or "mean": v for k, v in metrics.items() if k.startswith("tinychat") and k[9:] != "items"}
    return scores, (time.time() - t0) / 60


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="cpu-preset chat recipes against each other on tinychat.")
    parser.add_argument("--home", required=True, help="a home after a cpu-preset run (its base checkpoint)")
    parser.add_argument("--only", default="", help="a variant whose name starts with this")
    args = parser.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, FLATCHAT_DTYPE="
          f"{os.environ.get('FLATCHAT_DTYPE', 'fp32')}")
    for name, (mid, sft) in VARIANTS.items():
        if name.startswith(args.only):
            scores, minutes = variant(Path(args.home).resolve(), mid, sft)
            print(f"{name:<34} {minutes:5.1f} min | " + " | ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                  flush=True)
