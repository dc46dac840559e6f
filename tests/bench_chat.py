"""
Chat benchmark (not a test: it prints numbers): first-token latency and decoding speed of chat.py's
backend on the newest checkpoint of a run, the same code path the TUI and `chat.py -p` use.

    FLATCHAT_HOME=~/.cache/flatchat python tests/bench_chat.py          # after `bash run.sh`
    python tests/bench_chat.py --stage sft --replies 10 --max-tokens 128

Each reply is timed from the call (prompt rendering and prefill included) to its first token, then
tokens/s over the rest. Medians over the replies; the machine is shared, expect 10-30% noise.
--api also times the same replies through `chat.py --serve`'s OpenAI-compatible API (a streamed
POST /v1/chat/completions over a real socket, seed and sampling the same), the two taking turns.
"""
import argparse
import http.client
import json
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
parser.add_argument("--api", action="store_true", help="also through the HTTP API, taking turns with the TUI's path")
args = parser.parse_args()

stage, model, tok, meta = chat.load(args.stage, None, args.device)
prompts = ["Why is the sky blue?", "What is 12 times 34?", "Tell me a short story about a cat.",
           "Who are you?", "How many 'r' are in 'strawberry'?", "Name three colors."]


def tui_tokens(messages, seed):  # yields once per token, as the TUI's worker sees them
    for _, reply in chat.stream_reply(model, tok, messages, stage != "pretrain", args.max_tokens, seed=seed):
        yield reply.n


def api_tokens(messages, seed):  # yields once per streamed chunk that carries text (a token, or a few held back)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port)
    body = dict(messages=messages, max_tokens=args.max_tokens, temperature=0.6, top_k=50, seed=seed, stream=True)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    n = 0
    for line in conn.getresponse():
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"]["content"]:
            n += 1
            yield n
    conn.close()


paths = {"tui": tui_tokens}
if args.api:
    import threading
    server = chat.make_server(stage, model, tok, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    paths["api"] = api_tokens
    chat.API.log_message = lambda *a: None
first, speed = {p: [] for p in paths}, {p: [] for p in paths}
for i in range(args.replies + 1):  # the first reply warms up the allocator and is not counted
    for path, tokens in paths.items():
        messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
        t0, t_first, n = time.perf_counter(), None, 0
        for n in tokens(messages, i):
            t_first = t_first or (time.perf_counter() if n else None)
        t_end = time.perf_counter()
        if i and t_first:
            first[path].append(t_first - t0)
            speed[path].append((n - 1) / (t_end - t_first) if n > 1 else float("nan"))
print(f"{stage} step {meta['step']}: {model.num_params():,} parameters, context {model.config.sequence_len}, "
      f"{os.cpu_count()} cpus, torch threads {__import__('torch').get_num_threads()}, temperature 0.6, top-k 50")
for path in paths:
    print(f"{path}: first token median {statistics.median(first[path]) * 1000:.0f} ms (min {min(first[path]) * 1000:.0f}, "
          f"max {max(first[path]) * 1000:.0f}) over {len(first[path])} replies; decoding median "
          f"{statistics.median(speed[path]):.1f} tok/s ({'chunks' if path == 'api' else 'tokens'})")
