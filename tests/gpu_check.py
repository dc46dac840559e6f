"""
tests/gpu_check.py: the GPU device check, one command that fits a lent GPU's window and keeps its evidence.
Not collected by pytest (tests/test_gpu_check.py runs its --dry-run).

On the CPU machine, before the GPU is lent:
    python tests/gpu_check.py --prepare      # .gpu/ (git-ignored): a home with the corpus and a 32768-token
                                             # tokenizer, and nanochat's pretraining; refuses above 60 MiB
    python tests/gpu_check.py --dry-run      # the same steps on this CPU at tiny sizes, in about 2 minutes
On the GPU machine (device tool: carry [".gpu"], timeout ~560 s), with $OUT set by the tool:
    python3 tests/gpu_check.py --deadline 480

Steps in order of value, each in its own process group, killed whole at its limit; a step starts only if
the time left covers it, a failed step leaves its tail in summary.txt and the next one runs:
  probe            python3, torchrun, g++, the imports each step needs, the GPU's name and memory
  flatchat_d12     pretrain.py --bench at depth 12, seq 2048, 32 rows x 2 accumulation steps, 15 steps
  nanochat_d12     nanochat's own pretraining on the same documents, batch and number of steps
  flatchat_d20     the same at depth 20 (out of memory: once more at half the device batch)
  smoke            `bash run.sh --preset smoke` through every stage on CUDA, in a fresh home
  nanochat_d20     if time is left
$OUT holds summary.txt (a table: tok/s, MFU, data wait share, peak allocated / reserved memory) and one
log per step, written as the step runs (unbuffered): a step killed at its limit keeps what it printed.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"  # what travels to the GPU machine (git-ignored)
CARRY_LIMIT = 60 * 2**20  # the device tool refuses to carry more than 64 MiB: keep room for the tree
BENCH = {"steps": 15, "seq": 2048, "batch": 32, "total": 131072, "vocab": 32768}
TINY = {"steps": 15, "seq": 128, "batch": 4, "total": 1024}  # --dry-run's sizes


def size_of(path):
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def carry_size():
    """Bytes the device tool carries: the git tree (tracked and untracked, not ignored) plus .gpu/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True).stdout.split("\0")
    return sum(size_of(ROOT / f) for f in listed if f and (ROOT / f).is_file()) + size_of(GPU)


def prepare(mirror):
    """.gpu/home: the cpu corpus (its raw copies dropped: pretraining never reads them) and a 32768-token
    tokenizer; .gpu/nanochat: ../shared/bench/gpu (nanochat at 92d63d4, its data and tokenizer, stubs)."""
    home = GPU / "home"
    env = {**os.environ, "FLATCHAT_HOME": str(home), "FLATCHAT_DATA_MIRROR": str(mirror)}
    for cmd in (["data/corpus.py", "--preset", "cpu"], ["tokenizer.py", "train", "--vocab-size", BENCH["vocab"]]):
        subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, check=True)
    shutil.rmtree(home / "data" / "raw", ignore_errors=True)
    shutil.rmtree(home / "data" / "tokens", ignore_errors=True)  # the GPU machine's 16 cores tokenize quickly
    shutil.rmtree(GPU / "nanochat", ignore_errors=True)
    shutil.copytree(mirror.parent / "bench" / "gpu", GPU / "nanochat", ignore=shutil.ignore_patterns("uv.lock"))
    size = carry_size()
    print(f"prepared {GPU}: {size_of(GPU) / 2**20:.1f} MiB, {size / 2**20:.1f} MiB with the tree")
    if size > CARRY_LIMIT:
        sys.exit(f"error: {size / 2**20:.1f} MiB would travel, over the {CARRY_LIMIT / 2**20:.0f} MiB limit")


# -----------------------------------------------------------------------------
# Running a step: its own process group, its output streamed to a file, killed whole at its limit

class Check:
    def __init__(self, out, deadline):
        self.out, self.end, self.rows = Path(out), time.time() + deadline, []
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary = open(self.out / "summary.txt", "a", buffering=1)

    def say(self, line):
        print(line, flush=True)
        self.summary.write(line + "\n")

    def left(self):
        return self.end - time.time()

    def run(self, name, cmd, limit, need, env=None, cwd=ROOT):
        """Run cmd if `need` seconds are left, for at most `limit` (cut to the time left); (rc, log text)."""
        if self.left() < need:
            self.say(f"{name}: skipped, {self.left():.0f} s left of the deadline (it needs ~{need} s)")
            return None, ""
        limit, log, t0 = min(limit, self.left() - 5), self.out / f"{name}.txt", time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "a", buffering=1) as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: torchrun's workers, compile workers
            except ProcessLookupError:
                pass
            proc.wait()
        text = log.read_text(errors="replace")
        self.say(f"{name}: {'exit ' + str(rc) if rc != 'timeout' else f'killed at its {limit:.0f} s limit'} "
                 f"after {time.time() - t0:.0f} s ({log.name})")
        if rc != 0:
            self.summary.write("".join(f"    | {line}\n" for line in text.splitlines()[-15:]))
        return rc, text


