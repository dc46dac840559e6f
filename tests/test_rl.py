"""rl.py: the reward, the loss masks and advantages (in-process, on a tiny model), and the stage end to end
(subprocess): zero-advantage groups skip the update, exact resume after SIGKILL, torchrun == 1 process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import MIRROR, ROOT, read_log, run_script
import model as M
from model import GPT, GPTConfig, gsm8k_reward, norm, save_checkpoint
from tokenizer import Tokenizer
import rl

TINY = ["--examples-per-step", 2, "--num-samples", 4, "--max-new-tokens", 10, "--top-k", 0, "--eval-examples", 2,
        "--eval-samples", 2, "--init-lr-frac", 0.5]
ENV = {"OMP_NUM_THREADS": "1"}  # tiny matmuls: a second thread only waits, and on a busy machine for long


def gsm8k_conv(a, b):
    """A GSM8K-shaped train conversation: text, a calculator call, its output, '#### N'."""
    return {"messages": [{"role": "user", "content": f"Tom has {a} apples and gets {b} more. How many now?"},
                         {"role": "assistant", "content": [
                             {"type": "text", "text": f"He has {a}+{b} = "}, {"type": "python", "text": f"{a}+{b}"},
                             {"type": "python_output", "text": str(a + b)},
                             {"type": "text", "text": f"{a + b} apples.\n#### {a + b}"}]}]}


TRAIN = [gsm8k_conv(a, b) for a, b in [(1, 2), (2, 1), (1, 1), (1, 0), (2, 0), (0, 3), (0, 1), (0, 2)]]
TEST = [{**gsm8k_conv(a, b), "answer": str(a + b)} for a, b in [(1, 1), (2, 1), (0, 1), (3, 0)]]


def unigram_model(tok, marker=True):
    """A 2-layer GPT whose every position predicts the same distribution: mostly the digits 1-3, '##',
    spaces, '+', calculator calls and <|assistant_end|>. So its answers are short numbers, sometimes after
    a '####' marker (some right, some wrong), and the calculator fires; training makes it context dependent."""
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    model.init_weights()
    sp = tok.encode_special
    favored = {ord("1"): 8, ord("2"): 8, ord("3"): 8, ord(" "): 7, ord("+"): 7, sp("<|python_start|>"): 6,
               sp("<|python_end|>"): 7, sp("<|assistant_end|>"): 6.5, **{t: 8.5 for t in tok.encode("##") if marker}}
    with torch.no_grad():
        model.wte.weight[:] = model.wte.weight[0]  # the blocks start as the identity: one input, one output
        v = norm(model.wte.weight[0])
        model.lm_head.weight.zero_()
        for t, logit in favored.items():
            model.lm_head.weight[t] = logit * v / v.square().sum()
    return model, cfg


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rl_home(tmp_path_factory):
    """A base dir with a tiny tokenizer, GSM8K-style files and the unigram model saved as sft step 1."""
    home = tmp_path_factory.mktemp("rl_home")
    texts = [json.dumps(c) for c in TRAIN + TEST] + ["Once upon a time 12 cats ate 345 fish, 6,789 in all."] * 5
    tok = Tokenizer.train(texts, 300)
    tok.save(home / "tokenizer")
    model, cfg = unigram_model(tok)
    for name, rows in (("chat/gsm8k_train.jsonl", TRAIN), ("eval/gsm8k_test.jsonl", TEST)):
        (home / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (home / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLATCHAT_HOME", str(home))
        save_checkpoint("sft", 1, model, None, dict(model_config=vars(cfg), tokenizer_hash=tok.hash,
                                                    args=dict(max_seq_len=64), source=dict(stage="midtrain", step=1)))
    return home, tok


def fresh_home(rl_home, path, train=None):
    """A new base dir sharing the tokenizer, eval data and sft checkpoint (optionally other train data)."""
    home, _ = rl_home
    (path / "data" / "chat").mkdir(parents=True)
    (path / "checkpoints").mkdir()
    for d in ("tokenizer", "data/eval", "checkpoints/sft"):
        (path / d).symlink_to(home / d)
    rows = train or TRAIN
    (path / "data/chat/gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# The reward


def test_reward_on_fixtures():
    assert rl.reference(TRAIN[0]) == "3" and rl.reference(TEST[3]) == "3"
    assert rl.reference({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x\n#### 1,000"}]}) == "1000"
    assert rl.reference({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no answer"}]}) is None
    assert rl.reference({"messages": [], "answer": "1,234"}) == "1234"
    assert gsm8k_reward("So 12 + 6 = 18 apples.\n#### 18", "18") == 1.0
    assert gsm8k_reward("He paid $1,234.\n#### 1,234", "1234") == 1.0 and gsm8k_reward("#### 18.0", "18") == 1.0
    assert gsm8k_reward("#### -5 degrees", "-5") == 1.0 and gsm8k_reward("#### 5 degrees", "-5") == 0.0
    assert gsm8k_reward("So 12 + 6 = 18 apples.", "18") == 0.0  # the right number, but not as the answer
    assert gsm8k_reward("no number here", "3") == 0.0 and gsm8k_reward("", "3") == 0.0


@pytest.mark.skipif(not (MIRROR / "gsm8k").is_dir(), reason=f"offline data mirror {MIRROR} not found")
def test_reference_solutions_of_real_gsm8k_earn_reward_1(rl_home):
    """The first 50 GSM8K train answers, converted as data/chat_data.py does: the reference number is the
    '####' one, and the reference solution, rendered and decoded as a sampled answer would be, earns 1."""
    _, tok = rl_home
    sys.path.insert(0, str(ROOT / "data"))
    import chat_data
    with open(MIRROR / "gsm8k/grade_school_math/data/train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(50)]
    for row in rows:
        conv = {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": chat_data.gsm8k_parts(row["answer"])}]}
        assert rl.reference(conv) == row["answer"].split("####")[-1].strip().replace(",", "")
        ids, _ = tok.render_conversation(conv)
        start = ids.index(tok.encode_special("<|assistant_start|>")) + 1
        reply = tok.decode([t for t in ids[start:] if tok.token_bytes[t] > 0])  # as rollout() decodes
        assert gsm8k_reward(reply, rl.reference(conv)) == 1.0
        assert gsm8k_reward(reply.replace("####", "so"), rl.reference(conv)) == 0.0  # the number without the marker


def test_missing_gsm8k_is_one_clear_error(tmp_path):
    with pytest.raises(rl.UserError, match="python data/chat_data.py --only gsm8k"):
        rl.load_task(tmp_path / "gsm8k_train.jsonl", "gsm8k")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "7"}]}) + "\n")
    with pytest.raises(rl.UserError, match="bad.jsonl: conversation 1 has no reference answer"):
        rl.load_task(path, "gsm8k")


# -----------------------------------------------------------------------------
# The loss: masks and advantages, in-process on the unigram model


def test_gradient_flows_only_through_sampled_tokens(rl_home, monkeypatch):
    _, tok = rl_home
    model, _ = unigram_model(tok, marker=False)  # without '##' in its answers, the calculator fires more often
    out, loss_fn = [], M.softcap_cross_entropy

    def keep_head_input(h, *args):  # what the head reads at each position, to see its gradient after backward
        h.retain_grad()
        out.append(h)
        return loss_fn(h, *args)

    monkeypatch.setattr(M, "softcap_cross_entropy", keep_head_input)
    forced = sampled = 0
    for q, conv in enumerate(TRAIN):  # 8 questions, a group of 4 answers each: ~3% of tokens open a tool call
        prompt, seqs, masks, rewards, _ = rl.rollout(model, tok, conv, 4, seed=q, max_tokens=16)
        x, y = rl.group_batch(prompt, seqs, masks, tok.bos_id)
        assert all(x[r, :len(prompt)].tolist() == prompt for r in range(4))
        loss = rl.pg_loss(model, x, y, torch.tensor([1.0, -1.0, 0.5, -0.5]))  # every sample counts
        loss.backward()
        g = out[-1].grad.abs().sum(-1).view(x.shape)  # (n, L): gradient reaching each position's head input
        for r, (s, m) in enumerate(zip(seqs, masks)):
            for j in range(x.size(1)):
                k = j - (len(prompt) - 1)  # position j predicts completion token k
                trained = 0 <= k < len(s) and m[k] == 1
                assert (g[r, j] > 0).item() == trained, (q, r, j, k)
            forced, sampled = forced + m.count(0), sampled + m.count(1)
        model.zero_grad()
    assert forced > 0 and sampled > 0  # the calculator fired, so tool outputs were among the checked positions


def test_equal_rewards_give_zero_advantage_and_zero_loss(rl_home):
    _, tok = rl_home
    model, _ = unigram_model(tok)
    for rewards in ([1.0] * 4, [0.0] * 4):
        for std_norm in (False, True):
            assert torch.equal(rl.advantages(rewards, std_norm), torch.zeros(4))
    prompt, seqs, masks, _, _ = rl.rollout(model, tok, TRAIN[0], 4, seed=0, max_tokens=8)
    x, y = rl.group_batch(prompt, seqs, masks, tok.bos_id)
    assert rl.pg_loss(model, x, y, rl.advantages([0.0] * 4)).item() == 0.0
    assert rl.advantages([1.0, 0.0, 0.0, 0.0]).tolist() == [0.75, -0.25, -0.25, -0.25]
    std_normed = torch.tensor([3.0, -1.0, -1.0, -1.0]) / 3**0.5  # (r - mean) / std, std = sqrt(3) / 4
    assert torch.allclose(rl.advantages([1.0, 0.0, 0.0, 0.0], std_norm=True), std_normed, atol=1e-3)


def test_higher_reward_answer_gets_more_likely(rl_home):
    _, tok = rl_home
    model, _ = unigram_model(tok)
    conv = TRAIN[0]  # 1 + 2: the right answer is "#### 3"
    prompt, end = tok.render_for_completion(conv), tok.encode_special("<|assistant_end|>")
    seqs = [tok.encode("####") + [ord(c), end] for c in "3123"]
    rewards = [gsm8k_reward(tok.decode(s[:-1]), rl.reference(conv)) for s in seqs]
    assert rewards == [1.0, 0.0, 0.0, 1.0]

    def probs():
        with torch.no_grad():
            return model(torch.tensor([prompt]))[0, -1].softmax(-1)

    before = probs()
    optimizer = model.setup_optimizer(0.002, 0.02, 0.004)
    x, y = rl.group_batch(prompt, seqs, [[1] * len(s) for s in seqs], tok.bos_id)
    rl.pg_loss(model, x, y, rl.advantages(rewards)).backward()
    optimizer.step()
    after = probs()
    assert after[ord("3")] > before[ord("3")] + 0.01, (before[ord("3")], after[ord("3")])
    assert after[ord("1")] < before[ord("1")] and after[ord("2")] < before[ord("2")]


# -----------------------------------------------------------------------------
# The stage end to end (subprocesses)


def test_all_wrong_groups_skip_the_update(rl_home, tmp_path):
    wrong = [{"messages": c["messages"][:1] + [{"role": "assistant", "content": "#### 98765"}]} for c in TRAIN]
    home = fresh_home(rl_home, tmp_path, train=wrong)
    out = run_script("rl.py", *TINY, "--num-steps", 2, "--eval-examples", 0, home=home, env=ENV).stdout
    rows = [r for r in read_log(home, "rl") if "loss" in r]
    assert [(r["loss"], r["reward"], r["zero_adv"]) for r in rows] == [(0.0, 0.0, 2)] * 2, out
    a = torch.load(home / "checkpoints/sft/step_000001/model.pt", weights_only=True)
    b = torch.load(home / "checkpoints/rl/step_000002/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # no backward, no optimizer step


FLAGS = [*TINY, "--num-steps", 8, "--save-every", 2, "--eval-every", 4]


@pytest.fixture(scope="module")
def straight(rl_home, tmp_path_factory):
    """One uninterrupted run, one process: the reference of the resume and torchrun tests."""
    home = fresh_home(rl_home, tmp_path_factory.mktemp("straight"))
    out = run_script("rl.py", *FLAGS, home=home, env=ENV).stdout
    assert "gsm8k pass@1" in out and "sample:" in out and "zero_adv" in out
    rows = read_log(home, "rl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 8 and sum(r["zero_adv"] for r in train) < 16  # some groups did learn
    assert [r["step"] for r in rows if "gsm8k_pass1" in r] == [0, 4, 8]
    return home


def same_rows(a, b, tol=0.0):
    """Two rl logs agree: the same rows, rewards, lengths, zero-advantage counts, evals; losses within tol."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ("step", "reward", "seq_len", "zero_adv", "gsm8k_pass1", "gsm8k_passk"):
            assert ra.get(k) == rb.get(k), (k, ra, rb)
        assert abs(ra.get("loss", 0) - rb.get("loss", 0)) <= tol, (ra, rb)


