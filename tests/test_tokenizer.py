"""Tests of tokenizer.py: the trainer against a slow reference, round trips, tiktoken equality, the file
format, the chat format and the corpus readers.  Run: python -m pytest -q tests/test_tokenizer.py"""
import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import regex

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer as T  # noqa: E402
from tokenizer import UserError, Tokenizer  # noqa: E402

MIRROR = Path(os.environ.get("FLATCHAT_DATA_MIRROR") or ROOT.parent / "shared" / "data")
PROSE = MIRROR / "pretrain" / "offline-prose"
NO_TIKTOKEN = "tiktoken (the reference encoder) is a test dependency: pip install -r requirements.txt"


def mirror_sample(chars_per_file=40_000):
    """A few hundred KB of real text: the start of each offline-prose file and of TinyStories."""
    files = sorted(PROSE.glob("*.jsonl")) + sorted((MIRROR / "pretrain" / "tinystories").glob("*.txt"))
    if not files:
        pytest.skip(f"no data mirror at {MIRROR} (set FLATCHAT_DATA_MIRROR)")
    texts = []
    for f in files:
        n = 0
        for doc in T.iter_documents(f):
            texts.append(doc[:chars_per_file - n])
            n += len(texts[-1])
            if n >= chars_per_file:
                break
    return texts


@pytest.fixture(scope="module")
def sample():
    return mirror_sample()


@pytest.fixture(scope="module")
def tok(sample):
    return Tokenizer.train(sample, 1024)

# -----------------------------------------------------------------------------
# training: the fast trainer must give exactly the merges of this slow, obviously correct one


def reference_merges(texts, num_merges):
    """Count every pair in every chunk, merge the most frequent (ties: smallest pair) left to right,
    skip for good a pair whose bytes are already a token; repeat."""
    words = collections.Counter()
    for t in texts:
        for chunk in regex.findall(T.SPLIT_PATTERN, t):  # the `regex` package itself
            words[tuple(chunk.encode("utf-8"))] += 1
    vocab, merges, banned = [bytes([i]) for i in range(256)], [], set()
    while len(merges) < num_merges:
        stats = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                stats[pair] += n
        ranked = [(-n, pair) for pair, n in stats.items() if pair not in banned]
        if not ranked:
            break
        best = min(ranked)[1]
        if vocab[best[0]] + vocab[best[1]] in vocab:
            banned.add(best)
            continue
        merges.append(best)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        new = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(len(vocab) - 1)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) > 1:  # a single token has no pairs left: drop it
                new[tuple(out)] += n
        words = new
    return merges


def test_merges_equal_reference_on_mirror_text(sample):
    texts = sample
    ref = reference_merges(texts, 200)
    assert len(ref) == 200
    counts = T.count_chunks(texts, num_proc=1)
    for n in (1, 10, 100, 200):  # several vocab sizes: each is a prefix of the next, like the reference's
        assert T.bpe_merges(counts, n) == ref[:n]
    assert Tokenizer.train(texts, 256 + 9 + 100).merges == ref[:100]


@pytest.mark.parametrize("texts", [
    ["aaaa aaaaa aaaaaaaaaaa a aa aaa"],                       # runs: overlapping pairs merge left to right
    ["ab ab ba ba cd cd dc dc xy yx"],                          # ties everywhere: smallest pair first
    ["abab ababab bababa aabb abba baab", "abcabc bcabca cabcab"],
    ["héllo wörld 12345 1 22 333 ... !!! \r\n\r\n  \t x", "ÿÿÿ €€ 😀😀 😀"],
])
def test_merges_equal_reference_on_small_cases(texts):
    ref = reference_merges(texts, 60)
    assert T.bpe_merges(T.count_chunks(texts, num_proc=1), 60) == ref
    assert Tokenizer.train(texts, 256 + 9 + 500).merges == ref  # ran out of pairs: fewer merges


def test_training_is_deterministic_and_parallel_counting_agrees(sample):
    serial = T.count_chunks(sample, num_proc=1)
    assert T.count_chunks(sample, num_proc=2, batch_chars=20_000) == serial  # many batches over 2 processes
    assert Tokenizer.train(sample, 400).merges == Tokenizer.train(list(reversed(sample)), 400).merges


