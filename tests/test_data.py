"""
Tests of the data scripts (data/*.py): hermetic, offline (the mirror folder), a few seconds.

    python -m pytest -q tests/test_data.py

The scripts run in-process with FLATCHAT_HOME = a temp dir and FLATCHAT_DATA_MIRROR = the mirror (tests/fixtures/mirror unless set);
requests is patched so that any network call fails the test. fetch() is tested against a tiny HTTP
server on 127.0.0.1 (loopback only) that supports Range requests.
"""
import argparse
import csv
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import runpy
import sys
import tarfile
import threading
import zipfile

import pytest
import requests

from conftest import MIRROR, ROOT, needs_full_mirror  # $FLATCHAT_DATA_MIRROR, else tests/fixtures/mirror
from model import use_calculator
from tokenizer import UserError

sys.path.insert(0, str(ROOT / "data"))
import chat_data  # noqa: E402
import common  # noqa: E402
import corpus  # noqa: E402

needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline data mirror {MIRROR} not found")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A fresh base dir, the mirror, and no network."""
    def no_network(*args, **kwargs):
        raise AssertionError("a data test tried to use the network")

    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    monkeypatch.setenv("FLATCHAT_DATA_MIRROR", str(MIRROR))
    monkeypatch.setattr(requests.Session, "request", no_network)
    return tmp_path / "data"


def run_script(monkeypatch, name, *argv):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(ROOT / "data" / name), run_name="__main__")


# -----------------------------------------------------------------------------
# corpus.py


@needs_full_mirror  # the fixtures are too few documents for a 1% val split
def test_corpus_cpu_split_is_disjoint_and_idempotent(offline, monkeypatch, capsys):
    run_script(monkeypatch, "corpus.py", "--preset", "cpu")
    out = offline / "pretrain"
    train = [r["text"] for f in sorted((out / "train").glob("*.jsonl")) for r in read_jsonl(f)]
    val = [r["text"] for f in sorted((out / "val").glob("*.jsonl")) for r in read_jsonl(f)]
    assert len(train) > 3000 and 10 <= len(val) < len(train) // 20
    assert not set(train) & set(val), "a document is on both sides of the split"
    assert len(set(train)) == len(train) and all(t.strip() for t in train + val)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["docs"] == len(train) and meta["val"]["chars"] == sum(map(len, val))
    assert set(meta["sources"]) >= {"austen", "tinystories_valid", "tinystories_train"}
    # a rerun with the same settings leaves the shards alone; gpu offline falls back to this corpus
    stamp = (out / "train" / "shard_00000.jsonl").stat().st_mtime_ns
    run_script(monkeypatch, "corpus.py", "--preset", "gpu")
    assert "the gpu preset uses the cpu corpus instead" in capsys.readouterr().err
    assert (out / "train" / "shard_00000.jsonl").stat().st_mtime_ns == stamp


@needs_mirror
def test_corpus_smoke_is_small(offline, monkeypatch):
    run_script(monkeypatch, "corpus.py", "--preset", "smoke", "--shard-mb", "0.1")
    out = offline / "pretrain"
    files = sorted((out / "train").glob("*.jsonl"))
    assert len(files) > 1, "--shard-mb must start new shards"
    train = [r["text"] for f in files for r in read_jsonl(f)]
    val = [r["text"] for f in (out / "val").glob("*.jsonl") for r in read_jsonl(f)]
    assert 100_000 < sum(map(len, train)) < 1_000_000 and val and not set(train) & set(val)


def test_tinystories_readers(tmp_path):
    eot = tmp_path / "eot.txt"
    eot.write_text("One story.\nTwo lines.\n<|endoftext|>\nSecond story.<|endoftext|>\n")
    assert list(corpus.tinystories_docs(eot)) == ["One story.\nTwo lines.", "Second story."]
    blank = tmp_path / "blank.txt"
    blank.write_text("Once upon a time, a cat.\r\n\r\nThe cat slept.\n\nOnce there was a dog.\n\nOne day it ran.\n")
    assert list(corpus.tinystories_docs(blank)) == ["Once upon a time, a cat.\n\nThe cat slept.",
                                                    "Once there was a dog.\n\nOne day it ran."]


