"""
Conversations for midtraining/SFT, and the evaluation task files.

    python data/chat_data.py                            # everything, downloaded
    python data/chat_data.py --mirror ../shared/data    # offline (or FLATCHAT_DATA_MIRROR=../shared/data)
    python data/chat_data.py --only gsm8k,spelling --num-spelling 2000

Writes into <base>/data/ (* = online only; offline these are skipped with a note):
    chat/<name>.jsonl and its held-out chat/val/<name>.jsonl, one {"messages": [...]} per line, for gsm8k_train,
        mmlu_dev, mmlu_aux_train*, arc_{easy,challenge}_train* (val = ARC dev), dolly, identity, spelling, smoltalk*
    eval/gsm8k_test.jsonl      {"messages": [user, assistant with tool parts], "answer": "72"}
    eval/mmlu_test.jsonl, eval/arc_{easy,challenge}_test.jsonl   {"question", "choices", "gold" (, "subject")}
    eval/humaneval.jsonl       {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    eval/core/                 the DCLM CORE bundle: core.yaml, eval_meta_data.csv, eval_data/**
Raw downloads stay in <base>/data/raw/ (a rerun skips them). Test splits only go to eval/, and a training
conversation whose user prompt is an eval prompt is dropped and counted.
"""
import csv
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

from common import Parser, UserError, data_dir, fetch, mirror, parse_args, ranged, say, write_jsonl
from tokenizer import check_conversation, render_mc  # the chat format, defined once (common put it on the path)

LETTERS = "ABCDEFGHIJ"

# -----------------------------------------------------------------------------
# Reading, checking and writing conversations

def read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except ValueError as e:
                raise UserError(f"{path}:{i}: bad JSON ({e}); fix or delete that line")
    return rows

def chat(user, reply):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

def mc_conversations(rows):
    """{"question", "choices", "gold"} rows -> user: the rendered question, assistant: the gold letter."""
    return [chat(render_mc(r["question"], r["choices"]), LETTERS[r["gold"]]) for r in rows]

def check(conv):
    """None if conv is valid for training (the chat format, ending with the assistant), else why not."""
    try:
        turns = check_conversation(conv)
    except ValueError as e:
        return str(e)
    return None if turns[-1][0] == "assistant" else "the last message must be the assistant's"

def first_user(conv):
    return next(m["content"] for m in conv["messages"] if m["role"] == "user")

def clean(convs, held, taken=()):
    """{key: conv} without eval prompts (held) and duplicates (also of `taken` keys), in hash order."""
    kept = {json.dumps(c, sort_keys=True): c for c in convs if first_user(c).strip() not in held}
    return {k: kept[k] for k in sorted(kept.keys() - taken, key=lambda k: hashlib.sha256(k.encode()).hexdigest())}

