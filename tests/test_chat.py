"""chat.py: the backend (prompt trimming, streaming decode, log tailing), the TUI through Textual's pilot,
and `chat.py -p` as a user runs it. A real tiny checkpoint is trained in the test (seconds, CPU)."""

import asyncio
import json
import re
import os
import subprocess
import sys
import time

import pytest
import torch

import chat
import model as M
from conftest import ROOT, learned_by_heart
from tokenizer import Tokenizer

TEXT = ("Once upon a time there was a little cat. The cat liked to play in the sun with her friend the dog. "
        "What is 12*3? It is 36. Caf\u00e9 au lait, s'il vous pla\u00eet! ") * 20
CONV = {"messages": [{"role": "user", "content": "what is 12*3?"},
                     {"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                                       {"type": "python", "text": "12*3"},
                                                       {"type": "python_output", "text": "36"},
                                                       {"type": "text", "text": ". Caf\u00e9 \u2615!"}]}]}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A base dir with a tokenizer and an sft checkpoint that learned CONV by heart (a tool call and
    multi-byte characters in its reply), sequence_len 64. One torch thread: tiny ops on shared cores."""
    home, threads = tmp_path_factory.mktemp("chat_home"), torch.get_num_threads()
    torch.set_num_threads(1)
    learned_by_heart(home, TEXT, CONV, stages=(("pretrain", 3), ("sft", 1)))  # ctrl+s has a stage to go to
    yield home
    torch.set_num_threads(threads)


@pytest.fixture
def loaded(home, monkeypatch):
    monkeypatch.setenv("FLATCHAT_HOME", str(home))
    return chat.load(device="cpu")


def reply_text(loaded, messages, **kw):
    stage, model, tok, _ = loaded
    return "".join(piece for piece, _ in chat.stream_reply(model, tok, messages, stage != "pretrain", **kw))


# -----------------------------------------------------------------------------
# Backend


def test_newest_stage_is_picked_and_reply_shows_the_tool_call(loaded):
    assert loaded[0] == "sft" and loaded[3]["step"] == 1
    text = reply_text(loaded, [{"role": "user", "content": "what is 12*3?"}], temperature=0.0)
    assert text == "It is [calc: 12*3 = 36]. Caf\u00e9 \u2615!"


def test_reply_decoder_never_splits_a_character_and_keeps_parts(loaded):
    tok = loaded[2]
    reply = chat.Reply(tok)
    pieces = [reply.add(b) for b in "\u2615".encode()]  # one byte token at a time
    assert pieces == ["", "", "\u2615"]
    for t in [tok.encode_special("<|python_start|>"), *tok.encode("2+2"), tok.encode_special("<|python_end|>"),
              tok.encode_special("<|output_start|>"), *tok.encode("4"), tok.encode_special("<|output_end|>"),
              *tok.encode(" ok"), tok.encode_special("<|assistant_end|>")]:
        reply.add(t)
    assert reply.done and reply.text == "\u2615[calc: 2+2 = 4] ok"
    assert reply.message()["content"] == [{"type": "text", "text": "\u2615"}, {"type": "python", "text": "2+2"},
                                          {"type": "python_output", "text": "4"}, {"type": "text", "text": " ok"}]


def test_trimming_keeps_bos_turn_boundaries_and_room_for_the_reply(loaded):
    tok = loaded[2]
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} about the cat"},
                     {"role": "assistant", "content": f"answer {i}: the dog"}]
    messages.append({"role": "user", "content": "last one?"})
    ids, dropped = chat.build_prompt(tok, messages, context=64, room=32)
    assert len(ids) <= 32 and ids[0] == tok.bos_id
    suffixes = [tok.render_for_completion({"messages": messages[k:]}) for k in range(0, len(messages), 2)]
    assert ids in suffixes  # whole turns dropped from the front, nothing cut inside one
    assert ids == next(s for s in suffixes if len(s) <= 32)  # and only as many as needed
    assert ids == suffixes[dropped // 2] and dropped > 0 and dropped % 2 == 0  # and it says how many
    assert chat.build_prompt(tok, messages, context=10**6, room=0) == (suffixes[0], 0)  # all of it fits
    # a single user turn longer than the context keeps its end, which primes the reply
    ids, dropped = chat.build_prompt(tok, [{"role": "user", "content": TEXT}], context=64, room=32)
    full = tok.render_for_completion({"messages": [{"role": "user", "content": TEXT}]})
    assert len(ids) == 32 and ids[:2] == full[:2] and ids[2:] == full[-30:] and dropped == 0
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    # a base model continues the text: <|bos|> and its end
    ids, dropped = chat.build_prompt(tok, [{"role": "user", "content": TEXT}], context=64, room=32, chat=False)
    assert ids == [tok.bos_id] + tok.encode(TEXT)[-31:] and dropped == 0


def test_tail_jsonl_reads_complete_lines_only(tmp_path):
    path = tmp_path / "pretrain.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    rows, offset, restarted = chat.tail_jsonl(path, 0)
    assert [r["step"] for r in rows] == [1] and not restarted
    with open(path, "a") as f:
        f.write('ss": 4.0}\n')
    rows, offset, restarted = chat.tail_jsonl(path, offset)
    assert [r["step"] for r in rows] == [2] and not restarted
    path.write_text('{"step": 1, "loss": 6.0}\n')  # a fresh run rewrote the log
    rows, offset, restarted = chat.tail_jsonl(path, offset)
    assert restarted and rows == [{"step": 1, "loss": 6.0}]


# -----------------------------------------------------------------------------
# The TUI through Textual's pilot


def run_app(loaded, steps, **kw):
    async def go():
        app = chat.ChatApp(*loaded, **kw)
        async with app.run_test(size=(100, 30)) as pilot:
            await steps(app, pilot)
    asyncio.run(go())


async def send(app, pilot, text):
    await pilot.press(*text, "enter")
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
    return [str(w.content) for w in app.query(".assistant")]


def test_tui_streams_the_models_reply_into_the_chat_pane(loaded):
    expected = [reply_text(loaded, [{"role": "user", "content": "hi"}], seed=42)]

    async def steps(app, pilot):
        shown = await send(app, pilot, "hi")
        assert shown == expected and [str(w.content) for w in app.query(".user")] == ["hi"]
        assert app.messages[0] == {"role": "user", "content": "hi"} and len(app.messages) == 2
        assert "tok/s" in str(app.query_one("#status").content)
        await pilot.press("ctrl+n")  # a new conversation empties the history and the pane
        assert app.messages == [] and not app.query(".assistant")
    run_app(loaded, steps)


def test_tui_keys_stop_generation_cycle_sampling_and_switch_stage(loaded, monkeypatch):
    def slow_stream(model, tok, messages, *args, **kw):  # a reply that would take 10 s
        reply = chat.Reply(tok)
        for t in tok.encode("la " * 100):
            time.sleep(0.1)
            yield reply.add(t), reply

    async def steps(app, pilot):
        monkeypatch.setattr(chat, "stream_reply", slow_stream)
        await pilot.press("h", "i", "enter")
        await pilot.pause(0.5)
        assert app.busy and "generating" in str(app.query_one("#status").content)
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not app.busy and 0 < len(app.messages[1]["content"]) < 300  # stopped part way, kept
        await pilot.press("ctrl+t", "ctrl+o")
        assert (app.temperature, app.top_k) == (0.9, 200)
        assert "temperature 0.9 | top-k 200" in str(app.query_one("#status").content)
        await pilot.press("ctrl+s")  # sft -> pretrain (completion mode), loaded in a worker
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.stage == "pretrain" and "pretrain step 3 (completion)" in str(app.query_one("#status").content)
    run_app(loaded, steps)


def test_tui_long_conversation_is_trimmed_not_crashed(loaded):
    async def steps(app, pilot):
        for i in range(12):  # ~500 tokens of history against a 64-token context
            app.messages += [{"role": "user", "content": f"tell me about the little cat number {i} in the sun"},
                             {"role": "assistant", "content": f"The cat {i} liked to play with her friend the dog."}]
            app.add_message(app.messages[-2]["content"], "user")
            app.add_message(app.messages[-1]["content"], "assistant")
        assert len(app.tok.render_for_completion({"messages": app.messages + [{"role": "user", "content": "x"}]})) > 500
        shown = await send(app, pilot, "again")
        assert len(shown) == 13 and len(app.messages) == 26
        assert 0 < app.prompt_len <= 32 and "context" in str(app.query_one("#status").content)
        # the turns the model no longer sees are dimmed on screen, and a note says how many
        seen = [str(w.content) for w in app.query(".user, .assistant") if not w.has_class("forgotten")]
        assert app.forgotten == 24 and seen == ["again", shown[-1]]
        assert [str(w.content) for w in app.query(".note")] == [
            "context full: the model no longer sees the first 24 messages (dimmed); ctrl+n starts afresh"]
    run_app(loaded, steps)


def test_tui_says_when_earlier_turns_fall_out_of_the_context(loaded):
    def dimmed(app):
        return [w.has_class("forgotten") for w in app.query(".user, .assistant")]

    async def steps(app, pilot):
        await send(app, pilot, "what is 12*3?")  # ~30 tokens with its reply: the prompt may take 32
        assert app.forgotten == 0 and not app.query(".note")
        for n in (2, 4):  # each new question leaves out the exchange before it
            await send(app, pilot, "what is 12*3?")
            assert app.forgotten == n and dimmed(app) == [True] * n + [False, False]
            note = app.query(".note").last()
            assert str(note.content) == (f"context full: the model no longer sees the first {n} messages (dimmed); "
                                         "ctrl+n starts afresh")
            shown = list(app.query_one("#messages").children)
            assert shown.index(note) == shown.index(app.query(".assistant").last()) - 1  # just above its reply
        await pilot.press("ctrl+n")
        assert app.forgotten == 0 and not app.query(".note")
    run_app(loaded, steps)


def test_footer_names_ctrl_q_and_ctrl_q_quits(loaded):
    from textual.widgets._footer import FooterKey

    async def steps(app, pilot):
        await pilot.pause()
        keys = {(k.key, k.description) for k in app.query(FooterKey)}
        assert ("ctrl+q", "quit") in keys and ("ctrl+n", "new chat") in keys
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert app.return_code == 0  # the app exited
    run_app(loaded, steps)


def test_training_view_shows_rows_appended_after_start(loaded, home):
    log = home / "logs" / "pretrain.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.write_text(json.dumps({"step": 1, "loss": 5.5, "lr": 0.02, "dt": 0.5, "tok_per_s": 900.0}) + "\n")

    async def steps(app, pilot):
        await pilot.press("ctrl+l")
        assert app.query_one("TabbedContent").active == "training"
        with open(log, "a") as f:
            f.write(json.dumps({"step": 7, "loss": 3.25, "lr": 0.01, "dt": 0.5, "tok_per_s": 1234.0,
                                "num_steps": 10}) + "\n")
            f.write(json.dumps({"step": 7, "val_bpb": 1.875}) + "\n" + '{"step": 8, "lo')
        await pilot.pause(1.2)
        title, spark, evals = app.logs["pretrain"]["widgets"]
        assert str(title.content) == "pretrain  step 7/10 | loss 3.2500 | lr 1.00e-02 | 1,234 tok/s | eta 0m01s"
        assert list(spark.data) == [5.5, 3.25] and "val_bpb 1.875" in str(evals.content)
    run_app(loaded, steps)
    log.unlink()


def test_training_view_plots_what_rl_optimises(loaded, home):
    log = home / "logs" / "rl.jsonl"
    log.parent.mkdir(exist_ok=True)
    grpo = [{"step": s, "loss": 0.0, "lr": 0.01, "dt": 1.0, "tok_per_s": 900.0, "reward": r, "zero_adv": 4}
            for s, r in enumerate([0.0, 0.25, 0.0, 0.5], 1)]
    log.write_text("".join(json.dumps(r) + "\n" for r in grpo))

    async def steps(app, pilot):
        await pilot.press("ctrl+l")
        await pilot.pause(0.2)
        title, spark, _ = app.logs["rl"]["widgets"]
        assert list(spark.data) == [0.0, 0.25, 0.0, 0.5]  # the reward, not the loss (0 on most RL steps)
        assert "loss 0.0000 | reward 0.5000" in str(title.content)
        dpo = [{"step": s, "loss": 0.69 - s / 100, "lr": 0.01, "margin": m, "accuracy": 1.0} for s, m in
               enumerate([0.1, 0.3, 0.2], 1)]
        log.write_text("".join(json.dumps(r) + "\n" for r in dpo))  # a DPO run replaces it
        await pilot.pause(1.2)
        assert list(spark.data) == [0.1, 0.3, 0.2]  # the reward margin DPO's loss widens
        assert "margin 0.2000" in str(title.content)
    run_app(loaded, steps)
    log.unlink()


# -----------------------------------------------------------------------------
# The command line, as a user runs it


def run_chat(home, *args):
    env = {**os.environ, "FLATCHAT_HOME": str(home), "FLATCHAT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_prompt_mode_prints_the_reply(home, loaded):
    proc = run_chat(home, "-p", "what is 12*3?", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "It is [calc: 12*3 = 36]. Caf\u00e9 \u2615!\n"


def test_no_checkpoint_exits_2_with_the_command_that_creates_it(tmp_path, home):
    proc = run_chat(tmp_path, "-p", "hi")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "python tokenizer.py train" in proc.stderr
    (tmp_path / "tokenizer").symlink_to(home / "tokenizer")
    proc = run_chat(tmp_path, "-p", "hi")
    assert proc.returncode == 2 and "python pretrain.py" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_checkpoint_of_another_tokenizer_is_refused(tmp_path, home, monkeypatch):
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    Tokenizer.train([TEXT], 280, num_proc=1).save(tmp_path / "tokenizer")
    (tmp_path / "checkpoints").symlink_to(home / "checkpoints")
    with pytest.raises(M.UserError, match="another tokenizer"):
        chat.load(device="cpu")


def test_training_view_scrolls_when_the_stages_do_not_fit_and_context_counts_the_replies(loaded, home):
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        rows = [{"step": s, "loss": 4.0 - s / 10, "lr": 0.01, "dt": 0.5, "tok_per_s": 900.0, "num_steps": 8} for s in range(1, 9)]
        rows += [{"step": s, "val_loss": 3.0 - s / 10} for s in range(0, 9, 2)]  # 5 eval rows per stage
        (logs / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    async def go():
        app = chat.ChatApp(*loaded)
        async with app.run_test(size=(110, 36)) as pilot:
            await send(app, pilot, "hi")
            status = str(app.query_one("#status").content)
            used = int(re.search(r"context (\d+)/", status)[1])  # the prompt and the reply together
            assert used == len(app.tok.render_conversation({"messages": app.messages}, max_tokens=10**6)[0]) > 6
            await pilot.press("ctrl+l")
            await pilot.pause(1.0)
            stages = app.query_one("#stages")
            assert stages.max_scroll_y > 0 and app.focused is stages  # taller than the screen; keys scroll it
            await pilot.press("end")
            await pilot.pause(0.5)
            last = app.logs["rl"]["widgets"][2]  # the rl eval rows, at the very bottom
            assert stages.region.contains_region(last.region) and "val_loss 2.2" in str(last.content)
    asyncio.run(go())
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        (logs / f"{stage}.jsonl").unlink()


# -----------------------------------------------------------------------------
# The OpenAI-compatible server (chat.py --serve), through the official openai client and raw HTTP

QUESTION = [{"role": "user", "content": "what is 12*3?"}]


@pytest.fixture
def api(loaded):
    """chat.py's server on a free port of 127.0.0.1, in a thread: (base url, the server)."""
    import threading
    stage, model, tok, _ = loaded
    server = chat.make_server(stage, model, tok, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", server
    server.shutdown()
    server.server_close()


def test_openai_client_gets_the_tuis_reply_whole_and_streamed(api, loaded):
    import openai
    url, _ = api
    client = openai.OpenAI(base_url=url, api_key="unused")
    want = reply_text(loaded, QUESTION, temperature=0, top_k=None)
    assert [m.id for m in client.models.list()] == ["flatchat-sft"]
    r = client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert "[calc: 12*3 = 36]" in want and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 5
    chunks = list(client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=0, max_tokens=40, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert [c.choices[0].delta.role for c in chunks] == ["assistant"] + [None] * (len(chunks) - 1)  # as OpenAI
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3  # token by token
    r = client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=0, stop=["36"])
    assert r.choices[0].message.content == want[:want.index("36")] and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=0, stop="36", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want[:want.index("36")]
    a, b = (client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=1.0, seed=7,
                                           presence_penalty=0.5, frequency_penalty=0.5).choices[0].message.content for _ in range(2))
    assert a == b  # the same seed, the same reply
    r = client.completions.create(model="flatchat-sft", prompt="Once upon a time", temperature=0, max_tokens=8)
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_a_400_in_openais_error_format_and_the_server_goes_on(api):
    import requests
    url, _ = api
    bad = {"invalid JSON": "{not json", "wrong roles": {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
           "prompt longer than the context": {"messages": [{"role": "user", "content": "the cat " * 200}]},
           "max_tokens 0": {"messages": QUESTION, "max_tokens": 0}, "max_tokens past the context": {"messages": QUESTION, "max_tokens": 10**6},
           "temperature 5": {"messages": QUESTION, "temperature": 5}, "no messages": {"messages": []},
           "seed not a number": {"messages": QUESTION, "seed": "abc"},
           "a role that does not exist": {"messages": [{"role": "robot", "content": "hi"}]},
           "a message that is not an object": {"messages": ["x", {"role": "user", "content": "hi"}]},
           "content that is not a string": {"messages": [{"role": "user", "content": 5}]}}
    for name, body in bad.items():
        r = requests.post(f"{url}/chat/completions", data=body if isinstance(body, str) else json.dumps(body), timeout=30)
        assert r.status_code == 400, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], name
    assert requests.post(f"{url}/completions", json={"prompt": 5}, timeout=30).status_code == 400
    assert requests.post(f"{url}/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, timeout=30).status_code == 200


def test_unknown_model_is_a_404_model_not_found_as_openai_answers_it(api):
    import openai
    import requests
    url, _ = api
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    for route, body in (("chat/completions", {"messages": QUESTION}), ("completions", {"prompt": "hi"})):
        r = requests.post(f"{url}/{route}", json={"model": "gpt-9", "stream": True, **body}, timeout=30)
        assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
        assert r.json() == {"error": {"message": "The model `gpt-9` does not exist: this server has `flatchat-sft`",
                                      "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
    r = requests.post(f"{url}/chat/completions", json={"model": None, "messages": QUESTION, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200  # null or absent: the model this server has


def test_streamed_chunks_carry_the_role_in_the_first_delta_only(api):
    import requests
    url, _ = api
    with requests.post(f"{url}/chat/completions", json={"messages": QUESTION, "stream": True, "temperature": 0},
                       stream=True, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}  # before the first token, as OpenAI sends it
    assert len(deltas) > 3 and all(set(d) == {"content"} for d in deltas[1:])
    with requests.post(f"{url}/completions", json={"prompt": "Once", "stream": True, "max_tokens": 4},
                       stream=True, timeout=30) as r:  # text completions have no roles
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: {")]
    assert events and all(set(e["choices"][0]) == {"index", "finish_reason", "text"} for e in events)


def test_sixteen_clients_at_once_are_all_answered(api, loaded):
    import openai
    from concurrent.futures import ThreadPoolExecutor
    url, _ = api
    want = reply_text(loaded, QUESTION, temperature=0, top_k=None)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    ask = lambda _: client.chat.completions.create(model="flatchat-sft", messages=QUESTION, temperature=0).choices[0].message.content
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, range(16))) == [want] * 16


def test_a_client_that_goes_away_stops_its_generation(api, monkeypatch):
    import requests
    url, server = api
    made = []

    def slow_stream(model, tok, messages, ids=None, **kw):  # 100 tokens, 0.05 s each: 5 s if nobody stops it
        reply = chat.Reply(tok)
        for t in tok.encode("la " * 100):
            made.append(t)
            time.sleep(0.05)
            yield reply.add(t), reply
    monkeypatch.setattr(chat, "stream_reply", slow_stream)
    with requests.post(f"{url}/chat/completions", json={"messages": QUESTION, "stream": True, "max_tokens": 60},
                       stream=True, timeout=30) as r:
        next(r.iter_lines())  # the first chunk, then hang up
    time.sleep(0.5)
    stopped = len(made)
    time.sleep(0.5)
    assert len(made) == stopped < 40  # nothing more was generated after the client left


def test_serve_from_the_command_line(home):
    import requests
    env = {**os.environ, "FLATCHAT_HOME": str(home), "FLATCHAT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--serve", "--port", "0"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        url = re.search(r"(http://\S+/v1)", line)[1]
        assert requests.get(f"{url}/models", timeout=30).json()["data"][0]["id"] == "flatchat-sft"
    finally:
        p.send_signal(2)  # ctrl+c
        assert p.wait(timeout=30) == 0
