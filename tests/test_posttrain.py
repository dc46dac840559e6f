"""midtrain.py and sft.py end to end on a tiny model: golden loss masks, no nan on cut conversations,
exact resume after SIGKILL, and the base -> mid -> sft chain through checkpoint files."""

import json
import math
import re

import pytest
import torch

from conftest import fresh_home, read_log, run_killed, run_script

BASE = ["--depth", 2, "--max-seq-len", 128, "--device-batch-size", 4, "--total-batch-size", 1024, "--compile", 0,
        "--eval-tokens", 2048, "--sample-every", -1]
MID = ["--device-batch-size", 2, "--total-batch-size", 512, "--eval-rows", 8, "--max-seq-len", 128]
SFT = ["--device-batch-size", 2, "--examples-per-step", 4, "--eval-rows", 8]


@pytest.fixture(scope="session")
def post_home(tiny_home, tmp_path_factory):
    """tiny_home + conversations from the mirror + a base checkpoint trained for a few steps."""
    home = tmp_path_factory.mktemp("post_home")
    (home / "data").mkdir()
    (home / "data" / "pretrain").symlink_to(tiny_home / "data" / "pretrain")
    (home / "tokenizer").symlink_to(tiny_home / "tokenizer")
    run_script("data/chat_data.py", "--only", "gsm8k,identity,spelling,mmlu,dolly", "--num-spelling", 300,
               "--num-identity", 0, home=home)  # identity: data/identity.jsonl only, so that GSM8K rows are drawn
    run_script("pretrain.py", *BASE, "--num-steps", 8, home=home)
    return home


def stage_home(post_home, path, stages=("pretrain",)):
    home = fresh_home(post_home, path)
    (home / "checkpoints").mkdir()
    for s in stages:
        (home / "checkpoints" / s).symlink_to(post_home / "checkpoints" / s)
    return home


GOLDEN = [
    {"messages": [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                  {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the cat sit?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "What is 12 times 34?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "12 times 34 is "},
                                                    {"type": "python", "text": "12*34"},
                                                    {"type": "python_output", "text": "408"},
                                                    {"type": "text", "text": ". The answer is 408."}]}]},
    {"messages": [{"role": "user", "content": "Which is a fruit?\n\nA. car\nB. apple\nC. rock\nD. cloud\n\nAnswer with the letter."},
                  {"role": "assistant", "content": "B"}]},
]


def assistant_positions(ids, sp):
    """Independent of render_conversation's mask: positions of the tokens the assistant writes, found by
    walking the special tokens (inside assistant_start..assistant_end, minus output_start..output_end)."""
    written, in_assistant, in_output = set(), False, False
    for i, t in enumerate(ids):
        if t in (sp["<|bos|>"], sp["<|user_start|>"]):
            in_assistant = in_output = False
        elif t == sp["<|assistant_start|>"]:
            in_assistant = True
        elif t == sp["<|output_start|>"]:
            in_output = True
        elif t == sp["<|output_end|>"]:
            in_output = False
        elif in_assistant and not in_output:
            written.add(i)
            in_assistant = t != sp["<|assistant_end|>"]
    return written


@pytest.mark.parametrize("script,args", [("sft.py", ["--device-batch-size", 1, "--examples-per-step", 1, "--num-steps", 12]),
                                         ("midtrain.py", ["--device-batch-size", 1, "--total-batch-size", 128, "--num-steps", 24])])
