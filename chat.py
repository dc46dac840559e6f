"""
chat.py: talk to a flatchat checkpoint in the terminal or over an OpenAI-compatible API, and watch training live.

    python chat.py                            # TUI on the newest checkpoint: rl > sft > midtrain > pretrain
    python chat.py --stage sft --step 800     # TUI on a chosen checkpoint
    python chat.py -p "What is 12*3?"         # one reply on stdout, no TUI (for scripts and pipes)
    python chat.py --serve --port 8000        # an OpenAI-compatible API at http://127.0.0.1:8000/v1
    python chat.py --export onnx              # the model as ONNX and the tokenizer for tiktoken, in onnx/
    FLATCHAT_HOME=/path/to/run python chat.py # another run's base directory

Chat tab: enter sends, escape stops the reply, ctrl+n starts a new conversation, ctrl+t / ctrl+o / ctrl+r
cycle the temperature / top-k / repetition penalty, ctrl+s loads the next stage that has a checkpoint, ctrl+q
quits; earlier turns that no longer fit the context are dimmed, with a note. ctrl+l toggles the Training tab:
per stage a curve of the loss (rl: the reward), the latest step, lr, tok/s, eta and eval rows, tailed live
from logs/*.jsonl. A base (pretrain) checkpoint knows no chat format: it continues each message as text.
"""

import base64
import codecs
import contextlib
import hashlib
import json
import logging
import math
import random
import select
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Footer, Input, Sparkline, Static, TabbedContent, TabPane

from model import STAGE_COMMANDS, UserError, autodetect_device, generate, latest_step, load_model
from tokenizer import Parser, base_dir, check_home, exit_on_user_error, ranged

# -----------------------------------------------------------------------------
# Backend: pick and load a checkpoint, build the prompt, stream a reply, tail a log

STAGES = list(STAGE_COMMANDS)  # pipeline order: pretrain, midtrain, sft, rl; the last one present wins

def load(stage=None, step=None, device="cpu"):
    """(stage, model, tokenizer, meta): by default the newest stage's latest step (none: pretrain's UserError)."""
    stage = stage or ([s for s in STAGES if latest_step(s) is not None] or ["pretrain"])[-1]
    return stage, *load_model(stage, device, step)[:3]

def build_prompt(tok, messages, context, room, chat=True):
    """(prompt ids, messages left out): at most `context - room` tokens so the reply has `room` left. Too
    long: the oldest user/assistant pairs are left out; one turn alone still too long keeps its end."""
    budget = max(context - room, 4)
    if not chat:  # base model: continue the last message as a document
        ids = [tok.bos_id] + tok.encode(messages[-1]["content"])
        return ids[:1] + ids[1:][-(budget - 1):], 0
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    ids = tok.render_for_completion({"messages": system + turns})
    while len(ids) > budget and len(turns) > 1:
        turns = turns[2:]  # still starts with a user turn
        ids = tok.render_for_completion({"messages": system + turns})
    if len(ids) > budget:  # keep <|bos|><|user_start|> and the turn's end, which primes the reply
        ids = ids[:2] + ids[-(budget - 2):]
    return ids, len(messages) - len(system) - len(turns)