# -----------------------------------------------------------------------------
# chat_data.py: conversion


def gsm8k_answer(parts):
    """The inverse of chat_data.gsm8k_parts: the original answer text."""
    wrap = {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}
    return "".join(wrap[p["type"]].format(p["text"]) for p in parts)


@needs_mirror
def test_gsm8k_parts_round_trip_on_the_mirror():
    for split in ("train", "test"):
        rows = read_jsonl(MIRROR / "gsm8k" / "grade_school_math" / "data" / f"{split}.jsonl")
        for row in rows:
            parts = chat_data.gsm8k_parts(row["answer"])
            assert gsm8k_answer(parts) == row["answer"]
            types = [p["type"] for p in parts]
            assert types.count("python") == types.count("python_output") == row["answer"].count("<<")
            assert all(types[i + 1] == "python_output" for i, t in enumerate(types) if t == "python")
            assert parts[-1]["type"] == "text" and "#### " in parts[-1]["text"]
    assert chat_data.gsm8k_parts("a <<2*3=6>>6\n#### 6")[1:3] == [
        {"type": "python", "text": "2*3"}, {"type": "python_output", "text": "6"}]


def test_mmlu_reads_both_csv_dialects(tmp_path):
    rows = [["What is 1+1, roughly?", "1", "2", "3, or more", "4"], ["Pick B", "a", "b", "c", "d"]]
    mirror_csv, tar_csv = tmp_path / "x_dev.csv", tmp_path / "x_dev_orig.csv"
    with open(mirror_csv, "w", newline="") as f:
        csv.writer(f).writerows([["question", "choice0", "choice1", "choice2", "choice3", "answer"]] +
                                [r + [str(i)] for r, i in zip(rows, (1, 1))])
    with open(tar_csv, "w", newline="") as f:
        csv.writer(f).writerows([r + [letter] for r, letter in zip(rows, "BB")])
    a, b = chat_data.read_mmlu_csv(mirror_csv), chat_data.read_mmlu_csv(tar_csv)
    assert a == b == [{"question": rows[0][0], "choices": rows[0][1:], "gold": 1},
                      {"question": "Pick B", "choices": ["a", "b", "c", "d"], "gold": 1}]
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a,b,c,d,A\nq,a,b,c,d,Z\n")
    with pytest.raises(UserError, match="bad.csv:2"):
        chat_data.read_mmlu_csv(bad)
    assert len(chat_data.read_mmlu_csv(bad, skip_bad=True)) == 1  # auxiliary_train: skip and count


def test_bad_input_lines_stop_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        list(corpus.iter_documents(bad))  # the reader of .jsonl sources (tokenizer.py's)
    with pytest.raises(UserError, match="bad.jsonl:2"):
        chat_data.read_jsonl(bad)


