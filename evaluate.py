"""
evaluate.py: measure a checkpoint (bits per byte, CORE, chat tasks) and write the report card.

    python evaluate.py --stage pretrain                                  # bpb + CORE of the base model
    python evaluate.py --stage pretrain --max-per-task 50                # quick (the cpu preset)
    python evaluate.py --stage sft --tasks arc,mmlu,gsm8k,humaneval      # chat metrics
    python evaluate.py --stage sft --tasks humaneval --samples 10        # pass@1 and pass@10
    torchrun --standalone --nproc_per_node=8 evaluate.py --stage pretrain   # examples split over ranks
    python evaluate.py --report                                          # only rebuild report.md

Reads checkpoints/<stage>/ and data/eval/ under $FLATCHAT_HOME; writes report/metrics_<stage>.json,
report/<stage>.md and report.md. Generated code (HumanEval) runs in `run_sandboxed` below.
"""

import argparse
import csv
import functools
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

from model import (amp_ctx, compute_cleanup, compute_init, evaluate_loss, generate_batch, load_model,
                   load_tokenizer, print0)
from tokenizer import base_dir, iter_documents, render_mc

# -----------------------------------------------------------------------------
# The sandbox: generated code runs in a separate, limited process. Layers, from outside in:
# 1. where user namespaces work (Linux): new user, mount, network and pid namespaces (`unshare`): no
#    network interfaces; every mount read-only except a fresh size-capped tmpfs as the working dir;
#    a pid namespace capped at ~300 pids whose processes all die with it; all capabilities dropped;
# 2. rlimits: CPU seconds, address space, file size, open files, processes (not enforced for real root,
#    hence 1 and 3), no core dumps; a new session whose process group is killed at the end;
# 3. a Python audit hook refusing fork/exec/system/spawn/subprocess, ctypes, sockets, kill, setrlimit,
#    and writes/deletes outside the working dir; bypassable by determined code, so never the only layer.
# The environment is scrubbed, output is capped, a wall-clock deadline kills the group. It can still
# read files its user may read. Not a security boundary for hostile code: do not call it "secure".

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
    paths = [a for a in args if isinstance(a, (str, bytes))]
    if event in PATHS:
        bad = bad or not all(inside(p) for p in paths)
    if event == "open" and paths:
        p = os.fsdecode(paths[0])
        writing = (args[2] or 0) & WRITE or any(c in (args[1] or "") for c in "wax+")
        bad = (writing and not inside(p) and p != "/dev/null") or (p.startswith("/proc/") and not p.startswith("/proc/self/"))
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
            r = subprocess.run(_ns_prefix(d, 1) + ["true"], capture_output=True, timeout=10, cwd=d)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return r.returncode == 0


def _read_capped(proc, timeout, cap):
    """Read the merged stdout/stderr until EOF, the deadline or `cap` bytes; returns (bytes, problem)."""
    buf, deadline, fd = bytearray(), time.monotonic() + timeout, proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return bytes(buf), f"timed out after {timeout} s"
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                return bytes(buf), ""
            except subprocess.TimeoutExpired:
                return bytes(buf), f"timed out after {timeout} s"
        buf += chunk
        if len(buf) > cap:
            return bytes(buf[:cap]), f"output over {cap} bytes, stopped"


