"""
chat.py: talk to a flatchat checkpoint in the terminal, and watch training runs live.

    python chat.py                            # TUI on the newest checkpoint: rl > sft > midtrain > pretrain
    python chat.py --stage sft --step 800     # TUI on a chosen checkpoint
    python chat.py -p "What is 12*3?"         # one reply on stdout, no TUI (for scripts and pipes)
    FLATCHAT_HOME=/path/to/run python chat.py # another run's base directory

Keys. Chat tab: enter sends, escape stops the reply, ctrl+n starts a new conversation, ctrl+t / ctrl+o cycle
the temperature / top-k, ctrl+s switches to the next stage that has a checkpoint, ctrl+q quits. ctrl+l toggles
the Training tab: per stage a loss curve, the latest step, lr, tok/s, eta and eval results, tailed live from
logs/*.jsonl. A base (pretrain) checkpoint knows no chat format: each message is continued as plain text.
"""

import codecs
import contextlib
import json
import math
import sys
import threading
import time

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Footer, Input, Sparkline, Static, TabbedContent, TabPane

from model import STAGE_COMMANDS, UserError, autodetect_device, generate, latest_step, load_model
from tokenizer import SPECIAL_TOKENS, Parser, base_dir, ranged

# -----------------------------------------------------------------------------
# Backend: pick and load a checkpoint, build the prompt, stream a reply, tail a log

STAGES = list(STAGE_COMMANDS)  # pipeline order: pretrain, midtrain, sft, rl; the last one present wins

def load(stage=None, step=None, device="cpu"):
    """(stage, model, tokenizer, meta), by default the newest stage's latest step (none: pretrain's UserError)."""
    stage = stage or ([s for s in STAGES if latest_step(s) is not None] or ["pretrain"])[-1]
    return stage, *load_model(stage, device, step)

def build_prompt(tok, messages, context, room, chat=True):
    """Prompt ids of the conversation, at most `context - room` tokens so the reply has `room` left.
    Too long: the oldest user/assistant pairs go first; one turn alone still too long keeps its end."""
    budget = max(context - room, 4)
    if not chat:  # base model: continue the last message as a document
        ids = [tok.bos_id] + tok.encode(messages[-1]["content"])
        return ids[:1] + ids[1:][-(budget - 1):]
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    ids = tok.render_for_completion({"messages": system + turns})
    while len(ids) > budget and len(turns) > 1:
        turns = turns[2:]  # still starts with a user turn
        ids = tok.render_for_completion({"messages": system + turns})
    if len(ids) > budget:  # keep <|bos|><|user_start|> and the turn's end, which primes the reply
        ids = ids[:2] + ids[-(budget - 2):]
    return ids

class Reply:
    """Generated ids -> display text as they arrive, and message parts for the history. An incremental UTF-8
    decoder never splits a character over tokens; a calculator call shows as `[calc: 12*3 = 36]`."""

    MARKS = {"<|python_start|>": ("python", "[calc: "), "<|python_end|>": ("python_end", ""),
             "<|output_start|>": ("python_output", " = "), "<|output_end|>": ("text", "]")}

    def __init__(self, tok, prompt_len=0):
        self.tok, self.kind, self.text, self.parts, self.n, self.done = tok, "text", "", [], 0, False
        self.prompt_len, self.t0, self.t_first = prompt_len, time.time(), None
        self.marks = {tok.encode_special(name): v for name, v in self.MARKS.items()}
        self.stops = {tok.encode_special("<|assistant_end|>"), tok.bos_id}
        self.specials = {tok.encode_special(name) for name in SPECIAL_TOKENS}
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
        elif t not in self.specials:  # other special tokens do not belong in a reply: not shown
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
        return f"first token {self.t_first - self.t0:.2f} s | {speed:.1f} tok/s" if self.n else ""

    def message(self):
        plain = all(p["type"] == "text" for p in self.parts)
        return {"role": "assistant", "content": "".join(p["text"] for p in self.parts) if plain else self.parts}

