"""
Benchmark: a cpu-preset pretraining step and RL step on an idle machine and beside one competing busy
process pinned to a core, with the thread count fixed at the number of cores (before: OMP_NUM_THREADS)
and following the cores other processes leave free (after: model.fit_threads). Not collected by pytest.

    python tests/bench_load.py --home ~/.cache/flatchat     # a FLATCHAT_HOME of a finished cpu-preset run

Each figure is the median step time (s) of the stage run as the cpu preset runs it (compiled; set
FLATCHAT_DTYPE=bf16 for its bf16 path), the first steps (compile, warmup) left out. The busy process
is `while True: pass` pinned to the last core.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ["pretrain.py", "--depth", "4", "--max-seq-len", "256", "--device-batch-size", "32", "--total-batch-size", "8192",
            "--eval-every", "-1", "--eval-tokens", "8192", "--sample-every", "-1", "--compile", "1"]
RL = ["rl.py", "--examples-per-step", "4", "--num-samples", "4", "--max-new-tokens", "96", "--eval-examples", "0"]


def busy_core():
    """A process that keeps the last core busy until it is killed."""
    core = max(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])


def median_step(home, cmd, steps, skip, env):
    """Run a stage for `steps` steps in a scratch FLATCHAT_HOME beside `home`: the median dt after `skip` steps."""
    scratch = home.parent / f".bench_load_{os.getpid()}"
    subprocess.run(["rm", "-rf", str(scratch)])
    (scratch / "checkpoints").mkdir(parents=True)
    for d in ("data", "tokenizer", "checkpoints/sft"):
        (scratch / d).symlink_to(home / d)
    subprocess.run([sys.executable, *cmd, "--num-steps", str(steps)], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "FLATCHAT_HOME": str(scratch), **env})
    rows = [json.loads(l) for l in (scratch / "logs" / f"{cmd[0][:-3]}.jsonl").read_text().splitlines()]
    subprocess.run(["rm", "-rf", str(scratch)])
    return statistics.median(r["dt"] for r in rows if "loss" in r and r["step"] > skip)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Step times idle and beside a busy process, threads fixed or fitted.")
    parser.add_argument("--home", default=str(Path.home() / ".cache" / "flatchat"), help="a finished cpu-preset run")
    parser.add_argument("--pretrain-steps", type=int, default=10, help="pretraining steps per run (the first 4 skipped)")
    parser.add_argument("--rl-steps", type=int, default=3, help="RL steps per run (the first skipped)")
    args = parser.parse_args()
    home, cores = Path(args.home).resolve(), len(os.sched_getaffinity(0))
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    print(f"{cpu}, {cores} cores, load average {os.getloadavg()[0]:.2f} at start")
    policies = {"before: threads fixed at the cores": {"OMP_NUM_THREADS": str(cores)}, "after: threads fit the free cores": {}}
    results = {}
    for name, cmd, steps, skip in (("pretrain step", PRETRAIN, args.pretrain_steps, 4), ("RL step", RL, args.rl_steps, 1)):
        for policy, env in policies.items():
            for loaded in (False, True):
                busy = busy_core() if loaded else None
                time.sleep(0.5)
                try:
                    results[name, policy, loaded] = median_step(home, cmd, steps, skip, env)
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
                print(f"{name:<14} {policy:<36} {'loaded' if loaded else 'idle':<7} {results[name, policy, loaded]:7.2f} s",
                      flush=True)
    print(f"\n{'':<14} {'policy':<36} {'idle s':>8} {'loaded s':>9} {'loaded/idle':>12} {'loaded / idle before':>21}")
    for name in ("pretrain step", "RL step"):
        idle_before = results[name, "before: threads fixed at the cores", False]
        for policy in policies:
            idle, loaded = results[name, policy, False], results[name, policy, True]
            print(f"{name:<14} {policy:<36} {idle:8.2f} {loaded:9.2f} {loaded / idle:11.2f}x {loaded / idle_before:20.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (the busy process counts 1)")
