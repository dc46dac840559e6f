"""
flatchat tokenizer: byte-level BPE with a GPT-4 style pre-split, the chat format, and corpus readers.

    python tokenizer.py train --vocab-size 8192    # trains on $FLATCHAT_HOME/data/pretrain/train/*
    python tokenizer.py eval                       # bytes per token on the corpus and on fixed snippets

    tok = Tokenizer.load(base_dir() / "tokenizer"); ids = tok.encode("Hello"); tok.decode(ids)

Ids 0..255 are raw bytes, then one id per merge in training order, then the special tokens. The
encoder gives exactly the ids of a tiktoken Encoding built from the same merges (tested); the saved
file is plain JSON (pattern, merges, special tokens): loading it cannot run code.
"""
import argparse
import array
import collections
import contextlib
import ctypes
import gc
import hashlib
import heapq
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from functools import cached_property, lru_cache, partial
from pathlib import Path

import numpy as np
import regex

# -----------------------------------------------------------------------------
# constants and the base directory of a run

# GPT-4's split pattern, but numbers in groups of 1-2 digits (as nanochat): fewer tokens wasted on digits
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
VERSION = 1

class UserError(Exception):
    """A mistake the user can fix (a bad input line, a missing file or checkpoint, a wrong tokenizer): every
    script reports it as one line, `error: ...`, and exits with code 2."""