def test_golden_masks_are_exactly_the_assistant_tokens(post_home, tmp_path, script, args):
    from tokenizer import Tokenizer, SPECIAL_TOKENS
    home = stage_home(post_home, tmp_path / "home")
    (home / "data").unlink()
    chat = home / "data" / "chat"
    (chat / "val").mkdir(parents=True)
    (home / "data" / "pretrain").symlink_to(post_home / "data" / "pretrain")
    for path in (chat / "identity.jsonl", chat / "val" / "identity.jsonl"):
        path.write_text("".join(json.dumps(c) + "\n" for c in GOLDEN))
    dump = tmp_path / "batches.jsonl"
    source = ["--source", "pretrain"] if script == "sft.py" else []
    run_script(script, *args, *source, "--max-seq-len", 128, "--eval-rows", 1,
               "--dump-batches", dump, home=home)
    tok = Tokenizer.load(home / "tokenizer")
    sp = {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    rows = [(x, y) for line in dump.read_text().splitlines() for b in [json.loads(line)] for x, y in zip(b["x"], b["y"])]
    seen = set()
    for x, y in rows:
        n = max(i for i, t in enumerate(y) if t != -1) + 1  # past the last target: padding (sft rounds rows up)
        x, y = x[:n], y[:n]
        full = x + [-1]  # the row's tokens: x, and the last one, known only from y
        for i, t in enumerate(y):
            if t != -1:
                assert full[i + 1] in (t, -1)  # targets are the next tokens
                full[i + 1] = t
        full = full if full[-1] != -1 else full[:-1]
        trained = {i + 1 for i, t in enumerate(y) if t != -1}
        assert trained == assistant_positions(full, sp)
        text = tok.decode(full)
        seen.update(k for k in ("Be brief.\n\nName a color.", "<|python_start|>12*34<|python_end|><|output_start|>408",
                                "Answer with the letter.<|user_end|><|assistant_start|>B<|assistant_end|>",
                                "Why did the cat sit?<|assistant_end|>") if k in text)
    assert len(seen) == 4  # every golden feature was really trained on: system fold, tool call, MC, multi-turn


def test_no_nan_when_conversations_are_longer_than_the_context(post_home, tmp_path):
    home = stage_home(post_home, tmp_path / "home")
    run_script("sft.py", *SFT, "--source", "pretrain", "--max-seq-len", 64, "--num-steps", 20, "--eval-every", 10, home=home)
    rows = read_log(home, "sft")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    assert rows[-2]["skipped"] > 0  # GSM8K answers start past 64 tokens: those rows were skipped, counted


@pytest.mark.parametrize("script,args,source", [("midtrain.py", MID, "pretrain"), ("sft.py", SFT, "pretrain")])
def test_resume_after_sigkill_equals_a_straight_run(post_home, tmp_path, script, args, source):
    stage = script[:-3]
    flags = [*args, "--num-steps", 8, "--save-every", 4, "--eval-every", 4] + (["--source", source] if stage == "sft" else [])
    straight = stage_home(post_home, tmp_path / "a")
    run_script(script, *flags, home=straight)
    killed = stage_home(post_home, tmp_path / "b")
    run_killed(script, *flags, home=killed, checkpoint=killed / f"checkpoints/{stage}/step_000004")
    run_script(script, *flags, "--resume", home=killed)
    assert read_log(killed, stage)[-1]["step"] == 8
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "dt", "wait", "tok_per_s", "gflops")} for r in rows]
    assert drop_time(read_log(killed, stage)) == drop_time(read_log(straight, stage))
    a = torch.load(straight / f"checkpoints/{stage}/step_000008/model.pt", weights_only=True)
    b = torch.load(killed / f"checkpoints/{stage}/step_000008/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chain_base_mid_sft_through_files_and_sft_val_loss_falls(post_home, tmp_path):
    home = stage_home(post_home, tmp_path / "home")
    run_script("midtrain.py", *MID, "--num-steps", 6, home=home)
    out = run_script("sft.py", *SFT, "--num-steps", 12, "--eval-every", 6, "--init-lr-frac", 0.5, home=home).stdout
    assert "loaded midtrain step 6\ninherited max_seq_len = 128" in out
    meta = json.loads((home / "checkpoints/sft/step_000012/meta.json").read_text())
    assert meta["source"] == {"stage": "midtrain", "step": 6}
    val = [r["val_loss"] for r in read_log(home, "sft") if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]


# -----------------------------------------------------------------------------
# LoRA: only the adapters train; the checkpoint holds merged weights (and the adapters beside them)

LORA = ["--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", "q,v,mlp", "--lora-lr", 0.01]


def test_lora_trains_only_the_adapters_and_saves_merged_weights(post_home, tmp_path):
    home = stage_home(post_home, tmp_path / "home")
    out = run_script("sft.py", *SFT, "--source", "pretrain", "--num-steps", 6, *LORA, home=home).stdout
    assert re.search(r"LoRA rank 4 on q,v,mlp: [\d,]+ trainable parameters of [\d,]+ \(\d+\.\d+%\), the rest frozen", out)
    base = torch.load(post_home / "checkpoints/pretrain/step_000008/model.pt", weights_only=True)
    d = home / "checkpoints/sft/step_000006"
    merged, adapters = (torch.load(d / f, weights_only=True) for f in ("model.pt", "adapters.pt"))
    assert set(merged) == set(base)  # a plain checkpoint: later stages, evaluate.py and chat.py load it as any other
    changed = set()
    for name, weight in merged.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_A" in adapters:
            A, B = adapters[f"{layer}.lora_A"], adapters[f"{layer}.lora_B"]
            assert B.abs().sum() > 0 and torch.allclose(weight, base[name] + 2.0 * B @ A, atol=1e-6)  # alpha / rank = 2
            changed.add(name)
        else:
            assert torch.equal(weight, base[name]), name  # frozen: bit for bit the base
    assert len(changed) == 2 * 4  # q, v, mlp.c_fc, mlp.c_proj in each of the 2 layers
    run_script("chat.py", "-p", "hi", "--max-tokens", 4, home=home)  # and the merged model answers


def test_lora_rank_0_is_todays_finetuning_bit_for_bit(post_home, tmp_path):
    a, b = stage_home(post_home, tmp_path / "a"), stage_home(post_home, tmp_path / "b")
    run_script("sft.py", *SFT, "--source", "pretrain", "--num-steps", 4, home=a)
    run_script("sft.py", *SFT, "--source", "pretrain", "--num-steps", 4, "--lora-rank", 0, home=b)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "dt", "wait", "tok_per_s", "gflops")} for r in rows]
    assert drop(read_log(a, "sft")) == drop(read_log(b, "sft"))
    x, y = (torch.load(h / "checkpoints/sft/step_000004/model.pt", weights_only=True) for h in (a, b))
    assert all(torch.equal(x[k], y[k]) for k in x) and not (b / "checkpoints/sft/step_000004/adapters.pt").exists()


