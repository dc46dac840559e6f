"""
pretrain.py: train the base model on raw text, from one --depth dial.

    python pretrain.py --depth 4                                              # CPU, small
    python pretrain.py --depth 20                                             # one GPU
    torchrun --standalone --nproc_per_node=8 pretrain.py --depth 20           # 8 GPUs
    python pretrain.py --resume                                               # continue the latest checkpoint

Reads the corpus from $FLATCHAT_HOME/data/pretrain/{train,val} (`python data/corpus.py`) and the
tokenizer (`python tokenizer.py train`); writes checkpoints/pretrain/step_N and logs/pretrain.jsonl.
The corpus is tokenized once, on every core, into data/tokens/ (reused while the corpus is unchanged);
the loop packs rows from memory-mapped token arrays, so a step never waits for the tokenizer.
"""

import bisect
import math
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from model import (GPT, GPTConfig, JsonlLogger, UserError, amp_ctx, catch_stop_signals, compute_cleanup,
                   compute_init, distributed, evaluate_loss, exit_stopped, fit_threads, generate_batch,
                   load_checkpoint, lock_stage, not_finite, out_of_memory, print0,
                   save_checkpoint, stop_requested, sync)
from tokenizer import Parser, Tokenizer, base_dir, corpus_files, iter_documents, ranged

# -----------------------------------------------------------------------------
# Data: the corpus as token shards, then documents packed into rows of T+1 tokens that start with <|bos|>

def stale(path, current):
    """Is path an older version of a corpus file's shard (not `current`), or the temp file of a killed run
    on this node? (Another node's temp file on a shared disk may be that node's work in progress.)"""
    if ".tmp-" not in path.name:
        return not path.name.startswith(current + ".")
    host, _, pid = path.name.rpartition(".tmp-")[2].rpartition("-")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False