class Reply:
    """Generated ids -> the text to show as they arrive, and the message parts for the history. An incremental
    UTF-8 decoder never splits a character over tokens; a calculator call shows as `[calc: 12*3 = 36]`."""

    MARKS = {"<|python_start|>": ("python", "[calc: "), "<|python_end|>": ("python_end", ""),
             "<|output_start|>": ("python_output", " = "), "<|output_end|>": ("text", "]")}

    def __init__(self, tok, prompt_len=0, dropped=0):  # dropped: the earlier messages its prompt left out
        self.tok, self.kind, self.text, self.parts, self.n, self.done = tok, "text", "", [], 0, False
        self.prompt_len, self.dropped, self.t0, self.t_first = prompt_len, dropped, time.time(), None
        self.marks = {tok.encode_special(name): v for name, v in self.MARKS.items()}
        self.stops = {tok.encode_special("<|assistant_end|>"), tok.bos_id}
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, t):
        """Feed one token id; returns the text it adds ("" while a character is still incomplete)."""
        self.n, self.t_first, out = self.n + 1, self.t_first or time.time(), ""
        if self.kind == "python_end" and self.marks.get(t, ("",))[0] != "python_output":
            out, self.kind = "]", "text"  # the calculator had no answer: close the bracket
        if t in self.stops:
            self.done = True
            out += self.flush()
        elif t in self.marks:
            out += self.flush() + self.marks[t][1]
            self.kind = self.marks[t][0]
        elif self.tok.token_bytes[t]:  # other special tokens (0 bytes) do not belong in a reply: not shown
            out += self._part(self.utf8.decode(self.tok.decode_bytes([t])))
        self.text += out
        return out

    def flush(self):
        return self._part(self.utf8.decode(b"", final=True))

    def _part(self, s):
        if s and self.parts and self.parts[-1]["type"] == self.kind:
            self.parts[-1]["text"] += s
        elif s:
            self.parts.append({"type": self.kind, "text": s})
        return s

    def stats(self):
        speed = (self.n - 1) / max(time.time() - self.t_first, 1e-6) if self.n > 1 else 0.0
        return f"first token {self.t_first - self.t0:.2f} s, {speed:.0f} tok/s" if self.n else ""

    def message(self):
        plain = all(p["type"] == "text" for p in self.parts)
        return {"role": "assistant", "content": "".join(p["text"] for p in self.parts) if plain else self.parts}

def stream_reply(model, tok, messages, chat=True, max_tokens=256, temperature=0.6, top_k=50, seed=42, top_p=None,
                 penalties=None, ids=None):
    """Yields (new text, Reply) per token; the prompt (`ids`, else built from `messages`) leaves the reply room
    and the context's end stops it. penalties: model.penalize's repetition / presence / frequency."""
    context = model.config.sequence_len
    room = min(max_tokens, context // 2)
    ids, dropped = (ids, 0) if ids else build_prompt(tok, messages, context, room, chat)
    reply = Reply(tok, len(ids), dropped)
    for tokens, _ in generate(model, ids, max_tokens=max(1, min(max_tokens, context - len(ids))), top_k=top_k or None,
                              temperature=temperature, top_p=top_p, seed=seed, tokenizer=tok, penalties=penalties):
        yield reply.add(tokens[0]), reply
        if reply.done:
            return
    reply.done = True
    yield reply.flush(), reply

def tail_jsonl(path, offset):
    """New complete rows of a JSONL log since byte `offset`: (rows, new offset, restarted). A torn last
    line (the writer is mid-append) waits for the next call; a rewritten file (a fresh run) starts over."""
    with open(path, "rb") as f:
        f.seek(max(offset - 1, 0))
        data = f.read()
    if offset > 0 and data[:1] != b"\n":  # not where our last line ended: the file was rewritten
        return *tail_jsonl(path, 0)[:2], True
    data = data[1:] if offset > 0 else data
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by a killed writer: skip it
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and "step" in r], offset + end, False

PLOTTED = ("reward", "margin", "loss")  # a training row's sparkline value: rl's reward (GRPO) or margin (DPO)