def _report_user_error(kind, value, tb, _default=sys.excepthook):
    if not issubclass(kind, UserError):
        return _default(kind, value, tb)
    print(f"error: {value}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)  # at once: no torchrun or worker teardown that could hang or print a traceback

def exit_on_user_error():
    """From here on, an uncaught UserError ends the process with its one line and exit code 2 (the scripts
    call this first; importing a flatchat module changes nothing in the process)."""
    sys.excepthook = _report_user_error

def base_dir():
    """Where a run keeps everything it makes: $FLATCHAT_HOME, else ~/.cache/flatchat."""
    return Path(os.environ.get("FLATCHAT_HOME") or Path.home() / ".cache" / "flatchat")

def check_home(write=True):
    """A UserError unless the base dir is a folder (or can be made) that this process can write (write=False:
    read), checked before a script reads or writes anything; nothing is created here."""
    home, fix = base_dir(), "set FLATCHAT_HOME to a folder you can write (unset: ~/.cache/flatchat)"
    if home.exists() and not home.is_dir():
        raise UserError(f"the base dir {home} ($FLATCHAT_HOME) is a file, not a folder: {fix}")
    if not write:
        return
    there = next(p for p in [home, *home.parents] if p.exists())  # the home, or where it will be made
    if there.is_dir():
        test = there / f".flatchat_write_test.{os.getpid()}"
        try:
            test.touch()
            test.unlink()
            return
        except OSError as e:
            why = e.strerror
    else:
        why = f"{there} is a file"
    raise UserError(f"cannot write in the base dir {home} ({why}): {fix}")

class Parser(argparse.ArgumentParser):
    """Every script's argparse: the defaults in --help, and a bad flag is one line (what is wrong), exit 2."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

def ranged(kind, low, high=None, sentinel=None):
    """An argparse type: a `kind` (int or float) in [low, high], or the sentinel (-1: off / automatic)."""
    def parse(text):
        value = kind(text)
        if value != sentinel and not (low <= value and (high is None or value <= high)):  # nan fails too
            span = f"at least {low}" if high is None else f"from {low} to {high}"
            span += f", or {sentinel}" if sentinel is not None else ""
            raise argparse.ArgumentTypeError(f"{text} is out of range: {span}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse

# -----------------------------------------------------------------------------
# pre-split: text -> chunks (BPE never merges across chunk boundaries)
# The stdlib `re` runs this pattern ~2.4x faster than `regex`, but knows no \p{L} (letters) or \p{N}
# (numbers). So text of BMP characters goes through a twin of the pattern in `re` with those classes
# spelled out, taken from `regex` itself (the tests compare the two). Astral characters (emoji) would
# make `re` try its class ranges one by one, and lone surrogates are not text: such text takes the
# `regex` path, each lone surrogate read as U+FFFD (as tiktoken does).

_SLOW = re.compile("[\ud800-\udfff\U00010000-\U0010ffff]")  # lone surrogates or astral characters

@lru_cache(maxsize=None)
def _compiled(pattern):
    """(regex version, `re` twin for BMP text or None) of a split pattern."""
    if pattern != SPLIT_PATTERN:
        return regex.compile(pattern), None
    bmp = "".join(map(chr, range(0x10000)))
    def cls(p):  # the BMP characters matching p, as ranges for a [...] class
        cps = set(map(ord, regex.findall(p, bmp)))
        starts, ends = sorted(c for c in cps if c - 1 not in cps), sorted(c for c in cps if c + 1 not in cps)
        return "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in zip(starts, ends))
    L, N, S = cls(r"\p{L}"), cls(r"\p{N}"), cls(r"\s")  # `re`'s \s differs (it matches \x1c-\x1f)
    twin = (f"'(?i:[sdmt]|ll|ve|re)|[^\\r\\n{L}{N}]?+[{L}]+|[{N}]{{1,2}}| ?[^{S}{L}{N}]++[\\r\\n]*|[{S}]*[\\r\\n]"
            f"|[{S}]+(?![^{S}])|[{S}]+")
    return regex.compile(pattern), re.compile(twin)

def split(text, pattern=SPLIT_PATTERN):
    """The chunks of text under the split pattern."""
    slow, fast = _compiled(pattern)
    if text.isascii() or not _SLOW.search(text):
        return (fast or slow).findall(text)
    return slow.findall(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))  # lone surrogate -> U+FFFD

# -----------------------------------------------------------------------------
# training: count the unique chunks once (on both cores), then merge pairs over the unique chunks

def _count(texts, pattern, counts):
    for text in texts:
        counts.update(split(text, pattern))

def _count_worker(pattern, todo, done):
    """A counting process: one Counter over all its batches, sent once (one per batch costs more to send)."""
    try:
        counts = collections.Counter()
        for batch in iter(todo.get, None):
            _count(batch, pattern, counts)
        done.put(counts)
    except BaseException as e:  # the parent must not wait forever
        done.put(e)

def count_chunks(texts, pattern=SPLIT_PATTERN, num_proc=2, verbose=False, batch_chars=1 << 21):
    """Counter {chunk: count} over all texts: batches of ~2M characters go through a short queue to
    num_proc counting processes, so a stream of texts from disk never sits in memory whole."""
    def batches():
        batch, n = [], 0
        for text in texts:
            batch.append(text)
            n += len(text)
            if n >= batch_chars:
                yield batch
                batch, n = [], 0
        yield batch
    stream, counts, t0 = batches(), collections.Counter(), time.time()
    head = list(itertools.islice(stream, 2))  # a single batch is not worth starting processes for
    if num_proc < 2 or len(head) < 2:
        for batch in itertools.chain(head, stream):
            _count(batch, pattern, counts)
    else:
        todo, done = mp.Queue(2 * num_proc), mp.Queue()
        procs = [mp.Process(target=_count_worker, args=(pattern, todo, done), daemon=True) for _ in range(num_proc)]
        for p in procs:
            p.start()
        try:
            for i, batch in enumerate(itertools.chain(head, stream, [None] * num_proc)):
                todo.put(batch)
                if verbose and batch and i % 16 == 0:
                    print(f"split + count: {i * batch_chars / 1e6:,.0f}M chars read, {time.time() - t0:.1f} s",
                          flush=True)
            for _ in procs:  # results first, then join: a process exits only once its result is taken
                part = done.get()
                if isinstance(part, BaseException):
                    raise part
                counts.update(part)
        finally:  # also after Ctrl-C: no process left, and no queue for the interpreter to wait on at exit
            todo.cancel_join_thread()
            for p in procs:
                p.terminate()
                p.join()
    if verbose:
        print(f"split + count: {len(counts):,} unique chunks, {time.time() - t0:.1f} s")
    return counts

def _pair_stats(words, freqs):
    """{pair: count} and {pair: [word indices]} of the byte pairs of all words, counted at once by numpy."""
    lens = np.fromiter(map(len, words), np.int64, len(words))
    data = np.frombuffer("".join(words).encode("latin-1"), np.uint8).astype(np.int64)
    ok = np.ones(len(data), bool)
    ok[np.cumsum(lens) - 1] = False  # no pair starts at the last byte of a word
    keys = (data[:-1] * 256 + data[1:])[ok[:-1]]
    word = np.repeat(np.arange(len(words)), lens)[:-1][ok[:-1]]  # the word each pair is in
    counts = np.bincount(keys, np.asarray(freqs, np.float64)[word], 65536).astype(np.int64)
    order = np.argsort(keys, kind="stable")  # group by pair (a word may come twice: harmless)
    keys, word = keys[order], word[order]
    starts = np.flatnonzero(np.diff(keys, prepend=-1))  # where each pair's group starts
    stats, where = {}, collections.defaultdict(list)
    for key, ws in zip(keys[starts].tolist(), np.split(word, starts[1:])):
        pair = chr(key >> 8) + chr(key & 255)
        stats[pair], where[pair] = int(counts[key]), ws.tolist()
    return stats, where

def _merge(words, freqs, stats, where, pair, z):
    """Write z for pair in the words that hold it and update the counts around each merged spot: (x, a)
    and (b, y) lose, (x, z) and (z, y) are born. Returns the born pairs' counts."""
    a, b = pair
    born = {}
    get = born.get
    for i in where.pop(pair):
        w = words[i]
        if pair not in w:  # merged away since it was listed
            continue
        f = freqs[i]
        w = words[i] = w.replace(pair, z)
        k, n = w.find(z), len(w) - 1
        while k >= 0:
            if k:
                x = w[k - 1]
                stats[(b if x == z else x) + a] -= f  # x == z: the pair (b, a) between two merges
                p = x + z
                born[p] = get(p, 0) + f
                where[p].append(i)
            if k < n:
                y = w[k + 1]
                if y != z:  # a z on the right counts the pair between them as its left
                    stats[b + y] -= f
                    p = z + y
                    born[p] = get(p, 0) + f
                    where[p].append(i)
            k = w.find(z, k + 1)
    return born

def bpe_merges(counts, num_merges, verbose=False):
    """The merges [(left, right), ...] learned from {chunk: count}: each step merges the most frequent pair
    (ties: the smallest) in every chunk, left to right. A pair whose bytes are already a token's is skipped
    for good: tokens are named by their bytes (here and in tiktoken), so a second one could never be reached."""
    # A word is a str with one character per token (chr(id)): a pair is a 2-character str that sorts
    # like (left, right), and merging it everywhere in a word is one str.replace, left to right.
    words = [chunk.encode("utf-8").decode("latin-1") for chunk in counts]
    freqs = list(counts.values())
    stats, where = _pair_stats(words, freqs)  # pair -> count; pair -> words that (may) hold it
    # A max-heap of ints packing (-count, left, right), which compare faster than tuples. Entries go
    # stale as counts drop, and are refreshed when popped.
    key = lambda p, c: (-c << 42) + (ord(p[0]) << 21) + ord(p[1])
    heap = [key(p, c) for p, c in stats.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known, merges, skipped, t0 = set(vocab), [], 0, time.time()
    while len(merges) < num_merges and heap:
        k = heapq.heappop(heap)
        c, a, b = -(k >> 42), (k >> 21) & 0x1FFFFF, k & 0x1FFFFF
        pair = chr(a) + chr(b)
        if c != stats[pair]:  # stale: back in with the current count
            if stats[pair]:
                heapq.heappush(heap, key(pair, stats[pair]))
            continue
        if vocab[a] + vocab[b] in known:
            skipped += 1
            continue
        merges.append((a, b))
        vocab.append(vocab[a] + vocab[b])
        known.add(vocab[-1])
        born = _merge(words, freqs, stats, where, pair, chr(len(vocab) - 1))
        stats.update(born)
        for p, n in born.items():  # pairs with the new token: they enter the heap
            heapq.heappush(heap, key(p, n))
        stats[pair] = 0
        if verbose and (len(merges) % 1000 == 0 or len(merges) == num_merges):
            print(f"merge {len(merges):,}/{num_merges:,} | {vocab[-1]!r} x{c:,} | {skipped} skipped as "
                  f"duplicates | {time.time() - t0:.1f} s")
    return merges

# -----------------------------------------------------------------------------
# the tokenizer: encode (with a chunk cache), decode, save / load, and the chat format:
# <|bos|> <|user_start|>text<|user_end|> <|assistant_start|>text<|assistant_end|> ...
# An assistant turn may hold tool calls: <|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>.
# The loss mask is 1 exactly on what the assistant writes (text, tool calls, <|assistant_end|>), and 0 on
# what it reads: <|bos|>, user turns, <|assistant_start|> and tool outputs.

class _Cache(dict):
    """chunk -> ids: a miss runs bpe (most chunks repeat). A chunk with astral characters or lone surrogates,
    which the `re` twin may split wrongly, is a KeyError: encode learns of them from misses alone."""

    def __init__(self, bpe):
        self.bpe = bpe

    def __missing__(self, chunk):
        if not chunk.isascii() and _SLOW.search(chunk):
            raise KeyError(chunk)
        if len(self) >= 1 << 20:  # bound the memory on endless streams of new chunks
            self.clear()
        ids = self[chunk] = self.bpe(chunk)
        return ids

def _set_worker(tok):  # each Tokenizer.map process holds one tokenizer, and dies with its parent (Linux)
    global _worker
    _worker = tok
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the training loop's stop handler: Pool.terminate() ends it
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphans after a SIGKILL

def _work(method, kw, item):  # arrays pickle as raw bytes: ~10x cheaper to send back than lists of ints
    out = getattr(_worker, method)(item, **kw)
    return tuple(array.array("I", o) for o in out) if isinstance(out, tuple) else array.array("I", out)

def check_conversation(conversation):
    """The turns [(role, content), ...] of {"messages": [...]}, a leading system message folded into the
    first user turn. Raises ValueError saying what is wrong."""
    msgs = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]} with at least one message, '
                         'or {"prompt" or "instruction", "response" or "output"}')
    system = msgs[0].get("content") if msgs[0].get("role") == "system" else None
    first, turns = int(system is not None), []
    for i, m in enumerate(msgs[first:], first):
        role, content = m.get("role"), m.get("content")
        want = "assistant" if len(turns) % 2 else "user"
        if role != want:
            raise ValueError(f"message {i} has role {role!r} where {want!r} was expected "
                             "(roles alternate user/assistant, after an optional system message)")
        parts_ok = role == "assistant" and isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in ("text", "python", "python_output")
            and isinstance(p.get("text"), str) for p in content)
        if not (isinstance(content, str) or parts_ok):
            raise ValueError(f"message {i} ({role}): content must be a string" + (
                ' or a list of {"type": "text"|"python"|"python_output", "text": str}' if role == "assistant" else ""))
        turns.append((role, content))
    if system is not None:
        if not isinstance(system, str) or not turns:
            raise ValueError("the system message must be a string and be followed by a user message")
        turns[0] = ("user", system + "\n\n" + turns[0][1])
    return turns

