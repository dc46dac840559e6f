"""
Tokenizer benchmark (not a test: it prints numbers). Needs the data mirror and, for comparison only,
rustbpe, tokenizers and tiktoken (pip install rustbpe tokenizers tiktoken).

    python tests/bench_tokenizer.py                  # ~3 minutes on 2 cores
    python tests/bench_tokenizer.py --repeats 1      # quicker, noisier

Training: ours vs rustbpe (nanochat's Rust trainer) vs HF tokenizers (BPE, same split pattern) on the
mirror's offline-prose documents (~27 MB), with the same number of merges (ours also adds 9 specials).
Encoding: 10 MB of the same documents, one document per call, ours in one process vs tiktoken built
from our merges (one thread, encode_ordinary); the ids must be identical. Ours starts with an empty
chunk cache ("cold", every distinct chunk is merged once) or a full one ("warm", as in a long
pretraining run). Times are medians over the repeats; the machine is shared, expect 10-30% noise.
"""
import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from array import array
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
# data and timing

mirror = Path(os.environ.get("FLATCHAT_DATA_MIRROR") or ROOT.parent / "shared" / "data")
files = sorted((mirror / "pretrain" / "offline-prose").glob("*.jsonl"))
if not files:
    sys.exit(f"no offline-prose documents under {mirror} (set FLATCHAT_DATA_MIRROR)")
docs = [json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")]
nbytes = sum(len(d.encode("utf-8")) for d in docs)
print(f"{len(docs):,} documents, {nbytes / 1e6:.1f} MB, {os.cpu_count()} cpus; medians of {args.repeats} runs")


def timed(**runs):
    """{name: (median seconds, last result)} of runs {name: fn or (fn, setup)}, calling fn(setup()).
    The runs take turns, so that they meet the same load on this shared machine; setup is untimed."""
    times, out = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            fn, setup = run if isinstance(run, tuple) else (run, lambda: None)
            arg = setup()
            gc.collect()
            t0 = time.perf_counter()
            result = fn(arg)
            times[name].append(time.perf_counter() - t0)
            # lists of ids become one flat array: millions of ints in lists would slow every later
            # garbage collection in this process, for whichever run comes next
            out[name] = array("I", itertools.chain.from_iterable(result)) if isinstance(result, list) else result
            del result
    return {name: (statistics.median(times[name]), out[name]) for name in runs}

# -----------------------------------------------------------------------------
# training


def train_rustbpe(vocab_size):
    import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=T.SPLIT_PATTERN)
    return tok.vocab_size


def train_hf(vocab_size):
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(T.SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok.get_vocab_size()


rows, ours = [], {}
for vocab in args.vocab_sizes:
    merges = vocab - 256 - len(T.SPECIAL_TOKENS)  # the others get the same number of merges
    r = timed(ours=lambda _: T.Tokenizer.train(docs, vocab), rust=lambda _: train_rustbpe(256 + merges),
              hf=lambda _: train_hf(256 + merges))
    (t_ours, tok), (t_rust, _), (t_hf, _) = r["ours"], r["rust"], r["hf"]
    ours[vocab] = tok.merges
    rows.append((f"train {vocab} ({merges:,} merges)", t_ours, t_rust, t_hf))
    print(f"train {vocab}: ours {t_ours:.2f} s, rustbpe {t_rust:.2f} s, HF {t_hf:.2f} s", flush=True)

# -----------------------------------------------------------------------------
# encoding

import tiktoken  # noqa: E402

merges = ours[args.vocab_sizes[0]]
sample, n = [], 0
for d in docs:
    if n >= args.encode_mb * 1e6:
        break
    sample.append(d)
    n += len(d.encode("utf-8"))
del ours
tok = T.Tokenizer(merges)
ranks = {tok.decode_bytes([i]): i for i in range(256 + len(merges))}
enc = tiktoken.Encoding("flatchat", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
for d in sample:  # fills tok's chunk cache
    tok.encode(d)
stream = T.Tokenizer(merges)
for d in docs[len(sample):]:  # a cache filled by the rest of the corpus: a long pretraining stream
    stream.encode(d)
def fresh():  # a tokenizer with an empty chunk cache, its pair table built (like tiktoken's, untimed)
    t = T.Tokenizer(merges)
    t._ranks
    return t


r = timed(tik=lambda _: [enc.encode_ordinary(d) for d in sample],
          cold=(lambda t: [t.encode(d) for d in sample], fresh),
          warm=lambda _: [tok.encode(d) for d in sample],
          stream=lambda _: [stream.encode(d) for d in sample],
          batch=(lambda t: list(t.map("encode", sample, num_proc=2)), fresh))
(t_tik, tik_ids), (t_cold, ids), (t_warm, warm_ids), (t_batch, batch_ids) = r["tik"], r["cold"], r["warm"], r["batch"]
t_stream = r["stream"][0]
same = ids == tik_ids == warm_ids == batch_ids == r["stream"][1]
print(f"encode {n / 1e6:.1f} MB: {len(ids):,} tokens; ids identical to tiktoken: {same}")

# -----------------------------------------------------------------------------
# the table

print(f"\n{'train':38s} {'ours s':>8s} {'rustbpe s':>10s} {'HF s':>8s} {'ours/rust':>10s} {'ours/HF':>8s}")
for name, a, b, c in rows:
    print(f"{name:38s} {a:8.2f} {b:10.2f} {c:8.2f} {a / b:9.2f}x {a / c:7.2f}x")
mb = n / 1e6
print(f"\n{f'encode {mb:.1f} MB':42s} {'s':>4s} {'MB/s':>10s} {'speed vs tiktoken':>18s}")
for name, t in [("tiktoken (1 thread)", t_tik), ("ours (1 process, cold cache)", t_cold),
                ("ours (1 process, warm cache)", t_warm), ("ours (1 process, cache of the other docs)", t_stream),
                ("ours map(encode) (2 processes, cold)", t_batch)]:
    print(f"{name:42s} {t:4.2f} {mb / t:10.1f} {t_tik / t:17.2f}x")
print(f"ids identical to tiktoken on all {mb:.1f} MB: {same}")
if not same:
    sys.exit("MISMATCH between our ids and tiktoken's")
