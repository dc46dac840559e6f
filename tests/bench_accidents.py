"""
Accidents and bad input, as a user meets them: each case runs real commands in a copy of a finished
smoke-preset home and prints the command, its exit code, the last line it wrote to stderr (verbatim), and
whether everything the home held before is still there byte for byte (by sha256; a file that a fresh run
moved aside counts as kept where its bytes are found elsewhere in the home). Not collected by pytest.

    python tests/bench_accidents.py                 # builds the smoke home from the mirror first (~1 min)
    python tests/bench_accidents.py --home DIR      # a finished home to copy instead
"""

import argparse
import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = "--depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 --compile 0 --eval-tokens 4096"


def listing(home):
    """{path: sha256} of every file under home (not following links into shared data)."""
    out = {}
    for p in sorted(home.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(home))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(cmd, home, env=None, stop_after=None, sig=signal.SIGINT, limit=None):
    """(exit code, stderr) of a shell command run with FLATCHAT_HOME=home; stop_after: send `sig` once
    this text is in its stdout; limit: RLIMIT_FSIZE bytes for it (a disk that fills up)."""
    env = {**os.environ, "FLATCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    fsize = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    p = subprocess.Popen(cmd, shell=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=fsize, start_new_session=True)
    if stop_after:
        for line in p.stdout:
            if stop_after in line:
                os.killpg(p.pid, sig)
                break
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def cases(tmp):
    """(name, setup(home) or None, command, run keywords): the accidents and mistakes."""
    randoms = bytes(random.Random(0).randrange(256) for _ in range(4000))
    return [
        ("a trial run of another shape over the finished base model, Ctrl-C after its first step", None,
         f"{PY} pretrain.py --depth 1 --num-steps 500 --max-seq-len 128 --compile 0", dict(stop_after="step 1/")),
        ("... then --resume of the trial and Ctrl-C again (--keep 2 prunes)", "trial",
         f"{PY} pretrain.py --depth 1 --num-steps 500 --max-seq-len 128 --compile 0 --resume",
         dict(stop_after="step 4/")),
        ("FLATCHAT_HOME is a regular file: pretrain", "file", f"{PY} pretrain.py", {}),
        ("FLATCHAT_HOME is a regular file: sft", "file", f"{PY} sft.py", {}),
        ("FLATCHAT_HOME is a regular file: evaluate --report", "file", f"{PY} evaluate.py --report", {}),
        ("FLATCHAT_HOME is a regular file: chat -p", "file", f"{PY} chat.py -p hi", {}),
        ("FLATCHAT_HOME is a regular file: run.sh", "file", "bash run.sh --preset smoke", {}),
        ("a read-only home (a read-only mount)", None,
         "unshare -rm sh -c 'mount --bind $FLATCHAT_HOME $FLATCHAT_HOME && mount -o remount,bind,ro "
         f"$FLATCHAT_HOME && exec {PY} sft.py'", {}),
        ("tokenizer.py train without a corpus", "no corpus", f"{PY} tokenizer.py train", {}),
        ("Ctrl-C during tokenizer training", None, f"{PY} tokenizer.py train --vocab-size 4000",
         dict(stop_after="split + count")),
        ("the train shard replaced by random bytes", ("shard", randoms), f"{PY} pretrain.py {TINY} --num-steps 2",
         {}),
        ("a corpus line that is not JSON", ("shard", b'{"text": "fine"}\n{"text": broken\n'),
         f"{PY} pretrain.py {TINY} --num-steps 2", {}),
        ("chat.py --stage sft --step 5 (no such step)", None, f"{PY} chat.py --stage sft --step 5 -p hi", {}),
        ("a checkpoint of another tokenizer", "retokenize", f"{PY} sft.py --num-steps 2", {}),
        ("two runs of one stage at once", "lock", f"{PY} sft.py --num-steps 2", {}),
        ("a disk that fills up during a resumed save", None,
         f"{PY} pretrain.py {TINY} --num-steps 32 --resume", dict(limit=200_000)),
        ("a truncated model.pt in the latest checkpoint", "damage", f"{PY} chat.py -p hi --max-tokens 4", {}),
        ("--resume with another batch layout", None, f"{PY} pretrain.py {TINY} --num-steps 40 --resume "
         "--device-batch-size 2", {}),
        ("--resume with another model shape", None, f"{PY} pretrain.py {TINY} --num-steps 40 --resume --depth 3", {}),
        ("a conversation line with a wrong role", "bad role", f"{PY} midtrain.py --num-steps 2", {}),
        ("--chat-file with a line of neither shape", "bad chat file",
         f"{PY} sft.py --num-steps 2 --chat-file {tmp}/mine.jsonl", {}),
        ("rl without its GSM8K file", "no gsm8k", f"{PY} rl.py --num-steps 1", {}),
        ("chat.py --device cuda on a CPU-only build", None, f"{PY} chat.py --device cuda -p hi", {}),
        ("a flag out of range", None, f"{PY} pretrain.py --depth -3", {}),
        ("an unknown data step", None, f"{PY} data/chat_data.py --only nope", {}),
        ("--from a path that does not exist", None, f"{PY} data/corpus.py --from {tmp}/nowhere", {}),
        ("more experts a token than experts", None, f"{PY} pretrain.py --num-experts 2 --experts-per-token 3", {}),
        ("a fresh sft run killed by SIGKILL after its first save", None,
         f"{PY} sft.py --num-steps 40 --save-every 5", dict(stop_after="step 7/", sig=signal.SIGKILL)),
    ]


def setup(what, home, tmp):
    if what == "trial":  # the first trial run, stopped after its first step
        run(f"{PY} pretrain.py --depth 1 --num-steps 500 --max-seq-len 128 --compile 0", home, stop_after="step 1/")
    elif what == "file":
        shutil.rmtree(home)
        home.write_text("not a folder")
    elif what == "no corpus":
        shutil.rmtree(home / "data" / "pretrain")
        (home / "data" / "pretrain" / "train").mkdir(parents=True)
    elif isinstance(what, tuple):
        (home / "data/pretrain/train/shard_00000.jsonl").write_bytes(what[1])
    elif what == "retokenize":
        run(f"{PY} tokenizer.py train --vocab-size 600", home)
    elif what == "lock":
        return subprocess.Popen(f"{PY} sft.py --num-steps 400 --eval-every 1000", shell=True, cwd=ROOT,
                                env={**os.environ, "FLATCHAT_HOME": str(home)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    elif what == "damage":
        model_pt = max((home / "checkpoints" / "rl").glob("step_*")) / "model.pt"
        model_pt.write_bytes(model_pt.read_bytes()[:1000])
    elif what == "bad role":
        with open(home / "data/chat/identity.jsonl", "a") as f:
            f.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}\n')
    elif what == "bad chat file":
        (tmp / "mine.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n{"question": "q", "answer": "a"}\n')
    elif what == "no gsm8k":
        (home / "data/chat/gsm8k_train.jsonl").unlink()
    return None


def kept(before, after_home):
    """Is every file of `before` still in the home, byte for byte (at its path, or moved aside)?"""
    if not after_home.is_dir():
        return "(the home is a file)"
    after = listing(after_home)
    hashes = set(after.values())
    lost = [p for p, h in before.items() if after.get(p) != h and h not in hashes]
    return "all kept" if not lost else f"LOST: {', '.join(lost[:3])}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Accidents and bad input: exit codes, messages, nothing lost.")
    parser.add_argument("--home", default="", help="a finished home to copy (default: a smoke run, built now)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flatchat_accidents_"))
    base = Path(args.home) if args.home else tmp / "base"
    if not args.home:
        env = {**os.environ, "FLATCHAT_HOME": str(base), "PYTHON": PY}
        env.setdefault("FLATCHAT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
        subprocess.run(["bash", "run.sh", "--preset", "smoke"], cwd=ROOT, env=env, check=True, capture_output=True)
    print("| # | case | command | exit | last stderr line (verbatim) | the home's files |")
    print("|---|---|---|---|---|---|")
    for n, (name, what, cmd, kw) in enumerate(cases(tmp), 1):
        home = tmp / f"case{n}"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(base, home, symlinks=True)
        blocker = setup(what, home, tmp)
        before = listing(home) if home.is_dir() else {}
        if what == "lock":
            time.sleep(8)  # the first run holds the lock
        code, err = run(cmd, home, **kw)
        if blocker:
            os.killpg(blocker.pid, signal.SIGKILL)
            blocker.wait()
        lines = [line for line in err.strip().splitlines() if line.strip()]
        last = lines[-1].replace(str(home), "$HOME").replace(str(tmp), "$TMP").replace("|", "\\|") if lines else ""
        cmd_shown = cmd.replace(PY, "python").replace(str(tmp), "$TMP").replace("|", "\\|")
        print(f"| {n} | {name} | `{cmd_shown}` | {code} | {last[:300]} | "
              f"{kept(before, home) if what not in ('file',) else 'nothing read or written'} |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