def run_sandboxed(code, timeout=5.0, memory_mb=512, file_mb=16, max_output=1 << 16, max_procs=4, guard=True):
    """Run Python `code` in the sandbox described above: (ok, output). ok = exit status 0, in time, output
    under the cap. guard=False leaves out the audit hook (tests use it to check the other layers)."""
    with tempfile.TemporaryDirectory(prefix="flatchat_sandbox_") as d:
        prog, work = Path(d) / "program.py", Path(d) / "work"
        prog.write_text(code)
        work.mkdir()
        limits = [math.ceil(timeout) + 1, memory_mb << 20, file_mb << 20, max_procs, int(guard)]
        cmd = [sys.executable, "-I", "-c", _BOOT, str(prog), str(work), *map(str, limits)]
        if namespaces_available():
            cmd = _ns_prefix(work, file_mb) + cmd
        proc = subprocess.Popen(cmd, cwd=work, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, problem = _read_capped(proc, timeout, max_output)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group (the leader is not reaped yet)
            except ProcessLookupError:
                pass
            rc = proc.wait()
            proc.stdout.close()
    text = out.decode(errors="replace") + (f"\n[sandbox: {problem}]" if problem else "")
    return rc == 0 and not problem, text

# -----------------------------------------------------------------------------
# Scoring helpers: every task below only needs model(idx) -> logits and a strided slice per rank


def all_sum(*values):
    """Sum numbers over the ranks (a no-op in a single process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return tuple(t.tolist())


def crop(ids, T):
    """Keep the last T tokens of a prompt longer than the context; returns (ids, how many were cut)."""
    cut = max(0, len(ids) - T)
    return ids[cut:], cut


@torch.no_grad()
def next_token_scores(model, rows):
    """Per row: loss (nats) of each next token and the argmax prediction, (B, L-1) each, on the CPU.
    Rows of different lengths are right-padded; the padding is never looked at."""
    device = model.get_device()
    L = max(map(len, rows))
    x = torch.tensor([r + [0] * (L - len(r)) for r in rows], dtype=torch.long, device=device)
    with amp_ctx(device):
        logits = model(x)[:, :-1].float()  # (B, L-1, V)
    losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    return losses.cpu(), logits.argmax(-1).cpu()


# -----------------------------------------------------------------------------
# Bits per byte on the validation split (the loss, made independent of the vocab size)


def val_rows(tokenizer, files, T, max_tokens):
    """Documents as one stream doc, <|bos|>, doc, ... cut into rows of T+1 that each start with <|bos|>,
    as pretraining sees them; each stream token is a target exactly once."""
    bos, stream = tokenizer.bos_id, []
    for f in files:
        for text in iter_documents(f):
            if len(stream) >= max_tokens:
                break
            stream += tokenizer.encode(text) + [bos]
    stream = stream[:max_tokens]
    return [[bos] + stream[i:i + T] for i in range(0, len(stream) - T + 1, T)] or [[bos] + stream]


def bits_per_byte(model, rows, token_bytes, batch_size, rank=0, world=1):
    device, mine = model.get_device(), rows[rank::world]
    batches = (torch.tensor(mine[i:i + batch_size], device=device) for i in range(0, len(mine), batch_size))
    # evaluate_loss (model.py) sums nats and bytes of the non-special targets over ranks, divides by ln 2
    return evaluate_loss(model, ((x[:, :-1], x[:, 1:].contiguous()) for x in batches), token_bytes)["bpb"]

# -----------------------------------------------------------------------------
# CORE (the DCLM benchmark, scored as DCLM and nanochat do): 22 tasks of three kinds


def load_core_tasks(core_dir):
    """core.yaml's flat list of `key: value` maps, read by hand (values are JSON or bare strings)."""
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
    """The texts to score: few-shot examples (each solved, blank-line separated), then the item."""
    if kind == "multiple_choice":  # same context, one continuation per choice
        pre = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{pre}{item['query']}{delim}{c}" for c in item["choices"]]
    if kind == "schema":  # one context per option, the same continuation
        pre = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [f"{pre}{c}{delim}{item['continuation']}" for c in item["context_options"]]
    pre = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    prompt = f"{pre}{item['context'].strip()}{delim}"  # language_modeling: without, then with the answer
    return [prompt.strip(), prompt + item["continuation"]]


def continuation_spans(kind, seqs):
    """[start, end) of the scored tokens in each sequence: where the choices differ from each other."""
    if kind == "multiple_choice":  # after the longest common prefix
        n = 0
        while all(len(s) > n + 1 and s[n] == seqs[0][n] for s in seqs):
            n += 1
        return [(n, len(s)) for s in seqs]
    if kind == "schema":  # the longest common suffix
        n = 0
        while all(len(s) > n + 1 and s[-n - 1] == seqs[0][-n - 1] for s in seqs):
            n += 1
        return [(len(s) - n, len(s)) for s in seqs]
    return [(len(seqs[0]), len(seqs[1]))]  # language_modeling: past the prompt


def score_item(model, tokenizer, kind, prompts, gold):
    """1 if the model gets this item right: lowest mean continuation loss (MC, schema) or the
    greedy continuation reproduced exactly (LM)."""
    seqs = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    spans = continuation_spans(kind, seqs)
    if kind == "language_modeling":
        seqs = seqs[1:]
    rows, T = [], model.config.sequence_len
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        s, cut = crop(s, T)
        rows.append(s)
        spans[i] = (max(a - cut, 1), b - cut)
    losses, preds = next_token_scores(model, rows)
    if kind == "language_modeling":
        a, b = spans[0]
        return int(preds[0, a - 1:b - 1].tolist() == rows[0][a:b])
    means = [losses[i, a - 1:b - 1].mean().item() for i, (a, b) in enumerate(spans)]
    return int(min(range(len(means)), key=means.__getitem__) == gold)


def core_task(model, tokenizer, task, data, max_items, rank=0, world=1):
    """Accuracy on one task. Few-shot examples: random.Random(1234 + idx) over the task, minus the item."""
    shots_n, kind = task["num_fewshot"][0], task["icl_task_type"]
    delim = task.get("continuation_delimiter", " ")
    correct = count = 0
    for idx in range(rank, min(len(data), max_items), world):
        picks = random.Random(1234 + idx).sample(range(len(data) - 1), shots_n)  # positions in data minus idx
        shots = [data[j + (j >= idx)] for j in picks]
        item = data[idx]
        gold = item.get("gold", 0)  # LM items have no gold: only the one continuation
        correct += score_item(model, tokenizer, kind, render_prompts(kind, item, shots, delim), gold)
        count += 1
    correct, count = all_sum(correct, count)
    return correct / max(count, 1), int(count)


def centered(acc, baseline):
    """Accuracy above chance, rescaled so 1 stays 1 (baseline in percent, as eval_meta_data.csv has it)."""
    return (acc - baseline / 100) / (1 - baseline / 100)


def run_core(model, tokenizer, core_dir, max_items, rank=0, world=1):
    """{label: {acc, centered, n}} for every task whose data file exists, plus the CORE score."""
    results = {}
    tasks = load_core_tasks(core_dir)
    for task in tasks:
        path = core_dir / "eval_data" / task["dataset_uri"]
        if not path.exists():
            print0(f"core | {task['label']:<34} | skipped: {path} is missing")
            continue
        data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        random.Random(1337).shuffle(data)  # so --max-per-task takes a fair sample
        t0 = time.time()
        acc, n = core_task(model, tokenizer, task, data, max_items, rank, world)
        results[task["label"]] = dict(acc=acc, centered=centered(acc, task["baseline"]), n=n)
        print0(f"core | {task['label']:<34} | acc {acc:.4f} | centered {results[task['label']]['centered']:+.4f} "
               f"| {n} items | {time.time() - t0:.1f} s")
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return dict(core=core, core_tasks=results, core_k=len(results), core_total=len(tasks))

# -----------------------------------------------------------------------------
# Chat tasks: ARC-Easy, ARC-Challenge, MMLU (letters), GSM8K (calculator), HumanEval (sandbox)


def load_jsonl(path, max_items):
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:max_items]