def stream_reply(model, tok, messages, chat=True, max_tokens=256, temperature=0.6, top_k=50, seed=42):
    """Yields (new text, Reply) per token of the reply; the prompt leaves it room, the context's end stops it."""
    context = model.config.sequence_len
    ids = build_prompt(tok, messages, context, min(max_tokens, context // 2), chat)
    reply = Reply(tok, len(ids))
    for tokens, _ in generate(model, ids, max_tokens=max(1, min(max_tokens, context - len(ids))),
                              temperature=temperature, top_k=top_k or None, seed=seed, tokenizer=tok):
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

def fmt_row(row):
    """`step 120/2000 | loss 3.4120 | lr 1.20e-03 | 52,000 tok/s | eta 3m20s`, or `eval @ step 100: ...`."""
    if "loss" not in row:
        return f"eval @ step {row['step']}: " + " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in ("step", "time"))
    total = row.get("num_steps")
    line = f"step {row['step']}" + (f"/{total}" if total else "") + f" | loss {row['loss']:.4f}"
    line += f" | lr {row['lr']:.2e}" if "lr" in row else ""
    line += f" | {row['tok_per_s']:,.0f} tok/s" if "tok_per_s" in row else ""
    eta = (total - row["step"]) * row.get("dt", 0) if total else None
    return line + (f" | eta {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None else "")

# -----------------------------------------------------------------------------
# The Textual app: a Chat tab and a Training tab

def cycle(values, current):
    return values[(values.index(current) + 1) % len(values)] if current in values else values[0]

class ChatApp(App):
    CSS = """
    #messages { height: 1fr; padding: 0 1; }
    .user { color: $accent; text-style: bold; margin-top: 1; }
    .assistant { padding-left: 2; }
    .note { color: $text-muted; margin-top: 1; }
    #status { height: 1; background: $boost; padding: 0 1; }
    #stages { height: 1fr; }
    .stage { height: auto; margin-bottom: 1; }
    .stage Sparkline { height: 4; }
    """
    BINDINGS = [Binding("escape", "stop", "stop")] + [Binding(*b, priority=True) for b in [  # even in the input
        ("ctrl+n", "new_chat", "new chat"), ("ctrl+t", "cycle('temperature')", "temperature"),
        ("ctrl+o", "cycle('top_k')", "top-k"), ("ctrl+s", "next_stage", "stage"),
        ("ctrl+l", "toggle_view", "chat/training")]]
    CHOICES = {"temperature": [0.0, 0.3, 0.6, 0.9, 1.2], "top_k": [1, 5, 20, 50, 200, 0]}  # what ^t, ^o cycle

    def __init__(self, stage, model, tok, meta, max_tokens=256, temperature=0.6, top_k=50, seed=42):
        super().__init__()
        self.stage, self.model, self.tok, self.meta, self.device = stage, model, tok, meta, model.get_device()
        self.max_tokens, self.temperature, self.top_k, self.seed = max_tokens, temperature, top_k, seed
        self.messages, self.replies, self.speed, self.prompt_len, self.chat_id = [], 0, "", 0, 0
        self.busy, self.stop_event = False, threading.Event()
        self.log_dir, self.logs = base_dir() / "logs", {}  # stage -> its offset, losses, evals, widgets

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
        parts = [f"{self.stage} step {self.meta['step']} ({'completion' if self.stage == 'pretrain' else 'chat'})",
                 f"temperature {self.temperature}", f"top-k {self.top_k or 'off'}",
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
        event.input.value = ""
        self.messages.append({"role": "user", "content": text})
        self.add_message(text, "user")
        self.busy = True
        self.stop_event.clear()
        out = self.add_message("", "assistant")
        self.respond(out, list(self.messages), self.seed + self.replies, self.chat_id)  # reply n: seed + n
        self.replies += 1
        self.show_status()

    @work(thread=True, exclusive=True, group="generate")
    def respond(self, out, messages, seed, chat_id):
        last, reply = time.time(), None
        try:
            for _, reply in stream_reply(self.model, self.tok, messages, self.stage != "pretrain",
                                         self.max_tokens, self.temperature, self.top_k, seed):
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
            self.busy = False
        self.query_one("#messages", VerticalScroll).scroll_end(animate=False)
        self.show_status()

    def action_stop(self):
        self.stop_event.set()

    def action_new_chat(self):
        self.stop_event.set()
        self.messages, self.chat_id, self.prompt_len, self.speed = [], self.chat_id + 1, 0, ""
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
            loaded = load(stage, None, self.device)
        except UserError as e:
            return self.call_from_thread(self.use_model, None, f"error: {e}")
        self.call_from_thread(self.use_model, loaded, f"--- now {stage} step {loaded[3]['step']} ---")

    def use_model(self, loaded, note):
        self.stage, self.model, self.tok, self.meta = loaded or (self.stage, self.model, self.tok, self.meta)
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
            log = self.logs.get(path.stem) or self.add_log(path.stem)
            try:
                rows, log["offset"], restarted = tail_jsonl(path, log["offset"])
            except OSError:  # deleted between glob and open
                continue
            if restarted:
                log["losses"], log["evals"] = [], []
            for row in rows:
                try:
                    line = fmt_row(row)
                except (TypeError, ValueError, KeyError):  # a row of unexpected types: shown raw
                    line = json.dumps(row)
                if "loss" not in row:
                    log["evals"].append(line)
                    continue
                log["line"] = line
                if isinstance(row["loss"], (int, float)) and math.isfinite(row["loss"]):
                    log["losses"].append(row["loss"])
            if rows or restarted:
                title, spark, evals = log["widgets"]
                title.update(f"{path.stem}  {log['line']}")
                spark.data = log["losses"][-2000:]
                evals.update("\n".join(log["evals"][-8:]))

    def add_log(self, stage):
        widgets = (Static(stage, markup=False), Sparkline([]), Static("", markup=False))
        self.query_one("#stages").mount(Vertical(*widgets, classes="stage"))
        self.query_one("#nologs").display = False
        self.logs[stage] = dict(offset=0, losses=[], evals=[], line="", widgets=widgets)
        return self.logs[stage]

# -----------------------------------------------------------------------------
# Arguments, load the checkpoint (a missing one exits 2 before any TUI starts), then -p or the TUI

if __name__ == "__main__":
    parser = Parser(description="Chat with a flatchat checkpoint (Textual TUI) or answer one prompt.")
    parser.add_argument("-p", "--prompt", default=None, help="answer this prompt on stdout and exit (no TUI)")
    parser.add_argument("--stage", default=None, choices=STAGES,
                        help="checkpoint stage (default: the newest that exists, rl > sft > midtrain > pretrain)")
    parser.add_argument("--step", type=ranged(int, 0), default=None, help="checkpoint step (default: the stage's latest)")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: autodetect)")
    # sampling
    parser.add_argument("--max-tokens", type=ranged(int, 1), default=256, help="most tokens in a reply (the context caps it too)")
    parser.add_argument("--temperature", type=ranged(float, 0), default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=ranged(int, 0), default=50, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=ranged(int, 0), default=42, help="sampling seed of the first reply (reply n: seed + n)")
    args = parser.parse_args()
    # a UserError (no checkpoint, another tokenizer) ends in one line and exit 2 (model.py's excepthook)
    stage, model, tok, meta = load(args.stage, args.step, args.device or autodetect_device())
    if args.prompt is None:
        ChatApp(stage, model, tok, meta, args.max_tokens, args.temperature, args.top_k, args.seed).run()
        sys.exit(0)
    for piece, _ in stream_reply(model, tok, [{"role": "user", "content": args.prompt}], stage != "pretrain",
                                 args.max_tokens, args.temperature, args.top_k, args.seed):
        print(piece, end="", flush=True)
    print()