def fmt_row(row):
    """`step 120/2000 | loss 3.4120 | lr 1.20e-03 | 52,000 tok/s | eta 3m20s`, or `eval @ step 100: ...`."""
    if "loss" not in row:
        return f"eval @ step {row['step']}: " + " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in ("step", "time"))
    total = row.get("num_steps")
    line = f"step {row['step']}" + (f"/{total}" if total else "") + f" | loss {row['loss']:.4f}"
    line += "".join(f" | {k} {row[k]:.4f}" for k in PLOTTED[:2] if k in row)
    line += f" | lr {row['lr']:.2e}" if "lr" in row else ""
    line += f" | {row['tok_per_s']:,.0f} tok/s" if "tok_per_s" in row else ""
    eta = (total - row["step"]) * row.get("dt", 0) if total else None
    return line + (f" | eta {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None else "")

# -----------------------------------------------------------------------------
# The Textual app: a Chat tab and a Training tab

def cycle(values, current):  # the value after `current`, round and round
    return values[(values.index(current) + 1) % len(values)] if current in values else values[0]

class ChatApp(App):
    CSS = """
    #messages { height: 1fr; padding: 0 1; }
    .user { color: $accent; text-style: bold; margin-top: 1; }
    .assistant { padding-left: 2; }
    .note { color: $text-muted; margin-top: 1; }
    .forgotten { text-opacity: 50%; }
    #status { height: 1; background: $boost; padding: 0 1; }
    #stages { height: 1fr; }
    .stage { height: auto; margin-bottom: 1; }
    .stage Sparkline { height: 4; }
    """
    BINDINGS = [Binding("escape", "stop", "stop")] + [Binding(*b, priority=True) for b in [  # even in the input
        ("ctrl+n", "new_chat", "new chat"), ("ctrl+t", "cycle('temperature')", "temperature"),
        ("ctrl+o", "cycle('top_k')", "top-k"), ("ctrl+r", "cycle('repetition')", "repetition"),
        ("ctrl+s", "next_stage", "stage"), ("ctrl+l", "toggle_view", "chat/training"),
        ("ctrl+q", "quit", "quit")]]
    CHOICES = {"temperature": [0.0, 0.3, 0.6, 0.9, 1.2], "top_k": [1, 5, 20, 50, 200, 0],  # what ^t, ^o, ^r cycle
               "repetition": [1.0, 1.1, 1.2, 1.5]}

    def __init__(self, stage, model, tok, meta, max_tokens=256, temperature=0.6, top_k=50, seed=42, penalties=None):
        super().__init__()
        self.stage, self.model, self.tok, self.meta = stage, model, tok, meta
        self.max_tokens, self.temperature, self.top_k, self.seed = max_tokens, temperature, top_k, seed
        self.penalties = dict(penalties or {})  # presence, frequency (flags); repetition: ^r cycles it
        self.repetition = self.penalties.pop("repetition", 1.0)
        self.messages, self.replies, self.speed, self.prompt_len, self.chat_id = [], 0, "", 0, 0
        self.forgotten = 0  # the earlier messages that no longer fit the context (dimmed)
        self.busy, self.stop_event = False, threading.Event()
        self.log_dir, self.logs = base_dir() / "logs", {}  # stage -> offset, sparkline values, evals, widgets

    def compose(self):
        with TabbedContent(initial="chat"):
            with TabPane("Chat", id="chat"):
                yield VerticalScroll(id="messages")
                yield Static(id="status", markup=False)
                yield Input(placeholder="Message (enter sends)", id="input")
            with TabPane("Training", id="training"):
                yield VerticalScroll(Static(f"waiting for {self.log_dir}/*.jsonl", id="nologs"), id="stages")
        yield Footer()

    def on_mount(self):
        self.show_status()
        self.query_one("#input").focus()
        self.poll_logs()
        self.set_interval(0.5, self.poll_logs)

    def show_status(self):
        parts = [f"{self.stage} step {self.meta['step']}" + (" (completion)" if self.stage == "pretrain" else ""),
                 f"temperature {self.temperature}", f"top-k {self.top_k or 'off'}",
                 f"repetition {self.repetition}" if self.repetition != 1 else "",
                 f"context {self.prompt_len}/{self.model.config.sequence_len}", self.speed,
                 "generating (esc stops)" if self.busy else ""]
        self.query_one("#status", Static).update(" | ".join(p for p in parts if p))

    def add_message(self, text, kind):
        box = self.query_one("#messages", VerticalScroll)
        box.mount(widget := Static(text, classes=kind, markup=False))
        box.scroll_end(animate=False)
        return widget

    # --- chat: a worker thread streams the reply, the UI takes the text every ~50 ms, not per token
    def on_input_submitted(self, event):
        text = event.value.strip()
        if not text or self.busy:
            return
        event.input.value, self.busy = "", True
        self.stop_event.clear()
        self.messages.append({"role": "user", "content": text})
        self.add_message(text, "user")
        self.respond(self.add_message("", "assistant"), list(self.messages), self.seed + self.replies, self.chat_id)
        self.replies += 1  # reply n samples with seed + n
        self.show_status()

    @work(thread=True, exclusive=True, group="generate")
    def respond(self, out, messages, seed, chat_id):
        last, reply = time.time(), None
        try:
            penalties = {**self.penalties, "repetition": self.repetition}
            for _, reply in stream_reply(self.model, self.tok, messages, self.stage != "pretrain", self.max_tokens,
                                         self.temperature, self.top_k, seed, penalties=penalties):
                if self.stop_event.is_set():
                    break
                if time.time() - last > 0.05:
                    last = time.time()
                    self.call_from_thread(self.show_reply, out, reply, None)
        except Exception as e:  # a bug must not take the conversation down with it
            self.call_from_thread(self.add_message, f"error: {type(e).__name__}: {e}", "note")
        self.call_from_thread(self.show_reply, out, reply, chat_id)

    def show_reply(self, out, reply, chat_id):
        """Show the reply so far (chat_id None) or the finished one, kept in its conversation's history."""
        if reply is not None:
            out.update(reply.text + (" ▌" if chat_id is None else ""))
            self.speed, self.prompt_len = reply.stats(), reply.prompt_len + reply.n  # the prompt and the reply
        if chat_id is not None:
            if chat_id == self.chat_id:  # not after ctrl+n started another conversation
                self.messages.append(reply.message() if reply else {"role": "assistant", "content": ""})
                if reply and reply.dropped > self.forgotten:  # the conversation outgrew the context
                    self.forget(reply.dropped, out)
            self.busy = False
        self.query_one("#messages", VerticalScroll).scroll_end(animate=False)
        self.show_status()

    def forget(self, n, out):
        """Dim the first n messages, which the model no longer sees, and say so above the reply `out`."""
        for widget in self.query(".user, .assistant").nodes[self.forgotten:n]:
            widget.add_class("forgotten")
        note = f"context full: the model no longer sees the first {n} messages (dimmed); ctrl+n starts afresh"
        self.query_one("#messages").mount(Static(note, classes="note", markup=False), before=out)
        self.forgotten = n

    def action_stop(self):
        self.stop_event.set()

    def action_new_chat(self):
        self.stop_event.set()
        self.messages, self.chat_id, self.forgotten = [], self.chat_id + 1, 0
        self.prompt_len, self.speed = 0, ""
        self.query_one("#messages", VerticalScroll).remove_children()
        self.show_status()

    def action_cycle(self, name):
        setattr(self, name, cycle(self.CHOICES[name], getattr(self, name)))
        self.show_status()

    def action_next_stage(self):
        stages = [s for s in STAGES if latest_step(s) is not None]
        if stages and not self.busy:
            self.busy = True
            self.query_one("#status", Static).update(f"loading {cycle(stages, self.stage)} ...")
            self.switch_stage(cycle(stages, self.stage))

    @work(thread=True, exclusive=True, group="load")
    def switch_stage(self, stage):
        try:
            loaded = load(stage, None, self.model.get_device())
            note = f"--- now {stage} step {loaded[3]['step']} ---"
        except UserError as e:  # the checkpoint went away, or another tokenizer: keep the current model
            loaded, note = (self.stage, self.model, self.tok, self.meta), f"error: {e}"
        self.call_from_thread(self.use_model, loaded, note)

    def use_model(self, loaded, note):
        self.stage, self.model, self.tok, self.meta = loaded
        self.busy = False
        self.add_message(note, "note")
        self.show_status()

    def action_toggle_view(self):
        tabs = self.query_one(TabbedContent)
        tabs.active = "training" if tabs.active == "chat" else "chat"
        self.query_one("#input" if tabs.active == "chat" else "#stages").focus()  # focus follows the tab

    # --- training: tail logs/*.jsonl twice a second
    def poll_logs(self):
        order = lambda p: (STAGES.index(p.stem) if p.stem in STAGES else len(STAGES), p.stem)
        for path in sorted(self.log_dir.glob("*.jsonl"), key=order):
            if path.stem not in self.logs:  # a new log: its title line, loss sparkline and eval rows
                widgets = (Static(path.stem, markup=False), Sparkline([]), Static("", markup=False))
                self.query_one("#stages").mount(Vertical(*widgets, classes="stage"))
                self.query_one("#nologs").display = False
                self.logs[path.stem] = dict(offset=0, values=[], evals=[], line="", widgets=widgets)
            log = self.logs[path.stem]
            try:
                rows, log["offset"], restarted = tail_jsonl(path, log["offset"])
            except OSError:  # deleted between glob and open
                continue
            if restarted:
                log["values"], log["evals"] = [], []
            for row in rows:
                try:
                    line = fmt_row(row)
                except (TypeError, ValueError, KeyError):  # a row of unexpected types: shown raw
                    line = json.dumps(row)
                if "loss" not in row:
                    log["evals"].append(line)
                    continue
                log["line"] = line
                value = next(row[k] for k in PLOTTED if k in row)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    log["values"].append(value)
            if rows or restarted:
                title, spark, evals = log["widgets"]
                title.update(f"{path.stem}  {log['line']}")
                spark.data = log["values"][-2000:]
                evals.update("\n".join(log["evals"][-8:]))

# -----------------------------------------------------------------------------
# An OpenAI-compatible HTTP server (python chat.py --serve): /v1/chat/completions, /v1/completions, /v1/models

def error(message, code=None):  # OpenAI's JSON error body
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}