def test_lora_resume_after_sigkill_equals_a_straight_run(post_home, tmp_path):
    flags = [*MID, "--num-steps", 6, "--save-every", 2, "--eval-every", 3, *LORA]
    straight = stage_home(post_home, tmp_path / "a")
    run_script("midtrain.py", *flags, home=straight)
    killed = stage_home(post_home, tmp_path / "b")
    run_killed("midtrain.py", *flags, home=killed, checkpoint=killed / "checkpoints/midtrain/step_000002")
    run_script("midtrain.py", *flags, "--resume", home=killed)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "dt", "wait", "tok_per_s", "gflops")} for r in rows]
    assert drop(read_log(killed, "midtrain")) == drop(read_log(straight, "midtrain"))
    for f in ("model.pt", "adapters.pt"):
        x, y = (torch.load(h / f"checkpoints/midtrain/step_000006/{f}", weights_only=True) for h in (straight, killed))
        assert all(torch.equal(x[k], y[k]) for k in x), f


def test_your_own_conversations_join_the_mixture_with_a_weight(post_home, tmp_path):
    """--chat-file PATH:WEIGHT in both shapes ({messages} and {instruction, input, output}): in the printed
    mixture with its weight, every 50th held out for val; a bad line is named by file:line."""
    home = stage_home(post_home, tmp_path / "home")
    mine = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(100)]
    rows.append({"messages": [{"role": "user", "content": "Who made you?"},
                              {"role": "assistant", "content": "The flatchat repository."}]})
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for script in ("sft.py", "midtrain.py"):
        args = [*SFT, "--source", "pretrain"] if script == "sft.py" else MID
        out = run_script(script, *args, "--num-steps", 1, "--chat-file", f"{mine}:2", home=home).stdout
        assert re.search(r"mine\.jsonl +x2 +98 conversations", out), out  # 101 rows, 3 of them val
    mine.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    proc = run_script("sft.py", *SFT, "--source", "pretrain", "--num-steps", 1, "--chat-file", mine, home=home,
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f'error: {mine}:2: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} with at least one '
        'message, or {"prompt" or "instruction", "response" or "output"} (fix the line or pass --skip-bad)'
    ), proc.stderr
