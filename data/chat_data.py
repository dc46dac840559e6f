"""
Conversations for midtraining/SFT, and the evaluation task files.

    python data/chat_data.py                            # everything, downloaded
    python data/chat_data.py --mirror ../shared/data    # offline (or FLATCHAT_DATA_MIRROR=../shared/data)
    python data/chat_data.py --only gsm8k,spelling --num-spelling 2000

Writes into <base>/data/ (* = online only; offline these are skipped with a note):
    chat/<name>.jsonl and its held-out chat/val/<name>.jsonl, one {"messages": [...]} per line, for gsm8k_train,
        mmlu_dev, mmlu_aux_train*, arc_{easy,challenge}_train* (val = ARC dev), dolly, dolly_short, smoltalk*,
        and the generated sets (seeded): identity (+ data/identity.jsonl), spelling, arithmetic, stories
    eval/gsm8k_test.jsonl      {"messages": [user, assistant with tool parts], "answer": "72"}
    eval/tinychat.jsonl        {"messages": [user], "category", "answer"}: what the cpu preset's model should
                               do (its story rule reads raw/words/words_alpha.txt, which tinychat copies)
    eval/mmlu_test.jsonl, eval/arc_{easy,challenge}_test.jsonl   {"question", "choices", "gold" (, "subject")}
    eval/humaneval.jsonl       {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    eval/core/                 the DCLM CORE bundle: core.yaml, eval_meta_data.csv, eval_data/**
Raw downloads stay in <base>/data/raw/ (a rerun skips them). Test splits only go to eval/, and a training
conversation whose user prompt is an eval prompt is dropped and counted.
"""
import collections
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
from corpus import TINYSTORIES, tinystories_docs
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
    """chat/<name>.jsonl and chat/val/<name>.jsonl, without the prompts of the eval files written so far;
    returns (train, val). Without a val list, val is the conversations with the smallest hashes
    (deterministic)."""
    given = convs + (val or [])
    for i, conv in enumerate(given):
        if err := check(conv):
            raise UserError(f"{name}: conversation {i} is malformed: {err}")
    held = set()
    for task in ("gsm8k_test", "mmlu_test", "arc_easy_test", "arc_challenge_test", "tinychat"):
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
    return train, val

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
# General chat: Dolly (+ HH-RLHF) single-turn instructions, and its pairs short enough for the cpu preset's
# 256-token context (a longer reply is cut, and its end is never trained); SmolTalk multi-turn (online only)

DOLLY_TEMPLATE = re.compile(r"^Below is an instruction.*?### Instruction:\s*(.*?)\s*### Response:\s*$", re.S)
DOLLY_SHORT_CHARS = 600  # prompt + response: at most ~200 tokens at vocab 8192

def short_chats(convs, max_chars):
    return [c for c in convs if sum(len(m["content"]) for m in c["messages"]) <= max_chars]

def run_dolly(args):
    if mirror() is not None:
        name = "dolly_hhrlhf_train_small.jsonl"  # 1,000 rows of the train split
        rows = read_jsonl(fetch(None, raw_dir("dolly") / name, mirror_path=f"sft/{name}"))
    else:
        rows = hf_rows("mosaicml/dolly_hhrlhf", "train", ["prompt", "response"])
    pairs = [(DOLLY_TEMPLATE.sub(r"\1", r["prompt"]).strip(), r["response"].strip()) for r in rows]  # no template
    train, val = save_chat("dolly", [chat(q, a) for q, a in pairs if q and a])
    save_chat("dolly_short", short_chats(train, DOLLY_SHORT_CHARS), val=short_chats(val, DOLLY_SHORT_CHARS))

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

# -----------------------------------------------------------------------------
# Spelling (forwards with dashes, or backwards, with a tool call) and letter counting, generated from a word
# list (seeded, deterministic). Here and below, the EVAL_ lists (templates, names, things, topics, words) make
# the tinychat benchmark (eval/tinychat.jsonl) and nothing else: no training set uses them.

WORDS = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
COUNT_ASKS = ["How many '{c}' are in '{w}'?", "How many times does the letter {c} appear in the word {w}?",
              "Count the letter '{c}' in '{w}'.", "how many {c}s are there in {w}",
              'In "{w}", how many times does "{c}" occur?']
SPELL_ASKS = ["Spell '{w}' letter by letter.", "How do you spell {w}?", "spell out {w}",
              'Can you spell the word "{w}" one letter at a time?',
              "Spell the word {w} with dashes between the letters."]