class Tokenizer:
    def __init__(self, merges, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        self.merges, self.pattern = [tuple(m) for m in merges], pattern
        self.special_tokens = list(special_tokens)
        self._bytes = [bytes([i]) for i in range(256)]  # id -> token bytes
        for a, b in self.merges:
            if not (0 <= a < len(self._bytes) and 0 <= b < len(self._bytes)):
                raise ValueError(f"merge {len(self._bytes) - 256} uses an unknown id: {[a, b]}")
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._ids = {t: i for i, t in enumerate(self._bytes)}  # token bytes -> id
        if len(self._ids) != len(self._bytes):
            raise ValueError("two merges make the same bytes")
        self._special = {s: len(self._bytes) + i for i, s in enumerate(self.special_tokens)}
        self._decode = self._bytes + [s.encode("utf-8") for s in self.special_tokens]
        self._cache = _Cache(self._bpe)
        self.vocab_size = len(self._decode)
        self.bos_id = self._special["<|bos|>"]
        self.token_bytes = [len(t) for t in self._bytes] + [0] * len(self.special_tokens)  # for bits per byte

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN, num_proc=2, verbose=False):
        """Train on an iterable of strings; vocab_size counts the 256 bytes, the merges and the specials."""
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if num_merges < 0:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        counts = count_chunks(texts, pattern, num_proc, verbose)
        gc.disable()  # the merge loop makes many small lists but no cycles: the collector's passes are wasted
        try:
            return cls(bpe_merges(counts, num_merges, verbose), pattern)
        finally:
            gc.enable()

    @cached_property
    def _ranks(self):
        """left << 20 | right -> id (ints hash faster than tuples), for every way of writing a token as two:
        tiktoken looks pairs up by their bytes, so any such pair merges at the rank of its result."""
        ranks = {}
        for z, t in enumerate(self._bytes[256:], 256):
            for k in range(1, len(t)):
                if t[:k] in self._ids and t[k:] in self._ids:
                    ranks[self._ids[t[:k]] << 20 | self._ids[t[k:]]] = z
        return ranks

    def _bpe(self, chunk):
        """Ids of one chunk, exactly as tiktoken: the whole chunk if it is a token, else merge the adjacent
        pair with the lowest resulting id (the leftmost of equals) until no pair merges."""
        t = chunk.encode("utf-8")
        if t in self._ids:
            return (self._ids[t],)
        get, none = self._ranks.get, len(self._bytes)  # none: an id no pair merges to
        ranks = [get(a << 20 | b, none) for a, b in zip(t, t[1:])]  # ranks[i]: what ids[i], ids[i+1] make
        ids = list(t)
        while (z := min(ranks)) != none:
            i = ranks.index(z)
            ids[i] = z
            del ids[i + 1], ranks[i]  # only the pairs next to the merged one change
            if not ranks:
                break
            if i > 0:
                ranks[i - 1] = get(ids[i - 1] << 20 | z, none)
            if i < len(ranks):
                ranks[i] = get(z << 20 | ids[i + 1], none)
        return tuple(ids)

    def encode(self, text):
        """Ids of ordinary text. Special-token strings in it (say "<|bos|>") are encoded as plain text."""
        ids, (slow, fast) = [], _compiled(self.pattern)
        try:  # split with the `re` twin, extend ids with each chunk's cached ids (a loop run by C)
            collections.deque(map(ids.extend, map(self._cache.__getitem__, (fast or slow).findall(text))), maxlen=0)
            return ids
        except KeyError:  # an astral character or a lone surrogate: split() and bypass the cache for those chunks
            get = lambda chunk: self._bpe(chunk) if _SLOW.search(chunk) else self._cache[chunk]
            return list(itertools.chain.from_iterable(map(get, split(text, self.pattern))))

    def map(self, method, items, num_proc=2, chunksize=16, **kw):
        """self.method(item, **kw) for each item, in order, from num_proc processes that each hold a copy of this
        tokenizer (their chunk caches stay warm); lists of ids come back as arrays."""
        if num_proc <= 1 or len(items) < 2:
            yield from (getattr(self, method)(item, **kw) for item in items)
            return
        with mp.Pool(num_proc, _set_worker, (self,)) as pool:
            yield from pool.imap(partial(_work, method, kw), items, chunksize)

    def encode_special(self, name):
        if name not in self._special:
            raise KeyError(f"unknown special token {name!r}; the special tokens are {self.special_tokens}")
        return self._special[name]

    def decode_bytes(self, ids):
        return b"".join(map(self._decode.__getitem__, ids))

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def render_conversation(self, conversation, max_tokens=2048):
        """(ids, mask) of a conversation, both cut to max_tokens; mask[i] = 1 if the assistant wrote ids[i]."""
        ids, mask, sp = [], [], self.encode_special
        def add(toks, m):
            ids.extend(toks)
            mask.extend([m] * len(toks))
        add([self.bos_id], 0)
        for role, content in check_conversation(conversation):
            if role == "user":
                add([sp("<|user_start|>"), *self.encode(content), sp("<|user_end|>")], 0)
                continue
            add([sp("<|assistant_start|>")], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                text = self.encode(part["text"])
                if part["type"] == "text":
                    add(text, 1)
                elif part["type"] == "python":
                    add([sp("<|python_start|>"), *text, sp("<|python_end|>")], 1)
                else:  # the tool's output: read, not written, by the assistant
                    add([sp("<|output_start|>"), *text, sp("<|output_end|>")], 0)
            add([sp("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Ids that prime the assistant's reply; a final assistant message (the answer) is dropped."""
        check_conversation(conversation)
        msgs = conversation["messages"]
        msgs = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        ids, _ = self.render_conversation({"messages": msgs}, max_tokens=sys.maxsize)
        return ids + [self.encode_special("<|assistant_start|>")]

    def render_all(self, convs, max_tokens, num_proc=os.cpu_count()):
        """[(ids, targets)] int64 arrays of each conversation, rendered on num_proc processes (a repeated one
        once): ids cut to max_tokens, targets[i] = ids[i + 1] where the assistant wrote it, else -1."""
        unique = list({id(c): c for c in convs}.values())
        done = {}
        rendered = self.map("render_conversation", unique, num_proc, 64, max_tokens=max_tokens)
        for conv, (ids, mask) in zip(unique, rendered):
            ids, mask = np.asarray(ids, np.int64), np.asarray(mask, bool)
            done[id(conv)] = ids, np.where(mask[1:], ids[1:], -1)
        return [done[id(c)] for c in convs]

    def _json(self):  # canonical: the saved file is exactly these bytes
        state = {"version": VERSION, "pattern": self.pattern, "merges": self.merges,
                 "special_tokens": self.special_tokens, "token_bytes": self.token_bytes}
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @cached_property
    def hash(self):
        """sha256 of the saved file; checkpoints record it so a model never meets the wrong tokenizer."""
        return hashlib.sha256(self._json()).hexdigest()

    def save(self, path):
        """Write path/tokenizer.json (or path itself if it ends in .json), atomically; returns the file."""
        path = Path(path) if str(path).endswith(".json") else Path(path) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(self._json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path):
        """Load a tokenizer.json (path is the file or its directory)."""
        path = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no tokenizer here; train one with `python tokenizer.py train`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("version") != VERSION:
                raise ValueError(f"not a version {VERSION} tokenizer file")
            merges, pattern, specials = d["merges"], d["pattern"], d["special_tokens"]
            if not (isinstance(pattern, str) and isinstance(merges, list) and isinstance(specials, list)
                    and all(type(m) is list and len(m) == 2 and {type(x) for x in m} == {int} for m in merges)
                    and all(isinstance(s, str) for s in specials)):
                raise ValueError("pattern, merges or special_tokens have the wrong type")
            tok = cls(merges, pattern, specials)
            if d.get("token_bytes", tok.token_bytes) != tok.token_bytes:
                raise ValueError("token_bytes do not match the merges")
            _compiled(pattern)
        except (ValueError, KeyError, TypeError, regex.error) as e:
            raise UserError(f"{path}: not a valid tokenizer file ({e}); retrain: python tokenizer.py train") from None
        return tok

    def __reduce__(self):  # pickled (for worker processes) as its plain data, never as code
        return Tokenizer, (self.merges, self.pattern, self.special_tokens)

# -----------------------------------------------------------------------------
# chat data: JSONL files of conversations, mixtures of them, multiple-choice prompts

def as_conversation(row):
    """A JSONL row as {"messages": [...]}: the standard shape as it is, or the common single turn
    {"prompt" | "instruction" [, "input"], "response" | "output"} (Alpaca's, Dolly's) as a user and an
    assistant message."""
    if not isinstance(row, dict) or "messages" in row:
        return row
    ask = next((row[k] for k in ("prompt", "instruction") if k in row), None)
    answer = next((row[k] for k in ("response", "output") if k in row), None)
    if not (isinstance(ask, str) and isinstance(answer, str)):
        return row  # check_conversation says what is wrong
    if isinstance(row.get("input"), str) and row["input"].strip():
        ask = f"{ask}\n\n{row['input']}"
    return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]}

def read_conversations(path, skip_bad=False):
    """(conversations, n_bad) of a JSONL file of conversations (as_conversation's shapes): a bad line is a
    UserError, or counted."""
    convs, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = as_conversation(json.loads(line))
                check_conversation(conv)
                convs.append(conv)
            except ValueError as e:
                if not skip_bad:
                    what = f"invalid JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
                    raise UserError(f"{path}:{n}: {what} (fix the line or pass --skip-bad)") from None
                bad += 1
    return convs, bad

def read_mixture(mixture, folder, skip_bad=False, say=print, files=()):
    """The conversations of a mixture {name: weight} from data/chat/<folder>/<name>.jsonl, each file's rows
    repeated weight times (a missing file is skipped, and said), and of your own files, "PATH[:WEIGHT]"
    (--chat-file: every 50th conversation is val, the rest train): (conversations, bad lines skipped)."""
    chat = base_dir() / "data" / "chat" / folder
    sources = [(name, chat / f"{name}.jsonl", weight, False) for name, weight in mixture.items()]
    for spec in files:
        path, weight = spec.rsplit(":", 1) if re.fullmatch(r".+:\d+", spec) else (spec, "1")
        if not Path(path).is_file():
            raise UserError(f"--chat-file {spec}: no such file (PATH or PATH:WEIGHT, e.g. mine.jsonl:2)")
        sources.append((Path(path).name, Path(path), int(weight), True))
    rows, n_bad = [], 0
    for name, path, weight, own in sources:
        if not path.exists():
            say(f"  {name:<20} skipped: {path} not found (online-only source, or run `python data/chat_data.py`)")
            continue
        convs, bad = read_conversations(path, skip_bad=skip_bad)
        if own:  # every 50th conversation of your own file is its val split
            convs = convs[::50] if folder == "val" else [c for i, c in enumerate(convs) if i % 50]
        rows, n_bad = rows + convs * weight, n_bad + bad
        say(f"  {name:<20} x{weight}  {len(convs):>7,} conversations" + (f" ({bad} bad lines skipped)" if bad else ""))
    if not rows:
        raise UserError(f"no conversations in {chat}: run `python data/chat_data.py` (or give --chat-file)")
    return rows, n_bad

def render_mc(question, choices):
    """The user prompt of a multiple-choice question; the assistant answers with the letter alone."""
    options = "\n".join(f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n\n{options}\n\nAnswer with the letter."

# -----------------------------------------------------------------------------
# corpus readers: documents from .jsonl ("text"), .parquet (column "text") or .txt files

def iter_documents(path):
    """The documents of one corpus file. A .txt file holds documents separated by lines reading
    <|endoftext|> (as TinyStories) or, if its first MB has no such line, by blank lines."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    text = json.loads(line.decode("utf-8"))["text"] if line.strip() else ""
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{n}: not UTF-8 text (byte {e.start}): rewrite the file as UTF-8 "
                                    "(python data/corpus.py does)") from None
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UserError(f'{path}:{n}: expected a JSON object with a "text" string: fix or delete the line')
                if text:
                    yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only needed for parquet corpora
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
    elif path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            eot = re.search(r"^<\|endoftext\|>\s*$", f.read(1 << 20), re.M)
            f.seek(0)
            is_sep = (lambda line: line.strip() == "<|endoftext|>") if eot else (lambda line: not line.strip())
            for sep, lines in itertools.groupby(f, is_sep):  # runs of separator / document lines
                if not sep and (doc := "".join(lines).strip()):
                    yield doc
    else:
        raise UserError(f"{path}: unknown corpus format (expected .jsonl, .parquet or .txt)")

def corpus_files(split="train"):
    """The corpus files of data/pretrain/<split>, sorted; a UserError saying how to make them if none."""
    d = base_dir() / "data" / "pretrain" / split
    files = sorted(p for p in d.glob("*") if p.suffix in (".jsonl", ".parquet", ".txt"))
    if not files:
        raise UserError(f"no corpus files in {d}: create them with `python data/corpus.py`")
    return files

def corpus_texts(files, max_chars=-1, doc_cap=-1):
    """The documents of files, each cut to doc_cap characters, until max_chars are read (-1 = no limit)."""
    n = 0
    for path in files:
        for doc in iter_documents(path):
            doc = doc[:doc_cap] if doc_cap > 0 else doc
            yield doc
            n += len(doc)
            if 0 < max_chars <= n:
                return

# -----------------------------------------------------------------------------
# command line: train | eval

SNIPPETS = {
    "prose": "The old lighthouse keeper climbed the stairs each evening, counting the steps as he had been taught.",
    "code": "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "math": "If 3x + 7 = 25, then x = 6; the area is pi * r**2 = 3.14159 * 12.5**2 = 490.87 (to 2 d.p.).",
    "non-English": "Der schnelle Fuchs springt über den Hund. 東京は日本の首都です。 Быстрая лиса прыгает.",
}

def evaluate(max_chars):
    """Bytes per token of ours and of two smaller vocabularies trained here, on snippets and corpus files."""
    ours = Tokenizer.load(base_dir() / "tokenizer")
    files = corpus_files("train") + corpus_files("val")
    sample = [d for f in files for d in corpus_texts([f], 2_000_000 // len(files))]  # a bit of every file
    sizes = [v for v in (ours.vocab_size // 4, ours.vocab_size // 16) if v >= 512]
    toks = {f"ours {ours.vocab_size}": ours} | {f"bpe {v}": Tokenizer.train(sample, v) for v in sizes}
    texts = {name: [s] for name, s in SNIPPETS.items()}
    texts.update({f"{f.parent.name}/{f.name}": list(corpus_texts([f], max_chars)) for f in files})
    print(f"{'bytes per token':30s}" + "".join(f"{name:>14s}" for name in toks))
    for name, docs in texts.items():
        nbytes = sum(len(d.encode()) for d in docs)
        ntoks = [sum(map(len, t.map("encode", docs))) for t in toks.values()]
        print(f"{name[:30]:30s}" + "".join(f"{nbytes / max(n, 1):14.2f}" for n in ntoks))

if __name__ == "__main__":
    parser = Parser(description="Train or evaluate the flatchat tokenizer.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train on $FLATCHAT_HOME/data/pretrain/train/*")
    p.add_argument("--vocab-size", type=ranged(int, 256 + len(SPECIAL_TOKENS)), default=8192,
                   help="tokens in all: 256 bytes + merges + 9 specials")
    p.add_argument("--max-chars", type=ranged(int, 1, sentinel=-1), default=2_000_000_000,
                   help="stop reading after this many chars (-1 = all)")
    p.add_argument("--doc-cap", type=ranged(int, 1, sentinel=-1), default=10_000,
                   help="use at most this many chars per document (-1 = all)")
    p.add_argument("--num-proc", type=ranged(int, 1), default=2, help="processes that split and count (1 = no workers)")
    p = sub.add_parser("eval", help="bytes/token on the corpus and fixed snippets, versus smaller vocabularies")
    p.add_argument("--max-chars", type=ranged(int, 1, sentinel=-1), default=5_000_000,
                   help="chars read per corpus file (-1 = all)")
    args = parser.parse_args()
    exit_on_user_error()
    check_home()
    try:
        if args.cmd == "train":
            t0 = time.time()
            texts = corpus_texts(corpus_files("train"), args.max_chars, args.doc_cap)
            tok = Tokenizer.train(texts, args.vocab_size, num_proc=args.num_proc, verbose=True)
            path = tok.save(base_dir() / "tokenizer")
            print(f"saved {path} (vocab {tok.vocab_size:,}, hash {tok.hash[:12]}) in {time.time() - t0:.1f} s")
        else:
            evaluate(args.max_chars)
    except KeyboardInterrupt:  # the saved tokenizer (written atomically, at the end) is as it was
        print(f"\nstopped by Ctrl-C: {base_dir() / 'tokenizer'} is unchanged", file=sys.stderr)
        sys.exit(130)
