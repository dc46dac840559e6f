"""
Cut tests/fixtures/mirror/ from the offline data mirror: a few hundred KB of the same real data, laid
out like the mirror (see ../shared/data/README.md), so that a fresh clone's tests need neither the
mirror nor the network. SOURCES.md beside the data records where each file came from (path and sha256
of the source), what was kept, and its licence. Rerun it when the mirror changes:

    python tests/make_fixtures.py --mirror ../shared/data
"""

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parent / "fixtures" / "mirror"
LICENCES = {"pretrain/tinystories": "CDLA-Sharing-1.0", "pretrain/offline-prose": "public domain / PSF-2.0 / PostgreSQL",
            "gsm8k": "MIT", "mmlu": "MIT", "human-eval": "MIT", "sft": "CC BY-SA 3.0 / MIT", "words_alpha": "Unlicense",
            "eval_bundle/eval_data/world_knowledge/arc": "CC BY-SA 4.0", "eval_bundle": "per task: EVAL_GAUNTLET.md",
            "test_fixtures": "as their sources"}
MMLU_SUBJECTS = ["anatomy", "abstract_algebra", "astronomy", "high_school_geography", "philosophy"]
sources = []


def keep(rel, data, what):
    """Write OUT/rel and note its source (the mirror file of the same path) and what was kept."""
    (OUT / rel).parent.mkdir(parents=True, exist_ok=True)
    (OUT / rel).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    src = MIRROR / rel
    licence = next(v for k, v in sorted(LICENCES.items(), key=lambda kv: -len(kv[0])) if rel.startswith(k))
    sources.append(f"| `{rel}` | {hashlib.sha256(src.read_bytes()).hexdigest()[:16]} | {what} | {licence} |")


def first_lines(rel, n):
    with open(MIRROR / rel, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    keep(rel, "".join(lines), f"the first {n} lines")


def first_paragraphs(rel, max_chars):
    paras, n = [], 0
    for p in (MIRROR / rel).read_text(encoding="utf-8").split("\n\n"):
        if n + len(p) > max_chars:
            break
        paras.append(p)
        n += len(p) + 2
    keep(rel, "\n\n".join(paras) + "\n", f"the first {len(paras)} paragraphs ({n:,} chars)")


def first_docs(rel, docs, max_chars):
    with open(MIRROR / rel, encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(docs)]
    keep(rel, "".join(json.dumps({**r, "text": r["text"][:max_chars]}) + "\n" for r in rows),
         f"the first {docs} documents, each cut to {max_chars:,} chars")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Cut the test fixtures from the offline data mirror.")
    parser.add_argument("--mirror", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="the offline data mirror (../shared/data)")
    MIRROR = Path(parser.parse_args().mirror)
    shutil.rmtree(OUT, ignore_errors=True)
    first_paragraphs("pretrain/tinystories/TinyStories-train.head.txt", 60_000)
    first_paragraphs("pretrain/tinystories/TinyStories-valid.head.txt", 20_000)
    for name in ("austen", "python311_docs"):  # tests/conftest.py reads 20 documents of 4,000 chars of each
        first_docs(f"pretrain/offline-prose/{name}.jsonl", 22, 4_000)
    for name in ("world_english_bible", "postgresql15_docs", "shakespeare_sherlock"):
        first_docs(f"pretrain/offline-prose/{name}.jsonl", 4, 3_000)
    for split in ("train", "test"):
        first_lines(f"gsm8k/grade_school_math/data/{split}.jsonl", 60)
    for split, n in (("dev", 5), ("test", 30)):
        for subject in MMLU_SUBJECTS:
            first_lines(f"mmlu/data/{split}/{subject}_{split}.csv", n + 1)  # + the header row
    with gzip.open(MIRROR / "human-eval/data/HumanEval.jsonl.gz", "rt") as f:
        tasks = [next(f) for _ in range(10)]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:  # mtime 0: the same bytes on every run
        g.write("".join(tasks).encode())
    keep("human-eval/data/HumanEval.jsonl.gz", buf.getvalue(), "the first 10 tasks")
    first_lines("sft/dolly_hhrlhf_train_small.jsonl", 40)
    words = (MIRROR / "words_alpha.txt").read_text().splitlines()
    keep("words_alpha.txt", "\n".join(words[::100]) + "\n", "every 100th word")
    for name in ("core.yaml", "eval_meta_data.csv", "EVAL_GAUNTLET.md"):
        keep(f"eval_bundle/{name}", (MIRROR / "eval_bundle" / name).read_bytes(), "whole")
    for uri in re.findall(r"dataset_uri: (\S+)", (MIRROR / "eval_bundle/core.yaml").read_text()):
        if (MIRROR / "eval_bundle/eval_data" / uri).exists():  # 18 of the 22 tasks are in the mirror
            first_lines(f"eval_bundle/eval_data/{uri}", 12)
    for arc in ("arc_easy", "arc_challenge"):  # the chat tasks' ARC test sets: more items than CORE needs
        first_lines(f"eval_bundle/eval_data/world_knowledge/{arc}.jsonl", 40)
    for f in sorted((MIRROR / "test_fixtures").iterdir()):
        keep(f"test_fixtures/{f.name}", f.read_bytes(), "whole")
    rows = sorted(set(sources))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    (OUT / "SOURCES.md").write_text(
        "# tests/fixtures/mirror: where each file came from\n\nCut from the offline data mirror by "
        "`python tests/make_fixtures.py`; the layout is the mirror's, so `FLATCHAT_DATA_MIRROR` can point here. "
        f"{len(rows)} files, {total / 1e3:,.0f} KB. The canonical online sources are in the mirror's README.\n\n"
        "| file | sha256 of the source (16) | kept | licence |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"wrote {len(rows)} files, {total / 1e3:,.0f} KB, to {OUT}")
