"""Shared test fixtures: the data (tests/fixtures/mirror, or the whole mirror), a tiny base dir (corpus +
tokenizer), running a stage script.

By default the tests read tests/fixtures/mirror (cut from the offline mirror by tests/make_fixtures.py): a
fresh clone needs no mirror and no network. With FLATCHAT_DATA_MIRROR set (CI sets ../shared/data) they
read that instead, and the tests marked needs_full_mirror run too."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL_MIRROR = bool(os.environ.get("FLATCHAT_DATA_MIRROR"))
MIRROR = Path(os.environ.get("FLATCHAT_DATA_MIRROR") or ROOT / "tests" / "fixtures" / "mirror").resolve()
os.environ["FLATCHAT_DATA_MIRROR"] = str(MIRROR)  # data scripts run by the tests never touch the network
ENABLE = "set FLATCHAT_DATA_MIRROR=../shared/data (a folder laid out like it) to run them"
needs_full_mirror = pytest.mark.skipif(not FULL_MIRROR, reason=f"needs the whole data mirror: {ENABLE}")


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "whole data mirror" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests need the whole data mirror and were skipped: {ENABLE}")
# tiny models are dominated by per-op overhead: one thread each is faster, and tests run side by side
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(ROOT))


def mirror_texts(max_chars):
    """Real text from the mirror: TinyStories paragraphs and Austen/Python-docs documents."""
    texts, n = [], 0
    stories = (MIRROR / "pretrain/tinystories/TinyStories-train.head.txt").read_text().split("\n\n")
    prose = []
    for name in ("austen.jsonl", "python311_docs.jsonl"):
        with open(MIRROR / "pretrain/offline-prose" / name) as f:
            prose += [json.loads(next(f))["text"][:4000] for _ in range(20)]
    for text in [s for pair in zip(stories, prose) for s in pair] + stories[len(prose):]:
        texts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return texts


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """A base dir with a small train/val corpus and a 512-token tokenizer trained on it."""
    from tokenizer import Tokenizer
    home = tmp_path_factory.mktemp("flatchat_home")
    texts = mirror_texts(200_000)
    for split, docs in (("train", texts[10:]), ("val", texts[:10])):
        d = home / "data" / "pretrain" / split
        d.mkdir(parents=True)
        with open(d / "shard_00000.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    tok = Tokenizer.train(texts, 512)
    (home / "tokenizer").mkdir()
    tok.save(home / "tokenizer")
    return home


def run_script(script, *args, home, check=True, env=None, timeout=300, torchrun=0):
    """Run a stage script as a user would, in a subprocess with FLATCHAT_HOME=home."""
    env = {**os.environ, "FLATCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    launcher = [sys.executable]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    proc = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def learned_by_heart(home, text, conversation, vocab_size=300, steps=60, stages=(("sft", 1),)):
    """A tokenizer trained on `text` and a tiny model (2 layers, context 64) that learned the assistant turns
    of `conversation` by heart, saved in home as the checkpoints `stages` [(stage, step)]: (model, tokenizer)."""
    import torch
    import model as M
    from tokenizer import Tokenizer
    tok = Tokenizer.train([text], vocab_size, num_proc=1)
    tok.save(home / "tokenizer")
    torch.manual_seed(0)
    config = M.GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                         n_embd=64)
    model = M.GPT(config)
    model.init_weights()
    ids, mask = tok.render_conversation(conversation)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLATCHAT_HOME", str(home))
        for stage, step in stages:
            meta = dict(model_config=vars(config), tokenizer_hash=tok.hash)
            M.save_checkpoint(stage, step, model, None, meta)
    return model.eval(), tok


def read_log(home, stage):
    return [json.loads(line) for line in (Path(home) / "logs" / f"{stage}.jsonl").read_text().splitlines()]


def run_killed(script, *args, home, checkpoint):
    """Start a stage, SIGKILL it as soon as `checkpoint` (a dir) exists, and return the dir."""
    env = {**os.environ, "FLATCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert checkpoint.exists(), f"{script} ended without writing {checkpoint}"
    return checkpoint


def fresh_home(tiny_home, path, share=("data", "tokenizer")):
    """A new base dir sharing the (read-only) data and tokenizer of tiny_home."""
    path.mkdir(parents=True)
    for d in share:
        (path / d).symlink_to(tiny_home / d)
    return path
