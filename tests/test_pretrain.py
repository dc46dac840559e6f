"""pretrain.py end to end on a tiny model: loss falls, exact resume after SIGKILL, torchrun == 1 process."""

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, fresh_home, read_log, run_killed, run_script

TINY = ["--depth", 2, "--max-seq-len", 64, "--device-batch-size", 4, "--total-batch-size", 512, "--compile", 0,
        "--eval-tokens", 2048, "--eval-every", 4, "--sample-every", -1]


def train_losses(home):
    return [r["loss"] for r in read_log(home, "pretrain") if "loss" in r]


def test_smoke_training_loss_falls_and_samples(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    out = run_script("pretrain.py", *TINY, "--num-steps", 30, "--matrix-lr", 0.05, "--embedding-lr", 0.3,
                     "--sample-every", 30, home=home).stdout
    losses = train_losses(home)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    bpbs = [r["val_bpb"] for r in read_log(home, "pretrain") if "val_bpb" in r]
    assert bpbs[-1] < bpbs[0]
    assert "sample: Once upon a time," in out and "| tok/s" not in out and " tok/s | " in out
    assert (home / "checkpoints/pretrain/step_000030/meta.json").exists()


def test_bf16_autocast_on_cpu_trains(tiny_home, tmp_path):
    """FLATCHAT_DTYPE=bf16, which run.sh's cpu preset sets where the CPU has bf16 units: the loss falls too."""
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 20, "--matrix-lr", 0.05, "--embedding-lr", 0.3, home=home,
               env={"FLATCHAT_DTYPE": "bf16"})
    losses = train_losses(home)
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_compile_without_a_cxx_compiler_falls_back_to_eager(tiny_home, tmp_path):
    """--compile 1 on a CPU whose C++ toolchain is missing (CXX points nowhere): inductor fails, the step
    runs eagerly and training goes on (a warning, not a crashed run)."""
    home = fresh_home(tiny_home, tmp_path / "home")
    proc = run_script("pretrain.py", *TINY, "--num-steps", 2, "--compile", 1, home=home,
                      env={"CXX": str(tmp_path / "no-such-g++")})
    assert len(train_losses(home)) == 2 and "InvalidCxxCompiler" in proc.stderr


def test_a_busy_core_moves_an_eager_run_at_once_and_costs_a_compiled_run_no_recompile(tiny_home, tmp_path):
    """Another process keeps a core busy through the whole run. The eager run fits its threads at once (so
    the load is seen); the compiled run would recompile for a new thread count, and the load has not held
    as long as a compile costs (model.fit_threads' hold): it keeps its count and compiles once."""
    home = fresh_home(tiny_home, tmp_path / "home")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        runs = {}
        for compiled in (0, 1):
            proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *map(str, TINY), "--num-steps", "8",
                                   "--eval-every", "-1", "--compile", str(compiled)],
                                  env={**env, "FLATCHAT_HOME": str(home), "TORCH_LOGS": "recompiles"},
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[compiled] = proc.stdout + proc.stderr
    finally:
        busy.kill()
    assert re.search(r"threads: \d+ -> \d+", runs[0])
    assert "MFLOP/token, compiled" in runs[1]
    assert "GLOBAL_STATE changed: num_threads" not in runs[1] and "threads:" not in runs[1]


