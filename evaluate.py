"""
evaluate.py: what a checkpoint has learned, measured, and the report card that gathers it all.

- bits per byte on the held-out corpus (the base model's loss, independent of the vocabulary size);
- CORE: DCLM's 22 in-context tasks (multiple choice, schema, language modeling), centered on chance;
- chat tasks: ARC-Easy, ARC-Challenge and MMLU (the answer's letter), GSM8K (the number after '####',
  calculator on), HumanEval (the generated code run against the tests, in a sandbox); ChatCORE: their mean,
  centered on chance;
- tinychat: what a small chat model should do (who it is, one-step arithmetic with the calculator, a short
  story on a topic, spelling with a tool call, ending its turn), one plain rule per category.

    python evaluate.py --stage pretrain                                  # bpb + CORE of the base model
    python evaluate.py --stage pretrain --max-per-task 30                # quick (the cpu preset)
    python evaluate.py --stage sft --tasks arc,mmlu,gsm8k,humaneval      # chat metrics
    python evaluate.py --stage sft --tasks humaneval --samples 10        # pass@1 and pass@10
    python evaluate.py --stage sft --tasks tinychat --max-new-tokens 224 # the cpu preset's skills
    torchrun --standalone --nproc_per_node=8 evaluate.py --stage pretrain   # examples split over ranks
    python evaluate.py --report                                          # only rebuild report.md

Reads checkpoints/<stage>/ and data/eval/ under $FLATCHAT_HOME; writes report/metrics_<stage>.json,
report/system.md and report.md. Generated code (HumanEval) runs in `run_sandboxed`, below its caller.
"""

import contextlib
import csv
import functools
import itertools
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import (UserError, amp_ctx, compute_cleanup, compute_init, evaluate_loss, final_number_reward,
                   fit_threads, generate_batch, gsm8k_reward, load_model, print0)
from tokenizer import (Parser, base_dir, check_home, corpus_files, corpus_texts, exit_on_user_error, ranged,
                       render_mc)

# -----------------------------------------------------------------------------
# Helpers: every task needs only model(idx) -> logits; each rank takes a strided slice of the items

def all_mean(total, n):
    """The ranks' totals (each over its share of the items) summed, / n, the count of all the items."""
    if dist.is_initialized():
        t = torch.tensor([total], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        total = t.item()
    return total / max(n, 1)

@torch.no_grad()
def forward_rows(model, rows):
    """Logits (B, L, V) of rows of different lengths, right-padded (the padding is never read), and x."""
    device = model.get_device()
    x = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows], device=device)
    with amp_ctx(device):
        return model(x).float(), x

def load_jsonl(path):
    """The rows of a JSONL file in a fixed shuffled order, so that --max-per-task takes a fair sample."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except ValueError as e:
            raise UserError(f"{path}:{n}: not JSON ({e}): fix the line, or rebuild the file "
                            "(python data/chat_data.py)") from None
    random.Random(1337).shuffle(rows)
    return rows

# -----------------------------------------------------------------------------
# Bits per byte on the validation split: the loss, made independent of the vocab size

def val_rows(tokenizer, files, T, max_tokens):
    """doc, <|bos|>, doc, ... in rows of T+1 that start with <|bos|> (as pretrain packs): each token a target once."""
    bos, stream = tokenizer.bos_id, []
    for text in corpus_texts(files):
        if len(stream) >= max_tokens:
            break
        stream += tokenizer.encode(text) + [bos]
    stream = stream[:max_tokens]
    return [[bos] + stream[i:i + T] for i in range(0, len(stream) - T + 1, T)] or [[bos] + stream]

def bits_per_byte(model, rows, token_bytes, batch_size, rank=0, world=1):
    """evaluate_loss (model.py) sums the nats and bytes of non-special targets over ranks, / ln 2."""
    mine, device = rows[rank::world], model.get_device()
    batches = (torch.tensor(mine[i:i + batch_size], device=device) for i in range(0, len(mine), batch_size))
    return evaluate_loss(model, ((x[:, :-1], x[:, 1:].contiguous()) for x in batches), token_bytes)["bpb"]

# -----------------------------------------------------------------------------
# CORE (DCLM): 22 tasks of three kinds, scored as DCLM and nanochat score them

def load_core_tasks(core_dir):
    """core.yaml's flat `key: value` maps (JSON or bare strings), each + its baseline (%) from eval_meta_data.csv."""
    tasks = []
    for line in (core_dir / "core.yaml").read_text().splitlines():
        key, _, val = line.strip().partition(": ")
        if line.strip() == "-":
            tasks.append({})
        elif tasks and val:
            try:
                tasks[-1][key] = json.loads(val)
            except ValueError:
                tasks[-1][key] = val
    with open(core_dir / "eval_meta_data.csv") as f:
        base = {r["Eval Task"]: float(r["Random baseline"]) for r in csv.DictReader(f)}
    return [dict(t, baseline=base[t["label"]]) for t in tasks]