# The numbers a request may set, OpenAI's name -> (lowest, highest); null or absent: the default
RANGES = {"temperature": (0, 2), "top_p": (0, 1), "top_k": (0, 10**6), "presence_penalty": (-2, 2),
          "frequency_penalty": (-2, 2), "repetition_penalty": (0.01, 10), "seed": (-2**63, 2**63 - 1)}

class API(BaseHTTPRequestHandler):
    """One thread per connection (ThreadingHTTPServer); the model answers one request at a time (a lock)."""
    lock = threading.Lock()

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self.send(404, error(f"no route GET {self.path}"))
        model = dict(id=self.server.name, object="model", created=0, owned_by="flatchat")
        self.send(200, {"object": "list", "data": [model]})

    def do_POST(self):
        route = self.path.rstrip("/")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if route not in ("/v1/chat/completions", "/v1/completions"):
                return self.send(404, error(f"no route POST {self.path}"))
            if isinstance(body, dict) and body.get("model") not in (None, self.server.name):  # OpenAI's 404
                why = f"The model `{body['model']}` does not exist: this server has `{self.server.name}`"
                return self.send(404, error(why, "model_not_found"))
            ids, kw = self.request_args(body, chat := route == "/v1/chat/completions")
        except ValueError as e:  # a bad request (invalid JSON too): 400, and what is wrong with it
            return self.send(400, error(str(e)))
        with API.lock:  # requests queue for the model
            self.answer(ids, chat, **kw)

    def request_args(self, body, chat):
        """A request's prompt ids and the rest of answer()'s arguments, checked: a ValueError says what is wrong."""
        tok, context = self.server.tok, self.server.model.config.sequence_len
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        body = {k: v for k, v in body.items() if v is not None}  # null: the default, as in OpenAI's API
        if chat:
            messages = body.get("messages")
            if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
                    and messages[-1].get("role") == "user" and isinstance(messages[-1].get("content"), str)):
                raise ValueError("'messages' must be a list of {role, content} ending with a user message")
            ids, _ = build_prompt(tok, messages, 10**9, 0, self.server.stage != "pretrain")  # bad roles: 400
        elif isinstance(body.get("prompt"), str):
            ids = [tok.bos_id] + tok.encode(body["prompt"])
        else:
            raise ValueError("'prompt' must be a string")
        room = context - len(ids)  # the prompt and the reply share the context
        if room < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens: this model's context is {context} tokens")
        body.setdefault("max_tokens", body.get("max_completion_tokens", min(256, room)))
        for key, (low, high) in {**RANGES, "max_tokens": (1, room)}.items():
            if key in body and not (isinstance(body[key], (int, float)) and low <= body[key] <= high):
                why = f" (the prompt takes {len(ids)} of the context's {context} tokens)" if key == "max_tokens" else ""
                raise ValueError(f"'{key}' must be a number from {low} to {high}, got {body[key]!r}{why}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ValueError("'stop' must be a string or a list of up to 4 strings")
        if body.get("n", 1) != 1:
            raise ValueError("only n = 1 is supported")
        penalties = dict(repetition=body.get("repetition_penalty", 1.0), presence=body.get("presence_penalty", 0.0),
                         frequency=body.get("frequency_penalty", 0.0))
        return ids, dict(stream=bool(body.get("stream")), stop=stop, max_tokens=int(body["max_tokens"]),
                         temperature=body.get("temperature", 1.0), top_k=int(body.get("top_k", 0)),
                         top_p=body.get("top_p"), seed=int(body.get("seed", random.randrange(2**31))),
                         penalties=penalties)

    def answer(self, ids, chat, stream, stop, **kw):
        """Generate, streamed as server-sent events or whole; a client that goes away stops its generation."""
        kind = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else "")
        head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{random.randrange(16**12):012x}", object=kind,
                    created=int(time.time()), model=self.server.name)

        def piece(text, reason=None, role="assistant"):  # a response, or a streamed chunk, with one choice
            message = {"role": role, "content": text} if role else {"content": text}
            out = {"delta" if stream else "message": message} if chat else {"text": text}
            return {**head, "choices": [{"index": 0, "finish_reason": reason, **out}]}
        text, sent, cut, reply = "", 0, -1, None
        hold = max(map(len, stop), default=1) - 1  # held back while it may be the start of a stop string
        try:
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if chat:  # as OpenAI streams it: the role in the first chunk alone
                    self.event(piece(""))
            for new, reply in stream_reply(self.server.model, self.server.tok, [], ids=ids, **kw):
                if self.gone():
                    return
                text += new
                if (cut := min((text.find(s) for s in stop if s in text), default=-1)) >= 0:
                    text = text[:cut]
                    break
                if stream and len(text) - hold > sent:
                    self.event(piece(text[sent:len(text) - hold], role=None))
                    sent = len(text) - hold
            n = reply.n if reply else 0
            reason = "stop" if cut >= 0 or n < kw["max_tokens"] else "length"
            if not stream:
                usage = dict(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
                return self.send(200, {**piece(text, reason), "usage": usage})
            self.event(piece(text[sent:], reason, None))
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):  # the client went away: its generation stops here
            pass

    def gone(self):  # has the client closed its connection? (readable, with nothing to read)
        return bool(select.select([self.connection], [], [], 0)[0]) and not self.connection.recv(1, socket.MSG_PEEK)

    def event(self, data):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def send(self, status, data):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