@pytest.mark.parametrize("experts", [[], ["--num-experts", 4, "--experts-per-token", 2]], ids=["dense", "moe"])
def test_resume_after_sigkill_is_bitwise_identical(tiny_home, tmp_path, experts):
    straight = fresh_home(tiny_home, tmp_path / "a")
    run_script("pretrain.py", *TINY, *experts, "--num-steps", 12, "--save-every", 6, home=straight)
    killed = fresh_home(tiny_home, tmp_path / "b")
    run_killed("pretrain.py", *TINY, *experts, "--num-steps", 12, "--save-every", 6, home=killed,
               checkpoint=killed / "checkpoints/pretrain/step_000006")
    assert not (killed / "checkpoints/pretrain/step_000012").exists()
    run_script("pretrain.py", *TINY, *experts, "--num-steps", 12, "--save-every", 6, "--resume", home=killed)
    assert train_losses(killed) == train_losses(straight) and len(train_losses(straight)) == 12
    a = torch.load(straight / "checkpoints/pretrain/step_000012/model.pt", weights_only=True)
    b = torch.load(killed / "checkpoints/pretrain/step_000012/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_match_one_process(tiny_home, tmp_path):
    one = fresh_home(tiny_home, tmp_path / "one")
    two = fresh_home(tiny_home, tmp_path / "two")
    env = {"OMP_NUM_THREADS": "1"}
    run_script("pretrain.py", *TINY, "--num-steps", 5, home=one, env=env)  # 2 accumulation steps
    run_script("pretrain.py", *TINY, "--num-steps", 5, home=two, env=env, torchrun=2)  # 2 ranks x 1
    l1, l2 = train_losses(one), train_losses(two)
    assert len(l1) == len(l2) == 5
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, (l1, l2)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 2, home=home)
    # the architecture is too robust to diverge on demand (norms + soft-capped logits), so poison the
    # weights of a copy of the checkpoint instead: the resumed run must see nan and stop
    good = home / "checkpoints/pretrain/step_000002"
    bad = good.parent / "step_000003"
    shutil.copytree(good, bad)
    state = torch.load(bad / "model.pt", weights_only=True)
    state["lm_head.weight"][0, 0] = float("nan")
    torch.save(state, bad / "model.pt")
    meta = json.loads((bad / "meta.json").read_text())
    meta["step"], meta["sha256"]["model.pt"] = 3, hashlib.sha256((bad / "model.pt").read_bytes()).hexdigest()
    (bad / "meta.json").write_text(json.dumps(meta))  # a checkpoint that verifies, with a nan in it
    proc = run_script("pretrain.py", *TINY, "--num-steps", 6, "--resume", home=home, check=False)
    assert proc.returncode != 0 and "loss is nan at step 3" in proc.stderr
    assert "Traceback" not in proc.stderr and "is intact" in proc.stderr
    assert sorted(p.name for p in good.parent.iterdir()) == ["step_000002", "step_000003"]


def test_missing_corpus_is_one_clear_line(tmp_path, tiny_home):
    home = tmp_path / "empty"
    (home / "tokenizer").mkdir(parents=True)
    shutil.copy(tiny_home / "tokenizer/tokenizer.json", home / "tokenizer")
    proc = run_script("pretrain.py", *TINY, home=home, check=False)
    assert proc.returncode == 2 and "python data/corpus.py" in proc.stderr and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# the data pipeline: token shards and best-fit packing


def reference_rows(docs, lane, n_lanes, bos, size, count, buffer_size=32):
    """The packing rule written plainly over lists (as the loader packed before token shards): every
    n_lanes-th document, best fit; when none fits, the longest piece is split and its rest starts a later
    row with <|bos|>."""
    stream = iter([d for n, d in enumerate(docs) if n % n_lanes == lane] * 3)
    pieces, rows = [], []
    for _ in range(count):
        row = []
        while len(row) < size:
            while len(pieces) < buffer_size:
                pieces.append([bos] + list(next(stream)))
            room = size - len(row)
            fits = [p for p in pieces if len(p) <= room]
            if fits:
                best = max(fits, key=len)
                pieces.remove(best)
                row += best
            else:
                p = max(pieces, key=len)
                row += p[:room]
                pieces[pieces.index(p)] = [bos] + p[room:]
        rows.append(row)
    return rows


def test_token_shards_are_the_encoded_documents_and_are_reused_until_the_corpus_changes(tiny_home, tmp_path, monkeypatch):
    import pretrain
    from tokenizer import Tokenizer, corpus_files, iter_documents
    home = fresh_home(tiny_home, tmp_path / "home", share=("tokenizer",))
    shutil.copytree(tiny_home / "data", home / "data")
    monkeypatch.setenv("FLATCHAT_HOME", str(home))
    tok = Tokenizer.load(home / "tokenizer")
    files = corpus_files("train")
    shutil.rmtree(home / "data" / "tokens", ignore_errors=True)  # copied from tiny_home: encode afresh
    folder = home / "data" / "tokens" / tok.hash[:16] / "train"
    stale = folder / f"{files[0].name}.1.2.tmp-{socket.gethostname()}-999999999"  # a killed run's, this node
    busy = folder / f"{files[0].name}.1.2.tmp-othernode-1"  # another node's, maybe still writing
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    busy.write_bytes(b"half a shard")
    (tokens, starts), = pretrain.token_shards(files, tok, num_proc=2)
    assert not stale.exists() and busy.exists()
    busy.unlink()
    docs = list(iter_documents(files[0]))
    assert len(starts) == len(docs) + 1
    assert all(tokens[starts[i]:starts[i + 1]].tolist() == tok.encode(d) for i, d in enumerate(docs))
    shard = next((home / "data" / "tokens").rglob("*.bin"))
    before = shard.stat().st_mtime_ns
    pretrain.token_shards(files, tok)  # unchanged corpus: read, not encoded again
    assert shard.stat().st_mtime_ns == before
    with open(files[0], "a") as f:
        f.write('{"text": "A new document at the end."}\n')
    (tokens, starts), = pretrain.token_shards(files, tok, num_proc=1)
    assert tokens[starts[-2]:].tolist() == tok.encode("A new document at the end.")
    assert not shard.exists() and len(list(shard.parent.iterdir())) == 2  # the old version is gone: .bin + .idx.npy