def letter_ids(tokenizer, n):
    """The token of each answer letter as the assistant writes it ("A"); each must be one token."""
    ids = [tokenizer.encode(L) for L in "ABCDEFGHIJ"[:n]]
    assert all(len(i) == 1 for i in ids), f"answer letters are not single tokens: {ids}"
    return [i[0] for i in ids]


def letter_correct(logits, letters, gold):
    """Argmax restricted to the choices' letters (logits at the answer position, (V,))."""
    return int(logits[letters].argmax().item() == gold)


@torch.no_grad()
def run_letters(model, tokenizer, items, batch_size, rank=0, world=1):
    """Accuracy of the answer letter after the rendered multiple-choice prompt, batched."""
    T, correct, mine = model.config.sequence_len, 0, items[rank::world]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        convs = [{"messages": [{"role": "user", "content": render_mc(it["question"], it["choices"])}]}
                 for it in chunk]
        rows = [crop(tokenizer.render_for_completion(c), T)[0] for c in convs]
        L = max(map(len, rows))
        x = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=model.get_device())
        with amp_ctx(x.device):
            logits = model(x).float()  # (B, L, V)
        for j, (r, it) in enumerate(zip(rows, chunk)):
            correct += letter_correct(logits[j, len(r) - 1], letter_ids(tokenizer, len(it["choices"])), it["gold"])
    correct, count = all_sum(correct, len(mine))
    return correct / max(count, 1)


def last_number(text):
    """The last number in a text, commas dropped ("1,234.5" -> "1234.5"), or None."""
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def gsm8k_reference(answer):
    """The reference: what follows '####' in a GSM8K answer (or the whole string when absent)."""
    return answer.split("####")[-1].strip().replace(",", "")


def same_number(a, b):
    try:
        return a is not None and float(a) == float(b)
    except ValueError:
        return False