def kill_at_first_checkpoint(home, flags):
    """Start rl.py, SIGKILL it as soon as its step-2 checkpoint exists."""
    env = {**os.environ, **ENV, "FLATCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "rl.py"), *map(str, flags)], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = home / "checkpoints/rl/step_000002", time.time() + 120
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.exists()


def test_resume_after_sigkill_equals_a_straight_run(rl_home, straight, tmp_path):
    killed = fresh_home(rl_home, tmp_path)
    kill_at_first_checkpoint(killed, FLAGS)
    assert not (killed / "checkpoints/rl/step_000008").exists()
    run_script("rl.py", *FLAGS, "--resume", home=killed, env=ENV)
    same_rows(read_log(straight, "rl"), read_log(killed, "rl"))
    a = torch.load(straight / "checkpoints/rl/step_000008/model.pt", weights_only=True)
    b = torch.load(killed / "checkpoints/rl/step_000008/model.pt", weights_only=True)
    s = torch.load(straight / "checkpoints/sft/step_000001/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], s[k]) for k in a)


def test_torchrun_two_processes_match_one_process(rl_home, straight, tmp_path):
    two = fresh_home(rl_home, tmp_path)
    run_script("rl.py", *FLAGS, home=two, env=ENV, torchrun=2)  # 1 question per process instead of 2 in one
    same_rows(read_log(straight, "rl"), read_log(two, "rl"), tol=1e-5)


# -----------------------------------------------------------------------------
# DPO (--method dpo)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference_and_a_step_prefers_the_chosen(rl_home):
    _, tok = rl_home
    loss, margin = rl.dpo_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-3.0, -5.0]), beta=0.1)
    assert torch.isclose(loss, torch.log(torch.tensor(2.0))) and margin.item() == 0.0
    model, _ = unigram_model(tok)
    reference, _ = unigram_model(tok)
    conv = TRAIN[0]  # 1 + 2: chosen "#### 3", rejected "#### 1"
    prompt, end = tok.render_for_completion(conv), tok.encode_special("<|assistant_end|>")
    seqs = [tok.encode("#### 3") + [end], tok.encode("#### 1") + [end]]
    x, y = rl.group_batch(prompt, seqs, [[1] * len(s) for s in seqs], tok.bos_id)
    before = rl.sequence_logps(model, x, y).detach()
    loss, _ = rl.dpo_loss(rl.sequence_logps(model, x, y), rl.sequence_logps(reference, x, y).detach(), beta=0.1)
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)))  # a fresh policy is its own reference
    optimizer = model.setup_optimizer(0.002, 0.02, 0.004)
    loss.backward()
    optimizer.step()
    after = rl.sequence_logps(model, x, y).detach()
    assert (after[0] - after[1]) > (before[0] - before[1]) + 0.01  # the chosen answer gained on the rejected one