def test_vocab_size_counts_bytes_merges_and_specials(tok):
    assert tok.vocab_size == 1024 == 256 + len(tok.merges) + len(T.SPECIAL_TOKENS)
    assert len(tok.token_bytes) == tok.vocab_size
    with pytest.raises(ValueError):
        Tokenizer.train(["x"], 100)
    assert Tokenizer.train([], 300).merges == [] and Tokenizer.train(["a", "!", "7"], 300).merges == []
    assert Tokenizer.train(["ab"], 300).merges == [(97, 98)]

# -----------------------------------------------------------------------------
# splitting and encoding


def random_text(rng, n):
    pools = ["abcXYZ019 ,.'!?-_()[]{}", " \t\n\r\n\x0b\x0c\x00\x1c\x85\xa0\u2028\u3000", "'s'S'll'VE'rEſ",
             "éàüßøñçÆŒ", "日本語中文字한국어", "Ωπσ Быстрая ٠١٢٣ ١٢ ½ Ⅻ ²", "\u0301\u200b\u200d\ufeff\ufffd",
             "😀👍🏽🇫🇷𝔘𝟙𐍈"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_re_twin_splits_like_regex(sample):
    rng = random.Random(0)
    texts = sample + [random_text(rng, rng.randint(0, 80)) for _ in range(3000)]
    for t in texts:
        assert T.split(t) == regex.findall(T.SPLIT_PATTERN, t), repr(t)


def test_roundtrip_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(2000):
        s = random_text(rng, rng.randint(0, 60))
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == s.encode("utf-8")
        assert all(0 <= i < tok.vocab_size - len(T.SPECIAL_TOKENS) for i in ids)
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_lone_surrogates_become_replacement_characters(tok):
    # lone surrogates are not text (they cannot be written as UTF-8): encode() reads each as U+FFFD, as tiktoken does
    s = "a\ud800b \udfff\udfffc 😀"
    assert tok.decode(tok.encode(s)) == "a\ufffdb \ufffd\ufffdc 😀"
    assert tok.decode([0xff, 0xfe]) == "\ufffd\ufffd"  # invalid UTF-8 from the model decodes with replacement


def test_special_token_text_is_ordinary_text(tok):
    s = "<|bos|>hi<|assistant_end|><|python_start|> <|user_start|>"
    ids = tok.encode(s)
    first_special = tok.vocab_size - len(T.SPECIAL_TOKENS)
    assert ids and all(i < first_special for i in ids) and tok.decode(ids) == s
    assert [tok.encode_special(n) for n in T.SPECIAL_TOKENS] == list(range(first_special, tok.vocab_size))
    assert tok.bos_id == tok.encode_special("<|bos|>") == first_special
    assert tok.decode([tok.bos_id]) == "<|bos|>" and tok.token_bytes[tok.bos_id] == 0
    assert [tok.token_bytes[i] for i in tok.encode("ab")] == [len(tok.decode([i]).encode()) for i in tok.encode("ab")]
    with pytest.raises(KeyError):
        tok.encode_special("<|nope|>")


def test_cache_and_worker_processes_give_the_same_ids(tok, sample):
    fresh = Tokenizer(tok.merges)
    assert [fresh._bpe(c) for c in T.split(sample[0])] == [tok._cache[c] for c in T.split(sample[0])]
    assert [list(a) for a in tok.map("encode", sample[:6], num_proc=2)] == [tok.encode(t) for t in sample[:6]]
    convs = [{"messages": [{"role": "user", "content": t[:200]}, {"role": "assistant", "content": t[200:400]}]} for t in sample[:4]]
    for (ids, targets), conv in zip(tok.render_all(convs + convs[:1], 64, num_proc=2), convs + convs[:1]):
        want, mask = tok.render_conversation(conv, max_tokens=64)
        assert ids.tolist() == want and targets.tolist() == [t if m else -1 for t, m in zip(want[1:], mask[1:])]


def test_encode_follows_tiktoken_rules_on_odd_merges():
    # tokens named by their bytes: a chunk that is a token is that token, and any two adjacent tokens whose
    # bytes make a token merge (at that token's rank), even if no merge lists exactly that pair
    odd = Tokenizer([(98, 99), (97, 98), (99, 100), (257, 258), (257, 99)])  # bc ab cd abcd abc
    assert odd.encode("abcd") == [259]  # bpe alone would stop at a|bc|d
    assert odd.encode("abc") == [260] and odd.encode("xabc") == [120, 260]  # a+bc merges as abc
    assert odd.encode("xabcd") == [120, 259]  # x|a|bc|d -> x|abc|d -> x|abcd
    tiktoken = pytest.importorskip("tiktoken", reason=NO_TIKTOKEN)
    enc = tiktoken.Encoding("odd", pat_str=odd.pattern, special_tokens={},
                            mergeable_ranks={odd.decode_bytes([i]): i for i in range(261)})
    for s in ["abcd", "abc", "xabc", "xabcd", "abcdabcabbcd", "bcd dabc"]:
        assert odd.encode(s) == enc.encode_ordinary(s)


def test_ids_equal_tiktoken(tok, sample):
    tiktoken = pytest.importorskip("tiktoken", reason=NO_TIKTOKEN)
    ranks = {bytes(tok.decode_bytes([i])): i for i in range(256 + len(tok.merges))}
    enc = tiktoken.Encoding("flatchat-test", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(2)
    texts = sample + [random_text(rng, 200) for _ in range(300)] + ["\ud800x\udc00 y"]
    for t in texts:
        assert tok.encode(t) == enc.encode_ordinary(t)

# -----------------------------------------------------------------------------
# the file: JSON, atomic, loads back identical, malformed files give one clear line


def test_save_load_identity(tok, tmp_path, sample):
    path = tok.save(tmp_path / "tokenizer")
    assert path == tmp_path / "tokenizer" / "tokenizer.json" and os.listdir(path.parent) == ["tokenizer.json"]
    back = Tokenizer.load(tmp_path / "tokenizer")
    assert back.merges == tok.merges and back.pattern == tok.pattern and back.hash == tok.hash
    assert back.encode(sample[0]) == tok.encode(sample[0]) and back.token_bytes == tok.token_bytes
    d = json.loads(path.read_text())
    assert d["version"] == 1 and d["special_tokens"] == T.SPECIAL_TOKENS and len(d["merges"]) == len(tok.merges)
    assert Tokenizer(tok.merges[:-1]).hash != tok.hash


@pytest.mark.parametrize("content", [
    "{not json", "[]", '{"version": 2}', '{"version": 1, "pattern": "x", "special_tokens": []}',
    '{"version": 1, "pattern": "x", "special_tokens": [], "merges": [[0, 999]]}',
    '{"version": 1, "pattern": "(", "special_tokens": [], "merges": []}',
    '{"version": 1, "pattern": "x", "special_tokens": [], "merges": [[1, 2], [1, 2]]}',
])
def test_malformed_file_names_the_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(UserError, match=str(path).replace("\\", "\\\\")) as e:
        Tokenizer.load(path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="tokenizer.py train"):
        Tokenizer.load(tmp_path / "missing")

# -----------------------------------------------------------------------------
# the chat format


def golden(tok, *pieces):
    """ids, mask from (text or special name, mask bit) pieces."""
    ids, mask = [], []
    for piece, m in pieces:
        toks = [tok.encode_special(piece)] if piece in T.SPECIAL_TOKENS else tok.encode(piece)
        ids += toks
        mask += [m] * len(toks)
    return ids, mask


def test_render_multi_turn_with_system(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    assert tok.render_conversation(conv) == golden(
        tok, ("<|bos|>", 0), ("<|user_start|>", 0), ("Be brief.\n\nHi there", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("Hello!", 1), ("<|assistant_end|>", 1),
        ("<|user_start|>", 0), ("2+2?", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("4", 1), ("<|assistant_end|>", 1))


def test_render_tool_call_and_output(tok):
    conv = {"messages": [{"role": "user", "content": "What is 12*3?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"}, {"type": "text", "text": "It is 36."}]}]}
    ids, mask = tok.render_conversation(conv)
    assert (ids, mask) == golden(
        tok, ("<|bos|>", 0), ("<|user_start|>", 0), ("What is 12*3?", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("Let me compute. ", 1), ("<|python_start|>", 1), ("12*3", 1),
        ("<|python_end|>", 1), ("<|output_start|>", 0), ("36", 0), ("<|output_end|>", 0), ("It is 36.", 1),
        ("<|assistant_end|>", 1))
    assert tok.render_conversation(conv, max_tokens=7) == (ids[:7], mask[:7])  # truncation cuts both
    prompt = tok.render_for_completion(conv)
    assert prompt == ids[:ids.index(tok.encode_special("<|assistant_start|>")) + 1]
    assert tok.render_for_completion({"messages": conv["messages"][:1]}) == prompt


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "hi"}], "role 'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "system", "content": "s"}], "system message"),
    ([{"role": "user", "content": ["x"]}], "content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}],
     "content must be a string or a list"),
    ([], "at least one message"),
])
def test_render_rejects_bad_conversations(tok, messages, error):
    with pytest.raises(ValueError, match=regex.escape(error)):
        tok.render_conversation({"messages": messages})