def complete(model, tokenizer, conv, max_tokens, num_samples=1, temperature=0.0):
    """Sample assistant replies (calculator on) and decode them without the special tokens."""
    ids = crop(tokenizer.render_for_completion(conv), model.config.sequence_len - max_tokens)[0]
    seqs, _ = generate_batch(model, ids, num_samples=num_samples, max_tokens=max_tokens,
                             temperature=temperature, tokenizer=tokenizer)
    tb = tokenizer.token_bytes
    return [tokenizer.decode([t for t in s if tb[t] > 0]) for s in seqs]


def run_gsm8k(model, tokenizer, items, max_tokens, rank=0, world=1):
    correct, mine = 0, items[rank::world]
    for it in mine:
        text = complete(model, tokenizer, it, max_tokens)[0]
        correct += same_number(last_number(text), gsm8k_reference(it["answer"]))
    correct, count = all_sum(correct, len(mine))
    return correct / max(count, 1)


def humaneval_program(task, completion):
    """Code of a ```python block if there is one; a bare function body goes back under the prompt;
    then the task's tests and check(entry_point)."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.S)
    code = m.group(1) if m else completion
    if f"def {task['entry_point']}(" in code:  # a whole function: keep the prompt's imports
        imports = [l for l in task["prompt"].splitlines() if l.startswith(("import ", "from "))]
        code = "\n".join(imports) + "\n" + code
    else:
        code = task["prompt"] + code
    return f"{code}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def run_humaneval(model, tokenizer, tasks, max_tokens, samples, rank=0, world=1):
    p1 = pk = 0.0
    mine = tasks[rank::world]
    for task in mine:
        conv = {"messages": [{"role": "user", "content": task["prompt"]}]}
        outs = complete(model, tokenizer, conv, max_tokens, samples, 0.0 if samples == 1 else 0.8)
        c = sum(run_sandboxed(humaneval_program(task, o))[0] for o in outs)
        p1, pk = p1 + pass_at_k(samples, c, 1), pk + pass_at_k(samples, c, samples)
    p1, pk, count = all_sum(p1, pk, len(mine))
    return p1 / max(count, 1), pk / max(count, 1)

# -----------------------------------------------------------------------------
# The report card: report/<section>.md files (each stage rewrites only its own) joined into report.md

STAGES = {"pretrain": "BASE", "midtrain": "MID", "sft": "SFT", "rl": "RL"}
ROWS = {"bpb": "bpb", "core": "CORE", "arc_easy": "ARC-E", "arc_challenge": "ARC-C", "mmlu": "MMLU",
        "gsm8k": "GSM8K", "humaneval": "HumanEval", "chatcore": "ChatCORE"}
CHAT_BASELINES = {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}
ROOT = Path(__file__).resolve().parent


def chatcore(metrics):
    """Mean of the centered chat accuracies that were measured; (score, how many of the 5)."""
    got = [(metrics[k] - b) / (1 - b) for k, b in CHAT_BASELINES.items() if k in metrics]
    return (sum(got) / len(got) if got else None), len(got)


def system_section():
    from importlib.metadata import version, PackageNotFoundError
    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"
    git = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=short"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return "\n".join([
        "## System", "",
        f"- hardware: {os.cpu_count()} CPUs ({platform.machine()}), {mem:.0f} GiB RAM, "
        f"GPUs: {', '.join(gpus) if gpus else 'none'}",
        f"- software: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        "- dependencies: " + ", ".join(f"{p} {ver(p)}" for p in ("numpy", "regex", "textual", "requests", "pyarrow")),
        f"- git commit: {git.stdout.strip() or 'none yet'}{' (+ uncommitted changes)' if dirty else ''}",
        f"- sandbox: {'user/mount/net/pid namespaces + ' if namespaces_available() else ''}rlimits + audit hook"])


def tokenizer_section(tokenizer, files):
    text = ""
    for f in files:
        for doc in iter_documents(f):
            text += doc + "\n"
            if len(text) > 200_000:
                break
    ids = tokenizer.encode(text) if text else []
    ratio = f"{len(text.encode()) / len(ids):.2f} bytes/token on {len(text.encode()):,} bytes of val text" if ids else "-"
    return "\n".join(["## Tokenizer", "", f"- vocab size: {tokenizer.vocab_size:,}",
                      f"- compression: {ratio}", f"- hash: {tokenizer.hash[:16]}"])


def training_section(home):
    """Each stage's steps, wall time and final loss, read from logs/<stage>.jsonl; (markdown, seconds)."""
    lines, total = ["## Training", "", "| stage | steps | wall time | final loss | final val bpb |",
                    "|---|---|---|---|---|"], 0.0
    for stage in STAGES:
        path = home / "logs" / f"{stage}.jsonl"
        if not path.exists():
            continue
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line from a killed run
        train = [r for r in rows if "loss" in r]
        times = [r["time"] for r in rows if "time" in r]
        wall = max(times) - min(times) if times else 0.0
        total += wall
        bpb = [r["val_bpb"] for r in rows if "val_bpb" in r]
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        lines.append(f"| {stage} | {train[-1]['step'] if train else '-'} | {wall / 60:.1f} min | "
                     f"{fmt(train[-1]['loss'] if train else None)} | {fmt(bpb[-1] if bpb else None)} |")
    return "\n".join(lines), total


