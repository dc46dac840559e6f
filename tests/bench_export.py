"""
Export benchmark (not a test: it prints numbers): greedy decoding speed of the ONNX export under onnxruntime
on the CPU, beside chat.py's PyTorch generate() on the same checkpoint and the same prompt.

    FLATCHAT_HOME=~/.cache/flatchat python tests/bench_export.py               # after `bash run.sh`
    python tests/bench_export.py --stage sft --tokens 200 --repeats 3 --out onnx

It exports the checkpoint (`chat.py --export`'s code) into --out (default: a temp dir), then decodes --tokens
tokens greedily with each, taking turns --repeats times: first-token latency (prefill) and tokens/s after it,
medians. No stop token ends a run: both decode exactly as many tokens. Then, untimed, both read the same
tokens and the largest logits difference over all steps is printed. Needs onnx, onnxscript and onnxruntime.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chat  # noqa: E402
import model as M  # noqa: E402

parser = argparse.ArgumentParser(description="Decoding tokens/s of the ONNX export (onnxruntime) vs PyTorch.")
parser.add_argument("--stage", default=None, help="checkpoint stage (default: the newest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the stage's latest)")
parser.add_argument("--tokens", type=int, default=200, help="greedy tokens per run (the context caps it)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, taking turns (+1 warm-up)")
parser.add_argument("--prompt", default="Tell me a short story about a cat.", help="the user message")
parser.add_argument("--out", default=None, help="export here (default: a temp dir, deleted after)")
args = parser.parse_args()

import onnxruntime as ort  # noqa: E402  (after --help)

stage, model, tok, meta = chat.load(args.stage, args.step, "cpu")
c = model.config
question = [{"role": "user", "content": args.prompt}]
ids, _ = chat.build_prompt(tok, question, c.sequence_len, 0, chat=stage != "pretrain")
n = min(args.tokens, c.sequence_len - len(ids))
folder = Path(args.out or tempfile.mkdtemp(prefix="flatchat_export_"))
t0 = time.perf_counter()
chat.export(model, tok, meta, folder)
export_s = time.perf_counter() - t0
size_mb = sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 1e6
options = ort.SessionOptions()
options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch
session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
empty = np.zeros((c.n_layer, 1, c.n_kv_head, 0, c.n_embd // c.n_head), np.float32)


def torch_tokens():  # yields each greedy token as chat.py's generate() makes it
    for tokens, _ in M.generate(model, ids, max_tokens=n, temperature=0):
        yield tokens[0]


def onnx_step(new, keys, values):  # new ids -> logits (1, T, V), keys and values grown by T
    feed = {"input_ids": np.array([new], np.int64), "past_keys": keys, "past_values": values}
    return session.run(None, feed)


def onnx_tokens():  # the same with onnxruntime, the KV cache going out and back in
    new, keys, values = ids, empty, empty
    for _ in range(n):
        logits, keys, values = onnx_step(new, keys, values)
        token = int(logits[0, -1].argmax())
        yield token
        new = [token]


runs = {"pytorch": torch_tokens, "onnxruntime": onnx_tokens}
first, speed, made = {r: [] for r in runs}, {r: [] for r in runs}, {}
for i in range(args.repeats + 1):  # the first round warms up (allocator, kernels) and is not counted
    for name, tokens in runs.items():
        t0, t_first, out = time.perf_counter(), None, []
        for t in tokens():
            out.append(t)
            t_first = t_first or time.perf_counter()
        t_end = time.perf_counter()
        made[name] = out
        if i:
            first[name].append(t_first - t0)
            speed[name].append((len(out) - 1) / (t_end - t_first))

# untimed: both read the tokens onnxruntime chose, step by step; the largest logits difference of all steps
cache, keys, values, new, diff = M.KVCache(c.n_layer, len(ids) + n), empty, empty, ids, 0.0
with torch.no_grad():
    for token in made["onnxruntime"]:
        logits, keys, values = onnx_step(new, keys, values)
        want = model(torch.tensor([new]), kv_cache=cache).numpy()
        diff = max(diff, float(np.abs(logits - want).max()))
        new = [token]

cpu = platform.processor() or platform.machine()
if os.path.exists("/proc/cpuinfo"):
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else cpu
print(f"{stage} step {meta['step']}: {model.num_params():,} parameters, context {c.sequence_len}, "
      f"prompt {len(ids)} tokens, {n} greedy tokens; {cpu}, {os.cpu_count()} cpus, "
      f"{torch.get_num_threads()} threads")
print(f"torch {torch.__version__}, onnxruntime {ort.__version__}; "
      f"export {size_mb:.1f} MB in {export_s:.1f} s ({folder})")
print(f"max abs logits difference {diff:.2e}; same tokens: {made['pytorch'] == made['onnxruntime']}")
for name in runs:
    print(f"{name:>12}: first token {statistics.median(first[name]) * 1000:6.1f} ms, decoding "
          f"{statistics.median(speed[name]):7.1f} tok/s (median of {args.repeats}; "
          f"{min(speed[name]):.1f}-{max(speed[name]):.1f})")
ratio = statistics.median(speed["onnxruntime"]) / statistics.median(speed["pytorch"])
print(f"onnxruntime / pytorch decoding: {ratio:.2f}x")
if args.out is None:
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