def test_render_mc():
    assert T.render_mc("Which?", ["x", "y", "z", "w"]) == "Which?\n\nA. x\nB. y\nC. z\nD. w\n\nAnswer with the letter."


def test_read_conversations_names_bad_lines(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([good, "{oops", good, '{"messages": [{"role": "assistant", "content": "b"}]}',
                               '{"text": "no messages"}', ""]) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:2: invalid JSON .*\(fix the line or pass --skip-bad\)"):
        T.read_conversations(path)
    convs, bad = T.read_conversations(path, skip_bad=True)
    assert len(convs) == 2 and bad == 3
    path.write_text(good + "\n" + good.replace('"assistant"', '"user"') + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:2: message 1 has role 'user' where 'assistant'"):
        T.read_conversations(path)

# -----------------------------------------------------------------------------
# corpus readers and the command line


def test_iter_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("first story\nline 2\n<|endoftext|>\nsecond\n\nstill second\n<|endoftext|>\n")
    (tmp_path / "c.txt").write_text("para one\nmore\n\n\npara two\n")
    assert list(T.iter_documents(tmp_path / "a.jsonl")) == ["one", "two"]
    assert list(T.iter_documents(tmp_path / "b.txt")) == ["first story\nline 2", "second\n\nstill second"]
    assert list(T.iter_documents(tmp_path / "c.txt")) == ["para one\nmore", "para two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:2:"):
        list(T.iter_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="unknown corpus format"):
        list(T.iter_documents(tmp_path / "d.csv"))
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), tmp_path / "e.parquet", row_group_size=2)
    assert list(T.iter_documents(tmp_path / "e.parquet")) == ["x", "y", "z"]


