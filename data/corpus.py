"""
The pretraining corpus: <base>/data/pretrain/{train,val}/shard_00000.jsonl ..., one {"text": document} per line,
<= --shard-mb each, and meta.json (what was built: a rerun with the same settings skips).

    python data/corpus.py                               # cpu preset: TinyStories (downloads ~2.2 GB)
    python data/corpus.py --preset smoke                # a ~400 KB slice, for seconds-fast runs
    python data/corpus.py --preset gpu --num-shards 8   # ClimbMix parquet shards + the validation shard
    python data/corpus.py --mirror ../shared/data       # offline (or FLATCHAT_DATA_MIRROR=../shared/data)
    python data/corpus.py --from my_texts/ more.jsonl   # your own text instead of a preset

cpu: TinyStoriesV2-GPT4 train + valid; offline the mirror's heads of them + pretrain/offline-prose/*.jsonl.
smoke: the cpu sources, --max-chars of each. gpu: ClimbMix shards 0..N-1 into train/, the last one into val/,
kept as parquet (column "text"); the mirror has no ClimbMix, so offline gpu falls back to cpu and says so.
Identical documents are dropped; a document goes to val when the sha256 of its text falls in the first
--val-frac of the hash space: deterministic, independent of order, never on both sides.

--from PATH ...: files, or folders of them (recursively, sorted), of .txt (UTF-8), .jsonl (a "text" field
a line) or .parquet (a "text" column), in any language. A .txt file is split at <|endoftext|> if it has one,
else into whole paragraphs (blank-line separated) joined up to --doc-chars (1,000) characters, about a
TinyStories story: 200 KB of Chinese (~70k characters) still make ~70 documents to split by hash. A longer
paragraph is cut at a line end, a longer line at --doc-chars (no spaces needed: Chinese has none).
meta.json records the paths, the file count and a sha256 of the files: the same inputs and settings skip.
"""
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

from common import Parser, UserError, data_dir, fetch, iter_documents, mirror, parse_args, ranged, say

TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"
CLIMBMIX = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{:05d}.parquet"
CLIMBMIX_VAL = 6542  # the last shard is the validation shard
PROSE = ["austen", "world_english_bible", "python311_docs", "postgresql15_docs", "shakespeare_sherlock"]
EOT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")

# -----------------------------------------------------------------------------
# Readers: each yields documents (str) from one raw file

def text_lines(path):
    """The lines of a UTF-8 text file; a NUL byte (binary data) or bytes not UTF-8 stop at that line."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if b"\0" in line:
                raise UserError(f"{path}:{n}: NUL bytes: binary (or UTF-16) data; save it as UTF-8 text")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 (byte {e.start} of the line): save the file as UTF-8 "
                                "(Chinese in GBK: iconv -f GB18030 -t UTF-8)") from None
            yield text

def tinystories_docs(path):
    """Stories split at <|endoftext|>, or in the mirror's heads, whose stories are separated only by blank lines
    like their paragraphs, at a paragraph opening "Once upon a time" / "Once there" (~70% of the stories do;
    the others stay glued to the one before)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 20)
    docs = _docs_between_eot(text_lines(path)) if EOT in head else _docs_from_paragraphs(path)
    return (doc.strip() for doc in docs if doc.strip())

def _docs_between_eot(lines):
    rest = ""
    for line in lines:  # streams: the online train file is 2.2 GB
        *docs, rest = (rest + line).split(EOT)
        yield from docs
    yield rest

def _docs_from_paragraphs(path):
    paras = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n").split("\n\n")
    story = []
    for p in (p.strip() for p in paras):
        if story and p.startswith(("Once upon a time", "Once there")):
            yield "\n\n".join(story)
            story = []
        if p:
            story.append(p)
    yield "\n\n".join(story)

def _docs_of_paragraphs(lines, doc_chars):
    """Whole paragraphs joined while they fit in doc_chars characters: a document ends after its last blank
    line within doc_chars, else after its last line end there, else at doc_chars (Chinese has no spaces)."""
    buf = ""
    for line in lines:
        buf += line
        while len(buf) > doc_chars:
            head = buf[:doc_chars]
            blanks = [m.end() for m in re.finditer(r"\n\s*\n", head)]
            end = blanks[-1] if blanks else (head.rfind("\n") + 1 or doc_chars)
            yield buf[:end]
            buf = buf[end:]
    yield buf

def txt_docs(path, doc_chars):
    """--from's .txt files: split at <|endoftext|> if the file has it, else paragraphs up to doc_chars. A
    document keeps its text exactly, less the blank lines and spaces around it (its first indent stays)."""
    has_eot = any(EOT in line for line in text_lines(path))  # a first pass, stopping at the first one
    lines = text_lines(path)
    docs = _docs_between_eot(lines) if has_eot else _docs_of_paragraphs(lines, doc_chars)
    return (re.sub(r"^\s*\n", "", doc.rstrip()) for doc in docs if doc.strip())