def render_prompts(kind, item, shots, delim):
    """The texts to score: the few-shot examples (solved, blank-line separated), then the item."""
    if kind == "multiple_choice":  # one context, one continuation per choice
        pre = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{pre}{item['query']}{delim}{c}" for c in item["choices"]]
    if kind == "schema":  # one context per option, the same continuation
        pre = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [f"{pre}{c}{delim}{item['continuation']}" for c in item["context_options"]]
    pre = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    prompt = f"{pre}{item['context'].strip()}{delim}"  # language_modeling: without, then with the answer
    return [prompt.strip(), prompt + item["continuation"]]

def continuation_spans(kind, seqs):
    """[start, end) of the scored tokens of each sequence: where the options differ."""
    if kind == "language_modeling":  # past the prompt
        return [(len(seqs[0]), len(seqs[1]))]
    n, at = 0, (lambda s, n: s[n]) if kind == "multiple_choice" else (lambda s, n: s[-n - 1])
    while all(len(s) > n + 1 and at(s, n) == at(seqs[0], n) for s in seqs):
        n += 1  # the common prefix (multiple choice) or suffix (schema)
    return [(n, len(s)) if kind == "multiple_choice" else (len(s) - n, len(s)) for s in seqs]

def score_item(model, tokenizer, kind, prompts, gold):
    """1 if gold's continuation has the lowest mean loss (MC, schema) or the greedy continuation is exactly the
    answer (LM). Prompts longer than the context lose their start."""
    seqs = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    spans, T = continuation_spans(kind, seqs), model.config.sequence_len
    seqs = seqs[1:] if kind == "language_modeling" else seqs
    cuts = [max(0, len(s) - T) for s in seqs]
    rows, spans = [s[c:] for s, c in zip(seqs, cuts)], [(max(a - c, 1), b - c) for (a, b), c in zip(spans, cuts)]
    logits, x = forward_rows(model, rows)
    if kind == "language_modeling":
        (a, b), = spans
        return int(logits[0, a - 1:b - 1].argmax(-1).tolist() == rows[0][a:b])
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (B, L-1)
    means = [losses[i, a - 1:b - 1].mean().item() for i, (a, b) in enumerate(spans)]
    return int(means.index(min(means)) == gold)

def centered(acc, baseline):
    """Accuracy above chance rescaled so 1 stays 1 (baseline in percent, as eval_meta_data.csv has it)."""
    return (acc - baseline / 100) / (1 - baseline / 100)

def run_core(model, tokenizer, core_dir, max_items, rank=0, world=1):
    """Per task {acc, centered, n} for every task whose data file exists, and CORE (their mean)."""
    results, tasks = {}, load_core_tasks(core_dir)
    for task in tasks:
        path, t0 = core_dir / "eval_data" / task["dataset_uri"], time.time()
        if not path.exists():
            print0(f"core | {task['label']:<32} | skipped: {path} is missing")
            continue
        data, kind, k = load_jsonl(path), task["icl_task_type"], task["num_fewshot"][0]
        n, correct = min(len(data), max_items), 0
        for idx in range(rank, n, world):
            picks = random.Random(1234 + idx).sample(range(len(data) - 1), min(k, len(data) - 1))  # as DCLM
            shots = [data[j + (j >= idx)] for j in picks]  # the other items
            prompts = render_prompts(kind, data[idx], shots, task.get("continuation_delimiter", " "))
            correct += score_item(model, tokenizer, kind, prompts, data[idx].get("gold", 0))
        acc = all_mean(correct, n)
        r = results[task["label"]] = dict(acc=acc, centered=centered(acc, task["baseline"]), n=n)
        print0(f"core | {task['label']:<32} | acc {acc:.4f} | centered {r['centered']:+.4f} | {n} items "
               f"| {time.time() - t0:.1f} s")
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return dict(core=core, core_tasks=results, core_k=len(results), core_total=len(tasks))

# -----------------------------------------------------------------------------
# Chat tasks: ARC-Easy, ARC-Challenge, MMLU (letters), GSM8K (calculator), HumanEval (sandbox)

