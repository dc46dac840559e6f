"""chat.py --export: the ONNX model against PyTorch through onnxruntime (logits of a prefill and of steps
through the exported KV cache, a greedy reply token for token), the tiktoken file against our tokenizer, the
README's onnxruntime snippet run as written. A tiny model learns one conversation in the test (seconds, CPU).

onnxruntime, onnx, onnxscript and tiktoken are optional (export) or test-only lines of requirements.txt:
without them these tests skip (CI installs them, so they run there)."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's exporter needs it (and onnx, which it imports)

import chat  # noqa: E402
import model as M  # noqa: E402
from conftest import ROOT, learned_by_heart  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

GERMAN, JAPANESE, RUSSIAN = "Der schnelle Fuchs springt über den Hund.", "東京は日本の首都です。", "Быстрая лиса!"
QUESTION = "Who are you?"  # what the README's snippet asks
ANSWER = f"I am flatchat, a very small model that learned to talk on a laptop. {JAPANESE} {RUSSIAN}"
TEXT = f"{QUESTION} {ANSWER} {GERMAN} " * 20

# Both sides compute in fp32 and differ only in the order of their sums (matmul blocking, onnxruntime's fused
# kernels): a few 1e-6 here, on logits bounded by SOFTCAP = 15. 1e-4 leaves 25x room for other CPUs and
# kernels, while an export bug (a wrong rotary offset, mask or cache) moves logits by > 1e-2 (checked below).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A base dir whose sft checkpoint learned the conversation QUESTION -> ANSWER by heart, exported with
    `python chat.py --export` as a user runs it: (home, export dir, model, tokenizer)."""
    home = tmp_path_factory.mktemp("export_home")
    conversation = {"messages": [{"role": "user", "content": QUESTION},
                                 {"role": "assistant", "content": ANSWER}]}
    gpt, tok = learned_by_heart(home, TEXT, conversation, vocab_size=400, steps=80)
    env = {**os.environ, "FLATCHAT_HOME": str(home), "FLATCHAT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--export", str(home / "onnx")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.onnx" in proc.stdout and not proc.stderr.strip()  # torch.onnx's noise is kept quiet
    return home, home / "onnx", gpt, tok


def prompt_ids(tok, question):
    return tok.render_for_completion({"messages": [{"role": "user", "content": question}]})


def empty_cache(config, batch):  # past keys or values of no tokens: (L, B, H_kv, 0, D)
    return np.zeros((config.n_layer, batch, config.n_kv_head, 0, config.n_embd // config.n_head), np.float32)


def onnx_step(session, ids, keys, values):  # ids (B, T) -> logits (B, T, V), keys and values grown by T
    feed = {"input_ids": np.asarray(ids, np.int64), "past_keys": keys, "past_values": values}
    return session.run(None, feed)


def test_logits_match_pytorch_through_the_exported_kv_cache(exported):
    _, folder, gpt, tok = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["model_config"] == vars(gpt.config) and (config["stage"], config["step"]) == ("sft", 1)
    session = ort.InferenceSession(str(folder / "model.onnx"))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=gen)  # a batch of 2: the batch axis is dynamic
    keys, values = empty_cache(gpt.config, 2), empty_cache(gpt.config, 2)
    cache = M.KVCache(gpt.config.n_layer, 17)
    diffs = []
    with torch.no_grad():
        for step in range(5):  # the prefill, then 4 single tokens through the cache
            logits, keys, values = onnx_step(session, ids.numpy(), keys, values)
            want = gpt(ids, kv_cache=cache)
            assert logits.shape == tuple(want.shape) and keys.shape[3] == values.shape[3] == cache.pos
            np.testing.assert_allclose(keys, cache.k[:, :, :, :cache.pos].numpy(), atol=TOLERANCE, rtol=0)
            diffs.append(np.abs(logits - want.numpy()).max())
            ids = torch.randint(0, tok.vocab_size, (2, 1), generator=gen)
        forgot = onnx_step(session, ids.numpy(), empty_cache(gpt.config, 2), empty_cache(gpt.config, 2))[0]
        assert np.abs(forgot - gpt(ids, kv_cache=cache).numpy()).max() > 1e-2  # the check sees a lost cache
    print(f"max abs logits difference, prefill then 4 steps: {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) < TOLERANCE


def test_greedy_reply_matches_generate_token_for_token(exported):
    _, folder, gpt, tok = exported
    session = ort.InferenceSession(str(folder / "model.onnx"))
    ids = prompt_ids(tok, QUESTION)
    n = len(tok.encode(ANSWER)) + 1  # the learned answer and <|assistant_end|>: confident picks, no near-ties
    want = [tokens[0] for tokens, _ in M.generate(gpt, ids, max_tokens=n, temperature=0)]
    keys, values, got = empty_cache(gpt.config, 1), empty_cache(gpt.config, 1), []
    feed = [ids]
    for _ in range(n):
        logits, keys, values = onnx_step(session, feed, keys, values)
        got.append(int(logits[0, -1].argmax()))
        feed = [[got[-1]]]
    assert n >= 20 and got == want and tok.decode(got) == ANSWER + "<|assistant_end|>"


def test_tiktoken_file_encodes_exactly_as_our_tokenizer(exported):
    _, folder, _, tok = exported
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    config = json.loads((folder / "config.json").read_text())
    ranks = load_tiktoken_bpe(str(folder / "tokenizer.tiktoken"), expected_hash=config["tiktoken_sha256"])
    enc = tiktoken.Encoding("flatchat", pat_str=config["pattern"], mergeable_ranks=ranks,
                            special_tokens=config["special_tokens"])
    assert enc.n_vocab == tok.vocab_size
    texts = [QUESTION + " " + ANSWER, GERMAN, JAPANESE, RUSSIAN, "Ελληνικά, עברית, हिन्दी, 한국어",
             "emoji 😀 and code:\n\tdef f(x):\n\t\treturn x ** 2  # 12345\r\n\n", "<|bos|> as plain text"]
    for text in texts:
        ids = tok.encode(text)
        assert enc.encode_ordinary(text) == ids and enc.decode(ids) == text, text
    assert len(tok.encode(TEXT)) < len(TEXT.encode()) / 2  # merges at work, not bytes alone
    for name in tok.special_tokens:
        assert enc.encode(name, allowed_special="all") == [tok.encode_special(name)]


def test_readme_snippet_chats_with_the_export(exported, tmp_path):
    """The README's onnxruntime + tiktoken loop, as written, answers as flatchat's greedy generate does, even
    where tiktoken's cache holds another tokenizer under the same path (an earlier export)."""
    home, folder, gpt, tok = exported
    pytest.importorskip("tiktoken")  # the snippet reads the tokenizer with it
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run it outside PyTorch"):]
    assert "python chat.py --export onnx" in section
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    stale = "".join(open(folder / "tokenizer.tiktoken").readlines()[:256])  # another tokenizer: no merges
    (tmp_path / hashlib.sha1(b"onnx/tokenizer.tiktoken").hexdigest()).write_text(stale)  # tiktoken's cache key
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=home, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = prompt_ids(tok, QUESTION)
    reply = M.generate_batch(gpt, ids, max_tokens=60, temperature=0, tokenizer=tok)[0][0]
    assert reply[-1] == tok.encode_special("<|assistant_end|>")
    assert proc.stdout == tok.decode(reply[:-1]) + "\n" == ANSWER + "\n"


def test_grouped_query_attention_exports_too(tmp_path):
    torch.manual_seed(0)
    config = M.GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    gpt = M.GPT(config)
    gpt.init_weights()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the identity blocks of a fresh init
    tok = Tokenizer.train([TEXT], 300, num_proc=1)
    chat.export(gpt.eval(), tok, {"stage": "pretrain", "step": 0}, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    ids = torch.randint(0, 300, (1, 7))
    empty = empty_cache(config, 1)
    logits, keys, values = onnx_step(session, ids[:, :5].numpy(), empty, empty.copy())  # a prefill of 5
    logits = onnx_step(session, ids[:, 5:].numpy(), keys, values)[0]  # then 2 tokens at once
    with torch.no_grad():
        assert np.abs(logits - gpt(ids)[:, 5:].numpy()).max() < TOLERANCE


def test_export_mistakes_end_in_one_line_naming_the_fix(exported, tmp_path):
    home = exported[0]
    env = {**os.environ, "FLATCHAT_HOME": str(home), "FLATCHAT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    no_onnxscript = ("import runpy, sys; sys.modules['onnxscript'] = None; sys.argv[0] = 'chat.py';"
                     "runpy.run_path('chat.py', run_name='__main__')")  # its import fails as if not installed
    (tmp_path / "a_file").write_text("")
    runs = {"pip install onnx onnxscript": ["-c", no_onnxscript, "--export", str(tmp_path / "out")],
            "name a folder you can write": [str(ROOT / "chat.py"), "--export", str(tmp_path / "a_file")]}
    for fix, args in runs.items():
        proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and fix in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