# -----------------------------------------------------------------------------
# The steps

def probe(check, device):
    code = ("import importlib, shutil, sys, torch\n"
            "mods = 'numpy regex pyarrow tiktoken requests filelock psutil yaml jinja2 textual'.split()\n"
            "missing = [m for m in mods if importlib.util.find_spec(m) is None]\n"
            "print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)\n"
            "print('g++:', shutil.which('g++'), '| git:', shutil.which('git'), '| missing modules:', missing)\n"
            "if torch.cuda.is_available():\n"
            "    free, total = torch.cuda.mem_get_info()\n"
            "    print('gpu:', torch.cuda.get_device_name(), f'{total / 2**30:.1f} GiB, {free / 2**30:.1f} free')\n"
            "import torch.distributed.run\n"
            "print('torchrun: importable')\n")
    rc, text = check.run("probe", [sys.executable, "-c", code], 60, 5)
    said = [line for line in text.splitlines() if line.startswith(("python ", "g++:", "gpu:", "torchrun:"))]
    check.say("probe: " + " / ".join(said))
    missing = re.search(r"missing modules: \[(.*?)\]", text)
    return {m.strip(" '") for m in missing[1].split(",")} if missing and missing[1] else set()


def flatchat(check, name, home, depth, sizes, device_batch, compile, limit, need):
    """pretrain.py --bench in a fresh home sharing `home`'s corpus and tokenizer; the table's row."""
    run_home = Path(tempfile.mkdtemp(prefix=f"flatchat_{name}_"))
    for d in ("data", "tokenizer"):
        (run_home / d).symlink_to(home / d)
    cmd = [sys.executable, "pretrain.py", "--bench", "--depth", depth, "--max-seq-len", sizes["seq"],
           "--device-batch-size", device_batch, "--total-batch-size", sizes["total"], "--num-steps",
           sizes["steps"], "--compile", compile]
    rc, text = check.run(name, cmd, limit, need, env={"FLATCHAT_HOME": str(run_home)})
    log = run_home / "logs" / "pretrain.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    shutil.rmtree(run_home, ignore_errors=True)
    steady = [r for r in rows if "loss" in r][5:]
    if rc is None or not steady:
        return rc, text
    med = lambda key: statistics.median(r[key] for r in steady) if key in steady[0] else float("nan")
    peak = max((r.get("gpu_peak_gib", 0.0) for r in rows), default=0.0)
    reserved = max((r.get("gpu_reserved_gib", 0.0) for r in rows), default=0.0)
    check.rows.append((name, depth, device_batch, len(steady), med("tok_per_s"), 100 * med("mfu"),
                       100 * med("wait") / med("dt"), peak, reserved))
    return rc, text


NANOCHAT_LINE = re.compile(r"step (\d+)/\d+ \(.*?\) \| loss: [\d.]+ \| lrm: \S+ \| dt: [\d.]+ms \| "
                           r"tok/sec: ([\d,]+) \| bf16_mfu: ([\d.]+)")


def nanochat(check, name, bench, depth, sizes, device_batch, limit, need):
    """nanochat's base_train (as ../shared/bench/gpu/run_nanochat.sh runs it) on the same documents."""
    work = Path(tempfile.mkdtemp(prefix="nanochat_base_"))
    shutil.copytree(bench / "nc_base", work, dirs_exist_ok=True)
    cmd = [sys.executable, "-m", "scripts.base_train", "--run=dummy", f"--depth={depth}",
           f"--max-seq-len={sizes['seq']}", f"--device-batch-size={device_batch}",
           f"--total-batch-size={sizes['total']}", f"--num-iterations={sizes['steps']}", "--window-pattern=L",
           "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1", "--save-every=-1"]
    env = {"NANOCHAT_BASE_DIR": str(work), "WANDB_MODE": "disabled",
           "PYTHONPATH": f"{bench / 'stubs'}:{bench / 'nanochat'}"}
    rc, text = check.run(name, cmd, limit, need, env=env, cwd=bench / "nanochat")
    shutil.rmtree(work, ignore_errors=True)
    steady = [(int(m[1]), float(m[2].replace(",", "")), float(m[3])) for m in NANOCHAT_LINE.finditer(text)]
    steady = [r for r in steady if r[0] >= 5]
    if steady:
        peak = re.search(r"Peak memory usage: ([\d.]+)MiB", text)
        check.rows.append((name, depth, device_batch, len(steady), statistics.median(r[1] for r in steady),
                           statistics.median(r[2] for r in steady), float("nan"),
                           float(peak[1]) / 1024 if peak else float("nan"), float("nan")))
    return rc, text