def make_server(stage, model, tok, host="127.0.0.1", port=8000):
    """The HTTP server of API for one loaded model (port 0: any free port); serve_forever() runs it."""
    server = ThreadingHTTPServer((host, port), API)
    server.daemon_threads = True
    server.stage, server.model, server.tok, server.name = stage, model, tok, f"flatchat-{stage}"
    return server

# -----------------------------------------------------------------------------
# Export (python chat.py --export DIR): the model as ONNX, its KV cache in and out; the tokenizer for tiktoken

class Step(torch.nn.Module):
    """The exported graph: (input_ids, past_keys, past_values) -> (logits, keys, values), where the past is
    (L, B, H_kv, T_past, D). It is GPT.forward's KV cache too (pos and insert(), as model.KVCache's)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):
        self.past, self.pos, self.keys, self.values = (past_keys, past_values), past_keys.size(3), [], []
        logits = self.model(input_ids, kv_cache=self)  # (B, T, V), soft-capped
        return logits, torch.stack(self.keys), torch.stack(self.values)

    def insert(self, layer, k, v):  # k, v (B, H_kv, T, D) -> (B, H_kv, T_past + T, D), kept for the outputs
        self.keys.append(torch.cat([self.past[0][layer], k], dim=2))
        self.values.append(torch.cat([self.past[1][layer], v], dim=2))
        return self.keys[-1], self.values[-1]

def export(model, tok, meta, folder):
    """folder/model.onnx: Step, with dynamic batch, T and T_past axes; tokenizer.tiktoken: each token's bytes
    in base64 and its id (tiktoken's load_tiktoken_bpe format); config.json: pattern, special ids, config."""
    try:  # torch.onnx's exporter (torch.export underneath) writes the graph with onnxscript and onnx
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"--export needs the {e.name} package: pip install onnx onnxscript") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--export {folder}: {e.strerror}: name a folder you can write") from None
    c, model = model.config, model.cpu()  # traced on the CPU (plain attention): the graph runs anywhere
    ids = torch.zeros(1, 3, dtype=torch.long)  # examples: only their shapes matter
    past = torch.zeros(c.n_layer, 1, c.n_kv_head, 2, c.n_embd // c.n_head)
    B, T, T_past = (torch.export.Dim(name) for name in ("batch", "seq", "past"))
    shapes = dict(input_ids={0: B, 1: T}, past_keys={1: B, 3: T_past}, past_values={1: B, 3: T_past})
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on what it does without (torchvision)
    with torch.no_grad(), warnings.catch_warnings(action="ignore"):  # past twice would be one input: a clone
        torch.onnx.export(Step(model).eval(), (ids, past, past.clone()), folder / "model.onnx", dynamo=True,
                          input_names=["input_ids", "past_keys", "past_values"], verbose=False,
                          output_names=["logits", "keys", "values"], dynamic_shapes=shapes,
                          external_data=model.num_params() > 5e8)  # protobuf's 2 GB cap: weights beside it
    n = 256 + len(tok.merges)  # every token but the special ones
    ranks = "".join(f"{base64.b64encode(tok.decode_bytes([i])).decode()} {i}\n" for i in range(n))
    (folder / "tokenizer.tiktoken").write_text(ranks)
    specials = {name: tok.encode_special(name) for name in tok.special_tokens}
    config = dict(pattern=tok.pattern, special_tokens=specials, model_config=vars(c), stage=meta["stage"],
                  step=meta["step"], tokenizer_hash=tok.hash,  # tiktoken caches files by path: a new
                  tiktoken_sha256=hashlib.sha256(ranks.encode()).hexdigest())  # one is known by its hash
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 1e6
    print(f"wrote {folder}: model.onnx ({size:.1f} MB), tokenizer.tiktoken, config.json")

# -----------------------------------------------------------------------------
# Arguments, load the checkpoint (a missing one exits 2 before any TUI starts), then --export, --serve, TUI or -p

if __name__ == "__main__":
    parser = Parser(description="Chat with a flatchat checkpoint (Textual TUI), answer one prompt, or serve it.")
    parser.add_argument("-p", "--prompt", help="answer this prompt on stdout and exit (no TUI)")
    parser.add_argument("--stage", choices=STAGES,
                        help="checkpoint stage (default: the newest that exists, rl > sft > midtrain > pretrain)")
    parser.add_argument("--step", type=ranged(int, 0), help="checkpoint step (default: the stage's latest)")
    parser.add_argument("--device", help="cpu | cuda | mps (default: autodetect)")
    # sampling
    parser.add_argument("--max-tokens", type=ranged(int, 1), default=256,
                        help="most tokens in a reply (the context caps it too)")
    parser.add_argument("--temperature", type=ranged(float, 0), default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=ranged(int, 0), default=50, help="sample from the k likeliest tokens (0 = off)")
    parser.add_argument("--seed", type=ranged(int, 0), default=42, help="seed of the first reply (reply n: seed + n)")
    parser.add_argument("--repetition-penalty", type=ranged(float, 0.01, 10), default=1.0,
                        help="divides the logits of tokens already in the reply (1 = off; ^r cycles it in the TUI)")
    parser.add_argument("--presence-penalty", type=ranged(float, -2, 2), default=0.0,
                        help="subtracted once from tokens already in the reply (0 = off)")
    parser.add_argument("--frequency-penalty", type=ranged(float, -2, 2), default=0.0,
                        help="subtracted per time a token is in the reply (0 = off)")
    # serving
    parser.add_argument("--serve", action="store_true", help="serve the model over an OpenAI-compatible HTTP API")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=ranged(int, 0, 65535), default=8000, help="--serve: the port (0 = any free one)")
    parser.add_argument("--export", metavar="DIR", type=Path,
                        help="write the model (ONNX) and the tokenizer (tiktoken) to DIR, then exit (README)")
    args = parser.parse_args()
    exit_on_user_error()  # a UserError (no checkpoint, another tokenizer): one line, exit 2
    check_home(write=False)
    stage, model, tok, meta = load(args.stage, args.step, args.device or autodetect_device())
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                    penalties=dict(repetition=args.repetition_penalty, presence=args.presence_penalty,
                                   frequency=args.frequency_penalty))
    if args.export:
        export(model, tok, meta, args.export)
    elif args.serve:
        server = make_server(stage, model, tok, args.host, args.port)
        print(f"serving {server.name} at http://{args.host}:{server.server_port}/v1 (OpenAI API: /chat/completions, "
              "/completions, /models); ctrl+c stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    elif args.prompt is None:
        ChatApp(stage, model, tok, meta, **sampling).run()
    else:
        question = [{"role": "user", "content": args.prompt}]
        for piece, _ in stream_reply(model, tok, question, stage != "pretrain", **sampling):
            print(piece, end="", flush=True)
        print()