def cut(docs, max_chars):
    """The first documents, up to about max_chars characters (-1 = all)."""
    n = 0
    for doc in docs:
        if 0 <= max_chars <= n:
            return
        n += len(doc)
        yield doc

# -----------------------------------------------------------------------------
# Writing: dedupe, hash split, jsonl shards

def write_shards(folder, docs, max_bytes):
    """{"text": doc} lines into folder/shard_00000.jsonl ..., a new shard every max_bytes."""
    folder.mkdir(parents=True)
    lines, n = (json.dumps({"text": doc}) + "\n" for doc in docs), 0
    for line in lines:  # one shard per pass: its first line here, the next ones until it is full
        with open(folder / f"shard_{n:05d}.jsonl", "w", encoding="utf-8") as f:
            f.write(line)
            while f.tell() < max_bytes and (line := next(lines, None)):
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        n += 1
    return dict(docs=len(docs), chars=sum(map(len, docs)), shards=n)

def build_jsonl(sources, out, val_frac, shard_mb, config):
    """sources: (name, docs) pairs. Builds out.tmp/, renamed to out/ once complete."""
    seen, per_source, dupes, split = set(), {}, 0, {"train": [], "val": []}
    for name, docs in sources:
        per_source[name] = 0
        for doc in docs:
            h = hashlib.sha256(doc.encode("utf-8")).digest()
            if h in seen:
                dupes += 1
                continue
            seen.add(h)
            split["val" if int.from_bytes(h[:8], "big") < val_frac * 2**64 else "train"].append(doc)
            per_source[name] += 1
    if not split["train"] or not split["val"]:
        raise UserError(f"the split left train={len(split['train'])} val={len(split['val'])} documents: "
                        "raise --val-frac or --max-chars (with --from: give more text or lower --doc-chars)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = dict(config=config, sources=per_source, duplicates_dropped=dupes)
    for name, docs in split.items():
        # sources come one after another: shuffle, so any prefix of training sees the whole mixture
        random.Random(1234).shuffle(docs)
        meta[name] = write_shards(tmp / name, docs, shard_mb * 1e6)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta

# -----------------------------------------------------------------------------
# Sources per preset

def cpu_sources(raw, max_chars):
    sources = []
    for split in ("train", "valid"):  # the mirror has the heads of both files
        path = fetch(TINYSTORIES.format(split), raw / f"tinystories_{split}.txt",
                     mirror_path=f"pretrain/tinystories/TinyStories-{split}.head.txt")
        if path:
            sources.append((f"tinystories_{split}", cut(tinystories_docs(path), max_chars)))
    if mirror() is None:
        say("note: pretrain/offline-prose exists only in the offline mirror; online the cpu corpus is TinyStories")
        return sources
    for name in PROSE:
        path = fetch(None, raw / f"{name}.jsonl", mirror_path=f"pretrain/offline-prose/{name}.jsonl")
        sources.append((name, cut(iter_documents(path), max_chars)))
    return sources

def fetch_climbmix(out, num_shards):
    """gpu preset: parquet shards straight into train/ and val/ (fetch skips those already there)."""
    for i, split in [(i, "train") for i in range(num_shards)] + [(CLIMBMIX_VAL, "val")]:
        fetch(CLIMBMIX.format(i), out / split / f"shard_{i:05d}.parquet")
    for f in (out / "train").glob("shard_*.parquet"):  # shards of an earlier, larger --num-shards
        if int(f.stem[6:]) >= num_shards:
            f.unlink()
    import pyarrow.parquet as pq  # only where parquet is read
    meta = dict(config=dict(preset="gpu", num_shards=num_shards))
    for split in ("train", "val"):
        files = sorted((out / split).glob("*.parquet"))
        meta[split] = dict(docs=sum(pq.read_metadata(f).num_rows for f in files),
                           bytes=sum(f.stat().st_size for f in files), shards=len(files))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta

# -----------------------------------------------------------------------------
# Your own text: --from

def own_files(path):
    """--from: a .txt / .jsonl / .parquet file, or those in a folder (recursively, sorted)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(f for f in path.rglob("*") if f.is_file())
        files = [f for f in found if f.suffix in SUFFIXES]
        if not files:
            raise UserError(f"{path}: no .txt, .jsonl or .parquet files in this folder: fix the --from path")
        if len(found) > len(files):
            say(f"note: {path}: skipping {len(found) - len(files)} file(s) not .txt, .jsonl or .parquet")
        return files
    if not path.exists():
        raise UserError(f"{path}: no such file or folder: fix the path given to --from")
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown extension (--from reads .txt as UTF-8, .jsonl and .parquet with a "
                        '"text" field): rename or convert it')
    return [path]

def fingerprint(files):
    """sha256 of the files' names and bytes: the same inputs skip a rebuild, an edited file does not."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(str(f.resolve()).encode() + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()

def own_docs(files, doc_chars, max_chars):
    """--from: the documents of files, --max-chars of each; .jsonl / .parquet as pretrain.py reads them."""
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq  # only where parquet is read
            try:
                names = pq.read_schema(f).names
            except Exception:  # pyarrow.ArrowInvalid: not a parquet file
                names = []
            if "text" not in names:
                raise UserError(f'{f}: not a parquet file with a "text" column: name its text column "text"')
        docs = txt_docs(f, doc_chars) if f.suffix == ".txt" else iter_documents(f)
        yield from cut((doc for doc in docs if doc and doc.strip()), max_chars)

# -----------------------------------------------------------------------------
# Run

if __name__ == "__main__":
    parser = Parser(description="Write the pretraining corpus to <base>/data/pretrain/{train,val}/.")
    parser.add_argument("--preset", choices=["cpu", "gpu", "smoke"], default="cpu",
                        help="cpu: TinyStories (+ the mirror's prose offline); gpu: ClimbMix shards; "
                             "smoke: a tiny slice")
    parser.add_argument("--from", dest="paths", nargs="+", metavar="PATH", default=None,
                        help='your own text instead of a preset: .txt (UTF-8), .jsonl / .parquet with a '
                             '"text" field, or folders of them (recursively)')
    parser.add_argument("--doc-chars", type=ranged(int, 100), default=1000,
                        help="--from .txt files without <|endoftext|>: paragraphs are joined into documents "
                             "of at most this many characters")
    parser.add_argument("--num-shards", type=ranged(int, 1), default=8,
                        help="gpu preset: number of ClimbMix train shards (~250M chars each)")
    parser.add_argument("--max-chars", type=ranged(int, 1, sentinel=-1), default=None,
                        help="characters kept per source file (-1 = all; default: 50,000 for smoke, all otherwise)")
    parser.add_argument("--val-frac", type=ranged(float, 0.001, 0.5), default=None,
                        help="fraction of documents (by text hash) for val (default: 0.01; 0.1 for smoke, "
                             "0.05 for --from)")
    parser.add_argument("--shard-mb", type=ranged(float, 0.01), default=50, help="size of one jsonl shard in MB")
    args = parse_args(parser)
    offline = mirror() is not None
    preset = "own" if args.paths else args.preset
    if preset == "gpu" and offline:
        say("note: the mirror has no ClimbMix shards (online only): the gpu preset uses the cpu corpus instead")
        preset = "cpu"
    max_chars = args.max_chars if args.max_chars is not None else (50_000 if args.preset == "smoke" else -1)
    val_frac = args.val_frac if args.val_frac is not None else {"smoke": 0.1, "own": 0.05}.get(preset, 0.01)
    out = data_dir() / "pretrain"
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    config = dict(preset=preset, max_chars=max_chars, val_frac=val_frac, shard_mb=args.shard_mb, offline=offline)
    if args.paths:  # a rerun compares the inputs too; every path is checked here, before any file is read
        inputs = [(path, own_files(path)) for path in args.paths]
        files = [f for _, fs in inputs for f in fs]
        config = dict(preset=preset, paths=[str(Path(p).resolve()) for p in args.paths], files=len(files),
                      bytes=sum(f.stat().st_size for f in files), sha256=fingerprint(files),
                      doc_chars=args.doc_chars, max_chars=max_chars, val_frac=val_frac,
                      shard_mb=args.shard_mb)

    if preset == "gpu":
        if old.get("config", {}).get("preset") != "gpu":
            shutil.rmtree(out, ignore_errors=True)  # a jsonl corpus from another preset must not mix in
        meta = fetch_climbmix(out, args.num_shards)
    elif old.get("config") == config:
        say(f"{out} is already built with these settings: nothing to do")
        meta = old
    elif args.paths:
        sources = [(path, own_docs(fs, args.doc_chars, max_chars)) for path, fs in inputs]
        meta = build_jsonl(sources, out, val_frac, args.shard_mb, config)
    else:
        sources = cpu_sources(data_dir() / "raw" / "pretrain", max_chars)
        meta = build_jsonl(sources, out, val_frac, args.shard_mb, config)

    for split in ("train", "val"):
        m = meta[split]
        size = f"{m['chars']:,} chars" if "chars" in m else f"{m['bytes'] / 1e6:,.0f} MB"
        print(f"{split:5s}: {m['docs']:,} docs, {size}, {m['shards']} shards in {out / split}")
    if "sources" in meta:
        print("sources: " + ", ".join(f"{k} {v:,}" for k, v in meta["sources"].items())
              + f" | duplicates dropped: {meta['duplicates_dropped']}")