def token_shards(files, tokenizer, write=True, num_proc=os.cpu_count()):
    """[(tokens, starts)] per corpus file: its documents' ids in one memory-mapped array, and where each
    document starts (documents + 1 offsets). Encoded once by num_proc processes into data/tokens/<tokenizer
    hash>/, named after the file's size and mtime (an edited corpus is encoded again), written under a temp
    name (this node's) then renamed: a killed or failed run leaves no half shard, and older versions are
    deleted only once the new one is complete. write=False (other ranks of a node) waits for them."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    shards = []
    for f in files:
        st = f.stat()
        folder = base_dir() / "data" / "tokens" / tokenizer.hash[:16] / f.parent.name
        name = f"{f.name}.{st.st_size}.{st.st_mtime_ns}"
        bin_path, idx_path = folder / f"{name}.bin", folder / f"{name}.idx.npy"
        if write and not bin_path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            t0, lengths = time.time(), []
            tmp = folder / f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"
            try:
                with open(tmp, "wb") as out:
                    for ids in tokenizer.map("encode", list(iter_documents(f)), num_proc, chunksize=4):
                        out.write(np.asarray(ids, dtype).tobytes())
                        lengths.append(len(ids))
                np.save(idx_path, np.cumsum([0] + lengths))
                os.replace(tmp, bin_path)  # last: its existence means the shard is complete
            finally:
                tmp.unlink(missing_ok=True)
            for old in folder.glob(f"{f.name}.*"):
                if stale(old, name):
                    old.unlink()
            print0(f"tokenized {f} ({len(lengths):,} documents, {sum(lengths):,} tokens) in "
                   f"{time.time() - t0:.1f} s")
        while not bin_path.exists():  # another rank of this node is writing it
            time.sleep(0.2)
        tokens = np.zeros(0, dtype)
        if bin_path.stat().st_size:  # (an empty file cannot be mapped)
            tokens = np.memmap(bin_path, dtype, mode="r")
        shards.append((tokens, np.load(idx_path)))
    if sum(len(starts) - 1 for _, starts in shards) == 0:
        raise UserError(f"no documents in {files[0].parent}: its files are empty; rerun "
                        "`python data/corpus.py`")
    return shards

class Lane:
    """One stream of documents (lane r takes documents r, r + n_lanes, ... of the corpus, which repeats in
    epochs) packed into batches of B rows of T+1 tokens, best fit: each row takes the longest buffered piece
    that still fits; when none fits, the longest piece is split and its rest waits in the buffer, to start
    a later row with <|bos|> (never cropped away). Its state is two numbers per buffered piece: resuming is
    instant."""

    def __init__(self, shards, lane, n_lanes, bos, B, T, device="cpu", state=None, buffer_size=32):
        self.shards, self.lane, self.n_lanes, self.buffer_size = shards, lane, n_lanes, buffer_size
        self.B, self.T, self.device = B, T, torch.device(device)
        self.first = np.cumsum([0] + [len(starts) - 1 for _, starts in shards]).tolist()  # shards' first docs
        self.per_epoch = len(range(lane, self.first[-1], n_lanes))
        if self.per_epoch == 0:
            raise UserError(f"the corpus has {self.first[-1]} documents, too few for {n_lanes} lanes "
                            "(processes x accumulation steps): add documents or lower --total-batch-size")
        self.bos = np.array([bos], shards[0][0].dtype)
        state = state or {"next_pos": 0, "pieces": []}
        self.next_pos = state["next_pos"]
        # the buffer: [doc position, offset, ids] per piece
        self.pieces = [[pos, off, self.doc(pos)[off:]] for pos, off in state["pieces"]]

    def doc(self, pos):  # the ids of this lane's pos-th document
        n = self.lane + self.n_lanes * (pos % self.per_epoch)
        k = bisect.bisect_right(self.first, n) - 1
        tokens, starts = self.shards[k]
        j = n - self.first[k]
        return tokens[starts[j]:starts[j + 1]]

    def row(self, size):
        parts, room = [], size
        while room > 0:
            while len(self.pieces) < self.buffer_size:
                self.pieces.append([self.next_pos, 0, self.doc(self.next_pos)])
                self.next_pos += 1
            fits = [p for p in self.pieces if len(p[2]) < room]  # with its <|bos|>
            if fits:
                best = max(fits, key=lambda p: len(p[2]))
                self.pieces.remove(best)
                parts += [self.bos, best[2]]
                room -= len(best[2]) + 1
            else:  # split the longest piece: its rest continues in a later row
                p = max(self.pieces, key=lambda p: len(p[2]))
                parts += [self.bos, p[2][:room - 1]]
                p[1], p[2], room = p[1] + room - 1, p[2][room - 1:], 0
        return np.concatenate(parts)

    def batch(self):  # inputs and targets (B, T)
        rows = torch.from_numpy(np.stack([self.row(self.T + 1) for _ in range(self.B)]).astype(np.int64))
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1].to(self.device), rows[:, 1:].to(self.device)

    def state(self):
        return {"next_pos": self.next_pos, "pieces": [[p[0], p[1]] for p in self.pieces]}

# -----------------------------------------------------------------------------
# The model's shape from the depth, and how many rows of a micro-batch fit a GPU (its default device batch)

def depth_dial(depth):
    """(width, heads): width 64 x depth rounded up to whole heads of 128 (nanochat's rule: every depth
    works, the attention runs on heads of 128), one head of the whole width below 128."""
    head_dim = min(128, depth * 64)
    width = -(-depth * 64 // head_dim) * head_dim
    return width, width // head_dim

def micro_batch_bytes(config, rows, act_bytes=2):
    """(kept, peak) bytes of one micro-batch of `rows` rows in a training step, from the shapes, for eager
    PyTorch (compiled code keeps less). kept: what the forward pass keeps for the backward pass, per token 18
    tensors of width C a layer (attention 11, MLP 7, the 4C-wide ones counted 4 times) and 4 more, at
    act_bytes (2 under bf16 autocast), plus 2 fp32 copies of the V logits (tanh's output, log-softmax's);
    peak adds the logits' fp32 gradient and two temporaries of the backward pass. tests/test_pretrain.py
    checks `kept` against what autograd really saves."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    tokens = rows * config.sequence_len
    kept = tokens * ((18 * L + 4) * C * act_bytes + 2 * 4 * V)
    return kept, kept + tokens * 3 * 4 * V