def table(check):
    check.say(f"{'run':<16}{'depth':>6}{'batch':>6}{'steps':>6}{'tok/s':>12}{'MFU %':>8}{'wait %':>8}"
              f"{'peak GiB':>10}{'reserved':>10}")
    for name, depth, batch, steps, tok_s, mfu, wait, peak, reserved in check.rows:
        check.say(f"{name:<16}{depth:>6}{batch:>6}{steps:>6}{tok_s:>12,.0f}{mfu:>8.1f}{wait:>8.2f}{peak:>10.1f}"
                  f"{reserved:>10.1f}")


def main(args):
    dry = args.dry_run
    check = Check(args.out, args.deadline)
    sizes = TINY if dry else BENCH
    check.say(f"gpu_check: {'dry run on the CPU' if dry else 'GPU'}, deadline {args.deadline} s, out {args.out}")
    missing = probe(check, "cpu" if dry else "cuda")
    bench = GPU / "nanochat" if (GPU / "nanochat").exists() else ROOT.parent / "shared" / "bench" / "gpu"
    nanochat_ok = not missing & {"filelock", "psutil", "yaml", "jinja2", "tiktoken", "pyarrow"}
    if not nanochat_ok:
        check.say(f"nanochat steps: skipped, its imports are missing ({', '.join(sorted(missing))})")
    home = Path(args.home) if args.home else GPU / "home"
    if dry and not args.home:  # a tiny home from the fixtures: the smoke corpus and a 512-token tokenizer
        home = Path(tempfile.mkdtemp(prefix="flatchat_dry_home_"))
        env = {"FLATCHAT_HOME": str(home), "FLATCHAT_DATA_MIRROR": str(ROOT / "tests" / "fixtures" / "mirror")}
        for cmd in (["data/corpus.py", "--preset", "smoke"], ["tokenizer.py", "train", "--vocab-size", 512]):
            check.run("home", [sys.executable, *cmd], 60, 10, env=env)
    d_small, d_big, compile = (2, 3, 0) if dry else (12, 20, 1)
    flatchat(check, "flatchat_d12", home, d_small, sizes, sizes["batch"], compile, 150, 60)
    if nanochat_ok:
        nanochat(check, "nanochat_d12", bench, d_small, sizes, sizes["batch"], 150, 60)
    rc, text = flatchat(check, "flatchat_d20", home, d_big, sizes, sizes["batch"], compile, 180, 80)
    if rc not in (0, None) and "out of GPU memory" in text:
        flatchat(check, "flatchat_d20", home, d_big, sizes, sizes["batch"] // 2, compile, 150, 70)
    smoke_home = Path(tempfile.mkdtemp(prefix="flatchat_smoke_"))  # fresh: a rerun starts over
    check.run("smoke", ["bash", "run.sh", "--preset", "smoke"], 150, 40, env={
        "FLATCHAT_HOME": str(smoke_home), "FLATCHAT_DATA_MIRROR": str(ROOT / "tests" / "fixtures" / "mirror"),
        "PYTHON": sys.executable})
    shutil.rmtree(smoke_home, ignore_errors=True)
    if nanochat_ok:
        nanochat(check, "nanochat_d20", bench, d_big, sizes, sizes["batch"], 150, 80)
    table(check)
    check.say(f"gpu_check: done, {check.left():.0f} s of the deadline left")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The GPU device check (see the docstring).")
    parser.add_argument("--prepare", action="store_true", help="build .gpu/ on the CPU machine, then stop")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--deadline", type=float, default=480, help="seconds for all the steps together")
    parser.add_argument("--home", default="", help="a FLATCHAT_HOME with corpus + tokenizer (default: .gpu/home)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"), help="where logs go ($OUT)")
    parser.add_argument("--mirror", default=os.environ.get("FLATCHAT_DATA_MIRROR", str(ROOT.parent / "shared" / "data")),
                        help="the offline data mirror (--prepare)")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.mirror).resolve())
    else:
        main(args)
