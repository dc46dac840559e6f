"""
Benchmark: can the data pipeline keep a GPU fed. Not collected by pytest. (The GPU step itself:
tests/gpu_check.py.)

    python tests/bench_gpu.py --prepare DIR     # a FLATCHAT_HOME with the mirror's cpu corpus + a 32768 tokenizer
    python tests/bench_gpu.py --home DIR        # the loader, cold and warm, beside the previous one

On a CPU it measures what one process of pretrain.py's loader can supply, in tokens/s of (B, T+1) rows:
  - cold: from a FLATCHAT_HOME without token shards, the one-time tokenization into data/tokens/ included
    (on 1 process, and on every core as pretrain.py does it), then the first 20 batches;
  - warm: batches from the memory-mapped shards (what every step after the first pays);
  - the previous loader (git revision --rev, tokenizing each micro-batch inside the step), cold and warm,
    side by side on the same documents;
and compares them with what a model consumes: the cpu preset here (~6k tok/s), a depth-12 rank on an H100
(~500k tok/s) and a depth-20 one (~130k tok/s).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONSUMERS = {"cpu preset, 2 cores (bf16 + compile)": 6.5e3, "depth 20 rank, H100": 130e3, "depth 12 rank, H100": 500e3}


def run(*cmd, env=None):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})}, check=True,
                          capture_output=True, text=True)


def prepare(home):
    """The documents and tokenizer of ../shared/bench/gpu's nanochat side: the cpu corpus, vocab 32768."""
    env = {"FLATCHAT_HOME": str(home), "FLATCHAT_DATA_MIRROR": os.environ.get("FLATCHAT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))}
    run(sys.executable, "data/corpus.py", "--preset", "cpu", env=env)
    run(sys.executable, "tokenizer.py", "train", "--vocab-size", 32768, env=env)
    print(f"prepared {home}: carry it to the GPU machine and run `python tests/bench_gpu.py --home {home}`")


def old_lane_class(rev, tokenizer):
    """The Lane of pretrain.py at rev (before token shards: it tokenized documents as batches needed them)."""
    src = subprocess.run(["git", "show", f"{rev}:pretrain.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    code = src[src.index("class Lane:"):src.index("    def state(self):")]
    import torch
    from model import UserError
    from tokenizer import iter_documents
    scope = dict(tokenizer=tokenizer, torch=torch, iter_documents=iter_documents, UserError=UserError,
                 device=torch.device("cpu"))
    exec(code, scope)
    return scope["Lane"]


def time_batches(make_lane, B, T, n):
    """(seconds to build the lane, seconds for n batches) of one lane."""
    t0 = time.perf_counter()
    lane = make_lane()
    t1 = time.perf_counter()
    for _ in range(n):
        lane.batch(B, T) if getattr(lane, "B", None) is None else lane.batch()  # (the old Lane takes B, T)
    return t1 - t0, time.perf_counter() - t1


def loader_bench(home, rev, B, T, batches):
    import pretrain
    from tokenizer import Tokenizer, corpus_files
    os.environ["FLATCHAT_HOME"] = str(home)
    tok, files = Tokenizer.load(home / "tokenizer"), corpus_files("train")
    per_batch = B * (T + 1)
    print(f"{os.cpu_count()} CPUs ({cpu_name()}); corpus {sum(f.stat().st_size for f in files) / 1e6:.1f} MB, "
          f"vocab {tok.vocab_size:,}; batches of {B} x {T + 1} tokens")
    rows = []
    for procs in (1, os.cpu_count()):  # cold: the first run tokenizes the corpus into shards
        shutil.rmtree(home / "data" / "tokens", ignore_errors=True)
        t0 = time.perf_counter()
        shards = pretrain.token_shards(files, tok, num_proc=procs)
        seconds, n_tokens = time.perf_counter() - t0, int(sum(len(t) for t, _ in shards))
        rows.append((f"shards, cold: the corpus tokenized on {procs} process(es)", seconds * procs, n_tokens,
                     f"{n_tokens:,} tokens in {seconds:.1f} s"))
    dropped = subprocess.run(["sh", "-c", "sync && echo 1 > /proc/sys/vm/drop_caches"], capture_output=True).returncode == 0
    build, first = time_batches(lambda: pretrain.Lane(shards, 0, 1, tok.bos_id, B, T), B, T, batches)
    rows.append((f"shards: {batches} batches" + (" (page cache dropped)" if dropped else ""), build + first, batches * per_batch, ""))
    build, warm = time_batches(lambda: pretrain.Lane(shards, 0, 1, tok.bos_id, B, T), B, T, batches)
    rows.append((f"shards, warm: {batches} batches", build + warm, batches * per_batch, ""))
    OldLane = old_lane_class(rev, Tokenizer.load(home / "tokenizer"))  # a fresh tokenizer: an empty chunk cache
    build, cold = time_batches(lambda: OldLane(files, 0, 1), B, T, batches)
    rows.append((f"{rev} loader, cold: {batches} batches", build + cold, batches * per_batch, "empty chunk cache"))
    build, warm = time_batches(lambda: OldLane(files, 0, 1), B, T, batches)
    rows.append((f"{rev} loader, warm: {batches} batches", build + warm, batches * per_batch, "its chunk cache warm"))
    print(f"{'what (tok/s per process)':<58}{'seconds':>9}{'tok/s':>14}")
    for name, seconds, tokens, note in rows:
        print(f"{name:<58}{seconds:>9.2f}{tokens / seconds:>14,.0f} {note}")
    print("what a model consumes per process: " + ", ".join(f"{k} ~{v:,.0f} tok/s" for k, v in CONSUMERS.items()))


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Loader throughput (CPU) and pretraining throughput (GPU).")
    parser.add_argument("--prepare", default="", help="build a FLATCHAT_HOME here (mirror corpus, vocab 32768) and stop")
    parser.add_argument("--home", default="", help="a FLATCHAT_HOME made by --prepare")
    parser.add_argument("--rev", default="3cfac9b", help="git revision of the previous loader to compare with")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch (B)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (T)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per loader")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare).resolve())
        sys.exit(0)
    home = Path(args.home).resolve()
    loader_bench(home, args.rev, args.batch, args.seq, args.batches)