def test_cli_train_and_missing_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    assert T.base_dir() == tmp_path
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *a], capture_output=True, text=True,
                                    timeout=60, env={**os.environ, "FLATCHAT_HOME": str(tmp_path)})
    r = run("train", "--vocab-size", "300")
    assert r.returncode != 0 and "python data/corpus.py" in r.stderr and "Traceback" not in r.stderr
    corpus = tmp_path / "data" / "pretrain" / "train"
    corpus.mkdir(parents=True)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"story {i} of the cat"}) + "\n" for i in range(50)))
    r = run("train", "--vocab-size", "300")
    assert r.returncode == 0, r.stderr
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == 300
    monkeypatch.delenv("FLATCHAT_HOME")
    assert T.base_dir() == Path.home() / ".cache" / "flatchat"


def test_ctrl_c_during_training_stops_in_one_line_and_keeps_the_saved_tokenizer(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the counting processes run:
    one line, exit 130, no process left behind, the tokenizer saved before untouched."""
    import signal
    import time
    home = tmp_path / "home"
    train = home / "data" / "pretrain" / "train"
    train.mkdir(parents=True)
    rng = random.Random(0)
    words = [f"w{i}{chr(97 + i % 26) * (i % 7)}" for i in range(5000)]
    with open(train / "shard_00000.jsonl", "w") as f:
        for _ in range(4000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
    saved = T.Tokenizer.train(["a small tokenizer from before"], 300).save(home / "tokenizer")
    before = saved.read_bytes()
    env = {**os.environ, "FLATCHAT_HOME": str(home)}
    p = subprocess.Popen([sys.executable, str(ROOT / "tokenizer.py"), "train", "--vocab-size",
                          "2000", "--doc-cap", "-1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout.readline().startswith("split + count")  # the counting processes are at work
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines() == [f"stopped by Ctrl-C: {home / 'tokenizer'} is unchanged"]
    assert saved.read_bytes() == before
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True).stdout == b""  # nothing left