def test_dpo_pairs_from_a_file_count_only_the_reply_and_bad_lines_are_named(rl_home, tmp_path):
    _, tok = rl_home
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
               {"role": "user", "content": "1 + 2?"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"conversation": {"messages": history}, "chosen": "#### 3", "rejected": "#### 1"}) + "\n"
                    + json.dumps({"prompt": "2 + 2?", "chosen": [{"type": "text", "text": "#### 4"}], "rejected": "5"}) + "\n")
    (prompt, seqs, masks), _ = rl.read_pairs(path, tok)
    x, y = rl.group_batch(prompt, seqs, masks, tok.bos_id)
    end = tok.encode_special("<|assistant_end|>")
    assert seqs == [tok.encode("#### 3") + [end], tok.encode("#### 1") + [end]]
    assert (y[:, :len(prompt) - 1] == -1).all()  # the earlier turns, the assistant's 'hello there' too, count nothing
    assert [int((row >= 0).sum()) for row in y] == [len(s) for s in seqs]
    path.write_text(path.read_text() + '{"prompt": "3 + 3?", "chosen": "#### 6"}\n')
    with pytest.raises(rl.UserError, match=r"pairs.jsonl:3: missing or wrong field 'rejected'"):
        rl.read_pairs(path, tok)
    path.write_text('{"conversation": {"messages": [{"role": "robot", "content": "x"}]}, "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(rl.UserError, match=r"pairs.jsonl:1: message 0 has role 'robot'"):
        rl.read_pairs(path, tok)


DPO = [*TINY, "--method", "dpo", "--num-steps", 6, "--save-every", 2, "--eval-every", 3]


def test_dpo_on_gsm8k_samples_logs_its_numbers_and_resumes_exactly(rl_home, tmp_path):
    straight = fresh_home(rl_home, tmp_path / "a")
    run_script("rl.py", *DPO, home=straight, env=ENV)
    rows = [r for r in read_log(straight, "rl") if "loss" in r]
    assert len(rows) == 6 and all({"margin", "accuracy", "logp_chosen", "logp_rejected", "skipped"} <= set(r) for r in rows)
    assert sum(r["skipped"] for r in rows) < 12  # some questions had a right and a wrong answer: pairs
    killed = fresh_home(rl_home, tmp_path / "b")
    kill_at_first_checkpoint(killed, DPO)
    run_script("rl.py", *DPO, "--resume", home=killed, env=ENV)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "dt", "wait", "tok_per_s", "gflops")} for r in rows]
    assert drop(read_log(killed, "rl")) == drop(read_log(straight, "rl"))
    a, b = (torch.load(h / "checkpoints/rl/step_000006/model.pt", weights_only=True) for h in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_arithmetic_task_rewards_the_result_as_the_last_number(tmp_path):
    """--task arithmetic (the cpu preset's): the reference is a train reply's last number (the tool's output
    counts, its expression does not), or the tinychat row's answer; the reward is the reply's last number."""
    parts = [{"type": "text", "text": "Let me calculate."}, {"type": "python", "text": "7*8"},
             {"type": "python_output", "text": "56"}, {"type": "text", "text": "The answer is 56."}]
    conv = {"messages": [{"role": "user", "content": "What is 7 times 8?"}, {"role": "assistant", "content": parts}]}
    assert rl.reference(conv, "arithmetic") == "56" and rl.reference(conv, "gsm8k") is None
    conv["messages"][1]["content"] = parts[:2]  # the expression alone is not an answer
    assert rl.reference(conv, "arithmetic") is None
    reward = rl.TASKS["arithmetic"][2]
    assert reward("Let me calculate.\n7*8\n56\nThe answer is 56.", "56") == 1.0
    assert reward("The answer is 56, or 57.", "56") == 0.0 and reward("no number", "56") == 0.0
    rows = [{"messages": [{"role": "user", "content": q}], "category": c, "answer": a}
            for q, c, a in (("Who are you?", "identity", "flatchat"), ("2 + 3?", "arithmetic", "5"))]
    path = tmp_path / "tinychat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [rl.reference(c, "arithmetic") for c in rl.load_task(path, "arithmetic")] == ["5"]