def metrics_section(home):
    metrics = {s: json.loads(p.read_text()) for s in STAGES if (p := home / "report" / f"metrics_{s}.json").exists()}
    lines = ["## Metrics", "", "| metric | " + " | ".join(STAGES.values()) + " |", "|---|" + "---|" * len(STAGES)]
    for key, name in ROWS.items():
        cells = [f"{metrics[s][key]:.4f}" if s in metrics and metrics[s].get(key) is not None else "-" for s in STAGES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"{STAGES[s]}: CORE over {m['core_k']} of {m['core_total']} tasks" for s, m in metrics.items() if "core_k" in m]
    notes += [f"{STAGES[s]}: ChatCORE over {m['chatcore_k']} of 5 tasks" for s, m in metrics.items() if m.get("chatcore_k")]
    evals = sum(m.get("eval_seconds", 0) for m in metrics.values())
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]), evals


def repo_size():
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".sh") and not any(
        part.startswith(".") for part in p.relative_to(ROOT).parts)]
    text = [p.read_text(errors="replace") for p in files]
    return (f"- repo size: {sum(t.count(chr(10)) for t in text):,} lines in {len(files)} files (*.py, *.sh), "
            f"~{sum(map(len, text)) // 4:,} tokens")


def write_report(home):
    """Join the section files and the derived tables into report.md; returns its path."""
    d = home / "report"
    d.mkdir(parents=True, exist_ok=True)
    training, train_s = training_section(home)
    metrics, eval_s = metrics_section(home)
    parts = ["# flatchat report card", f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    parts += [(d / f"{n}.md").read_text().strip() for n in ("system", "tokenizer") if (d / f"{n}.md").exists()]
    parts += [training, metrics]
    parts += [(d / f"{s}.md").read_text().strip() for s in STAGES if (d / f"{s}.md").exists()]
    parts += ["## Totals", f"- total wall clock: {(train_s + eval_s) / 3600:.2f} h "
              f"(training {train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min)", repo_size()]
    (home / "report.md").write_text("\n\n".join(parts) + "\n")
    return home / "report.md"


def stage_section(stage, step, m):
    """This stage's own part of the card: every number it measured, CORE per task."""
    lines = [f"## {STAGES[stage]} ({stage}, step {step})", ""]
    lines += [f"- {ROWS.get(k, k)}: {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "eval_seconds"]
    if m.get("core_tasks"):
        lines += ["", "| CORE task | accuracy | centered | items |", "|---|---|---|---|"]
        lines += [f"| {t} | {r['acc']:.4f} | {r['centered']:+.4f} | {r['n']} |" for t, r in m["core_tasks"].items()]
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Arguments

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint and update the report card.")
    parser.add_argument("--stage", choices=list(STAGES), help="which checkpoint to evaluate")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tasks", default="", help="comma list of bpb,core,arc,mmlu,gsm8k,humaneval "
                        "(default: bpb,core for pretrain, the chat tasks for the other stages)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1 = all)")
    parser.add_argument("--samples", type=int, default=1, help="HumanEval samples per problem: pass@1 and "
                        "pass@K (1 = greedy, else temperature 0.8)")
    parser.add_argument("--bpb-tokens", type=int, default=2**20, help="validation tokens for bits per byte")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (bpb, letters)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget for GSM8K/HumanEval, tokens")
    parser.add_argument("--report", action="store_true", help="only rebuild report.md from report/ and logs/")
    args = parser.parse_args()
    home = base_dir()
    if args.report or not args.stage:
        if not args.report:
            parser.error("--stage is required (or --report to only rebuild the card)")
        print(f"wrote {write_report(home)}")
        sys.exit(0)
    default = "bpb,core" if args.stage == "pretrain" else "arc,mmlu,gsm8k,humaneval"
    tasks = [t.strip() for t in (args.tasks or default).split(",") if t.strip()]
    unknown = set(tasks) - {"bpb", "core", "arc", "mmlu", "gsm8k", "humaneval"}
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}: choose from bpb,core,arc,mmlu,gsm8k,humaneval")
    max_items = args.max_per_task if args.max_per_task > 0 else 10**9

    # -------------------------------------------------------------------------
    # Init and the checkpoint
    ddp, rank, _, world, device = compute_init()
    model, tokenizer, meta = load_model(args.stage, device, step=args.step)
    T = model.config.sequence_len
    print0(f"evaluating {args.stage} step {meta['step']} on {world} process(es): {','.join(tasks)}")
    t_start = time.time()
    m, eval_dir = {}, home / "data" / "eval"
    val_files = sorted(f for f in (home / "data" / "pretrain" / "val").glob("*") if f.suffix in (".jsonl", ".parquet", ".txt"))

    # -------------------------------------------------------------------------
    # Base metrics
    if "bpb" in tasks:
        if not val_files:
            sys.exit(f"no validation files in {home / 'data/pretrain/val'}: create them with `python data/corpus.py`")
        rows = val_rows(tokenizer, val_files, T, args.bpb_tokens)
        m["bpb"] = bits_per_byte(model, rows, tokenizer.token_bytes, args.batch_size, rank, world)
        print0(f"bpb | {m['bpb']:.4f} over {len(rows) * T:,} tokens")
    if "core" in tasks:
        core_dir = home / "data" / "eval" / "core"
        if not (core_dir / "core.yaml").exists():
            sys.exit(f"no CORE bundle at {core_dir}: create it with `python data/eval_data.py`")
        m.update(run_core(model, tokenizer, core_dir, max_items, rank, world))
        print0(f"CORE {m['core']:.4f} over {m['core_k']} of {m['core_total']} tasks")

    # -------------------------------------------------------------------------
    # Chat metrics (each skipped, with a line saying so, when its data file is missing)
    chat = {"arc_easy": "arc_easy_test", "arc_challenge": "arc_challenge_test", "mmlu": "mmlu_test"}
    for key, name in chat.items():
        if key.split("_")[0] in tasks:
            items = load_jsonl(eval_dir / f"{name}.jsonl", max_items)
            if items is None:
                print0(f"{key} | skipped: {eval_dir / name}.jsonl is missing")
                continue
            m[key] = run_letters(model, tokenizer, items, args.batch_size, rank, world)
            print0(f"{key} | acc {m[key]:.4f} over {len(items)} items")
    if "gsm8k" in tasks and (items := load_jsonl(eval_dir / "gsm8k_test.jsonl", max_items)) is not None:
        m["gsm8k"] = run_gsm8k(model, tokenizer, items, args.max_new_tokens, rank, world)
        print0(f"gsm8k | acc {m['gsm8k']:.4f} over {len(items)} items")
    if "humaneval" in tasks and (items := load_jsonl(eval_dir / "humaneval.jsonl", max_items)) is not None:
        m["humaneval"], pk = run_humaneval(model, tokenizer, items, args.max_new_tokens, args.samples, rank, world)
        if args.samples > 1:
            m[f"humaneval_pass@{args.samples}"] = pk
        print0(f"humaneval | pass@1 {m['humaneval']:.4f} (pass@{args.samples} {pk:.4f}) over {len(items)} problems")

    # -------------------------------------------------------------------------
    # Save this stage's metrics (merged with earlier runs of other tasks) and rebuild the card
    if rank == 0:
        d = home / "report"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"metrics_{args.stage}.json"
        old = json.loads(path.read_text()) if path.exists() and json.loads(path.read_text()).get("step") == meta["step"] else {}
        m = {**old, **m, "step": meta["step"], "eval_seconds": old.get("eval_seconds", 0) + time.time() - t_start}
        m["chatcore"], m["chatcore_k"] = chatcore(m)
        path.write_text(json.dumps(m, indent=1))
        (d / f"{args.stage}.md").write_text(stage_section(args.stage, meta["step"], m))
        (d / "system.md").write_text(system_section())
        (d / "tokenizer.md").write_text(tokenizer_section(tokenizer, val_files))
        print0(f"wrote {write_report(home)} ({time.time() - t_start:.0f} s)")
    compute_cleanup()
