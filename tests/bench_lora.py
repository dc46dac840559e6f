"""
LoRA benchmark (not a test: it prints numbers): full SFT against LoRA SFT from the same midtrain
checkpoint, the same steps, batches and seed, one after the other (then again, in the other order).

    FLATCHAT_HOME=~/.cache/flatchat python tests/bench_lora.py            # after `bash run.sh` (cpu preset)
    python tests/bench_lora.py --home DIR --ranks 8,32 --args "--num-steps 80 --eval-every 40 --eval-rows 64"

Each run gets its own home next to a temporary copy of the run's links (data, tokenizer, the midtrain
checkpoints), so the real home is only read. Printed per configuration: trainable parameters and their
share, median step time, the optimizer's state (the size of optim.pt in the checkpoint: Muon's momentum
and AdamW's two moments for full SFT, AdamW's two moments of the adapters for LoRA), final val loss.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description="Full SFT against LoRA SFT: trainable share, step time, optimizer memory, val loss.")
parser.add_argument("--home", default=os.environ.get("FLATCHAT_HOME", os.path.expanduser("~/.cache/flatchat")))
parser.add_argument("--ranks", default="8", help="comma list of LoRA ranks (0 = full finetuning, always run)")
parser.add_argument("--targets", default="q,k,v,o", help="--lora-targets")
parser.add_argument("--args", default="--num-steps 80 --eval-every 40 --eval-rows 64", help="sft.py flags (the cpu preset's)")
parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs every configuration, the order reversed each round")
args = parser.parse_args()

home = Path(args.home)
if not (home / "checkpoints" / "midtrain").is_dir():
    sys.exit(f"error: no midtrain checkpoint in {home}: run `bash run.sh` first or pass --home")
ranks = [0] + [int(r) for r in args.ranks.split(",") if int(r)]
results = {r: [] for r in ranks}
with tempfile.TemporaryDirectory() as tmp:
    for rnd in range(args.rounds):
        for rank in ranks if rnd % 2 == 0 else ranks[::-1]:
            run_home = Path(tmp) / f"r{rank}_{rnd}"
            (run_home / "checkpoints").mkdir(parents=True)
            for name in ("data", "tokenizer"):
                (run_home / name).symlink_to(home / name)
            (run_home / "checkpoints" / "midtrain").symlink_to(home / "checkpoints" / "midtrain")
            flags = args.args.split() + (["--lora-rank", str(rank), "--lora-targets", args.targets] if rank else [])
            out = subprocess.run([sys.executable, str(ROOT / "sft.py"), *flags], capture_output=True, text=True,
                                 env={**os.environ, "FLATCHAT_HOME": str(run_home)}, cwd=ROOT)
            if out.returncode:
                sys.exit(f"sft.py {' '.join(flags)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            rows = [json.loads(line) for line in open(run_home / "logs" / "sft.jsonl")]
            steps = [r for r in rows if "dt" in r]
            evals = [r for r in rows if "val_loss" in r]
            ckpt = sorted((run_home / "checkpoints" / "sft").glob("step_*"))[-1]
            share = re.search(r"([\d,]+) trainable parameters of ([\d,]+)", out.stdout)
            trainable, total = (int(share[1].replace(",", "")), int(share[2].replace(",", ""))) if share else (None, None)
            results[rank].append(dict(ms=1000 * statistics.median(r["dt"] for r in steps[1:]), val=evals[-1]["val_loss"],
                                      optim_mb=(ckpt / "optim.pt").stat().st_size / 2**20, trainable=trainable, total=total))
            print(f"round {rnd} {'full' if not rank else f'lora r{rank}'}: {results[rank][-1]}", flush=True)

cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
print(f"\n{cpu}, {os.cpu_count()} cpus; sft.py {args.args}; LoRA targets {args.targets}; medians over {args.rounds} round(s)")
print(f"{'config':<12} {'trainable':>22} {'ms/step':>9} {'optimizer state':>16} {'final val loss':>15}")
for rank, rs in results.items():
    r0 = rs[0]
    total = r0["total"] or results[ranks[-1]][0]["total"]
    trainable = r0["trainable"] or total
    print(f"{'full' if not rank else f'lora r{rank}':<12} {trainable:>12,} ({100 * trainable / total:5.2f}%) "
          f"{statistics.median(r['ms'] for r in rs):>9.0f} {statistics.median(r['optim_mb'] for r in rs):>13.2f} MB "
          f"{statistics.median(r['val'] for r in rs):>15.4f}")