def test_check_rejects_malformed_conversations():
    ok = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}
    assert chat_data.check(ok) is None
    bad = [{}, {"messages": []},
           {"messages": [{"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
           {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                         {"role": "assistant", "content": "b"}]},
           {"messages": [{"role": "user", "content": "a"},
                         {"role": "assistant", "content": [{"type": "code", "text": "1"}]}]},
           {"messages": [{"role": "user", "content": "a"}]}]
    assert all(chat_data.check(c) for c in bad)


def tool_call(reply):
    """(the python call, its output) of an assistant reply with one tool call."""
    return tuple(next(p["text"] for p in reply if p["type"] == t) for t in ("python", "python_output"))


def test_spelling_tasks_are_correct_and_deterministic():
    words = ["strawberry", "apple", "banana", "rhythm", "mississippi"]
    convs = chat_data.spelling_tasks(words, 300, seed=0)
    assert convs == chat_data.spelling_tasks(words, 300, seed=0)
    kinds = set()
    for conv in convs:
        assert chat_data.check(conv) is None
        user, reply = conv["messages"][0]["content"], conv["messages"][1]["content"]
        call, out = tool_call(reply)
        assert use_calculator(call) == out  # the tool, as generation runs it, gives what the reply shows
        if m := re.fullmatch(r"'( ?)(\w+)'\[::-1\]|'-'\.join\('( ?)(\w+)'\)", call):  # a-p-p-l-e, or elppa
            word, space = m[2] or m[4], m[1] if m[2] else m[3]
            assert word in words and word in user and ("backward" in user or "Reverse" in user) == bool(m[2])
            assert out == (word[::-1] if m[2] else "-".join(word)) and reply[-1] == {"type": "python_output",
                                                                                     "text": out}
            assert (f"'{word}'" in user or f'"{word}"' in user) == (space == "")  # the question's token, quoted or not
            kinds.add("backward" if m[2] else "spell")
            continue
        word, c = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", call).groups()
        n = int(out)
        assert n == word.count(c) and word in user and c in user
        assert f"appears {n} time" in reply[-1]["text"]
        assert n == 0 or f"({n})" in reply[0]["text"]
        kinds.add("count0" if n == 0 else "count")
    assert kinds == {"spell", "backward", "count", "count0"}


def test_arithmetic_tasks_call_the_calculator_and_state_its_result():
    convs = chat_data.arithmetic_tasks(2000, seed=0)
    assert convs == chat_data.arithmetic_tasks(2000, seed=0)
    assert convs != chat_data.arithmetic_tasks(2000, seed=1)
    ops, problems = set(), 0
    for conv in convs:
        assert chat_data.check(conv) is None
        user, reply = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert [p["type"] for p in reply] == ["text", "python", "python_output", "text"]
        call, out = tool_call(reply)
        a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", call).groups()
        assert use_calculator(call) == out and reply[-1]["text"] == f"The answer is {out}."
        assert int(out) >= 0 and len(a) <= 3 and len(b) <= 3  # never negative, exact, operands of 1-3 digits
        assert a in user and b in user
        ops.add(op)
        problems += any(name in user for name, _ in chat_data.NAMES)
    assert ops == set("+-*/") and 0.2 < problems / len(convs) < 0.4  # a word problem 30% of the time
    users = [c["messages"][0]["content"] for c in convs]
    for phrase in ("What is 1", " times ", " divided by ", "*", "Lily had "):  # words and symbols
        assert any(phrase in u for u in users), phrase


def test_identity_tasks_name_flatchat_in_many_phrasings():
    convs = chat_data.identity_tasks(1000, seed=0)
    assert convs == chat_data.identity_tasks(1000, seed=0)
    assert all(chat_data.check(c) is None and "flatchat" in c["messages"][1]["content"] for c in convs)
    assert all(len(c["messages"][1]["content"]) < 150 for c in convs)  # short answers
    assert len({c["messages"][0]["content"] for c in convs}) > 200


def story_topic(user):
    """The training topic a story request asks for."""
    return next(t for t in chat_data.STORY_TOPICS for ask in chat_data.STORY_ASKS if ask.format(t=t) == user)


def test_story_tasks_pair_topics_with_real_stories_about_them():
    texts = (MIRROR / "pretrain/tinystories/TinyStories-valid.head.txt").read_text().split("\n\n")
    stories = [t for t in texts if len(t) <= 700]
    convs = chat_data.story_tasks(stories, chat_data.STORY_TOPICS, 3, seed=0)
    assert convs and convs == chat_data.story_tasks(stories, chat_data.STORY_TOPICS, 3, seed=0)
    for conv in convs:
        user, reply = conv["messages"][0]["content"], conv["messages"][1]["content"]
        topic = story_topic(user)
        intro, story = reply.split("\n\n", 1)  # the reply names the topic, then tells a real story about it
        mentions = [m.start() for m in re.finditer(rf"\b{topic.split()[-1]}(?:s|es)?\b", story, re.I)]
        assert intro == f"Here is a story about {topic}."
        assert story in stories and (len(mentions) >= 2 or mentions and mentions[0] < 250)


# -----------------------------------------------------------------------------
# The tinychat benchmark (scored by evaluate.py): deterministic, and nothing of it in any training set


def test_tinychat_benchmark_is_deterministic_and_answers_its_prompts():
    rows = chat_data.tinychat_items()
    assert rows == chat_data.tinychat_items() and rows != chat_data.tinychat_items(seed=1)
    counts = {c: sum(r["category"] == c for r in rows) for c in chat_data.TINYCHAT}
    assert counts == chat_data.TINYCHAT and sum(counts.values()) == 200
    assert len({chat_data.first_user(r) for r in rows}) == 200  # distinct prompts
    spelled = []
    for r in rows:
        prompt, answer = chat_data.first_user(r), r["answer"]
        if r["category"] == "story":
            assert re.search(rf"\b{answer}\b", prompt)
            assert answer in {t.split()[-1] for t in chat_data.EVAL_STORY_TOPICS}
        elif r["category"] == "spelling":
            word = next(w for w in chat_data.EVAL_SPELL_WORDS if re.search(rf"\b{w}\b", prompt))
            assert answer in (word[::-1], "-".join(word))
            spelled.append(word)
        elif r["category"] == "identity":
            assert answer == "flatchat"
        else:
            assert answer.isdigit()
    assert sorted(spelled) == sorted(chat_data.EVAL_SPELL_WORDS)  # each word once, forwards or backwards
    assert any("Zoe" in chat_data.first_user(r) for r in rows)  # word problems among the arithmetic


def test_tinychat_benchmark_is_disjoint_from_every_training_generator():
    C = chat_data
    keys = lambda topics: {t.split()[-1] for t in topics}
    flat = lambda templates: [t for ts in templates.values() for t in ts]
    pairs = [(C.HELLOS, C.EVAL_HELLOS), (C.WHO_ASKS + C.CAN_ASKS, C.EVAL_WHO_ASKS),
             (C.SPELL_ASKS + C.BACKWARD_ASKS + C.COUNT_ASKS, C.EVAL_SPELL_ASKS + C.EVAL_BACKWARD_ASKS),
             (C.STORY_ASKS, C.EVAL_STORY_ASKS), (C.NAMES, C.EVAL_NAMES), (C.THINGS, C.EVAL_THINGS),
             (keys(C.STORY_TOPICS), keys(C.EVAL_STORY_TOPICS)),
             (flat(C.ARITH_ASKS), flat(C.EVAL_ARITH_ASKS)),
             (flat(C.WORD_PROBLEMS), flat(C.EVAL_WORD_PROBLEMS))]
    for train, held in pairs:
        assert not set(train) & set(held), set(train) & set(held)
    benchmark = {chat_data.first_user(r) for r in chat_data.tinychat_items()}
    words = (MIRROR / "words_alpha.txt").read_text().split()
    train = chat_data.identity_tasks(5000, 0) + chat_data.arithmetic_tasks(20000, 0)
    train += chat_data.read_jsonl(ROOT / "data" / "identity.jsonl")
    train += chat_data.spelling_tasks(words + chat_data.EVAL_SPELL_WORDS, 20000, 0)
    texts = (MIRROR / "pretrain/tinystories/TinyStories-valid.head.txt").read_text().split("\n\n")
    train += chat_data.story_tasks(texts, chat_data.STORY_TOPICS, 50, 0)
    assert not benchmark & {chat_data.first_user(c) for c in train}  # even with the benchmark's words spelled


def test_spelling_never_trains_the_benchmark_words(offline, monkeypatch):
    others = ["ocean", "pillow", "meadow"]
    monkeypatch.setattr(chat_data, "story_words", lambda: chat_data.EVAL_SPELL_WORDS + others)
    chat_data.run_spelling(argparse.Namespace(num_spelling=200, seed=0))
    convs = read_jsonl(offline / "chat" / "spelling.jsonl") + read_jsonl(offline / "chat/val/spelling.jsonl")
    calls = [tool_call(c["messages"][1]["content"])[0] for c in convs]
    assert {re.findall(r"' ?([a-z]+)'", call)[0] for call in calls} == set(others)


@needs_mirror
def test_tinychat_sets_offline(offline, monkeypatch, capsys):
    run_script(monkeypatch, "chat_data.py", "--only", "tinychat,identity,spelling,arithmetic,stories",
               "--num-spelling", "300", "--num-arithmetic", "300", "--num-identity", "300")
    out = capsys.readouterr().out
    for name in ("identity", "spelling", "arithmetic", "stories"):
        assert re.search(rf"chat/{name}: [\d,]+ train, \d+ val", out), name
    rows = read_jsonl(offline / "eval" / "tinychat.jsonl")
    assert {r["category"] for r in rows} == set(chat_data.TINYCHAT) and "eval/tinychat: " in out
    assert (offline / "raw" / "words" / "words_alpha.txt").exists()  # where evaluate.py reads the word list
    benchmark = {chat_data.first_user(r) for r in rows}
    for path in list((offline / "chat").glob("*.jsonl")) + list((offline / "chat" / "val").glob("*.jsonl")):
        convs = read_jsonl(path)
        assert convs and all(chat_data.check(c) is None for c in convs), path
        assert not benchmark & {chat_data.first_user(c) for c in convs}, path
    identity = read_jsonl(offline / "chat/identity.jsonl") + read_jsonl(offline / "chat/val/identity.jsonl")
    handwritten = read_jsonl(ROOT / "data" / "identity.jsonl")
    assert len(identity) > len(handwritten) and all(c in identity for c in handwritten)
    for conv in read_jsonl(offline / "chat" / "stories.jsonl"):
        story = conv["messages"][1]["content"].split("\n\n", 1)[1]  # (after "Here is a story about ...")
        assert re.search(rf"\b{story_topic(chat_data.first_user(conv)).split()[-1]}", story, re.I)
        assert len(story) <= chat_data.STORY_CHARS


# -----------------------------------------------------------------------------
# chat_data.py: the whole offline run


@needs_full_mirror  # it checks the sizes of the whole datasets
def test_chat_data_offline_run_writes_everything_without_leaks(offline, monkeypatch, capsys):
    run_script(monkeypatch, "chat_data.py", "--num-spelling", "500")
    err = capsys.readouterr().err
    for name in ("smoltalk", "arc_easy_train", "mmlu_aux_train"):
        assert f"skipping chat/{name}" in err
    ev = offline / "eval"
    sizes = {n: len(read_jsonl(ev / f"{n}.jsonl")) for n in
             ("gsm8k_test", "mmlu_test", "arc_easy_test", "arc_challenge_test", "humaneval")}
    assert sizes == {"gsm8k_test": 1319, "mmlu_test": 14042, "arc_easy_test": 2376,
                     "arc_challenge_test": 1172, "humaneval": 164}
    assert (ev / "core" / "core.yaml").exists() and (ev / "core/eval_data/world_knowledge/arc_easy.jsonl").exists()
    row = read_jsonl(ev / "gsm8k_test.jsonl")[0]
    assert row["answer"].isdigit() and chat_data.check({"messages": row["messages"]}) is None

    # every chat file is valid; no prompt of GSM8K/MMLU/ARC test (rebuilt here from the mirror) is in it
    held = {r["question"] for r in read_jsonl(MIRROR / "gsm8k/grade_school_math/data/test.jsonl")}
    for path in (MIRROR / "mmlu/data/test").glob("*.csv"):
        held |= {chat_data.render_mc(r["question"], r["choices"]) for r in chat_data.read_mmlu_csv(path)}
    for subset in ("easy", "challenge"):
        for r in read_jsonl(MIRROR / f"eval_bundle/eval_data/world_knowledge/arc_{subset}.jsonl"):
            held.add(chat_data.render_mc(r["query"].removeprefix("Question: "), r["choices"]))
    tinychat = {chat_data.first_user(r) for r in read_jsonl(ev / "tinychat.jsonl")}
    assert len(tinychat) == 200
    held |= tinychat
    names = {p.stem for p in (offline / "chat").glob("*.jsonl")}
    assert names == {"gsm8k_train", "mmlu_dev", "dolly", "dolly_short", "identity", "spelling", "arithmetic",
                     "stories"}
    for path in list((offline / "chat").glob("*.jsonl")) + list((offline / "chat" / "val").glob("*.jsonl")):
        convs = read_jsonl(path)
        assert convs and all(chat_data.check(c) is None for c in convs), path
        assert not {chat_data.first_user(c).strip() for c in convs} & held, f"eval prompt leaked into {path}"
    for name in names:  # train and held-out val never share a conversation
        train, val = (read_jsonl(offline / "chat" / d / f"{name}.jsonl") for d in (".", "val"))
        assert val and not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}
    dolly = read_jsonl(offline / "chat" / "dolly.jsonl")
    assert not any("### Instruction" in c["messages"][0]["content"] for c in dolly)
    for split in (".", "val"):  # dolly_short: dolly's pairs that fit the cpu preset's context, split as dolly
        short = read_jsonl(offline / "chat" / split / "dolly_short.jsonl")
        assert short and all(c in read_jsonl(offline / "chat" / split / "dolly.jsonl") for c in short)
        limit = chat_data.DOLLY_SHORT_CHARS
        assert all(len(c["messages"][0]["content"] + c["messages"][1]["content"]) <= limit for c in short)
    assert len(read_jsonl(offline / "chat" / "stories.jsonl")) > 400
    assert "\r" not in (offline / "chat" / "spelling.jsonl").read_text()


# -----------------------------------------------------------------------------
# common.fetch against a loopback HTTP server


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv, rng = self.server, self.headers.get("Range")
        srv.ranges.append(rng)
        if srv.fail > 0:
            srv.fail -= 1
            self.send_error(503)
            return
        blob = srv.files.get(self.path)
        if blob is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        body = blob[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("FLATCHAT_DATA_MIRROR", raising=False)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.blob, srv.ranges, srv.fail, srv.waits = os.urandom(300_000), [], 0, []
    srv.files = {"/file.bin": srv.blob}  # path -> bytes; tests add more
    monkeypatch.setattr(common.time, "sleep", srv.waits.append)  # record the backoff instead of waiting
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.url = srv.base + "/file.bin"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_fetch_resumes_a_partial_file_with_range(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(server.blob[:100_000])
    sha = hashlib.sha256(server.blob).hexdigest()
    assert common.fetch(server.url, dest, sha256=sha, size=len(server.blob)) == dest
    assert dest.read_bytes() == server.blob and not (tmp_path / "file.bin.part").exists()
    assert server.ranges == ["bytes=100000-"]
    common.fetch(server.url, dest, sha256=sha, size=len(server.blob))  # complete: no second request
    assert server.ranges == ["bytes=100000-"]


def test_fetch_detects_checksum_mismatch_and_retries(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(UserError, match="sha256 mismatch"):
        common.fetch(server.url, dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / "file.bin.part").exists()
    with pytest.raises(UserError, match="size mismatch"):
        common.fetch(server.url, dest, size=123)
    server.fail = 2  # two 503s, then success: exponential backoff 1 s, 2 s
    common.fetch(server.url, dest)
    assert dest.read_bytes() == server.blob and server.waits == [1, 2]
    with pytest.raises(UserError, match="404"):  # a missing file fails at once, without retries
        common.fetch(server.base + "/missing.bin", tmp_path / "missing.bin")
    assert server.waits == [1, 2]


@needs_mirror
def test_fetch_offline_copies_or_skips(offline, capsys):
    dest = offline / "raw" / "words.txt"
    assert common.fetch("https://example.invalid/w.txt", dest, mirror_path="words_alpha.txt") == dest
    assert dest.read_bytes() == (MIRROR / "words_alpha.txt").read_bytes()
    assert common.fetch("https://example.invalid/x.zip", offline / "x.zip") is None
    assert common.fetch("https://example.invalid/y.zip", offline / "y.zip", mirror_path="nope/y.zip") is None
    assert "skipping x.zip: not in the mirror (online only)" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The online code paths, with the canonical URLs pointed at the loopback server and tiny fake files


def zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_online_paths_against_a_local_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    F, base = server.files, server.base
    gsm = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
           for i in range(30)]
    F["/gsm/train.jsonl"], F["/gsm/test.jsonl"] = jsonl_bytes(gsm[:25]), jsonl_bytes(gsm[25:])
    mmlu_row = lambda i: f'"Question {i}, with a comma?",a,b,c,d,{"ABCD"[i % 4]}\n'.encode()
    F["/mmlu.tar"] = tar_bytes({"data/dev/x_dev.csv": mmlu_row(1) + mmlu_row(2), "data/test/x_test.csv": mmlu_row(3),
                                "data/auxiliary_train/race.csv": b"".join(mmlu_row(i) for i in range(3, 40))})
    F["/bundle.zip"] = zip_bytes({"eval_bundle/core.yaml": "icl_tasks: []\n", "eval_bundle/eval_meta_data.csv": "a,b\n",
                                  **{f"eval_bundle/eval_data/world_knowledge/arc_{s}.jsonl":
                                     jsonl_bytes([{"query": "Question: ARC question 1?", "choices": list("wxy"), "gold": 2}])
                                     for s in ("easy", "challenge")}})
    arc_raw = lambda i: {"id": str(i), "question": {"stem": f"ARC question {i}?", "choices": [
        {"text": t, "label": str(k + 1)} for k, t in enumerate("wxy")]}, "answerKey": "3"}
    splits = {"Train": range(1, 6), "Dev": [1, 6, 7, 8], "Test": [1]}  # dev repeats the test question 1
    F["/arc.zip"] = zip_bytes({f"ARC-V1-Feb2018-2/ARC-{n}/ARC-{n}-{s}.jsonl": jsonl_bytes([arc_raw(i) for i in ids])
                               for n in ("Easy", "Challenge") for s, ids in splits.items()})
    F["/he.jsonl.gz"] = gzip.compress(jsonl_bytes([{"task_id": "t/0", "prompt": "p", "canonical_solution": "s",
                                                    "test": "t", "entry_point": "f", "extra": 1}]))
    F["/words.txt"] = b"apple\r\nbanana\r\ncherry\r\n"
    F["/ts/valid.txt"] = b"Once upon a time, a toy bear sat on a bed.\n<|endoftext|>\nThe king had a hat.\n"
    smol = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "hello"}]} for i in range(23)]
    smol.append({"messages": [{"role": "assistant", "content": "out of order"}]})
    F["/smol/train.parquet"], F["/smol/test.parquet"] = parquet_bytes(smol[3:]), parquet_bytes(smol[:3])
    template = "Below is an instruction.\n\n### Instruction:\nSay {}\n\n### Response:\n"
    F["/dolly.parquet"] = parquet_bytes([{"prompt": template.format(i), "response": f"{i}"} for i in range(20)])
    F["/api/HuggingFaceTB/smol-smoltalk/train"] = json.dumps([base + "/smol/train.parquet"]).encode()
    F["/api/HuggingFaceTB/smol-smoltalk/test"] = json.dumps([base + "/smol/test.parquet"]).encode()
    F["/api/mosaicml/dolly_hhrlhf/train"] = json.dumps([{"url": base + "/dolly.parquet"}]).encode()
    for name, path in dict(GSM8K="/gsm/{}.jsonl", MMLU="/mmlu.tar", CORE="/bundle.zip", ARC="/arc.zip",
                           HUMANEVAL="/he.jsonl.gz", WORDS="/words.txt", HF_API="/api/{}/{}",
                           TINYSTORIES="/ts/{}.txt").items():
        monkeypatch.setattr(chat_data, name, base + path)

    args = argparse.Namespace(num_spelling=40, num_arithmetic=40, num_identity=40, seed=0)
    for step in chat_data.STEPS.values():
        step(args)
    data = tmp_path / "data"
    chat = {p.stem: read_jsonl(p) for p in (data / "chat").glob("*.jsonl")}
    assert set(chat) == {"gsm8k_train", "mmlu_dev", "mmlu_aux_train", "arc_easy_train", "arc_challenge_train",
                         "dolly", "dolly_short", "identity", "spelling", "arithmetic", "stories", "smoltalk"}
    stories = chat["stories"] + read_jsonl(data / "chat" / "val" / "stories.jsonl")
    stories = {c["messages"][1]["content"].split("\n\n", 1)[1] for c in stories}
    assert stories == {"Once upon a time, a toy bear sat on a bed.", "The king had a hat."}  # the valid file
    assert len(read_jsonl(data / "eval" / "tinychat.jsonl")) > 100
    assert read_jsonl(data / "eval" / "mmlu_test.jsonl") == [{"question": "Question 3, with a comma?",
                                                              "choices": list("abcd"), "gold": 3, "subject": "x"}]
    assert read_jsonl(data / "eval" / "humaneval.jsonl")[0] == {
        "task_id": "t/0", "prompt": "p", "canonical_solution": "s", "test": "t", "entry_point": "f"}
    assert len(read_jsonl(data / "chat" / "val" / "smoltalk.jsonl")) == 3 and len(chat["smoltalk"]) == 20
    assert chat["dolly"][0]["messages"][0]["content"].startswith("Say ")
    # ARC test question 1 and MMLU test question 3 (also in aux train) never reach the training files
    val = [read_jsonl(p) for p in (data / "chat" / "val").glob("*.jsonl")]
    users = {chat_data.first_user(c) for rows in list(chat.values()) + val for c in rows}
    assert chat_data.render_mc("ARC question 1?", ["w", "x", "y"]) not in users
    assert chat_data.render_mc("Question 3, with a comma?", list("abcd")) not in users
    assert chat_data.render_mc("ARC question 2?", ["w", "x", "y"]) in users
    assert chat["arc_easy_train"][0]["messages"][1]["content"] == "C"
    assert len(read_jsonl(data / "chat" / "val" / "arc_easy_train.jsonl")) == 3  # dev minus the test question
    assert (data / "eval" / "core" / "eval_data" / "world_knowledge" / "arc_easy.jsonl").exists()