BACKWARD_ASKS = ["Spell '{w}' backwards.", "How do you spell {w} backwards?", "spell {w} backward",
                 'Can you write the word "{w}" backwards?', "Reverse the word {w}."]
EVAL_SPELL_ASKS = ["Please spell {w} one letter at a time.", "What are the letters of '{w}'?",
                   "Break the word {w} into letters."]
EVAL_BACKWARD_ASKS = ["What is '{w}' spelled backwards?", "Write {w} in reverse.",
                      "Reverse the letters of {w}."]
EVAL_SPELL_WORDS = ["happy", "smile", "jump", "green", "sleep", "house", "brave", "kind", "river", "cloud",
                    "candle", "forest", "window", "yellow", "purple", "garden", "pocket", "rabbit", "basket",
                    "spoon", "table", "chair", "paper", "music", "dance", "laugh", "quiet", "sweet", "bread",
                    "lemon", "tiger", "zebra", "horse", "sheep", "mouse", "puppy", "kitten", "flower",
                    "pencil", "blanket", "bottle", "button", "cookie", "orange", "planet", "rocket", "castle",
                    "bridge", "shadow", "winter", "summer", "morning", "night", "storm", "honey", "sugar",
                    "juice", "story", "friend", "family"]  # common words: the benchmark spells each once

def word_list():
    """The words of 3-12 letters of words_alpha.txt, copied to raw/words/ (where evaluate.py reads it)."""
    path = fetch(WORDS, raw_dir("words") / "words_alpha.txt", mirror_path="words_alpha.txt")
    text = path.read_text(encoding="utf-8")  # CRLF line ends: splitlines() drops the \r too
    return [w for w in text.splitlines() if 3 <= len(w) <= 12 and w.isalpha()]

def count_reply(word, c):
    """The word spelled with a running count at each match (s, t, r (1), a, ...), then checked in Python."""
    n = word.count(c)
    tally = [f"{ch} ({word[:i + 1].count(c)})" if ch == c else ch for i, ch in enumerate(word)]
    return [{"type": "text", "text": f"Let me spell '{word}' and count each '{c}': {', '.join(tally)}.\n"
                                     f"That makes {n}. Let me double-check with Python: "},
            {"type": "python", "text": f"'{word}'.count('{c}')"},
            {"type": "python_output", "text": str(n)},
            {"type": "text", "text": f"\n\nThe letter '{c}' appears {n} time{'' if n == 1 else 's'} in '{word}'."}]

def spell_reply(word, backwards, quoted):
    """The tool spells the word with dashes ('-'.join('cat') -> c-a-t) or reverses it; its output is the
    answer. Asked without quotes (spell cat), the call quotes the word with the space before it (' cat'), so
    that it is the very token of the question (a small model copies tokens, not letters)."""
    quote = f"'{word}'" if quoted else f"' {word}'"
    call, answer = (f"{quote}[::-1]", word[::-1]) if backwards else (f"'-'.join({quote})", "-".join(word))
    return [{"type": "text", "text": "Let me use Python."}, {"type": "python", "text": call},
            {"type": "python_output", "text": answer}]

def spelling_tasks(words, n, seed):
    """A third each: spell forwards, spell backwards, count a letter."""
    rng, convs = random.Random(seed), []
    for _ in range(n):
        word, kind = rng.choice(words), rng.randrange(3)
        if kind < 2:
            asks = BACKWARD_ASKS if kind else SPELL_ASKS
            ask = rng.choice(asks)
            quoted = "'{w}'" in ask or '"{w}"' in ask
            convs.append(chat(ask.format(w=word), spell_reply(word, backwards=kind == 1, quoted=quoted)))
        else:  # mostly letters of the word, sometimes one that is absent (answer 0)
            c = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            convs.append(chat(rng.choice(COUNT_ASKS).format(c=c, w=word), count_reply(word, c)))
    return convs

def story_words():
    """The words of 3-8 letters that TinyStories uses at least 3 times: everyday words, like the benchmark's
    (words_alpha.txt is mostly rare words, split into several tokens each)."""
    counts = collections.Counter(w for s in tinystories(10**9) for w in re.findall(r"[a-z]+", s.lower()))
    return [w for w, n in counts.items() if n >= 3 and 3 <= len(w) <= 8]

