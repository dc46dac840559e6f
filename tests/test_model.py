"""model.py: the transformer, KV-cache generation, the calculator, the optimizer, checkpoints."""

import json
import os
import pickle
import random
import subprocess
import sys
import time

import pytest
import torch

import model as M
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, generate, generate_batch, use_calculator

CFG = GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def trained_tiny_model(steps=30, seed=0):
    """A tiny GQA model trained a little on a repeating pattern, so greedy decoding is not degenerate."""
    torch.manual_seed(seed)
    m = GPT(CFG)
    m.init_weights()
    opt = m.setup_optimizer()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (4, 65), generator=g)
    for _ in range(steps):
        m(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        m.zero_grad(set_to_none=True)
    return m.eval()


def test_forward_shapes_and_padded_vocab():
    m = GPT(CFG)
    m.init_weights()
    assert m.padded_vocab == 320 and m.lm_head.weight.shape == (320, 64)
    x = torch.randint(0, 300, (2, 16))
    assert m(x).shape == (2, 16, 300)
    per_token = m(x, x, loss_reduction="none")
    assert per_token.shape == (2, 16)
    y = x.clone()
    y[:, :8] = -1  # ignored targets neither count nor contribute
    assert torch.allclose(m(x, y), per_token[:, 8:].mean())
    # zero-init projections: every block starts as the identity, first predictions are near uniform
    assert abs(m(x, x).item() - torch.log(torch.tensor(300.0)).item()) < 0.05


def test_kv_cache_greedy_equals_no_cache_for_64_steps():
    m = trained_tiny_model()
    ids = [5, 17, 42, 9, 100, 3]
    cached = [t[0] for t, _ in generate(m, ids, max_tokens=64, temperature=0)]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(64):
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
    assert len(cached) == 64 and cached == seq[len(ids):]
    assert len(set(cached)) > 3  # a real, non-constant continuation


def test_several_samples_from_one_prefill_equal_independent_prefills():
    m = trained_tiny_model()
    ids = [5, 17, 42, 9]
    # rows of an expanded batch-1 cache, each fed different tokens, match separate full forwards
    kv = KVCache(CFG.n_layer, 64)
    with torch.no_grad():
        m(torch.tensor([ids]), kv_cache=kv)
        kv.expand(3)
        rows = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(1))
        for t in range(8):
            step_logits = m(rows[:, t:t + 1], kv_cache=kv)[:, -1]
            for i in range(3):
                full = m(torch.tensor([ids + rows[i, :t + 1].tolist()]))[0, -1]
                assert torch.allclose(step_logits[i], full, atol=1e-4)
    # and greedy samples from one prefill all equal the single-sample result
    one, _ = generate_batch(m, ids, num_samples=1, max_tokens=20, temperature=0)
    many, _ = generate_batch(m, ids, num_samples=4, max_tokens=20, temperature=0)
    assert all(s == one[0] for s in many)
    # sampled rows differ from each other and are reproducible from the seed
    a, _ = generate_batch(m, ids, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    b, _ = generate_batch(m, ids, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    assert a == b and len({tuple(s) for s in a}) > 1


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    rng = torch.Generator().manual_seed(0)
    assert set(M.sample_next(logits, rng, 1.0, top_k=2).tolist()) == {0, 1}
    assert set(M.sample_next(logits, rng, 1.0, top_p=0.5).tolist()) == {0}  # p(0) = 0.71 >= 0.5
    assert set(M.sample_next(logits, rng, 1.0, top_p=0.9).tolist()) == {0, 1}


def test_sampling_follows_the_softmax_of_the_candidates():
    """Frequencies over 40,000 rows match the tempered, top-k / top-p renormalised softmax within 4 standard
    errors; tokens of probability 0 never come."""
    logits = torch.tensor([[0.5, float("-inf"), 2.0, -1.0, 1.0, 0.0]]).repeat(40_000, 1)
    order = logits[0].argsort(descending=True)
    rng = torch.Generator().manual_seed(0)
    for kw, keep in ((dict(temperature=1.0), 5), (dict(temperature=0.5), 5), (dict(temperature=1.0, top_k=3), 3),
                     (dict(temperature=1.0, top_p=0.8), 3), (dict(temperature=2.0, top_k=4, top_p=0.9), 4)):
        want, kept = torch.zeros(6), order[:keep]
        want[kept] = (logits[0, kept] / kw["temperature"]).softmax(-1)
        got = torch.bincount(M.sample_next(logits, rng, **kw), minlength=6).float() / len(logits)
        se = (want * (1 - want) / len(logits)).sqrt()
        assert (got - want).abs().le(4 * se + 1e-9).all(), (kw, got, want)


def test_calculator_is_safe_and_bounded():
    assert use_calculator("12*3") == "36" and use_calculator("48/2") == "24"
    assert use_calculator("1,000 + 5") == "1005" and use_calculator("7/4") == "1.75"
    assert use_calculator("'strawberry'.count('r')") == "3"
    for bad in ("2**10**9", "__import__('os').system('true')", "open('x')", "1/0", "x+1", "9"*300):
        t0 = time.time()
        assert use_calculator(bad) is None
        assert time.time() - t0 < 0.5


def test_calculator_spells_a_quoted_word_backwards_or_with_dashes():
    assert use_calculator("'apple'[::-1]") == "elppa" and use_calculator('"Cat"[::-1]') == "taC"
    assert use_calculator("'-'.join('apple')") == "a-p-p-l-e" and use_calculator('"-".join("ox")') == "o-x"
    assert use_calculator(" '-'.join('a') ") == "a"
    # letters only, one quote style per string, exactly these two forms: everything else is refused
    for bad in ("'ap ple'[::-1]", "'apple'[::-2]", "'apple'[1:]", "'apple'[::-1]+'x'", "'apple\"[::-1]",
                "'-'.join('apple', 'x')", "'x'.join('apple')", "'--'.join('apple')", "'-'.join(open('x'))",
                "'-'.join('ap1e')", "'-\".join('apple')", "'-'.join(\"apple')", "'a'*10**9", "'x' * 99999999",
                "'é'[::-1]", "'" + "a" * 100 + "'[::-1]", "'-'.join('" + "a" * 100 + "')",
                "'apple'[::-1]()"):
        t0 = time.time()
        assert use_calculator(bad) is None, bad
        assert time.time() - t0 < 0.5


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script of tokens regardless of input (to drive the tool logic of generate)."""

    def __init__(self, script, prompt_len):
        super().__init__()
        self.config = GPTConfig(n_layer=1, vocab_size=600)
        self.script, self.prompt_len = script, prompt_len
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.dummy.device

    def forward(self, idx, kv_cache=None):
        kv_cache.pos += idx.size(1)
        n = kv_cache.pos - self.prompt_len  # tokens generated so far
        logits = torch.zeros(idx.size(0), idx.size(1), 600)
        logits[:, -1, self.script[min(n, len(self.script) - 1)]] = 10.0
        return logits


def test_calculator_tool_output_is_forced_and_masked(tiny_home):
    from tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_home / "tokenizer")
    sp = tok.encode_special
    expr, result = tok.encode("12*3"), tok.encode("36")
    forced = [sp("<|output_start|>"), *result, sp("<|output_end|>")]
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), *[0] * len(forced), *tok.encode(" done"),
              sp("<|assistant_end|>")]
    prompt = [tok.bos_id, sp("<|user_start|>")]
    seqs, masks = generate_batch(ScriptedModel(script, len(prompt)), prompt, max_tokens=50, temperature=0,
                                 tokenizer=tok)
    n = 2 + len(expr)
    assert seqs[0][:n] == script[:n] and seqs[0][n:n + len(forced)] == forced
    assert masks[0] == [1] * n + [0] * len(forced) + [1] * (len(script) - n - len(forced))
    assert seqs[0][-1] == sp("<|assistant_end|>")  # stopped there, stop token included


def test_newton_schulz_orthogonalises_one_matrix_or_a_stack():
    G = torch.randn(3, 64, 32)  # tall: it works on the transpose
    stacked = M.newton_schulz(G)
    assert stacked.shape == G.shape and stacked.dtype == G.dtype
    for g, x in zip(G, stacked):
        s = torch.linalg.svdvals(x)
        assert s.min() > 0.5 and s.max() < 1.3  # all singular values pulled towards 1
        assert torch.allclose(M.newton_schulz(g), x, atol=1e-2)  # the stack is the same as one at a time


def test_muon_step_on_tall_and_wide_matrices_together():
    torch.manual_seed(0)
    tall, wide, square = (torch.nn.Parameter(torch.randn(*s)) for s in [(32, 16), (16, 32), (16, 16)])
    opt = M.MuonAdamW([dict(kind="muon", params=[tall, wide, square], lr=0.1, momentum=0.9, initial_lr=0.1)])
    before = [p.detach().clone() for p in (tall, wide, square)]
    grads = [torch.randn_like(p) for p in (tall, wide, square)]
    for p, g in zip((tall, wide, square), grads):
        p.grad = g.clone()
    opt.step()
    for p, p0, g in zip((tall, wide, square), before, grads):  # one step from zero momentum: lerp(g, 0.1 g, 0.9)
        scale = max(1, p.size(0) / p.size(1)) ** 0.5
        assert torch.allclose((p0 - p.detach()) / (0.1 * scale), M.newton_schulz(0.19 * g), atol=1e-2)  # entries ~0.2


def test_optimizer_state_round_trips():
    m = trained_tiny_model(steps=3)
    opt = m.setup_optimizer()
    m(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))).backward()
    opt.step()
    opt2 = m.setup_optimizer()
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert [g["kind"] for g in opt2.param_groups] == ["muon", "adamw", "adamw"]


# -----------------------------------------------------------------------------
# checkpoints


def save_tiny(home, monkeypatch, step=1, tokenizer_hash="abc"):
    monkeypatch.setenv("FLATCHAT_HOME", str(home))
    m = trained_tiny_model(steps=1)
    meta = dict(model_config=vars(CFG), tokenizer_hash=tokenizer_hash)
    return m, M.save_checkpoint("pretrain", step, m, m.setup_optimizer(), meta)


def test_checkpoint_round_trip_and_latest(tmp_path, monkeypatch):
    m, path = save_tiny(tmp_path, monkeypatch, step=3)
    save_tiny(tmp_path, monkeypatch, step=10)
    (tmp_path / "checkpoints/pretrain/.tmp_step_000020_1").mkdir()  # a torn save never counts
    assert M.latest_step("pretrain") == 10
    state, optim, meta, rng = M.load_checkpoint("pretrain", step=3, load_optim=True)
    assert meta["step"] == 3 and optim is not None and "cpu" in rng
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_pickle_disguised_as_checkpoint_is_rejected(tmp_path, monkeypatch):
    _, path = save_tiny(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (path / "model.pt").write_bytes(pickle.dumps({"wte.weight": Evil()}))
    with pytest.raises(M.UserError, match="model.pt is damaged"):  # its sha256 no longer matches meta.json
        M.load_checkpoint("pretrain")
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]  # no checksum to catch it: the weights-only loader refuses the pickled code itself
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(M.UserError, match="cannot load its tensors on cpu .*Unpickl"):
        M.load_checkpoint("pretrain")
    assert not marker.exists()


def test_wrong_tokenizer_or_missing_checkpoint_refuses_to_load(tiny_home, tmp_path, monkeypatch):
    save_tiny(tmp_path, monkeypatch, tokenizer_hash="not-this-one")
    (tmp_path / "tokenizer").symlink_to(tiny_home / "tokenizer")
    with pytest.raises(M.UserError, match="another tokenizer"):
        M.load_model("pretrain", "cpu")
    with pytest.raises(M.UserError, match="create it with `python sft.py`"):
        M.load_model("sft", "cpu")


def test_checkpoint_of_an_older_model_format_refuses_to_load(tmp_path, monkeypatch):
    _, path = save_tiny(tmp_path, monkeypatch)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["model_format"] == M.MODEL_FORMAT
    del meta["model_format"]  # as written before formats were numbered: format 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(M.UserError, match="format 1, this model.py reads format 3 .* retrain from `python pretrain.py`"):
        M.load_checkpoint("pretrain")


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
import model as M
m = M.GPT(M.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
print("ready", flush=True)
step = {start}
while True:
    step += 1
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(step)  # the content says which step wrote it
    M.save_checkpoint("pretrain", step, m, None, dict(model_config={{}}), keep=2)
"""


def test_sigkill_during_save_never_leaves_a_broken_latest(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    rng, loaded = random.Random(0), 0
    env = {**os.environ, "FLATCHAT_HOME": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for trial in range(8):
        start = (trial + 1) * 1000
        p = subprocess.Popen([sys.executable, "-c", SAVER.format(root=root, start=start)], env=env,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        p.kill()
        p.wait()
        step = M.latest_step("pretrain")
        if step is None:
            continue  # killed before the first save completed
        state, _, meta, _ = M.load_checkpoint("pretrain", step)
        assert meta["step"] == step and all((v == step).all() for v in state.values())
        loaded += step > start  # this trial's own saves, not an older trial's
    assert loaded >= 3  # the kills really landed while checkpoints were being written


def test_loss_is_the_soft_capped_cross_entropy_and_ignores_minus_one():
    torch.manual_seed(0)
    m = GPT(CFG)
    m.init_weights()
    torch.nn.init.normal_(m.lm_head.weight, std=2.0)  # logits of ~20: the cap bites
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    y[1, :4] = -1
    h = M.norm(m.wte(x))
    for block in m.blocks:
        h = block(h, m.cos[:, :16], m.sin[:, :16], None)
    logits = M.norm(h) @ m.lm_head.weight[:300].t()
    ref = F.cross_entropy((15 * torch.tanh(logits / 15)).flatten(0, 1), y.flatten(), ignore_index=-1)
    assert torch.allclose(m(x, y), ref, atol=1e-5)
    assert m(x, torch.full_like(y, -1)).item() == 0.0  # no target at all: 0, not nan
    assert m(x).abs().max() <= 15.0


def test_one_softcap_constant_drives_both_loss_paths(monkeypatch):
    """SOFTCAP changed: the fused CPU loss (GPT.forward on a CPU) and the plain loss of GPT.logits (the GPU
    path) move together, to the cross-entropy of the new cap's logits, in value and gradient."""
    torch.manual_seed(0)
    h = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(37, 8, dtype=torch.float64) * 8).requires_grad_()  # raw logits of ~20: every cap bites
    y = torch.randint(-1, 37, (40,))
    def plain(cap):  # F.cross_entropy of GPT.logits, with lm_head's weight w
        m = M.GPT(M.GPTConfig(sequence_len=8, vocab_size=37, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)).double()
        m.lm_head.weight.data[:37] = w.detach()
        return F.cross_entropy(m.logits(h.detach()[None])[0], y, ignore_index=-1, reduction="none")
    fused15 = M.softcap_cross_entropy(h, w, y, False).detach()
    for cap in (5, 30):
        monkeypatch.setattr(M, "SOFTCAP", cap)
        ref = F.cross_entropy(cap * torch.tanh(h @ w.t() / cap), y, ignore_index=-1, reduction="none")
        assert torch.allclose(plain(cap).double(), ref.detach(), atol=1e-5)  # (logits() computes in fp32)
        assert torch.autograd.gradcheck(lambda h, w: M.SoftcapCrossEntropy.apply(h, w, y, True, 16), (h, w))
        assert torch.allclose(M.SoftcapCrossEntropy.apply(h, w, y, True, 16), ref)
        assert not torch.allclose(ref, fused15)  # the cap made a difference


def test_fused_cpu_loss_equals_the_plain_loss_in_value_and_gradient():
    """model.py's Speed section: SoftcapCrossEntropy against F.cross_entropy of the soft-capped logits,
    in float64 (gradcheck, 3 row chunks, ignored targets) and under bf16 autocast with negative weights."""
    torch.manual_seed(0)
    h = torch.randn(150, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(37, 8, dtype=torch.float64) * 8).requires_grad_()  # logits of ~20: the cap bites
    y = torch.randint(-1, 37, (150,))
    assert torch.autograd.gradcheck(lambda h, w: M.SoftcapCrossEntropy.apply(h, w, y, True, 64), (h, w))
    ref = F.cross_entropy(15 * torch.tanh(h @ w.t() / 15), y, ignore_index=-1, reduction="none")
    assert torch.allclose(M.SoftcapCrossEntropy.apply(h, w, y, True, 64), ref) and ref[y < 0].eq(0).all()
    with torch.no_grad():  # evaluation: no gradient is written, the loss is the same
        assert torch.allclose(M.softcap_cross_entropy(h, w, y, False), ref)
    h, w = torch.randn(100, 16, requires_grad=True), (torch.randn(300, 16) * 5).requires_grad_()
    y, a = torch.randint(-1, 300, (100,)), torch.randn(100)  # a < 0: RL advantages
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(15 * torch.tanh(h64 @ w64.t() / 15), y, ignore_index=-1, reduction="none")
    (ref * a).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head multiplies in bf16, the loss sums in fp32
        loss = M.softcap_cross_entropy(h, w, y, True)
    (loss * a).sum().backward()
    assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    assert torch.allclose(loss.double(), ref.detach(), atol=0.1, rtol=0.02)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (got.double() - want).norm() < 0.03 * want.norm()


def test_rotary_keeps_norms_and_makes_scores_depend_on_the_offset_only():
    cos, sin = M.rotary_tables(40, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    at = lambda v, t: M.rotary(v, cos[:, t:t + 1], sin[:, t:t + 1])
    assert torch.allclose(at(q, 7).norm(), q.norm())
    for s in (0, 5, 20):  # <q at t + 3, k at t> is the same for every t
        assert torch.allclose((at(q, s + 3) * at(k, s)).sum(), (at(q, 3) * at(k, 0)).sum(), atol=1e-5)
    assert not torch.allclose((at(q, 4) * at(k, 0)).sum(), (at(q, 3) * at(k, 0)).sum(), atol=1e-3)


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="inductor needs a C++ compiler on CPU")
def test_compiled_model_gives_the_eager_loss_and_gradients():
    """Under torch.compile the whole forward and loss run as one graph: losses (ignored targets included),
    every gradient, and the compiled optimizer's update must match eager."""
    torch.manual_seed(0)
    m = GPT(CFG)
    m.init_weights()
    torch.nn.init.normal_(m.blocks[0].attn.c_proj.weight, std=0.05)  # non-zero, so every weight gets a gradient
    torch.nn.init.normal_(m.blocks[1].mlp.c_proj.weight, std=0.05)
    x, y = torch.randint(0, CFG.vocab_size, (2, 32)), torch.randint(0, CFG.vocab_size, (2, 32))
    y[0, :5] = -1
    grads = []
    for model in (m, torch.compile(m, dynamic=False)):
        loss = model(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        m.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-5)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5, rtol=1e-4), name
    after = []
    for compiled in (False, True):
        m2 = GPT(CFG)
        m2.load_state_dict(m.state_dict())
        opt = m2.setup_optimizer(compile=compiled)
        for _ in range(2):  # the second step has momentum and Adam moments
            for n, p in m2.named_parameters():
                p.grad = g0[n].clone()
            opt.step()
        after.append(m2.state_dict())
    for name, p in m.state_dict().items():
        d0, d1 = after[0][name] - p, after[1][name] - p
        assert (d0 - d1).norm() <= 1e-4 * d0.norm() + 1e-7, name


def test_repetition_presence_and_frequency_penalties_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # tokens 0 (twice) and 1 (once) were generated already
    assert torch.equal(M.penalize(logits, counts, repetition=2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert torch.equal(M.penalize(logits, counts, presence=0.5), torch.tensor([[1.5, -1.5, 0.5, 3.0]]))
    assert torch.equal(M.penalize(logits, counts, frequency=0.5), torch.tensor([[1.0, -1.5, 0.5, 3.0]]))
    assert torch.equal(M.penalize(logits, counts, 1.0, 0.0, 0.0), logits)  # off: nothing changes
    m = trained_tiny_model()
    plain, _ = generate_batch(m, [5, 17, 42], max_tokens=100, temperature=0)
    off, _ = generate_batch(m, [5, 17, 42], max_tokens=100, temperature=0, penalties=dict(repetition=1.0, presence=0.0, frequency=0.0))
    hard, _ = generate_batch(m, [5, 17, 42], max_tokens=100, temperature=0, penalties=dict(frequency=100.0))
    assert off == plain and len(set(plain[0])) < 60 and len(set(hard[0])) == 100  # a huge penalty: no token twice


def test_lora_merged_weights_compute_what_base_plus_adapters_compute():
    torch.manual_seed(0)
    m = trained_tiny_model(steps=3)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    trainable, total = m.add_lora(4, 8.0, ("q", "v", "mlp"))
    assert trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32)) + 2 * (4 * (64 + 256) + 4 * (256 + 64)) and total > 10 * trainable
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [n for n, _ in m.named_parameters() if ".lora_" in n]
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(m(x), _plain(base)(x), atol=1e-6)  # B starts at 0: the model is unchanged
        for module in m.modules():
            if isinstance(module, M.LoRA):
                torch.nn.init.normal_(module.lora_B, std=0.1)
        plain = _plain(m.merged_state_dict())
        assert torch.allclose(m(x), plain(x), atol=1e-5) and not torch.allclose(m(x), _plain(base)(x), atol=1e-3)
    assert set(m.merged_state_dict()) == set(base)  # the plain model's keys: every stage loads it as usual


def _plain(state):
    model = GPT(CFG)
    model.load_state_dict(state)
    return model.eval()


def test_thread_fitting_waits_out_a_passing_load_before_a_recompile(monkeypatch):
    """fit_threads: a thread count not compiled before is taken only once the load has held for `hold`
    seconds; a count already used is taken at once; with hold 0 (eager) at once; said once, on stderr."""
    readings, clock = [], [0.0]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(M, "free_cores", lambda: readings.pop(0))
    monkeypatch.setattr(M.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(M, "_load", {})
    monkeypatch.setattr(M.os.path, "exists", lambda path: True)
    threads = [2]
    monkeypatch.setattr(M.torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(M.torch, "set_num_threads", lambda n: threads.__setitem__(0, n))
    cpu = torch.device("cpu")
    for t, free, want in [(0, 1, 2), (20, 1, 2), (35, 2, 2), (36, 1, 2), (70, 1, 2), (77, 1, 1),  # held 41 s
                          (80, 2, 2), (81, 1, 1), (90, None, 1)]:  # 2 and 1 both compiled: at once
        clock[0] = t
        readings.append(free)
        M.fit_threads(cpu, hold=40)
        assert threads[0] == want, (t, free)
    M._load.clear()
    readings.append(1)
    threads[0] = 2
    M.fit_threads(cpu)  # eager: no compile to pay for
    assert threads[0] == 1


def test_a_mixture_of_one_expert_is_the_dense_mlp_and_routing_is_deterministic():
    torch.manual_seed(0)
    config = M.GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                         num_experts=1, experts_per_token=1)
    dense, moe = M.MLP(config), M.MoE(config)
    with torch.no_grad():
        moe.router.weight.normal_()
        moe.c_fc[0] = dense.c_fc.weight
        moe.c_proj[0] = dense.c_proj.weight
    x = torch.randn(2, 8, 32)
    assert torch.equal(moe(x), dense(x)) and moe.aux.item() == 1.0  # one expert: the MLP, evenly loaded
    config.num_experts, config.experts_per_token = 4, 2
    moe = M.MoE(config)
    for p in (moe.router.weight, moe.c_fc, moe.c_proj):
        torch.nn.init.normal_(p, std=0.3)
    out, aux = moe(x), moe.aux
    assert torch.equal(moe(x), out) and moe.aux == aux  # the same tokens go the same way
    probs = moe.router(x).softmax(-1)  # by hand: each token's 2 best experts, mixed by their renormed scores
    w, e = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    for b in range(2):
        for t in range(8):
            for j in range(2):
                i = e[b, t, j]
                ref[b, t] += w[b, t, j] * (F.relu(moe.c_fc[i] @ x[b, t]).square() @ moe.c_proj[i].t())
    assert torch.allclose(out, ref, atol=1e-5) and aux > 0


def test_moe_counts_active_parameters_and_generates_with_the_cache_as_without():
    torch.manual_seed(0)
    config = M.GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=1, n_kv_head=1, n_embd=32,
                         num_experts=4, experts_per_token=1)
    model = M.GPT(config)
    model.init_weights()
    torch.nn.init.normal_(next(p for n, p in model.named_parameters() if n.endswith("mlp.c_proj")), std=0.1)
    dense = M.GPT(M.GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=1, n_kv_head=1, n_embd=32))
    routers = 2 * 4 * 32
    assert model.num_params() == dense.num_params() + 2 * 3 * 8 * 32**2 + routers
    assert model.active_params() == dense.num_params() + routers  # one expert a token: dense + the routers
    assert model.estimate_flops() == dense.estimate_flops() + 6 * routers
    model.eval()
    ids = [1, 5, 9, 2]
    cached, _ = M.generate_batch(model, ids, max_tokens=12, temperature=0)
    seq = list(ids)
    for _ in range(12):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached[0] == seq[len(ids):]