def test_a_broken_corpus_stops_before_the_model_and_keeps_the_good_cache(tiny_home, tmp_path):
    """The train shard replaced by random bytes: one line naming the file, before any model is built, the
    token cache of the good file untouched and no temp file left."""
    home = fresh_home(tiny_home, tmp_path / "home", share=("tokenizer",))
    shutil.copytree(tiny_home / "data" / "pretrain", home / "data" / "pretrain")
    run_script("pretrain.py", *TINY, "--num-steps", 1, home=home)
    cache = sorted(p.name for p in (home / "data" / "tokens").rglob("*"))
    shard = home / "data/pretrain/train/shard_00000.jsonl"
    shard.write_bytes(bytes(__import__("random").Random(0).randrange(256) for _ in range(5000)))
    proc = run_script("pretrain.py", *TINY, "--num-steps", 1, home=home, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {shard}:1: ")
    assert "model:" not in proc.stdout  # stopped before the model was built
    assert sorted(p.name for p in (home / "data" / "tokens").rglob("*")) == cache


def test_lanes_pack_best_fit_like_the_plain_rule_resume_exactly_and_stay_disjoint():
    import numpy as np
    import pretrain
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, rng.integers(1, 300)).astype(np.uint16) for _ in range(101)]
    starts = np.cumsum([0] + [len(d) for d in docs])
    shards = [(np.concatenate(docs[:60]), starts[:61]), (np.concatenate(docs[60:]), starts[60:] - starts[60])]
    for lane, n_lanes in ((0, 1), (1, 3)):
        L = pretrain.Lane(shards, lane, n_lanes, 999, B=4, T=64)
        rows = [L.row(65).tolist() for _ in range(40)]  # past one epoch of the lane: the corpus repeats
        assert rows == reference_rows(docs, lane, n_lanes, 999, 65, 40)
    a = pretrain.Lane(shards, 0, 2, 999, B=4, T=64)
    for _ in range(7):
        a.row(65)
    b = pretrain.Lane(shards, 0, 2, 999, B=4, T=64, state=a.state())  # resume: the same next rows
    assert [a.row(65).tolist() for _ in range(5)] == [b.row(65).tolist() for _ in range(5)]
    x, y = pretrain.Lane(shards, 1, 2, 999, B=4, T=64).batch()
    assert x.shape == y.shape == (4, 64) and (x[:, 0] == 999).all() and torch.equal(x[:, 1:], y[:, :-1])
    lane0, lane1 = pretrain.Lane(shards, 0, 2, 1, B=4, T=64), pretrain.Lane(shards, 1, 2, 1, B=4, T=64)
    lane0.row(500), lane1.row(500)
    docs0 = {lane0.lane + 2 * (p[0] % lane0.per_epoch) for p in lane0.pieces}
    docs1 = {lane1.lane + 2 * (p[0] % lane1.per_epoch) for p in lane1.pieces}
    assert docs0 and docs1 and not docs0 & docs1 and all(d % 2 == 0 for d in docs0)


def test_a_killed_run_leaves_no_worker_processes_and_a_worker_error_reaches_the_caller(tiny_home):
    from tokenizer import Tokenizer
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tokenizer import Tokenizer\n"
            f"tok = Tokenizer.load({str(tiny_home / 'tokenizer')!r})\n"
            "for i, _ in enumerate(tok.map('encode', ['hello world ' * 3000] * 100000, 2, chunksize=1)):\n"
            "    print('encoding', flush=True) if i == 0 else None\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "encoding"
    def children(pid):  # live (not zombie) processes whose parent is pid
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out += [int(stat.parent.name)] if int(fields[1]) == pid and fields[0] != "Z" else []
        return out
    workers = children(p.pid)
    assert len(workers) == 2
    p.kill()  # SIGKILL: no cleanup code runs in the parent
    p.wait()
    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.time() + 10
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))
    tok = Tokenizer.load(tiny_home / "tokenizer")
    with pytest.raises(TypeError):  # raised in a worker, re-raised here with its message
        list(tok.map("encode", ["fine", 5, "fine"], 2, chunksize=1))