def fit_device_batch(config, num_params, free_bytes, most=32):
    """The largest power of 2 of rows, at most `most`, whose peak fits 90% of free_bytes beside the weights,
    their gradients and the optimizer's state (16 bytes a parameter at most, fp32)."""
    rows = most
    while rows > 1 and 16 * num_params + micro_batch_bytes(config, rows)[1] > 0.9 * free_bytes:
        rows //= 2
    return rows

if __name__ == "__main__":  # tests and benchmarks import the data code above
    # -------------------------------------------------------------------------
    # Arguments
    parser = Parser(description="Pretrain the base model.")
    add = parser.add_argument
    # model
    add("--depth", type=ranged(int, 1), default=20,
        help="layers; sets width (depth x 64), heads, batch, lrs, horizon")
    add("--max-seq-len", type=ranged(int, 2), default=2048, help="context length in tokens")
    add("--num-experts", type=ranged(int, 1), default=1, help="MLPs a block (1 = dense, more: experts)")
    add("--experts-per-token", type=ranged(int, 1), default=1, help="experts each token goes through (MoE)")
    # horizon (the first of these that is set wins)
    add("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1,
        help="optimizer steps (-1 = from the tokens)")
    add("--target-tokens", type=ranged(int, 1, sentinel=-1), default=-1,
        help="training tokens (-1 = ratio x params)")
    add("--param-data-ratio", type=ranged(float, 0), default=20, help="tokens per parameter (Chinchilla: 20)")
    # batch
    add("--device-batch-size", type=ranged(int, 1, sentinel=-1), default=-1,
        help="rows per forward pass per process (-1 = 32 on a GPU, 8,192 tokens' worth on a CPU, fewer when "
        "the total batch is smaller; lower it on OOM)")
    add("--total-batch-size", type=ranged(int, 1, sentinel=-1), default=-1,
        help="tokens per step (-1 = from depth)")
    # optimization
    add("--matrix-lr", type=ranged(float, 0), default=0.02, help="Muon learning rate of the block matrices")
    add("--embedding-lr", type=ranged(float, 0), default=0.2, help="AdamW lr of the embedding (at width 768)")
    add("--unembedding-lr", type=ranged(float, 0), default=0.004, help="AdamW lr of the head (at width 768)")
    add("--weight-decay", type=ranged(float, 0), default=0.0, help="decoupled weight decay (0 = off)")
    add("--warmup-ratio", type=ranged(float, 0, 1), default=0.0, help="fraction of steps of linear lr warmup")
    add("--warmdown-ratio", type=ranged(float, 0, 1), default=0.2,
        help="fraction of steps of linear lr decay at the end")
    add("--final-lr-frac", type=ranged(float, 0, 1), default=0.0, help="the last lr, a fraction of the peak")
    add("--compile", type=ranged(int, 0, 1), default=1, help="torch.compile where a compiler works (1/0)")
    add("--bench", action="store_true", help="a benchmark: steps only, no evaluation, samples or checkpoints")
    # evaluation, samples, checkpoints
    add("--eval-every", type=ranged(int, 1, sentinel=-1), default=250,
        help="steps between evals (-1 = at the end)")
    add("--eval-tokens", type=ranged(int, 1, sentinel=-1), default=-1,
        help="val tokens per eval (-1 = 10 x batch)")
    add("--sample-every", type=ranged(int, 1, sentinel=-1), default=2000,
        help="steps between samples (-1 = at the end)")
    add("--save-every", type=ranged(int, 1, sentinel=-1), default=-1,
        help="steps between saves (-1 = at the end)")
    add("--keep", type=ranged(int, 0), default=2, help="checkpoints to keep (0 = all)")
    add("--resume", action="store_true", help="continue from this stage's latest complete checkpoint")
    add("--seed", type=ranged(int, 0), default=42, help="random seed: init, data order, samples")
    args = parser.parse_args()

    # -------------------------------------------------------------------------
    # Init: processes, tokenizer, the model shape and the batch from the depth dial
    ddp, rank, local_rank, world, device = compute_init(args.seed)
    lock_stage("pretrain", args.resume)  # one live run per stage; an earlier run is kept
    master = rank == 0
    tokenizer = Tokenizer.load(base_dir() / "tokenizer")
    n_embd, n_head = depth_dial(args.depth)
    if args.experts_per_token > args.num_experts:
        raise UserError(f"--experts-per-token {args.experts_per_token} is more than --num-experts "
                        f"{args.num_experts}: lower it")
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=tokenizer.vocab_size, n_layer=args.depth,
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd, num_experts=args.num_experts,
                       experts_per_token=args.experts_per_token)
    with torch.device("meta"):  # the model without memory: its shape now, its weights on the device below
        model = GPT(config)
    num_params = model.active_params()  # what a token meets: the batch and the horizon follow it (MoE: less)
    matrix_params = num_params - 2 * model.padded_vocab * n_embd
    T, total_batch = args.max_seq_len, args.total_batch_size
    if total_batch == -1:  # bigger models like bigger batches: ~5e-3 tokens a matrix parameter, a power of 2,
        log2 = min(19, max(12, round(math.log2(5e-3 * matrix_params))))
        total_batch = max(T * world, 2**log2)  # and at least a row per process
    B = args.device_batch_size
    if B == -1:
        most = max(1, 8192 // T)  # a CPU: at most 8,192 tokens (memory and cache)
        if device.type == "cuda":  # a GPU: as many rows as its free memory holds, by the estimate
            free = torch.cuda.mem_get_info(device)[0]
            most = fit_device_batch(config, num_params, free)
        B = min(most, max(1, total_batch // (T * world)))  # and no more rows than the total batch holds
        while total_batch % (B * T * world):
            B -= 1
        if device.type == "cuda":
            need = micro_batch_bytes(config, B)[1] / 2**30
            print0(f"device batch: {B} rows, ~{need:.1f} GiB of activations and logits (estimated, eager) "
                   f"beside {16 * num_params / 2**30:.1f} GiB of weights and optimizer state, of "
                   f"{free / 2**30:.1f} GiB free")
    if total_batch % (B * T * world):
        raise UserError(f"--total-batch-size {total_batch} is not a multiple of {B * T * world}, what one "
                        "forward pass of all processes takes: change it or --device-batch-size")
    grad_accum = total_batch // (B * T * world)  # micro-batches per optimizer step
    args.device_batch_size, args.total_batch_size = B, total_batch  # the checkpoint records what was used
    target_tokens = args.target_tokens if args.target_tokens > 0 else int(args.param_data_ratio * num_params)
    num_steps = args.num_steps if args.num_steps > 0 else max(1, target_tokens // total_batch)

    # -------------------------------------------------------------------------
    # Data: the corpus as token shards (written by one process per node), read before a model is built, so
    # that a bad line in it costs seconds, not a model
    train_shards = token_shards(corpus_files("train"), tokenizer, write=local_rank == 0)
    val_shards = token_shards(corpus_files("val"), tokenizer, write=local_rank == 0)

    # -------------------------------------------------------------------------
    # Model + optimizer (fresh, or from the latest checkpoint with --resume), compiled where a compiler works
    use_compile = args.compile == 1 and device.type in ("cpu", "cuda") and args.num_experts == 1  # MoE: eager
    if use_compile and device.type == "cpu":  # inductor builds CPU kernels with a C++ compiler: is there one?
        try:
            import torch._inductor.cpp_builder as cpp
            cpp.get_cpp_compiler()
            torch._dynamo.config.suppress_errors = True  # a graph that still fails to build runs eagerly
        except Exception as e:
            print0(f"warning: torch.compile needs a C++ compiler ({type(e).__name__}): running eagerly "
                   "(apt install g++)", file=sys.stderr)
            use_compile = False
    model = model.to_empty(device=device)  # the weights straight on the device, no CPU copy
    model.init_weights()
    optimizer = model.setup_optimizer(args.matrix_lr, args.embedding_lr, args.unembedding_lr,
                                      args.weight_decay, use_compile)
    start_step, resume_meta = 0, None
    if args.resume:
        model_state, optim_state, resume_meta, rng = load_checkpoint("pretrain", device=device,
                                                                      load_optim=True)
        if GPTConfig(**resume_meta["model_config"]) != config:
            raise UserError(f"--resume needs the model shape of the checkpoint ({resume_meta['args']}): "
                            "pass its flags")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        torch.set_rng_state(rng["cpu"])
        start_step = resume_meta["step"]
    orig_model = model  # plain: for sampling with the KV cache and for saving
    if ddp:  # torchrun: the gradients are summed over the ranks during the backward pass
        ddp_model = distributed(model, device)
        model = ddp_model
    if use_compile:
        model = torch.compile(model, dynamic=False)
    flops_per_token = orig_model.estimate_flops()
    experts = f" ({num_params:,} active a token: {args.experts_per_token} of {args.num_experts} experts)"
    print0(f"model: depth {args.depth}, width {n_embd}, {n_head} heads, {orig_model.num_params():,} "
           f"parameters{experts if args.num_experts > 1 else ''}, {flops_per_token / 1e6:.1f} MFLOP/token"
           f"{', compiled' if use_compile else ''}")
    print0(f"batch: {total_batch:,} tokens/step = {B} rows x {T} tokens x {world} processes x {grad_accum} "
           "accumulation")
    print0(f"horizon: {num_steps:,} steps = {num_steps * total_batch:,} tokens "
           f"({num_steps * total_batch / num_params:.1f} per parameter)")

    # -------------------------------------------------------------------------
    # Lanes: one per micro-batch: micro-batch m of rank r always reads lane r * grad_accum + m, so N
    # processes and 1 process with N accumulation steps see exactly the same rows
    n_lanes = world * grad_accum
    states = resume_meta["lanes"] if resume_meta else [None] * n_lanes
    if len(states) != n_lanes:
        raise UserError(f"--resume needs the batch layout of the checkpoint ({len(states)} lanes, now "
                        f"{n_lanes}): use the same batch sizes and number of processes")
    lanes = [Lane(train_shards, i, n_lanes, tokenizer.bos_id, B, T, device, states[i])
             for i in range(rank * grad_accum, (rank + 1) * grad_accum)]
    val_steps = max(1, (args.eval_tokens if args.eval_tokens > 0 else 10 * total_batch) // (B * T * world))

    def val_batches():  # the same val rows at every evaluation: a fresh lane per rank
        lane = Lane(val_shards, rank, world, tokenizer.bos_id, B, T, device)
        return (lane.batch() for _ in range(val_steps))

    # -------------------------------------------------------------------------
    # Schedules
    def lr_multiplier(step):
        warmup, warmdown = round(args.warmup_ratio * num_steps), round(args.warmdown_ratio * num_steps)
        if step < warmup:
            return (step + 1) / warmup
        if step <= num_steps - warmdown:
            return 1.0
        progress = (num_steps - step) / warmdown
        return progress + (1 - progress) * args.final_lr_frac

    def muon_momentum(step):  # 0.85 -> 0.95 over the first 300 steps
        frac = min(step / 300, 1)
        return (1 - frac) * 0.85 + frac * 0.95

    # -------------------------------------------------------------------------
    # Training loop: eval, sample and save at the top of a step; the last iteration only does those
    logger = JsonlLogger("pretrain", start_step if args.resume else None, enabled=master, world=world)
    prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):",
               "If 5 apples cost 10 dollars,"]
    metrics = resume_meta["metrics"] if resume_meta else dict(val_bpb=None, min_val_bpb=float("inf"))
    t_start = time.time()
    catch_stop_signals()  # SIGTERM / Ctrl-C: finish the step, save, stop
    for step in range(start_step, num_steps + 1):
        last = step == num_steps
        stop = stop_requested(device)  # SIGTERM or Ctrl-C on some rank
        evaluated = args.resume and step == start_step  # (the resumed checkpoint's step was evaluated before)
        due = last or args.eval_every > 0 and step % args.eval_every == 0
        if due and not stop and not evaluated and not args.bench:
            model.eval()
            val_bpb = evaluate_loss(model, val_batches(), tokenizer.token_bytes)["bpb"]
            model.train()
            print0(f"step {step}/{num_steps} | val bpb {val_bpb:.4f}")
            logger.log(step=step, val_bpb=val_bpb)
            metrics = dict(val_bpb=val_bpb, min_val_bpb=min(metrics["min_val_bpb"], val_bpb))
        sample = last or args.sample_every > 0 and step % args.sample_every == 0
        if master and sample and step > 0 and not stop and not args.bench:
            orig_model.eval()
            for prompt in prompts:
                ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
                out, _ = generate_batch(orig_model, ids, max_tokens=24, temperature=0, tokenizer=tokenizer)
                text = tokenizer.decode([t for t in out[0] if t != tokenizer.bos_id])
                print0(f"  sample: {prompt}{text!r}")
            orig_model.train()
        due = last or stop or args.save_every > 0 and step % args.save_every == 0
        if due and step > start_step and not args.bench:
            meta = dict(model_config=vars(config), tokenizer_hash=tokenizer.hash, args=vars(args),
                        metrics=metrics, lanes_total=n_lanes, total_batch=total_batch, world_size=world,
                        num_steps=num_steps, train_time=time.time() - t_start)
            lane_states = [lane.state() for lane in lanes]
            save_checkpoint("pretrain", step, orig_model, optimizer, meta, args.keep, lane_states)
        if stop:
            exit_stopped(step, step > start_step)
        if last:
            break

        # one optimizer step: the mean loss over every target token of the micro-batches of all ranks
        # on a CPU, one thread per core that other processes leave free; compiled, a new count must hold for
        # as long as a recompile costs (a cold cpu-preset compile: 30-40 s) before it is taken
        fit_threads(device, hold=40 if use_compile else 0)
        sync(device)
        t0 = time.time()
        batches = [lane.batch() for lane in lanes]
        wait = time.time() - t0  # the step's time spent waiting for its data
        lrm = lr_multiplier(step)
        optimizer.set_lr(lrm)
        optimizer.param_groups[0]["momentum"] = muon_momentum(step)  # group 0: the Muon matrices
        n = sum((y >= 0).sum() for _, y in batches).double()  # target tokens of this rank...
        if ddp:
            dist.all_reduce(n)  # ... and of all ranks: every token weighs the same (DDP sums the gradients)
        n = n.clamp(min=1)
        train_loss = torch.zeros((), device=device, dtype=torch.float64)
        try:
            for i, (x, y) in enumerate(batches):
                if ddp:  # sum over the ranks in the last micro-batch's backward pass only
                    ddp_model.require_backward_grad_sync = i == len(batches) - 1
                with amp_ctx(device):
                    loss = model(x, y, loss_reduction="none").sum() / n
                loss.backward()
                train_loss += loss.detach()
            optimizer.step()
        except torch.OutOfMemoryError:
            raise out_of_memory(B) from None
        model.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(train_loss)
        train_loss = train_loss.item()
        if not math.isfinite(train_loss):
            raise not_finite(train_loss, step)
        sync(device)
        logger.train_step(step + 1, num_steps, train_loss, lrm * args.matrix_lr, time.time() - t0,
                          total_batch, flops_per_token, wait)

    minutes = (time.time() - t_start) / 60
    val = "--bench: no evaluation" if args.bench else f"val bpb {metrics['val_bpb']:.4f}"
    print0(f"done: {num_steps} steps in {minutes:.1f} min, {val}")
    compute_cleanup()