def test_corpus_online_paths(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    stories = [f"Story number {i}. The end." for i in range(300)]
    server.files["/ts/train.txt"] = "\n<|endoftext|>\n".join(stories[:250]).encode()
    server.files["/ts/valid.txt"] = "\n<|endoftext|>\n".join(stories[250:] + stories[:5]).encode()  # 5 repeats
    for i in (0, 1, corpus.CLIMBMIX_VAL):
        server.files[f"/climb/shard_{i:05d}.parquet"] = parquet_bytes([{"text": f"doc {i} {j}"} for j in range(7)])
    monkeypatch.setattr(corpus, "TINYSTORIES", server.base + "/ts/{}.txt")
    monkeypatch.setattr(corpus, "CLIMBMIX", server.base + "/climb/shard_{:05d}.parquet")

    out = tmp_path / "data" / "pretrain"
    meta = corpus.build_jsonl(corpus.cpu_sources(tmp_path / "raw", -1), out, 0.05, 50, {})
    assert meta["duplicates_dropped"] == 5 and meta["train"]["docs"] + meta["val"]["docs"] == 300
    meta = corpus.fetch_climbmix(out / "gpu", 2)
    assert meta["train"] == dict(docs=14, bytes=meta["train"]["bytes"], shards=2) and meta["val"]["docs"] == 7
    assert (out / "gpu" / "val" / f"shard_{corpus.CLIMBMIX_VAL:05d}.parquet").exists()
    assert corpus.fetch_climbmix(out / "gpu", 1)["train"]["shards"] == 1  # fewer shards: the extra one goes
