"""
Chat benchmark (not a test: it prints numbers): first-token latency and decoding speed of chat.py's
backend on the newest checkpoint of a run, the same code path the TUI and `chat.py -p` use.

    FLATCHAT_HOME=~/.cache/flatchat python tests/bench_chat.py          # after `bash run.sh`
    python tests/bench_chat.py --stage sft --replies 10 --max-tokens 128

Each reply is timed from the call (prompt rendering and prefill included) to its first token, then
tokens/s over the rest. Medians over the replies; the machine is shared, expect 10-30% noise.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chat  # noqa: E402

parser = argparse.ArgumentParser(description="First-token latency and tokens/s of chat.py's backend.")
parser.add_argument("--stage", default=None, help="checkpoint stage (default: the newest)")
parser.add_argument("--replies", type=int, default=6, help="timed replies (prompts cycle)")
parser.add_argument("--max-tokens", type=int, default=96, help="most tokens per reply")
parser.add_argument("--device", default="cpu", help="cpu | cuda | mps")
args = parser.parse_args()

stage, model, tok, meta = chat.load(args.stage, None, args.device)
prompts = ["Why is the sky blue?", "What is 12 times 34?", "Tell me a short story about a cat.",
           "Who are you?", "How many 'r' are in 'strawberry'?", "Name three colors."]
first, speed, lengths = [], [], []
for i in range(args.replies + 1):  # the first reply warms up the allocator and is not counted
    messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
    t0, t_first, n = time.perf_counter(), None, 0
    for _, reply in chat.stream_reply(model, tok, messages, stage != "pretrain", args.max_tokens, seed=i):
        n = reply.n
        t_first = t_first or (time.perf_counter() if n else None)
    t_end = time.perf_counter()
    if i and t_first:
        first.append(t_first - t0)
        lengths.append(n)
        speed.append((n - 1) / (t_end - t_first) if n > 1 else float("nan"))
print(f"{stage} step {meta['step']}: {model.num_params():,} parameters, context {model.config.sequence_len}, "
      f"{os.cpu_count()} cpus, torch threads {__import__('torch').get_num_threads()}")
print(f"first token: median {statistics.median(first) * 1000:.0f} ms (min {min(first) * 1000:.0f}, "
      f"max {max(first) * 1000:.0f}) over {len(first)} replies")
print(f"decoding: median {statistics.median(speed):.1f} tok/s, replies of median {statistics.median(lengths):.0f} tokens")
