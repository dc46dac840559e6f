"""Runs that survive real machines: SIGTERM and Ctrl-C stop with a checkpoint and resume exactly, one live
run per stage, a full disk during a save, damaged checkpoints, bad input files and bad flags: each ends in
one line that names the file and the fix, and nothing on disk is lost or torn."""

import functools
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, fresh_home, read_log, run_script

sys.path.insert(0, str(ROOT / "data"))  # the data scripts import their common.py

TINY = ["--depth", 2, "--max-seq-len", 64, "--device-batch-size", 4, "--total-batch-size", 512, "--compile", 0,
        "--eval-tokens", 2048, "--eval-every", 4, "--sample-every", -1]


def start(script, *args, home, env=None, torchrun=0, **kw):
    env = {**os.environ, "FLATCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [])
    return subprocess.Popen([*launcher, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for_step(home, stage, step, proc, timeout=120):
    log, deadline = home / "logs" / f"{stage}.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(l).get("step", 0) >= step and "loss" in l for l in log.read_text().splitlines() if l.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"{stage} did not reach step {step}: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")


def losses(home, stage="pretrain"):
    return [r["loss"] for r in read_log(home, stage) if "loss" in r]


def same_weights(a, b, stage="pretrain", step=16):
    sa, sb = (torch.load(h / f"checkpoints/{stage}/step_{step:06d}/model.pt", weights_only=True) for h in (a, b))
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def straight(tiny_home, tmp_path_factory):
    home = fresh_home(tiny_home, tmp_path_factory.mktemp("robust") / "straight")
    run_script("pretrain.py", *TINY, "--num-steps", 16, home=home)
    return home


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_the_step_and_resume_equals_a_straight_run(tiny_home, straight, tmp_path, sig, code):
    home = fresh_home(tiny_home, tmp_path / "b")
    proc = start("pretrain.py", *TINY, "--num-steps", 16, home=home)
    wait_for_step(home, "pretrain", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    stopped = int(re.search(r"stopped at step (\d+) by", err)[1])
    assert 3 <= stopped < 16 and "--resume" in err and "Traceback" not in err
    assert (home / f"checkpoints/pretrain/step_{stopped:06d}/meta.json").exists()
    run_script("pretrain.py", *TINY, "--num-steps", 16, "--resume", home=home)
    assert losses(home) == losses(straight) and same_weights(home, straight)


def test_a_second_ctrl_c_exits_at_once_and_leaves_no_torn_checkpoint(tiny_home, tmp_path):
    import model as M
    home = fresh_home(tiny_home, tmp_path / "home")
    proc = start("pretrain.py", *TINY, "--num-steps", 400, "--save-every", 1, home=home)
    wait_for_step(home, "pretrain", 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if "second Ctrl-C" not in err:  # the first stop had saved and reached shutdown (default handlers) already
        assert "stopped at step" in err and proc.returncode in (130, -signal.SIGINT), err
    else:
        assert proc.returncode == 130, err
    os.environ["FLATCHAT_HOME"] = str(home)
    try:
        state, _, meta, _ = M.load_checkpoint("pretrain")  # the newest complete one loads and verifies
        assert meta["step"] >= 1 and state
    finally:
        del os.environ["FLATCHAT_HOME"]


def test_torchrun_ranks_stop_at_the_same_step_and_resume_exactly(tiny_home, tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    straight = fresh_home(tiny_home, tmp_path / "a")
    run_script("pretrain.py", *TINY, "--num-steps", 16, home=straight, env=env, torchrun=2)
    home = fresh_home(tiny_home, tmp_path / "b")
    proc = start("pretrain.py", *TINY, "--num-steps", 16, home=home, env=env, torchrun=2)
    wait_for_step(home, "pretrain", 3, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("stopped at step") == 1  # rank 0 speaks for both, after both saved
    run_script("pretrain.py", *TINY, "--num-steps", 16, "--resume", home=home, env=env, torchrun=2)
    assert losses(home) == losses(straight) and same_weights(home, straight)


def test_a_second_run_on_the_same_stage_is_refused_and_a_killed_runs_lock_is_not(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    first = start("pretrain.py", *TINY, "--num-steps", 400, home=home)
    wait_for_step(home, "pretrain", 1, first)
    second = run_script("pretrain.py", *TINY, "--num-steps", 4, home=home, check=False)
    assert second.returncode == 2 and f"another run (process {first.pid}) is writing" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    first.kill()  # SIGKILL: no cleanup at all, the lock file stays behind
    first.wait()
    assert (home / "checkpoints/.pretrain.lock").exists()
    run_script("pretrain.py", *TINY, "--num-steps", 4, home=home)  # not blocked


def test_a_full_disk_during_a_save_stops_in_one_line_and_keeps_the_previous_checkpoint(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 4, home=home)

    def small_disk():  # files may not grow past 256 KB: the 2 MB model.pt cannot be written (EFBIG, not a signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
    proc = start("pretrain.py", *TINY, "--num-steps", 8, "--resume", home=home, preexec_fn=small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"could not write \S+/\.tmp_step_000008_\d+/model\.pt: File too large \(a checkpoint needs ~\d+ MB", err)
    root = home / "checkpoints/pretrain"
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    run_script("pretrain.py", *TINY, "--num-steps", 8, "--resume", home=home)  # space is back: it resumes from 4
    assert (root / "step_000008/meta.json").exists()


def test_damaged_checkpoints_are_passed_over_or_named(tiny_home, tmp_path, monkeypatch):
    import model as M
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 8, "--save-every", 4, home=home)
    monkeypatch.setenv("FLATCHAT_HOME", str(home))
    newest = home / "checkpoints/pretrain/step_000008"
    data = bytearray((newest / "model.pt").read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit
    (newest / "model.pt").write_bytes(bytes(data))
    _, _, meta, _ = M.load_checkpoint("pretrain")
    assert meta["step"] == 4  # the one before it, which verifies
    with pytest.raises(M.UserError, match=r"step_000008/model.pt is damaged .* delete .*step_000008"):
        M.load_checkpoint("pretrain", step=8)
    (home / "checkpoints/pretrain/step_000004/optim.pt").write_bytes(b"truncated")
    with pytest.raises(M.UserError, match=r"step_000004/optim.pt is damaged"):
        M.load_checkpoint("pretrain", load_optim=True)  # nothing left that verifies: the oldest's problem, named
    (newest / "meta.json").write_text("{not json")
    proc = run_script("chat.py", "-p", "hi", "--max-tokens", 2, home=home, check=False)
    assert proc.returncode == 0 and "skipping" in proc.stderr and "meta.json is unreadable or not JSON" in proc.stderr


def test_a_fresh_run_keeps_the_log_of_the_run_before_it(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 6, home=home)
    before = (home / "logs/pretrain.jsonl").read_text()
    proc = start("pretrain.py", *TINY, "--num-steps", 400, home=home)  # a fresh start over a finished run
    while not list(home.glob("logs/previous/*.jsonl")) and proc.poll() is None:
        time.sleep(0.05)
    wait_for_step(home, "pretrain", 1, proc)
    assert len(losses(home)) < 6  # the new run's log
    proc.kill()
    proc.wait()
    kept = list((home / "logs/previous").glob("pretrain-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == before
    assert (home / "checkpoints/pretrain/step_000006/meta.json").exists()


def sha_listing(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_moves_the_earlier_run_aside_at_its_first_save_and_prunes_only_its_own(tiny_home, tmp_path):
    """The accident: a trial run of another shape, with the default --keep, in a finished home. It says what
    is there before it starts, moves it to checkpoints/previous/ only at its first save (a run stopped before
    it leaves it in place), and --keep prunes only its own checkpoints; --resume moves nothing."""
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 4, home=home)
    real = sha_listing(home / "checkpoints/pretrain")
    trial = ["--depth", 1, "--max-seq-len", 64, "--device-batch-size", 4, "--total-batch-size", 512, "--compile", 0,
             "--eval-tokens", 2048, "--sample-every", -1, "--keep", 1, "--save-every", 2]
    proc = run_script("pretrain.py", *trial, "--num-steps", 6, "--eval-every", 1000, home=home, env={
        "FLATCHAT_DEVICE": "nope"}, check=False)  # fails before its first save (no such device)
    assert proc.returncode != 0 and sha_listing(home / "checkpoints/pretrain") == real
    proc = run_script("pretrain.py", *trial, "--num-steps", 6, home=home)
    assert re.search(r"holds an earlier run \(latest: step 4, depth 2, width 128, saved [-\d: ]+\)", proc.stderr)
    aside, = (home / "checkpoints/previous").iterdir()
    assert aside.name.startswith("pretrain-") and sha_listing(aside) == real
    assert sorted(p.name for p in (home / "checkpoints/pretrain").glob("step_*")) == ["step_000006"]
    proc = run_script("pretrain.py", *trial, "--num-steps", 8, "--resume", home=home)
    assert "earlier run" not in proc.stderr and len(list((home / "checkpoints/previous").iterdir())) == 1
    assert sorted(p.name for p in (home / "checkpoints/pretrain").glob("step_*")) == ["step_000008"]
    chat = run_script("chat.py", "--stage", "pretrain", "--step", 5, "-p", "hi", home=home, check=False)
    assert chat.returncode == 2 and chat.stderr.strip().splitlines() == [
        f"error: no checkpoint at step 5 in {home / 'checkpoints/pretrain'}: its steps are 8"]


def test_a_home_that_is_a_file_or_read_only_is_one_line_everywhere(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder")
    for cmd in (["pretrain.py"], ["sft.py"], ["evaluate.py", "--report"], ["chat.py", "-p", "hi"],
                ["tokenizer.py", "train"], ["data/corpus.py"], ["data/chat_data.py", "--only", "identity"]):
        proc = run_script(*cmd, home=home, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: the base dir {home} ($FLATCHAT_HOME) is a file, not a folder: set FLATCHAT_HOME to a folder "
            "you can write (unset: ~/.cache/flatchat)"], (cmd, proc.stderr)
    proc = subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "smoke"], capture_output=True, text=True,
                          env={**os.environ, "FLATCHAT_HOME": str(home)})
    assert proc.returncode == 2 and "run.sh: error: cannot write in" in proc.stderr and proc.stdout == ""
    home.unlink()
    home.mkdir()  # a folder on a read-only mount (root ignores file modes), where user namespaces work
    ro = f"mount --bind {home} {home} && mount -o remount,bind,ro {home} && exec {sys.executable} {ROOT}/pretrain.py"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", ro], capture_output=True, text=True,
                          env={**os.environ, "FLATCHAT_HOME": str(home)})
    if "unshare" not in proc.stderr:
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: cannot write in the base dir {home} (Read-only file system): set FLATCHAT_HOME to a folder you "
            "can write (unset: ~/.cache/flatchat)"], proc.stderr


def test_no_gpu_names_the_cause_and_never_advises_deleting_a_good_file(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 2, home=home)
    proc = run_script("chat.py", "--device", "cuda", "-p", "hi", home=home, check=False)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "delete" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# bad input files: one line naming the file (and line) and the fix


def test_bad_input_files_end_in_one_line_naming_them(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home", share=("tokenizer",))
    train = home / "data/pretrain/train"
    train.mkdir(parents=True)
    (home / "data/pretrain/val").mkdir()
    (home / "data/pretrain/val/shard_00000.jsonl").write_text('{"text": "fine"}\n')
    cases = {
        "broken JSON line": (b'{"text": "ok"}\n{"text": "no end\n', r"shard_00000.jsonl:2: .*\"text\""),
        "invalid UTF-8": (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"shard_00000.jsonl:2: not UTF-8 text"),
        "empty corpus": (b"", r"no documents in .*train"),
    }
    for name, (content, message) in cases.items():
        (train / "shard_00000.jsonl").write_bytes(content)
        proc = run_script("pretrain.py", *TINY, "--num-steps", 2, home=home, check=False)
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and re.search(message, proc.stderr), (name, proc.stderr)
        assert not list(home.glob("checkpoints/pretrain/step_*")), name


def test_a_conversation_with_a_wrong_role_names_its_file_and_line(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 2, home=home)
    chat = home / "data/chat"
    (chat / "val").mkdir(parents=True)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "hello"}]}
    (chat / "identity.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    (chat / "val/identity.jsonl").write_text(json.dumps(good) + "\n")
    for script in ("midtrain.py", "sft.py"):
        args = ["--source", "pretrain"] if script == "sft.py" else []
        proc = run_script(script, *args, "--num-steps", 2, home=home, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert re.search(r"identity.jsonl:2: message 1 has role 'robot' where 'assistant' was expected", proc.stderr)


def test_every_script_reports_a_user_error_as_one_line_and_exit_2(tiny_home, tmp_path):
    """One error class (tokenizer.UserError) and one convention: `error: ...`, exit 2, in the data scripts, the
    tokenizer's command line, a stage whose NaN loss stops it, and the evaluator."""
    home = fresh_home(tiny_home, tmp_path / "home")
    cases = [(["data/chat_data.py", "--only", "nope"], "--only: unknown nope"),
             (["data/corpus.py", "--mirror", str(tmp_path / "missing")], "mirror folder .*missing does not exist"),
             (["evaluate.py", "--stage", "sft"], r"no checkpoint in .*sft: create it with `python sft.py`"),
             (["pretrain.py", *TINY, "--num-steps", 3, "--matrix-lr", "1e30", "--embedding-lr", "1e30"],
              "loss is nan at step")]
    for cmd, message in cases:
        proc = run_script(*cmd, home=home, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("error: ") and re.search(message, lines[-1]), proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    empty = tmp_path / "empty"
    (empty / "data/pretrain/train").mkdir(parents=True)
    proc = run_script("tokenizer.py", "train", home=empty, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: no corpus files in {empty / 'data/pretrain/train'}: create them with `python data/corpus.py`"]


def test_importing_a_module_changes_nothing_in_the_process():
    """model.py's setup (the excepthook, the allocator switch) runs in compute_init, not at import."""
    code = ("import os, sys; hook = sys.excepthook; import model, tokenizer, torch; "
            "print(sys.excepthook is hook, 'THP_MEM_ALLOC_ENABLE' in os.environ, "
            "torch._dynamo.config.suppress_errors)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


# -----------------------------------------------------------------------------
# every numeric flag of every script: a bad value is one line, exit 2, and nothing on disk changes

SCRIPTS = ["pretrain.py", "midtrain.py", "sft.py", "rl.py", "evaluate.py", "chat.py", "tokenizer.py train",
           "tokenizer.py eval", "data/corpus.py", "data/chat_data.py"]


@functools.lru_cache(maxsize=None)
def script_parser(script):
    """A script's own argparse parser, built by running its source up to where it parses the command line."""
    src = (ROOT / script).read_text()
    cut = min(i for i in (src.find("args = parser.parse_args()"), src.find("args = parse_args(parser)")) if i >= 0)
    scope = {"__name__": "__main__", "__file__": str(ROOT / script)}
    exec(compile(src[:cut], str(ROOT / script), "exec"), scope)
    return scope["parser"]


def numeric_flags(script):
    """The flags of a command line (`tokenizer.py train`) that take a number: their type is ranged()."""
    parser, sub = script_parser(script.split()[0]), script.split()[1:]
    if sub:
        parser = next(a for a in parser._actions if a.dest == "cmd").choices[sub[0]]
    return [a.option_strings[-1] for a in parser._actions if getattr(a.type, "__qualname__", "") == "ranged.<locals>.parse"]


def snapshot(home):
    return {p: p.stat().st_mtime_ns for p in home.rglob("*")}


def test_every_numeric_flag_rejects_bad_values_in_one_line(capsys):
    tried = 0
    for script in SCRIPTS:
        parser, sub = script_parser(script.split()[0]), script.split()[1:]
        actions = parser._actions + [a for c in parser._subparsers._group_actions[0].choices.values() for a in c._actions] if sub else parser._actions
        assert not [a.dest for a in actions if a.type in (int, float)], script  # every number has a checked range
        for flag in numeric_flags(script):
            for bad in ("-5", "abc", "nan"):  # nan: no float flag takes it (an int flag says 'invalid int value')
                with pytest.raises(SystemExit) as exit:
                    parser.parse_args([*sub, flag, bad])
                lines = capsys.readouterr().err.strip().splitlines()
                assert exit.value.code == 2 and len(lines) == 1 and flag in lines[0], (script, flag, bad, lines)
                tried += 1
    assert tried > 250  # 90 flags in 10 command lines


def test_a_bad_flag_changes_nothing_on_disk(tiny_home, tmp_path):
    """The real command line of every script: one line, exit 2, no file touched (a checkpoint and logs exist)."""
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 2, home=home)
    before = snapshot(home)
    flags = {script: numeric_flags(script)[0] for script in SCRIPTS}
    procs = {script: start(*script.split(), flags[script], "-5", home=home) for script in SCRIPTS}  # all at once
    for script, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and flags[script] in lines[0], (script, err)
    assert snapshot(home) == before