def run_letters(model, tokenizer, items, batch_size, rank=0, world=1):
    """Accuracy of the argmax over the choices' letters only, at the answer position after the rendered prompt."""
    correct, mine, T = 0, items[rank::world], model.config.sequence_len
    letters = [tokenizer.encode(c)[0] for c in "ABCDEFGHIJ"]  # as the assistant writes them: one byte, one token
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        convs = [{"messages": [{"role": "user", "content": render_mc(it["question"], it["choices"])}]} for it in chunk]
        rows = [tokenizer.render_for_completion(c)[-T:] for c in convs]  # a long prompt loses its start
        logits, _ = forward_rows(model, rows)
        for j, (r, it) in enumerate(zip(rows, chunk)):
            correct += int(logits[j, len(r) - 1, letters[:len(it["choices"])]].argmax().item() == it["gold"])
    return all_mean(correct, len(items))

def generate_replies(model, tokenizer, conv, max_tokens, num_samples=1, temperature=0.0):
    """The assistant's replies (calculator on) as token ids, the stop token included."""
    fit_threads(model.get_device())  # on a CPU: one thread per core that other processes leave free
    T = model.config.sequence_len
    ids = tokenizer.render_for_completion(conv)[-max(T - max_tokens, T // 2):]  # room for the reply
    return generate_batch(model, ids, num_samples=num_samples, max_tokens=max_tokens, temperature=temperature,
                          tokenizer=tokenizer)[0]  # the ids, not their masks

def complete(model, tokenizer, conv, max_tokens, num_samples=1, temperature=0.0):
    """The assistant's replies, decoded without the special tokens."""
    seqs = generate_replies(model, tokenizer, conv, max_tokens, num_samples, temperature)
    return [tokenizer.decode([t for t in s if tokenizer.token_bytes[t] > 0]) for s in seqs]

def run_gsm8k(model, tokenizer, items, max_tokens, rank=0, world=1):
    """Accuracy of the number after '####' in the greedy reply, against the item's "answer" ("72")."""
    correct = sum(gsm8k_reward(complete(model, tokenizer, conv, max_tokens)[0], conv["answer"])
                  for conv in items[rank::world])  # the user's question; its reference solution is dropped
    return all_mean(correct, len(items))

def humaneval_program(task, completion):
    """The code of a ```python block if there is one (else the reply), under the prompt if a bare body; then
    the task's tests and check(entry_point)."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.S)
    code = m.group(1) if m else completion
    if f"def {task['entry_point']}(" in code:  # a whole function: keep the prompt's imports
        code = "\n".join(l for l in task["prompt"].splitlines() if l.startswith(("import ", "from "))) + "\n" + code
    else:
        code = task["prompt"] + code
    return f"{code}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)

def run_humaneval(model, tokenizer, tasks, max_tokens, samples, rank=0, world=1):
    """(pass@1, pass@samples): greedy with one sample, temperature 0.8 with more."""
    p1 = pk = 0.0
    for task in tasks[rank::world]:
        conv = {"messages": [{"role": "user", "content": task["prompt"]}]}
        replies = complete(model, tokenizer, conv, max_tokens, samples, 0.0 if samples == 1 else 0.8)
        c = sum(run_sandboxed(humaneval_program(task, r))[0] for r in replies)
        p1, pk = p1 + pass_at_k(samples, c, 1), pk + pass_at_k(samples, c, samples)
    return all_mean(p1, len(tasks)), all_mean(pk, len(tasks))

# -----------------------------------------------------------------------------
# The sandbox of run_humaneval: generated code runs in its own process, limited in layers (outside in):
# 1. user namespaces where they work (Linux, probed once): no network, every mount read-only but a tmpfs of file_mb
#    as the working dir, a pid namespace (<= ~300 pids on kernel >= 6.14) that dies with it, no capabilities.
# 2. rlimits (CPU, memory, file size, open files, processes: not enforced for real root), no core dumps; a new
#    session whose process group is SIGKILLed at the end.
# 3. an audit hook refusing process creation, ctypes, sockets, signals, setrlimit, writes outside the working dir
#    and reading /proc/<other pid>. Code can get around a hook, so it is never the only layer.
# Only PATH and LANG in the environment, output capped, a deadline. The code can still read what its user may read
# (`nobody` could not run a Python under /root/.pyenv): not a boundary for hostile code, never call it "secure".

_BOOT = r"""
import os, resource as R, sys
src, work = open(sys.argv[1]).read(), os.path.realpath(sys.argv[2])
cpu, mem, fsize, nproc, guard = map(int, sys.argv[3:8])
for lim, v in ((R.RLIMIT_CPU, cpu), (R.RLIMIT_AS, mem), (R.RLIMIT_FSIZE, fsize), (R.RLIMIT_NOFILE, 64),
               (R.RLIMIT_NPROC, nproc), (R.RLIMIT_CORE, 0)):
    hard = R.getrlimit(lim)[1]
    v = v if hard == R.RLIM_INFINITY else min(v, hard)
    R.setrlimit(lim, (v, v))
BLOCK = {"os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
         "ctypes.dlopen", "ctypes.dlsym", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
         "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit"}
MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty"}
PATHS = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod",
         "os.chown", "os.mkdir", "os.utime", "shutil.rmtree", "os.mkfifo", "os.mknod", "os.setxattr"}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(p):
    p = os.path.realpath(os.path.join(work, os.fsdecode(p)))
    return p == work or p.startswith(work + os.sep)
def hook(event, args):
    bad = event in BLOCK or (event == "import" and args[0].partition(".")[0] in MODULES)
    if event in PATHS:
        bad = bad or not all(inside(p) for p in args if isinstance(p, (str, bytes)))
    if event == "open" and isinstance(args[0], (str, bytes)):  # (path or fd, mode, flags)
        p = os.fsdecode(args[0])
        writing = (args[2] or 0) & WRITE or any(c in (args[1] or "") for c in "wax+")
        other_proc = p.startswith("/proc/") and not p.startswith("/proc/self/")  # e.g. the parent's environ
        bad = (writing and not inside(p) and p != "/dev/null") or other_proc
    if bad:
        raise PermissionError(f"sandbox: {event} {str(args)[:80]} is blocked")
code = compile(src, "program.py", "exec")
sys.argv = ["program.py"]
if guard:
    sys.addaudithook(hook)
exec(code, {"__name__": "__main__"})
"""

# run inside the new namespaces, as their root, before handing over to Python without capabilities
_NS_SH = r"""
mount -t tmpfs -o size="$2"m,mode=0700 none "$1" || exit 97
{ echo 301 > /proc/sys/kernel/pid_max; } 2>/dev/null
for m in $(awk '{print $5}' /proc/self/mountinfo); do
  [ "$m" = "$1" ] || mount -o remount,bind,ro "$m" 2>/dev/null
done
cd "$1" && shift 2 && exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- "$@"
"""

def _ns_prefix(work, disk_mb):
    return [shutil.which("unshare"), "-rmnpf", "--kill-child", "--mount-proc", "sh", "-c", _NS_SH, "sh",
            str(work), str(disk_mb)]

@functools.cache
def namespaces_available():
    """True where unprivileged user namespaces work (most Linux); else the sandbox has layers 2 and 3 only."""
    if not (sys.platform == "linux" and shutil.which("unshare") and shutil.which("setpriv")):
        return False
    with tempfile.TemporaryDirectory() as d:
        try:
            return subprocess.run(_ns_prefix(d, 1) + ["true"], capture_output=True, timeout=10, cwd=d).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

def _read_capped(proc, timeout, cap):
    """Read the merged stdout/stderr until EOF, the deadline or `cap` bytes; returns (bytes, problem)."""
    buf, deadline, fd = bytearray(), time.monotonic() + timeout, proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return bytes(buf), f"timed out after {timeout} s"
        chunk = os.read(fd, 1 << 16)
        while not chunk and time.monotonic() < deadline:  # EOF: wait for the exit, without reaping it
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):  # (the group id stays ours)
                return bytes(buf), ""
            time.sleep(0.002)
        buf += chunk
        if len(buf) > cap:
            return bytes(buf[:cap]), f"output over {cap} bytes, stopped"

def run_sandboxed(code, timeout=5.0, memory_mb=512, file_mb=16, max_output=1 << 16, max_procs=4, guard=True):
    """(ok, output) of Python `code` in the sandbox above: ok = exit status 0, in time, output under the cap.
    guard=False leaves out the audit hook (tests use it to check the other layers)."""
    with tempfile.TemporaryDirectory(prefix="flatchat_sandbox_") as d:
        prog, work = Path(d) / "program.py", Path(d) / "work"
        prog.write_text(code)
        work.mkdir()
        limits = [math.ceil(timeout) + 1, memory_mb << 20, file_mb << 20, max_procs, int(guard)]
        cmd = [sys.executable, "-I", "-c", _BOOT, str(prog), str(work), *map(str, limits)]
        if namespaces_available():
            cmd = _ns_prefix(work, file_mb) + cmd
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        with subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:  # leaving: reaped
            try:
                out, problem = _read_capped(proc, timeout, max_output)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group (its leader is not reaped yet)
    text = out.decode(errors="replace") + (f"\n[sandbox: {problem}]" if problem else "")
    return proc.returncode == 0 and not problem, text

# -----------------------------------------------------------------------------
# tinychat: what the cpu preset's small model should do. data/chat_data.py writes eval/tinychat.jsonl from
# templates, topics and words that no training set uses; each reply is scored by its category's plain rule

def score_identity(reply, answer, words):
    """A greeting or who-are-you: the reply names the assistant (answer: "flatchat")."""
    return int(answer in reply.lower())

def score_arithmetic(reply, answer, words):
    """The reply's last number is the result ("1,234" counts as 1234)."""
    return int(final_number_reward(reply, answer))

def score_story(reply, answer, words, min_words=20):
    """A story about the topic: at least min_words words, among them the topic (answer) or its plural, and at
    least 90% of them in the English word list `words`."""
    tokens = re.findall(r"[a-z]+", reply.lower())
    on_topic = bool({answer, answer + "s", answer + "es"} & set(tokens))
    english = sum(t in words for t in tokens) >= 0.9 * len(tokens)
    return int(len(tokens) >= min_words and on_topic and english)

def score_spelling(reply, answer, words):
    """The reply's last run of letters (with dashes between them) is the answer: c-a-t, or tac backwards."""
    runs = re.findall(r"[a-z]+(?:-[a-z]+)*", reply.lower())
    return int(bool(runs) and runs[-1] == answer)

SCORERS = {"identity": score_identity, "arithmetic": score_arithmetic, "story": score_story,
           "spelling": score_spelling}

def reply_text(tokenizer, seq):
    """A reply's text, its pieces between special tokens on lines of their own (a tool call, its output):
    'Let me calculate.\\n7*8\\n56\\nThe answer is 56.'"""
    runs = itertools.groupby(seq, key=lambda t: tokenizer.token_bytes[t] > 0)
    return "\n".join(tokenizer.decode(list(ids)) for is_text, ids in runs if is_text)

def run_tinychat(model, tokenizer, items, words, max_tokens, rank=0, world=1):
    """{tinychat_<category>: the fraction of its items passed (greedy, each category split over the ranks),
    tinychat_ended: the share of replies that emit <|assistant_end|> in max_tokens, tinychat: their mean}."""
    end, out, ended = tokenizer.encode_special("<|assistant_end|>"), {}, 0
    for category, score in SCORERS.items():
        mine = [it for it in items if it["category"] == category]
        if not mine:
            continue
        passed = 0
        for item in mine[rank::world]:
            seq = generate_replies(model, tokenizer, item, max_tokens)[0]
            passed += score(reply_text(tokenizer, seq), item["answer"], words)
            ended += int(seq[-1:] == [end])
        out[f"tinychat_{category}"] = all_mean(passed, len(mine))
    out["tinychat_ended"] = all_mean(ended, len(items))
    out["tinychat"] = sum(out.values()) / len(out)
    return out

# -----------------------------------------------------------------------------
# The report card: report/metrics_<stage>.json (one per stage), report/system.md and logs/ join into report.md

STAGES = {"pretrain": "BASE", "midtrain": "MID", "sft": "SFT", "rl": "RL"}
ROWS = {"bpb": "bpb", "core": "CORE", "arc_easy": "ARC-E", "arc_challenge": "ARC-C", "mmlu": "MMLU",
        "gsm8k": "GSM8K", "humaneval": "HumanEval", "chatcore": "ChatCORE", "tinychat": "tinychat"}
CHAT_BASELINES = {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}
ROOT = Path(__file__).resolve().parent

def chatcore(metrics):
    """(mean of the centered chat accuracies measured, how many of the 5)."""
    got = [(metrics[k] - b) / (1 - b) for k, b in CHAT_BASELINES.items() if k in metrics]
    return (sum(got) / len(got) if got else None), len(got)

def system_section(tokenizer):
    """The machine, the software, the commit, the sandbox's layers, the tokenizer."""
    def git(*args):  # "" where there is no git (a bare GPU machine) or no repository
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    commit, dirty = git("log", "-1", "--format=%h %cd", "--date=short"), git("status", "--porcelain")
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return "\n".join([
        "## System", "", f"- hardware: {os.cpu_count()} CPUs ({platform.machine()}), {ram:.0f} GiB RAM, GPUs: {gpus}",
        f"- software: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        f"- git commit: {commit or 'none yet'}{' (+ uncommitted changes)' if dirty else ''}",
        f"- sandbox: {'user/mount/net/pid namespaces + ' if namespaces_available() else ''}rlimits + audit hook",
        f"- tokenizer: vocab size {tokenizer.vocab_size:,} (hash {tokenizer.hash[:12]})"])

def loss_svg(rows, width=560, height=220, pad=44):
    """A stage's curves against the step: train loss (line, left axis) and the validation metric (dots, right
    axis: val bpb for pretraining, val loss after)."""
    key = "val_bpb" if any("val_bpb" in r for r in rows) else "val_loss"
    train = [(r["step"], r["loss"]) for r in rows
             if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]  # not a NaN step
    val = [(r["step"], r[key]) for r in rows if key in r]
    steps = [s for s, _ in train + val]
    x = lambda s: pad + (s - min(steps)) / max(max(steps) - min(steps), 1) * (width - 2 * pad)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
           f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">step {min(steps)} .. {max(steps)}</text>']
    for points, color, side, name in ((train, "#1f77b4", pad, "train loss"), (val, "#ff7f0e", width - pad, key)):
        if not points:
            continue
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        y = lambda v: height - pad - (v - lo) / max(hi - lo, 1e-9) * (height - 2 * pad)
        dx, anchor = (-4, "end") if side == pad else (4, "start")
        out.append(f'<text x="{side}" y="{pad - 14}" text-anchor="middle" fill="{color}">{name}</text>')
        out += [f'<text x="{side + dx}" y="{y(v) + 4}" text-anchor="{anchor}" fill="{color}">{v:.3f}</text>'
                for v in (hi, lo)]
        if points is train:
            xy = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{xy}"/>')
        else:
            out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>' for s, v in points]
    return "\n".join(out + ["</svg>"]) + "\n"

def training_section(home):
    """(markdown, seconds): steps, wall time, final loss and validation of each stage from logs/<stage>.jsonl,
    and its loss curve written as report/loss_<stage>.svg."""
    lines, plots, total = ["## Training", "", "| stage | steps | wall time | final loss | final validation |",
                           "|---|---|---|---|---|"], [], 0.0
    for stage in STAGES:
        path = home / "logs" / f"{stage}.jsonl"
        rows = [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")] if path.exists() else []
        times = [r["time"] for r in rows if "time" in r]
        if not times:
            continue
        total += max(times) - min(times)
        train = [r for r in rows if "loss" in r]
        step, loss = (train[-1]["step"], f"{train[-1]['loss']:.4f}") if train else ("-", "-")
        val = [f"{r[k]:.4f} {k[4:]}" for r in rows for k in ("val_bpb", "val_loss") if k in r] or ["-"]
        lines.append(f"| {stage} | {step} | {(max(times) - min(times)) / 60:.1f} min | {loss} | {val[-1]} |")
        if train:
            (home / "report" / f"loss_{stage}.svg").write_text(loss_svg(rows))
            plots.append(f"![{stage} loss](report/loss_{stage}.svg)")
    return "\n".join(lines + ([""] + plots if plots else [])), total

def score_cell(m, key):
    """A score, marked '(chance)' when within 2 standard errors of guessing on its number of items."""
    value, chance, n = m.get(key), m.get(f"{key}_chance", CHAT_BASELINES.get(key)), m.get(f"{key}_items")
    if value is None:
        return "-"
    near = chance and n and abs(value - chance) <= 2 * math.sqrt(chance * (1 - chance) / n)
    return f"{value:.4f}" + (" (chance)" if near else "")

def metrics_section(ms):
    """The table of metrics per stage (ms: stage -> its metrics), then what each stage measured besides."""
    lines = ["## Metrics", "", f"| metric | chance | {' | '.join(STAGES.values())} |",
             "|---|---|" + "---|" * len(STAGES)]
    for key, name in ROWS.items():
        chance = next((m[f"{key}_chance"] for m in ms.values() if f"{key}_chance" in m), CHAT_BASELINES.get(key))
        chance = f"{chance:.4f}" if chance else "-" if chance is None else "0"
        chance = "0 (centered)" if key in ("core", "chatcore") else chance
        lines.append(f"| {name} | {chance} | " + " | ".join(score_cell(ms.get(s, {}), key) for s in STAGES) + " |")
    lines += ["", "A score marked (chance) is within 2 standard errors of guessing, for the number of items "
              "evaluated: it shows nothing learned yet."]
    for s, m in ms.items():
        lines += ["", f"## {STAGES[s]} ({s}, step {m['step']})", ""]
        lines += [f"- CORE over {m['core_k']} of {m['core_total']} tasks"] if "core_k" in m else []
        lines += [f"- ChatCORE over {m['chatcore_k']} of 5 tasks"] if m.get("chatcore_k") else []
        lines += [f"- {k}: {v:.4f}" for k, v in m.items() if k.startswith("humaneval_pass@")]
        tiny = [f"{k[9:]} {v:.4f}" for k, v in m.items() if k.startswith("tinychat_") and k[9:] != "items"]
        lines += [f"- tinychat over {m['tinychat_items']} prompts: {', '.join(tiny)}"] if tiny else []
        if m.get("core_tasks"):
            lines += ["", "| CORE task | accuracy | centered | items |", "|---|---|---|---|"]
            lines += [f"| {t} | {r['acc']:.4f} | {r['centered']:+.4f} | {r['n']} |" for t, r in m["core_tasks"].items()]
    return "\n".join(lines)

def write_report(home):
    """report.md from report/system.md, logs/ and report/metrics_<stage>.json; returns its path."""
    d = home / "report"
    d.mkdir(parents=True, exist_ok=True)
    ms = {s: json.loads(p.read_text()) for s in STAGES if (p := d / f"metrics_{s}.json").exists()}
    (training, train_s), eval_s = training_section(home), sum(m.get("eval_seconds", 0) for m in ms.values())
    parts = ["# flatchat report card", f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    parts += [(d / "system.md").read_text().strip()] if (d / "system.md").exists() else []
    parts += [training, metrics_section(ms), f"## Totals\n\n- wall clock: {(train_s + eval_s) / 3600:.2f} h (training "
              f"{train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min)"]
    (home / "report.md").write_text("\n\n".join(parts) + "\n")
    return home / "report.md"

# -----------------------------------------------------------------------------
# Arguments

if __name__ == "__main__":
    parser = Parser(description="Evaluate a checkpoint and update the report card.")
    parser.add_argument("--stage", choices=list(STAGES), help="the checkpoint to evaluate")
    parser.add_argument("--step", type=ranged(int, 0), help="its step (default: the latest)")
    parser.add_argument("--tasks", default="", help="comma list of bpb,core,arc,mmlu,gsm8k,humaneval,"
                        "tinychat (default: bpb,core for pretrain, the chat tasks for the later stages)")
    parser.add_argument("--max-per-task", type=ranged(int, 1, sentinel=-1), default=-1,
                        help="items per task, per category for tinychat (-1 = all)")
    parser.add_argument("--samples", type=ranged(int, 1), default=1,
                        help="HumanEval samples per problem for pass@1 and pass@K (1 = greedy, more = temperature 0.8)")
    parser.add_argument("--bpb-tokens", type=ranged(int, 1), default=2**20, help="validation tokens for bits per byte")
    parser.add_argument("--batch-size", type=ranged(int, 1), default=8, help="rows per forward pass (bpb, letters)")
    parser.add_argument("--max-new-tokens", type=ranged(int, 1), default=256,
                        help="tokens generated per GSM8K/HumanEval/tinychat reply")
    parser.add_argument("--report", action="store_true", help="only rebuild report.md from report/ and logs/")
    args = parser.parse_args()
    exit_on_user_error()  # a UserError: one line, exit 2
    check_home()
    home = base_dir()
    if args.report:
        print(f"wrote {write_report(home)}")
        sys.exit(0)
    if not args.stage:
        parser.error("--stage is required (or --report to only rebuild the card)")
    default = "bpb,core" if args.stage == "pretrain" else "arc,mmlu,gsm8k,humaneval,tinychat"
    tasks = [t.strip() for t in (args.tasks or default).split(",")]
    if set(tasks) - {"bpb", "core", "arc", "mmlu", "gsm8k", "humaneval", "tinychat"}:
        parser.error(f"--tasks {args.tasks}: choose from bpb,core,arc,mmlu,gsm8k,humaneval,tinychat")
    max_items = args.max_per_task if args.max_per_task > 0 else sys.maxsize

    # -------------------------------------------------------------------------
    # Init, the checkpoint
    _, rank, _, world, device = compute_init()
    model, tokenizer, meta, _ = load_model(args.stage, device, step=args.step)
    print0(f"evaluating {args.stage} step {meta['step']} on {world} process(es): {','.join(tasks)}")
    t0, m, ev = time.time(), {}, home / "data" / "eval"

    # -------------------------------------------------------------------------
    # Base metrics
    if "bpb" in tasks:
        rows = val_rows(tokenizer, corpus_files("val"), model.config.sequence_len, args.bpb_tokens)
        m["bpb"] = bits_per_byte(model, rows, tokenizer.token_bytes, args.batch_size, rank, world)
        print0(f"bpb | {m['bpb']:.4f} over {len(rows) * model.config.sequence_len:,} tokens")
    if "core" in tasks:
        if not (ev / "core" / "core.yaml").exists():
            raise UserError(f"no CORE bundle at {ev / 'core'}: create it with `python data/chat_data.py --only core`")
        m.update(run_core(model, tokenizer, ev / "core", max_items, rank, world))
        print0(f"CORE {m['core']:.4f} over {m['core_k']} of {m['core_total']} tasks")

    # -------------------------------------------------------------------------
    # Chat metrics; a task whose file is missing is skipped with a line saying so
    for key in ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"):
        task, path = key.split("_")[0], ev / f"{key}{'' if key == 'humaneval' else '_test'}.jsonl"
        if task not in tasks:
            continue
        if not path.exists():
            print0(f"{key} | skipped: {path} is missing (`python data/chat_data.py --only {task}`)")
            continue
        items = load_jsonl(path)[:max_items]
        if key == "gsm8k":
            m[key] = run_gsm8k(model, tokenizer, items, args.max_new_tokens, rank, world)
        elif key == "humaneval":
            m[key], pk = run_humaneval(model, tokenizer, items, args.max_new_tokens, args.samples, rank, world)
            m.update({f"humaneval_pass@{args.samples}": pk} if args.samples > 1 else {})
        else:
            m[key] = run_letters(model, tokenizer, items, args.batch_size, rank, world)
            m[f"{key}_chance"] = sum(1 / len(it["choices"]) for it in items) / max(len(items), 1)
        m[f"{key}_items"] = len(items)
        print0(f"{key} | {'pass@1' if key == 'humaneval' else 'acc'} {m[key]:.4f} over {len(items)} items")

    # tinychat: --max-per-task prompts per category; the story rule reads the word list chat_data.py copied
    words_file = home / "data" / "raw" / "words" / "words_alpha.txt"
    if "tinychat" in tasks and not ((ev / "tinychat.jsonl").exists() and words_file.exists()):
        print0(f"tinychat | skipped: {ev / 'tinychat.jsonl'} or {words_file} is missing "
               "(`python data/chat_data.py --only tinychat`)")
    elif "tinychat" in tasks:
        rows, items = load_jsonl(ev / "tinychat.jsonl"), []
        for category in SCORERS:
            items += [r for r in rows if r["category"] == category][:max_items]
        words = set(words_file.read_text(encoding="utf-8").split())
        scores = run_tinychat(model, tokenizer, items, words, args.max_new_tokens, rank, world)
        m.update(scores, tinychat_items=len(items))
        shown = " | ".join(f"{k.removeprefix('tinychat_')} {v:.4f}" for k, v in scores.items())
        print0(f"tinychat | {shown} | {len(items)} items")

    # -------------------------------------------------------------------------
    # This stage's metrics (merged with earlier evaluations of the same checkpoint) and the report card; the
    # metrics of another checkpoint, and the card that showed them, go to report/previous/ first
    if rank == 0:
        d = home / "report"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"metrics_{args.stage}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        if old and (old.get("step"), old.get("saved_at")) != (meta["step"], meta.get("saved_at")):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            (d / "previous").mkdir(exist_ok=True)
            shutil.copy2(path, d / "previous" / f"metrics_{args.stage}-{stamp}.json")
            if (home / "report.md").exists():
                shutil.copy2(home / "report.md", d / "previous" / f"report-{stamp}.md")
            old = {}
        m = {**old, **m, "step": meta["step"], "saved_at": meta.get("saved_at"),
             "eval_seconds": old.get("eval_seconds", 0) + time.time() - t0}
        m["chatcore"], m["chatcore_k"] = chatcore(m)
        path.write_text(json.dumps(m, indent=1))
        (d / "system.md").write_text(system_section(tokenizer))
        print0(f"wrote {write_report(home)} ({time.time() - t0:.0f} s)")
    compute_cleanup()