def save_chat(name, convs, val=None, val_frac=0.02, min_val=10):
    """chat/<name>.jsonl and chat/val/<name>.jsonl, without the prompts of the eval files written so far.
    Without a val list, val is the conversations with the smallest hashes (deterministic)."""
    given = convs + (val or [])
    for i, conv in enumerate(given):
        if err := check(conv):
            raise UserError(f"{name}: conversation {i} is malformed: {err}")
    held = set()
    for task in ("gsm8k_test", "mmlu_test", "arc_easy_test", "arc_challenge_test"):
        if (path := data_dir() / "eval" / f"{task}.jsonl").exists():
            held |= {(first_user(r) if "messages" in r else render_mc(r["question"], r["choices"])).strip()
                     for r in read_jsonl(path)}
    train = clean(convs, held)
    if val is None:
        k = min(max(min_val, int(len(train) * val_frac)), len(train) // 2)
        val, train = list(train.values())[:k], list(train.values())[k:]
    else:
        val, train = list(clean(val, held, taken=train).values()), list(train.values())
    write_jsonl(data_dir() / "chat" / f"{name}.jsonl", train)
    write_jsonl(data_dir() / "chat" / "val" / f"{name}.jsonl", val)
    leaked = sum(first_user(c).strip() in held for c in given)
    print(f"chat/{name}: {len(train):,} train, {len(val):,} val | "
          f"dropped {len(given) - leaked - len(train) - len(val)} duplicates, {leaked} eval prompts")

def save_eval(name, rows):
    write_jsonl(data_dir() / "eval" / f"{name}.jsonl", rows)
    print(f"eval/{name}: {len(rows):,} rows")

# -----------------------------------------------------------------------------
# Raw files: archives, Hugging Face parquet shards

def raw_dir(name):
    return data_dir() / "raw" / name

def unpacked(url, name, in_mirror=None):
    """The zip or tar at url, downloaded and unpacked into raw/<name>/unpacked/ (once: via a temp folder);
    offline the mirror's folder `in_mirror`, read in place (it is already unpacked), or None."""
    if mirror() is not None:
        return mirror() / in_mirror if in_mirror else None
    archive, dest = fetch(url, raw_dir(name) / url.rsplit("/", 1)[1]), raw_dir(name) / "unpacked"
    if not dest.exists():
        tmp = dest.with_name("unpacked.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")  # refuses absolute paths, .. and links out of tmp
        os.replace(tmp, dest)
    return dest

def find(folder, name):
    """The file called `name` somewhere in an unpacked archive."""
    if hit := next(folder.rglob(name), None):
        return hit
    raise UserError(f"{name} not found in {folder}: incomplete data (fix the mirror, or delete {folder.parent} and rerun)")

HF_API = "https://huggingface.co/api/datasets/{}/parquet/default/{}"  # -> JSON list of parquet URLs

def hf_rows(dataset, split, columns):
    """The rows of a Hugging Face dataset split (online only), from its parquet shards."""
    import pyarrow.parquet as pq  # only here, where parquet is read

    folder = raw_dir(dataset.split("/")[1])
    listing = fetch(HF_API.format(dataset, split), folder / f"{split}_shards.json")
    urls = [u if isinstance(u, str) else u["url"] for u in json.loads(listing.read_text())]
    files = [fetch(u, folder / f"{split}_{i:05d}.parquet") for i, u in enumerate(urls)]
    return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]

# -----------------------------------------------------------------------------
# GSM8K: <<expr=result>> annotations become python tool calls; the final "#### N" stays as text

GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"

