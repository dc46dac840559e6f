"""
Tokenizer benchmark (not a test: prints numbers). Needs the data mirror and, for comparison only,
rustbpe, tokenizers and tiktoken (pip install rustbpe tokenizers tiktoken).

    python tests/bench_tokenizer.py                  # ~2 minutes on 2 cores
    python tests/bench_tokenizer.py --repeats 1      # quicker, noisier

Training: ours vs rustbpe (nanochat's Rust trainer) vs HF tokenizers (BPE, same split pattern) on the
mirror's offline-prose documents (~27 MB), with the same number of merges. Encoding: ours in one process
(cold chunk cache) vs tiktoken built from our merges (one thread, encode_ordinary), on 10 MB of the same
documents, checking the ids are identical. Times are medians over the repeats; the machine is shared, so
expect noise of 10-20%.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer as T  # noqa: E402

parser = argparse.ArgumentParser(description="Benchmark tokenizer.py against rustbpe, HF tokenizers and tiktoken.")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is shown)")
parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 8192], help="vocab sizes to train")
parser.add_argument("--encode-mb", type=float, default=10, help="MB of documents to encode")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# data

mirror = Path(os.environ.get("FLATCHAT_DATA_MIRROR") or ROOT.parent / "shared" / "data")
files = sorted((mirror / "pretrain" / "offline-prose").glob("*.jsonl"))
if not files:
    sys.exit(f"no offline-prose documents under {mirror} (set FLATCHAT_DATA_MIRROR)")
docs = [json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")]
nbytes = sum(len(d.encode("utf-8")) for d in docs)
print(f"{len(docs):,} documents, {nbytes / 1e6:.1f} MB, {os.cpu_count()} cpus; medians of {args.repeats} runs")


def timed(fn):
    """(median seconds, last result) of repeats runs of fn()."""
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out

# -----------------------------------------------------------------------------
# training


def train_rustbpe(vocab_size):
    import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=T.SPLIT_PATTERN)
    return tok


def train_hf(vocab_size):
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(T.SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


rows, ours = [], {}
for vocab in args.vocab_sizes:
    merges = vocab - 256 - len(T.SPECIAL_TOKENS)  # the others get the same number of merges (no specials)
    t_ours, ours[vocab] = timed(lambda: T.Tokenizer.train(docs, vocab))
    t_rust, _ = timed(lambda: train_rustbpe(256 + merges))
    t_hf, _ = timed(lambda: train_hf(256 + merges))
    rows.append((f"train {vocab} ({merges:,} merges)", t_ours, t_rust, t_hf))
    print(f"train {vocab}: ours {t_ours:.2f} s, rustbpe {t_rust:.2f} s, HF {t_hf:.2f} s", flush=True)

# -----------------------------------------------------------------------------
# encoding

import tiktoken  # noqa: E402

tok = ours[args.vocab_sizes[0]]
sample, n = [], 0
for d in docs:
    if n >= args.encode_mb * 1e6:
        break
    sample.append(d)
    n += len(d.encode("utf-8"))
ranks = {tok.decode_bytes([i]): i for i in range(256 + len(tok.merges))}
enc = tiktoken.Encoding("flatchat", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
fresh = [T.Tokenizer(tok.merges) for _ in range(2 * args.repeats)]  # a cold chunk cache for each run


def encode_cold():
    t = fresh.pop()
    return [t.encode(d) for d in sample]


t_enc, ids = timed(encode_cold)
t_tik, tik_ids = timed(lambda: [enc.encode_ordinary(d) for d in sample])
t_warm, _ = timed(lambda: [tok.encode(d) for d in sample])
t_batch, batch_ids = timed(lambda: fresh.pop().encode_batch(sample, num_proc=2))
same = ids == tik_ids == batch_ids
print(f"encode {n / 1e6:.1f} MB: {sum(map(len, ids)):,} tokens; ids identical to tiktoken: {same}")

# -----------------------------------------------------------------------------
# the table

print(f"\n{'task':34s} {'ours s':>8s} {'rustbpe s':>10s} {'HF s':>8s} {'ours/rust':>10s} {'ours/HF':>8s}")
for name, a, b, c in rows:
    print(f"{name:34s} {a:8.2f} {b:10.2f} {c:8.2f} {a / b:9.2f}x {a / c:7.2f}x")
mb = n / 1e6
print(f"\n{'encode ' + f'{mb:.1f} MB':34s} {'s':>8s} {'MB/s':>10s} {'vs tiktoken':>12s}")
for name, t in [("tiktoken (1 thread)", t_tik), ("ours (1 process, cold cache)", t_enc),
                ("ours (1 process, warm cache)", t_warm), ("ours encode_batch (2 processes)", t_batch)]:
    print(f"{name:34s} {t:8.2f} {mb / t:10.1f} {t_tik / t:11.2f}x")
print(f"ids identical to tiktoken on all {n / 1e6:.1f} MB: {same}")
if not same:
    sys.exit("MISMATCH between our ids and tiktoken's")
