"""
Tests of `python data/corpus.py --from PATH ...` (your own text instead of a preset): hermetic, a few seconds.

    python -m pytest -q tests/test_own_text.py

The fixture tests/fixtures/own_text (a few KB, see its SOURCES.md) mixes Chinese and English in .txt files
(paragraphs, <|endoftext|> separators) and a .jsonl. The scripts run as a user runs them, in subprocesses
with FLATCHAT_HOME = a temp dir.
"""
import hashlib
import json
import shutil
import sys

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "data"))
import corpus  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "own_text"
ARGS = ("--doc-chars", 450, "--val-frac", 0.25)  # tiny fixture: small documents, a val side big enough


def read_split(home, split):
    out = []
    for f in sorted((home / "data" / "pretrain" / split).glob("shard_*.jsonl")):
        out += [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines()]
    return out


def snapshot(home):
    """{relative path: bytes} of everything under home."""
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def paragraphs(path):
    return [p.strip("\n") for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


# -----------------------------------------------------------------------------
# .txt documents


def test_txt_documents_paragraphs_and_endoftext(tmp_path):
    text = "First paragraph,\ntwo lines.\n\n\u3000\u3000第二段。\n  \n\nThird one.\n\n\nFourth.\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    # whole paragraphs joined while they fit; indents (full-width spaces) stay; blank lines may hold spaces
    assert list(corpus.txt_docs(tmp_path / "p.txt", 40)) == [
        "First paragraph,\ntwo lines.\n\n\u3000\u3000第二段。", "Third one.\n\n\nFourth."]
    assert list(corpus.txt_docs(tmp_path / "p.txt", 1000)) == [text.strip("\n")]
    # <|endoftext|> anywhere in the file: documents are what lies between, whatever their size
    (tmp_path / "e.txt").write_text("one\n\ntwo\n<|endoftext|>\nthree<|endoftext|>\n\n", encoding="utf-8")
    assert list(corpus.txt_docs(tmp_path / "e.txt", 100)) == ["one\n\ntwo", "three"]


def test_txt_documents_cut_long_lines_without_spaces(tmp_path):
    line = "道可道，非常道；名可名，非常名。" * 40  # 640 characters, no space and no line end
    long_para = "\n".join(["第一行。" * 10] * 8)  # 8 lines of 40 characters, no blank line
    (tmp_path / "zh.txt").write_text(f"{line}\n\n{long_para}\n", encoding="utf-8")
    docs = list(corpus.txt_docs(tmp_path / "zh.txt", 100))
    assert all(len(d) <= 100 for d in docs)
    assert "".join(docs[:7]) == line  # cut at 100 characters, nothing lost
    assert docs[7:] == ["\n".join(["第一行。" * 10] * 2)] * 4  # a long paragraph: cut at line ends


# -----------------------------------------------------------------------------
# the whole build


def test_own_text_builds_a_corpus_from_a_mixed_folder(tmp_path):
    home = tmp_path / "home"
    proc = run_script("data/corpus.py", "--from", FIXTURE, *ARGS, home=home)
    assert "skipping 1 file(s) not .txt, .jsonl or .parquet" in proc.stderr  # SOURCES.md, said aloud
    train, val = read_split(home, "train"), read_split(home, "val")
    docs = train + val

    # the documents: every paragraph of the plain .txt files whole in one document of <= 450 characters,
    # the <|endoftext|> passages and the .jsonl texts exactly, Chinese included; the duplicate and "" dropped
    for name in ("daodejing.txt", "prose/harbour.txt", "prose/notes.txt"):
        for para in paragraphs(FIXTURE / name):
            assert sum(para in d for d in docs) == 1, para
    assert all(len(d) <= 450 for d in docs)
    analects = (FIXTURE / "analects.txt").read_text(encoding="utf-8").split("\n<|endoftext|>\n")
    with open(FIXTURE / "extra.jsonl", encoding="utf-8") as f:
        extra = [json.loads(line)["text"] for line in f]
    assert set(analects[:3]) | set(extra[:3]) | {extra[4]} <= set(docs)
    assert analects[2].startswith("子曰：“巧言令色，鲜矣仁！”\n\n曾子曰")  # one document, blank line and all
    assert len(docs) == len(set(docs)) and "" not in docs

    # the split: by the sha256 of each document, as for the presets
    for doc in docs:
        h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")
        assert (doc in val) == (h < 0.25 * 2**64)
    assert train and val

    meta = json.loads((home / "data" / "pretrain" / "meta.json").read_text())
    assert meta["config"]["paths"] == [str(FIXTURE)] and meta["config"]["files"] == 5
    assert meta["sources"] == {str(FIXTURE): len(docs)} and meta["duplicates_dropped"] == 1
    assert meta["train"]["docs"] == len(train) and meta["val"]["chars"] == sum(map(len, val))

    # a rerun with the same inputs and settings skips; the same inputs elsewhere give the same bytes
    before = snapshot(home)
    proc = run_script("data/corpus.py", "--from", FIXTURE, *ARGS, home=home)
    assert "already built with these settings: nothing to do" in proc.stderr and snapshot(home) == before
    run_script("data/corpus.py", "--from", FIXTURE, *ARGS, home=tmp_path / "again")
    assert snapshot(tmp_path / "again") == before

    # an edited input, or other settings, rebuild
    mine = tmp_path / "mine"
    shutil.copytree(FIXTURE, mine)
    run_script("data/corpus.py", "--from", mine, *ARGS, home=home)
    with open(mine / "prose" / "notes.txt", "a", encoding="utf-8") as f:
        f.write("\nOne more paragraph, written later.\n")
    proc = run_script("data/corpus.py", "--from", mine, *ARGS, home=home)
    assert "nothing to do" not in proc.stderr
    docs = read_split(home, "train") + read_split(home, "val")
    assert any("One more paragraph, written later." in d for d in docs)
    proc = run_script("data/corpus.py", "--from", mine, *ARGS, "--doc-chars", 1000, home=home)
    assert "nothing to do" not in proc.stderr
    assert json.loads((home / "data" / "pretrain" / "meta.json").read_text())["config"]["doc_chars"] == 1000


def test_tokenizer_trains_on_own_text_and_round_trips_chinese(tmp_path):
    from tokenizer import Tokenizer

    home = tmp_path / "home"
    run_script("data/corpus.py", "--from", FIXTURE, *ARGS, home=home)
    run_script("tokenizer.py", "train", "--vocab-size", 320, "--num-proc", 1, home=home)
    tok = Tokenizer.load(home / "tokenizer")
    docs = read_split(home, "train") + read_split(home, "val")
    for doc in docs + ["道可道，非常道。", "上善若水 — the highest good is like water."]:
        assert tok.decode(tok.encode(doc)) == doc
    # it learned Chinese: some merges are whole characters of the fixture
    learned = {tok.decode([i]) for i in range(256, 320 - len(tok.special_tokens))}
    assert {c for c in learned if len(c) == 1 and "\u4e00" <= c <= "\u9fff"}


# -----------------------------------------------------------------------------
# bad input: one line naming the file (and line), exit code 2, nothing written


def make_bad(tmp_path, case):
    """(the path to give --from, what the error line must name) for one kind of bad input."""
    bad = tmp_path / "in"
    bad.mkdir()
    if case == "binary":
        (bad / "a.txt").write_bytes(b"text\nPK\x03\x04\x00\x00\x14\x00\n")
        return bad, f"{bad / 'a.txt'}:2:"
    if case == "not utf-8":
        text = "第一行\n\n道可道，非常道。\n".encode("utf-8") + "名可名。\n".encode("gbk")  # GBK on line 4
        (bad / "zh.txt").write_bytes(text)
        return bad, f"{bad / 'zh.txt'}:4:"
    if case == "empty folder":
        return bad, str(bad)
    if case == "no supported files":
        (bad / "notes.md").write_text("# notes\n")
        (bad / "sub").mkdir()
        (bad / "sub" / "picture.png").write_bytes(b"\x89PNG\r\n")
        return bad, str(bad)
    if case == "missing":
        return bad / "nope", str(bad / "nope")
    if case == "jsonl without text":
        (bad / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
        return bad / "x.jsonl", f"{bad / 'x.jsonl'}:2:"
    if case == "unknown extension":
        (bad / "book.docx").write_bytes(b"PK\x03\x04")
        return bad / "book.docx", str(bad / "book.docx")
    if case == "parquet without text":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["a", "b"]}), bad / "t.parquet")
        return bad, str(bad / "t.parquet")
    raise ValueError(case)


@pytest.mark.parametrize("case", ["binary", "not utf-8", "empty folder", "no supported files", "missing",
                                  "jsonl without text", "unknown extension", "parquet without text"])
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(tmp_path, case):
    path, named = make_bad(tmp_path, case)
    home = tmp_path / "home"
    proc = run_script("data/corpus.py", "--from", FIXTURE / "prose", path, home=home, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and named in lines[0]
    assert not home.exists(), "a bad input wrote something"


def test_bad_input_leaves_an_existing_corpus_alone(tmp_path):
    home = tmp_path / "home"
    run_script("data/corpus.py", "--from", FIXTURE, *ARGS, home=home)
    before = snapshot(home)
    path, named = make_bad(tmp_path, "not utf-8")  # found while reading, the last check of all
    proc = run_script("data/corpus.py", "--from", FIXTURE, path, *ARGS, home=home, check=False)
    assert proc.returncode == 2 and named in proc.stderr and snapshot(home) == before