def run_spelling(args):
    word_list()  # (copies words_alpha.txt to raw/words/, where evaluate.py's story rule reads it)
    words = sorted(set(story_words() or word_list()) - set(EVAL_SPELL_WORDS))  # (no stories: the word list)
    train = spelling_tasks(words, args.num_spelling, args.seed)
    val = spelling_tasks(words, max(20, args.num_spelling // 50), args.seed + 1)  # save_chat drops those in train
    save_chat("spelling", train, val=val)

# -----------------------------------------------------------------------------
# Identity, one-step arithmetic, short stories: what a 7M-parameter model can learn to do (seeded templates)

HELLOS = ["Hi", "Hello", "Hey", "Hi there", "Hello there", "Hey there", "Good morning", "Good afternoon"]
WHO_ASKS = ["Who are you?", "What is your name?", "What's your name?", "What are you?",
            "Tell me about yourself.", "Are you a robot?", "What should I call you?", "Do you have a name?",
            "who are you", "what is your name", "Are you a person?", "What kind of model are you?",
            "May I ask who you are?", "Can you tell me your name?", "Are you a chatbot?",
            "What do people call you?", "Are you an assistant?", "What exactly are you?"]
CAN_ASKS = ["What can you do?", "How can you help me?", "What are you good at?", "what can you do",
            "What kind of things can you do?", "Can you help me?", "What are you for?",
            "How do you help people?"]
HELLO_REPLIES = ["Hello! I'm flatchat, a small language model. How can I help you?",
                 "Hi! I'm flatchat, a small chat model. What would you like to talk about?"]
WHO_REPLIES = ["I'm flatchat, a small language model.", "My name is flatchat. I'm a small language model.",
               "I am flatchat, a small chat model that answers simple questions."]
CAN_REPLIES = ["I'm flatchat, a small model. I can do simple math with a calculator, spell words and tell "
               "short stories.",
               "I am flatchat, a small language model. I can add, subtract, multiply and divide, spell "
               "words, and tell you a short story."]
EVAL_HELLOS = ["Howdy", "Greetings", "Good evening", "Hiya", "Yo", "Hey hey"]
EVAL_WHO_ASKS = ["Introduce yourself.", "Who am I talking to?", "What are you called?",
                 "Which model are you?", "Tell me your name.", "Who is this?", "what's your name, please?",
                 "Are you an AI?"]

def identity_tasks(n, seed):
    """Greetings, and who-are-you / what-can-you-do questions (alone or after a greeting): short replies that
    name flatchat."""
    rng, convs = random.Random(seed), []
    for _ in range(n):
        hello = rng.choice(HELLOS)
        if rng.random() < 0.3:
            hello = hello.lower() if rng.random() < 0.3 else hello
            convs.append(chat(hello + rng.choice(["", "!", "."]), rng.choice(HELLO_REPLIES)))
            continue
        asks, replies = (WHO_ASKS, WHO_REPLIES) if rng.random() < 0.65 else (CAN_ASKS, CAN_REPLIES)
        ask, reply = rng.choice(asks), rng.choice(replies)
        if rng.random() < 0.4:  # greeted first: greet back
            ask, reply = f"{hello}, {ask[0].lower()}{ask[1:]}", f"Hello! {reply}"
        convs.append(chat(ask, reply))
    return convs

def run_identity(args):
    path = Path(__file__).with_name("identity.jsonl")  # hand-written: how it was trained, its limits, ...
    convs = read_jsonl(path)
    for i, conv in enumerate(convs, 1):
        if err := check(conv):
            raise UserError(f"{path}:{i}: {err}")
    save_chat("identity", convs + identity_tasks(args.num_identity, args.seed), val_frac=0.05)

# {a}, {b}: the operands; {op}: the operator in words or as a symbol; {sym}: as a symbol. "" = any operator.
OP_WORDS = {"+": ["plus", "+"], "-": ["minus", "-"], "*": ["times", "multiplied by", "x", "*"],
            "/": ["divided by", "/"]}
ARITH_ASKS = {"": ["What is {a} {op} {b}?", "what's {a} {op} {b}", "Compute {a} {op} {b}.", "{a} {op} {b}",
                   "{a}{sym}{b}", "{a} {sym} {b} =", "How much is {a} {op} {b}?",
                   "Can you work out {a} {op} {b}?", "Please calculate {a} {op} {b}", "what is {a}{sym}{b}"],
              "+": ["What is the sum of {a} and {b}?", "Add {a} and {b}."],
              "-": ["Subtract {b} from {a}.", "What is {a} take away {b}?"],
              "*": ["What is the product of {a} and {b}?", "Multiply {a} by {b}."],
              "/": ["Divide {a} by {b}.", "How many times does {b} go into {a}?"]}
EVAL_ARITH_ASKS = {"": ["Calculate {a} {op} {b}.", "Tell me what {a} {op} {b} is.",
                        "{a} {op} {b} equals what?", "Quick math: {a} {sym} {b}", "Solve {a}{sym}{b}"],
                   "+": ["Find the total of {a} and {b}."],
                   "-": ["What do you get if you take {b} away from {a}?"],
                   "*": ["What do you get when you multiply {a} and {b}?"],
                   "/": ["What is {a} split into {b} equal parts?"]}
WORD_PROBLEMS = {
    "+": ["{name} had {a} {things} and got {b} more. How many {things} does {pro} have now?",
          "{name} found {a} {things} in the morning and {b} in the afternoon. How many {things} did {pro} "
          "find?"],
    "-": ["{name} had {a} {things} and gave {b} to a friend. How many {things} does {pro} have left?",
          "{name} had {a} {things} but lost {b} of them. How many {things} are left?"],
    "*": ["{name} has {a} boxes with {b} {things} in each box. How many {things} does {pro} have?",
          "{name} buys {a} bags of {things} with {b} in each bag. How many {things} did {pro} buy?"],
    "/": ["{name} shares {a} {things} equally among {b} friends. How many {things} does each friend get?",
          "{name} puts {a} {things} into {b} equal piles. How many {things} are in each pile?"]}
EVAL_WORD_PROBLEMS = {
    "+": ["There are {a} {things} on the table and {name} adds {b} more. How many {things} are on the table "
          "now?"],
    "-": ["{name} bought {a} {things} and used {b} of them. How many {things} does {pro} still have?"],
    "*": ["{name} makes {a} rows of {things} with {b} in each row. How many {things} are there in total?"],
    "/": ["{name} packs {a} {things} into {b} boxes with the same number in each. How many {things} go in "
          "each box?"]}
NAMES = [("Lily", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Anna", "she"), ("Sam", "he"),
         ("Lucy", "she"), ("Max", "he"), ("Sara", "she"), ("Jack", "he"), ("Emma", "she"), ("Tim", "he")]
EVAL_NAMES = [("Zoe", "she"), ("Leo", "he"), ("Nora", "she"), ("Finn", "he"), ("Ivy", "she"), ("Omar", "he")]
THINGS = ["apples", "marbles", "stickers", "cookies", "pencils", "balloons", "books", "cards", "shells",
          "stamps", "coins", "eggs", "crayons", "flowers"]
EVAL_THINGS = ["oranges", "buttons", "candies", "rocks", "beads", "cupcakes", "feathers", "ribbons"]

def number(rng):  # 1, 2 or 3 digits, each as likely
    digits = rng.randint(1, 3)
    return rng.randint(max(2, 10 ** (digits - 1)), 10 ** digits - 1)

def arithmetic_question(rng, asks, problems, names, things):
    """(prompt, expression, result) of a random one-step question on integers of up to three digits, asked
    in words or symbols or as a word problem (30%); a - b is never negative, a / b is exact."""
    op = rng.choice("+-*/")
    a, b = number(rng), number(rng)
    problem = rng.random() < 0.3
    if op == "-" and a < b:
        a, b = b, a
    if problem and op in "*/":  # b: boxes, bags, rows, friends, piles: a few
        b = rng.randint(2, 12)
    if op == "/":  # a is b times a whole number
        a = b * rng.randint(1, 999 // b)
    if problem:
        name, pro = rng.choice(names)
        prompt = rng.choice(problems[op]).format(name=name, pro=pro, a=a, b=b, things=rng.choice(things))
    else:
        prompt = rng.choice(asks[""] + asks[op]).format(a=a, b=b, op=rng.choice(OP_WORDS[op]), sym=op)
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return prompt, f"{a}{op}{b}", str(result)

def arithmetic_reply(expr, result):
    """The calculator call, its output, and the result said once more: one short template for every reply."""
    return [{"type": "text", "text": "Let me calculate."}, {"type": "python", "text": expr},
            {"type": "python_output", "text": result}, {"type": "text", "text": f"The answer is {result}."}]

def arithmetic_tasks(n, seed):
    rng, convs = random.Random(seed), []
    for _ in range(n):
        prompt, expr, result = arithmetic_question(rng, ARITH_ASKS, WORD_PROBLEMS, NAMES, THINGS)
        convs.append(chat(prompt, arithmetic_reply(expr, result)))
    return convs

def run_arithmetic(args):
    val = arithmetic_tasks(max(20, args.num_arithmetic // 50), args.seed + 1)  # save_chat drops train's
    save_chat("arithmetic", arithmetic_tasks(args.num_arithmetic, args.seed), val=val)

# a topic's word is its last one; every topic is a common TinyStories noun
STORY_ASKS = ["Tell me a short story about {t}.", "Write a story about {t}.",
              "Can you tell me a story about {t}?", "I want a story about {t}.", "story about {t} please",
              "Tell me a bedtime story about {t}.", "Please write a short story about {t}.",
              "Make up a little story about {t}."]
STORY_TOPICS = ["a friend", "mom", "dad", "grandma", "a sister", "a brother", "a baby", "a teacher",
                "a princess", "a king", "the park", "a house", "a room", "a kitchen", "a bed", "a door",
                "a window", "a garden", "the forest", "a farm", "a hill", "a pond", "a lake", "a river",
                "the sea", "the beach", "the zoo", "a shop", "school", "a castle", "the sky", "a star",
                "water", "a toy", "a game", "a picture", "a song", "a drum", "a book", "a car", "a blue car",
                "a truck", "a bike", "a robot", "a balloon", "a rock", "a shell", "a leaf", "a cup", "a jar",
                "a hat", "a shoe", "a blanket", "candy", "a cookie", "a pie", "bread", "milk", "a bear",
                "a big bear", "a butterfly", "a bug", "a bee", "an ant", "a spider", "a squirrel", "a puppy",
                "a monkey", "a lion", "a tiger", "an elephant", "a horse", "a cow", "a pig", "a rabbit",
                "a mouse", "a little mouse", "an owl", "a fox", "a snake", "a dragon"]
STORY_CHARS = 850  # with the prompt, at most ~245 tokens at vocab 8192: fits the cpu preset's 256 tokens
STORIES_PER_TOPIC = 50
EVAL_STORY_ASKS = ["Could you write a story about {t} for me?", "I'd like a short story about {t}, please.",
                   "Tell a tale about {t}.", "Write me a kids' story about {t}."]
EVAL_STORY_TOPICS = ["a cat", "a dog", "rain", "a red ball", "a little bird", "a big tree", "the sun",
                     "a fish", "a boat", "a kite", "snow", "a frog", "a cake", "a flower", "a bunny",
                     "a train", "a duck", "the moon", "an apple", "a doll"]

def tinystories(max_chars):
    """The TinyStories stories of at most max_chars characters: online the valid file (the 2.2 GB train file
    is not needed), where data/corpus.py keeps it; offline the mirror's heads of both."""
    stories = []
    for split in ("valid",) if mirror() is None else ("valid", "train"):
        path = fetch(TINYSTORIES.format(split), data_dir() / "raw" / "pretrain" / f"tinystories_{split}.txt",
                     mirror_path=f"pretrain/tinystories/TinyStories-{split}.head.txt")
        stories += [s for s in tinystories_docs(path) if len(s) <= max_chars]
    return list(dict.fromkeys(stories))  # each once, in file order

def story_tasks(stories, topics, per_topic, seed):
    """Each topic, asked with a random phrasing, answered by up to per_topic real stories that name its word
    (or its plural) twice or in their first 250 characters: those that name it most often first."""
    rng, convs = random.Random(seed), []
    for topic in topics:
        word = re.compile(rf"\b{topic.split()[-1]}(?:s|es)?\b", re.I)
        about = []
        for s in stories:
            hits = [m.start() for m in word.finditer(s)]
            if len(hits) >= 2 or hits and hits[0] < 250:
                about.append((-len(hits), hits[0], s))
        about.sort()  # most mentions, then the earliest (then the text: deterministic)
        for _, _, story in about[:per_topic]:  # the reply names its topic first, as the request does
            reply = f"Here is a story about {topic}.\n\n{story}"
            convs.append(chat(rng.choice(STORY_ASKS).format(t=topic), reply))
    return convs

def run_stories(args):
    save_chat("stories", story_tasks(tinystories(STORY_CHARS), STORY_TOPICS, STORIES_PER_TOPIC, args.seed))

# -----------------------------------------------------------------------------
# The tinychat benchmark (evaluate.py --tasks tinychat): TINYCHAT distinct prompts of each category, from the
# EVAL_ lists only, with a fixed seed; "answer": what evaluate.py checks the reply for

TINYCHAT = {"identity": 40, "arithmetic": 60, "story": 40, "spelling": len(EVAL_SPELL_WORDS)}
TINYCHAT_SEED = 1337  # not --seed: the benchmark stays the same from run to run

def eval_identity(rng, i):
    hello = rng.choice(EVAL_HELLOS)
    if rng.random() < 0.4:
        return hello + rng.choice(["", "!", "."]), "flatchat"
    ask = rng.choice(EVAL_WHO_ASKS)
    return (ask if rng.random() < 0.6 else f"{hello}, {ask[0].lower()}{ask[1:]}"), "flatchat"

def eval_arithmetic(rng, i):
    prompt, _, result = arithmetic_question(rng, EVAL_ARITH_ASKS, EVAL_WORD_PROBLEMS, EVAL_NAMES, EVAL_THINGS)
    return prompt, result

def eval_story(rng, i):
    topic = rng.choice(EVAL_STORY_TOPICS)
    return rng.choice(EVAL_STORY_ASKS).format(t=topic), topic.split()[-1]

def eval_spelling(rng, i):  # the i-th word, forwards or backwards
    word = EVAL_SPELL_WORDS[i % len(EVAL_SPELL_WORDS)]
    if rng.random() < 0.5:
        return rng.choice(EVAL_BACKWARD_ASKS).format(w=word), word[::-1]
    return rng.choice(EVAL_SPELL_ASKS).format(w=word), "-".join(word)

MAKERS = {"identity": eval_identity, "arithmetic": eval_arithmetic, "story": eval_story,
          "spelling": eval_spelling}

def tinychat_items(seed=TINYCHAT_SEED):
    """The benchmark's rows {"messages": [user], "category", "answer"}."""
    rng, rows, seen = random.Random(seed), [], set()
    for category, n in TINYCHAT.items():
        made = 0
        for _ in range(100 * n):  # draws until n distinct prompts
            prompt, answer = MAKERS[category](rng, made)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"messages": [{"role": "user", "content": prompt}], "category": category,
                             "answer": answer})
                made += 1
            if made == n:
                break
    return rows

def run_tinychat(args):
    word_list()  # copies words_alpha.txt to raw/words/, where evaluate.py's story rule reads it
    rows = tinychat_items()
    save_eval("tinychat", rows)
    print("  " + ", ".join(f"{c} {sum(r['category'] == c for r in rows)}" for c in TINYCHAT))

# -----------------------------------------------------------------------------
# Run: eval sets first, so that save_chat can drop any training prompt that appears in them

STEPS = {"core": run_core, "arc": run_arc, "mmlu": run_mmlu, "gsm8k": run_gsm8k, "humaneval": run_humaneval,
         "tinychat": run_tinychat, "dolly": run_dolly, "identity": run_identity, "spelling": run_spelling,
         "arithmetic": run_arithmetic, "stories": run_stories, "smoltalk": run_smoltalk}

if __name__ == "__main__":
    parser = Parser(description="Write conversations to <base>/data/chat/, eval tasks to <base>/data/eval/.")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(STEPS)} (default: all)")
    parser.add_argument("--num-spelling", type=ranged(int, 0), default=5000,
                        help="number of generated spelling/counting conversations (val: 1/50 of it, at least 20)")
    parser.add_argument("--num-arithmetic", type=ranged(int, 0), default=5000,
                        help="number of generated arithmetic conversations (val: 1/50 of it, at least 20)")
    parser.add_argument("--num-identity", type=ranged(int, 0), default=2000,
                        help="generated identity conversations (duplicates dropped), + data/identity.jsonl")
    parser.add_argument("--seed", type=ranged(int, 0), default=42,
                        help="seed of the generated training sets (val: seed+1; tinychat's benchmark: fixed)")
    args = parse_args(parser)
    names = [n for n in args.only.split(",") if n] or list(STEPS)
    if unknown := [n for n in names if n not in STEPS]:
        raise UserError(f"--only: unknown {','.join(unknown)}; choose from {','.join(STEPS)}")
    for name in [n for n in STEPS if n in names]:  # always in this order
        STEPS[name](args)