def gsm8k_parts(answer):
    """'Sold 48/2 = <<48/2=24>>24 clips.\\n#### 24' -> text, python '48/2', python_output '24', text."""
    parts = []
    for i, piece in enumerate(re.split(r"<<(.*?)>>", answer)):
        if i % 2 == 1 and "=" in piece:
            expr, result = piece.rsplit("=", 1)
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif i % 2 == 1:  # an annotation without a result: keep it verbatim as text
            parts.append({"type": "text", "text": f"<<{piece}>>"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts

def gsm8k(split):
    path = fetch(GSM8K.format(split), raw_dir("gsm8k") / f"{split}.jsonl",
                 mirror_path=f"gsm8k/grade_school_math/data/{split}.jsonl")
    return [dict(chat(r["question"], gsm8k_parts(r["answer"])),
                 answer=r["answer"].rsplit("####", 1)[1].strip().replace(",", ""))  # "#### 1,000" -> "1000"
            for r in read_jsonl(path)]

def run_gsm8k(args):
    save_eval("gsm8k_test", gsm8k("test"))
    save_chat("gsm8k_train", [{"messages": c["messages"]} for c in gsm8k("train")])

# -----------------------------------------------------------------------------
# MMLU: 4-way multiple choice, in two CSV dialects: the mirror's (a header row, answer 0-3), the tar's (A-D)

MMLU = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"

def read_mmlu_csv(path, skip_bad=False):
    """Rows {"question", "choices", "gold"}; a bad row stops with its file:line, or is skipped if skip_bad."""
    rows, bad = [], 0
    with open(path, newline="", encoding="utf-8") as f:
        for i, rec in enumerate(csv.reader(f), 1):
            if i == 1 and rec and rec[0] == "question" and rec[-1] == "answer":
                continue  # header row of the mirror's dialect
            ans = rec[-1].strip().upper() if rec else ""
            gold = int(ans) if ans.isdigit() else dict(A=0, B=1, C=2, D=3).get(ans, -1)
            if len(rec) >= 4 and 0 <= gold < len(rec) - 2:
                rows.append({"question": rec[0], "choices": rec[1:-1], "gold": gold})
            elif skip_bad:
                bad += 1
            else:
                raise UserError(f"{path}:{i}: expected question,choice...,answer with the answer 0-3 or A-D; got {rec[-1:]}")
    if bad:
        say(f"{path}: skipped {bad} malformed rows")
    return rows

def mmlu_split(root, split, skip_bad=False):
    return [dict(r, subject=re.sub(rf"_{split}$", "", p.stem))  # abstract_algebra_test.csv -> abstract_algebra
            for p in sorted((root / split).glob("*.csv")) for r in read_mmlu_csv(p, skip_bad)]

def run_mmlu(args):
    root = unpacked(MMLU, "mmlu", in_mirror="mmlu") / "data"
    save_eval("mmlu_test", mmlu_split(root, "test"))
    save_chat("mmlu_dev", mc_conversations(mmlu_split(root, "dev")))
    if (root / "auxiliary_train").is_dir():
        save_chat("mmlu_aux_train", mc_conversations(mmlu_split(root, "auxiliary_train", skip_bad=True)))
    else:
        say("skipping chat/mmlu_aux_train: MMLU auxiliary_train is not in the mirror (online only)")

# -----------------------------------------------------------------------------
# The CORE bundle (base-model eval); ARC (test from the bundle, train/dev from the ARC zip, online); HumanEval

CORE = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
ARC = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"

def run_core(args):
    src = find(unpacked(CORE, "core", in_mirror="eval_bundle"), "core.yaml").parent
    dest = data_dir() / "eval" / "core"
    tmp = dest.with_name("core.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "eval_data", tmp / "eval_data")
    for name in ("core.yaml", "eval_meta_data.csv"):
        shutil.copyfile(src / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"eval/core: {len(list((dest / 'eval_data').rglob('*.jsonl')))} task files")

def arc_rows(path):
    """ARC's own jsonl (labels A-E or 1-5) -> {"question", "choices", "gold"}."""
    return [{"question": r["question"]["stem"], "choices": [c["text"] for c in r["question"]["choices"]],
             "gold": [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])} for r in read_jsonl(path)]

def run_arc(args):
    core = data_dir() / "eval" / "core"
    if not core.exists():
        run_core(args)
    folder = unpacked(ARC, "arc")  # offline None: the mirror has ARC's test splits only, in the CORE bundle
    for subset in ("easy", "challenge"):
        # the bundle's format: {"query": "Question: ...", "choices", "gold"}
        test = read_jsonl(core / "eval_data" / "world_knowledge" / f"arc_{subset}.jsonl")
        save_eval(f"arc_{subset}_test", [{"question": re.sub(r"^Question:\s*", "", r["query"]),
                                          "choices": r["choices"], "gold": r["gold"]} for r in test])
        if folder is None:
            say(f"skipping chat/arc_{subset}_train: ARC train/dev are not in the mirror (online only)")
            continue
        train, dev = (arc_rows(find(folder, f"ARC-{subset.title()}-{s}.jsonl")) for s in ("Train", "Dev"))
        save_chat(f"arc_{subset}_train", mc_conversations(train), val=mc_conversations(dev))

HUMANEVAL = "https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz"

def run_humaneval(args):
    path = fetch(HUMANEVAL, raw_dir("humaneval") / "HumanEval.jsonl.gz",
                 mirror_path="human-eval/data/HumanEval.jsonl.gz")
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    save_eval("humaneval", [{k: r[k] for k in keys} for r in read_jsonl(path)])

# -----------------------------------------------------------------------------
# General chat: Dolly (+ HH-RLHF) single-turn instructions, SmolTalk multi-turn (online only), and the
# hand-written identity conversations (who the assistant is)

DOLLY_TEMPLATE = re.compile(r"^Below is an instruction.*?### Instruction:\s*(.*?)\s*### Response:\s*$", re.S)

def run_dolly(args):
    if mirror() is not None:
        name = "dolly_hhrlhf_train_small.jsonl"  # 1,000 rows of the train split
        rows = read_jsonl(fetch(None, raw_dir("dolly") / name, mirror_path=f"sft/{name}"))
    else:
        rows = hf_rows("mosaicml/dolly_hhrlhf", "train", ["prompt", "response"])
    pairs = [(DOLLY_TEMPLATE.sub(r"\1", r["prompt"]).strip(), r["response"].strip()) for r in rows]  # no template
    save_chat("dolly", [chat(q, a) for q, a in pairs if q and a])

def smoltalk(split):
    convs = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
             for r in hf_rows("HuggingFaceTB/smol-smoltalk", split, ["messages"])]
    good = [c for c in convs if check(c) is None]
    if len(good) < len(convs):
        say(f"smoltalk: skipped {len(convs) - len(good)} conversations that are not user/assistant alternations")
    return good

def run_smoltalk(args):
    if mirror() is not None:
        say("skipping chat/smoltalk: SmolTalk is not in the mirror (online only)")
        return
    save_chat("smoltalk", smoltalk("train"), val=smoltalk("test"))  # its test split is our val

def run_identity(args):
    path = Path(__file__).with_name("identity.jsonl")
    convs = read_jsonl(path)
    for i, conv in enumerate(convs, 1):
        if err := check(conv):
            raise UserError(f"{path}:{i}: {err}")
    save_chat("identity", convs, val_frac=0.1, min_val=4)

# -----------------------------------------------------------------------------
# Spelling and letter counting, generated from a word list (seeded, deterministic)

WORDS = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
COUNT_ASKS = ["How many '{c}' are in '{w}'?", "How many times does the letter {c} appear in the word {w}?",
              "Count the letter '{c}' in '{w}'.", "how many {c}s are there in {w}",
              'In "{w}", how many times does "{c}" occur?']
SPELL_ASKS = ["Spell '{w}' letter by letter.", "How do you spell {w}?", "spell out {w}",
              'Can you spell the word "{w}" one letter at a time?',
              "Spell the word {w} with dashes between the letters."]

def count_reply(word, c):
    """The word spelled with a running count at each match (s, t, r (1), a, ...), then checked in Python."""
    n = word.count(c)
    tally = [f"{ch} ({word[:i + 1].count(c)})" if ch == c else ch for i, ch in enumerate(word)]
    return [{"type": "text", "text": f"Let me spell '{word}' and count each '{c}': {', '.join(tally)}.\n"
                                     f"That makes {n}. Let me double-check with Python: "},
            {"type": "python", "text": f"'{word}'.count('{c}')"},
            {"type": "python_output", "text": str(n)},
            {"type": "text", "text": f"\n\nThe letter '{c}' appears {n} time{'' if n == 1 else 's'} in '{word}'."}]

def spelling_tasks(words, n, seed):
    rng, convs = random.Random(seed), []
    for _ in range(n):
        word = rng.choice(words)
        if rng.random() < 0.5:
            convs.append(chat(rng.choice(SPELL_ASKS).format(w=word), "-".join(word)))
        else:  # mostly letters of the word, sometimes one that is absent (answer 0)
            c = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            convs.append(chat(rng.choice(COUNT_ASKS).format(c=c, w=word), count_reply(word, c)))
    return convs

def run_spelling(args):
    path = fetch(WORDS, raw_dir("words") / "words_alpha.txt", mirror_path="words_alpha.txt")
    text = path.read_text(encoding="utf-8")  # CRLF line ends: splitlines() drops the \r too
    words = [w for w in text.splitlines() if 3 <= len(w) <= 12 and w.isalpha()]
    train = spelling_tasks(words, args.num_spelling, args.seed)
    val = spelling_tasks(words, max(20, args.num_spelling // 50), args.seed + 1)  # save_chat drops those in train
    save_chat("spelling", train, val=val)

# -----------------------------------------------------------------------------
# Run: eval sets first, so that save_chat can drop any training prompt that appears in them

STEPS = {"core": run_core, "arc": run_arc, "mmlu": run_mmlu, "gsm8k": run_gsm8k, "humaneval": run_humaneval,
         "dolly": run_dolly, "identity": run_identity, "spelling": run_spelling, "smoltalk": run_smoltalk}

if __name__ == "__main__":
    parser = Parser(description="Write conversations to <base>/data/chat/, eval tasks to <base>/data/eval/.")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(STEPS)} (default: all)")
    parser.add_argument("--num-spelling", type=ranged(int, 0), default=5000,
                        help="number of generated spelling/counting conversations (val: 1/50 of it, at least 20)")
    parser.add_argument("--seed", type=ranged(int, 0), default=42,
                        help="seed of the generated spelling tasks (val uses seed+1)")
    args = parse_args(parser)
    names = [n for n in args.only.split(",") if n] or list(STEPS)
    if unknown := [n for n in names if n not in STEPS]:
        raise UserError(f"--only: unknown {','.join(unknown)}; choose from {','.join(STEPS)}")
    for name in [n for n in STEPS if n in names]:  # always in this order
        STEPS[name](args)
