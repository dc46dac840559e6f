"""
pretrain.py: train the base model on raw text, from one --depth dial.

    python pretrain.py --depth 4 --max-seq-len 256 --device-batch-size 8     # CPU, small
    python pretrain.py --depth 20                                             # one GPU
    torchrun --standalone --nproc_per_node=8 pretrain.py --depth 20           # 8 GPUs
    python pretrain.py --resume                                               # continue the latest checkpoint

Reads the corpus from $FLATCHAT_HOME/data/pretrain/{train,val} (`python data/corpus.py`) and the
tokenizer (`python tokenizer.py train`); writes checkpoints/pretrain/step_N and logs/pretrain.jsonl.
"""

import argparse
import math
import time

import torch

from model import (GPT, GPTConfig, UserError, compute_cleanup, compute_init, evaluate_loss,
                   generate_batch, JsonlLogger, step_backward, load_checkpoint, load_tokenizer, print0, save_checkpoint)
from tokenizer import base_dir, corpus_files, iter_documents

# -----------------------------------------------------------------------------
# Arguments
parser = argparse.ArgumentParser(description="Pretrain the base model.")
# model
parser.add_argument("--depth", type=int, default=20, help="number of layers; sets width (depth x 64), heads, batch, lrs, horizon")
parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
# horizon (the first of these that is set wins)
parser.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1 = from the token target)")
parser.add_argument("--target-tokens", type=int, default=-1, help="training tokens (-1 = ratio x parameters)")
parser.add_argument("--param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla: 20)")
# batch
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per process (lower it on OOM)")
parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = from depth)")
# optimization
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate of the block matrices")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding (at width 768)")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the output head (at width 768)")
parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (0 = off)")
parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup")
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear lr decay at the end")
parser.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end as a fraction of the peak")
# evaluation, samples, checkpoints
parser.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evaluations (-1 = only at the end)")
parser.add_argument("--eval-tokens", type=int, default=10 * 524288, help="val tokens per evaluation")
parser.add_argument("--sample-every", type=int, default=2000, help="steps between samples (-1 = only at the end)")
parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = only at the end)")
parser.add_argument("--keep", type=int, default=2, help="checkpoints to keep (0 = all)")
# runtime
parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model (1/0, -1 = on GPU only)")
parser.add_argument("--seed", type=int, default=42, help="random seed of the init")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init: processes, tokenizer, the model shape from the depth dial
ddp, rank, local_rank, world, device = compute_init(args.seed)
master = rank == 0
tokenizer = load_tokenizer()
n_embd = args.depth * 64
n_head = max(1, (n_embd + 127) // 128)  # head dim 128
config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=tokenizer.vocab_size, n_layer=args.depth,
                   n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
with torch.device("meta"):  # count parameters without allocating them
    shape_only = GPT(config)
num_params = shape_only.num_params()
matrix_params = num_params - 2 * shape_only.padded_vocab * n_embd
B, T = args.device_batch_size, args.max_seq_len
total_batch = args.total_batch_size
if total_batch == -1:  # bigger models like bigger batches: ~5e-3 tokens per matrix parameter, a power of 2
    total_batch = 2 ** min(19, max(12, round(math.log2(5e-3 * matrix_params))))
if total_batch % (B * T * world):
    raise UserError(f"--total-batch-size {total_batch} is not a multiple of device batch x seq len x world "
                    f"= {B * T * world}: change one of them")
grad_accum = total_batch // (B * T * world)
target_tokens = args.target_tokens if args.target_tokens > 0 else int(args.param_data_ratio * num_params)
num_steps = args.num_steps if args.num_steps > 0 else max(1, target_tokens // total_batch)

# -----------------------------------------------------------------------------
# Model + optimizer (fresh, or from the latest checkpoint with --resume)
model = GPT(config).to(device)
model.init_weights()
optimizer = model.setup_optimizer(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.weight_decay)
start_step, resume_meta = 0, None
if args.resume:
    model_state, optim_state, resume_meta, rng = load_checkpoint("pretrain", device=device, load_optim=True)
    if resume_meta["model_config"] != vars(config) or resume_meta["lanes_total"] != grad_accum * world:
        raise UserError("--resume needs the same model shape, batch sizes and world size as the checkpoint "
                        f"({resume_meta['args']}); pass the original flags")
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    torch.set_rng_state(rng["cpu"])
    start_step = resume_meta["step"]
orig_model = model  # uncompiled, for sampling with the KV cache and for saving
if args.compile == 1 or (args.compile == -1 and device.type == "cuda"):
    model = torch.compile(model, dynamic=False)
    # on a CPU, a missing or broken C++ toolchain makes inductor fail: run those graphs eagerly, with a warning
    torch._dynamo.config.suppress_errors = device.type == "cpu"
flops_per_token = orig_model.estimate_flops()
print0(f"model: depth {args.depth}, width {n_embd}, {n_head} heads, {num_params:,} parameters, "
       f"{flops_per_token / 1e6:.1f} MFLOP/token")
print0(f"batch: {total_batch:,} tokens/step = {B} rows x {T} tokens x {world} processes x {grad_accum} accumulation")
print0(f"horizon: {num_steps:,} steps = {num_steps * total_batch:,} tokens "
       f"({num_steps * total_batch / num_params:.1f} per parameter)")

# -----------------------------------------------------------------------------
# Data: documents packed into rows of T+1 tokens, each row starting with <|bos|>

class Lane:
    """One stream of documents (every n_lanes-th document of the corpus) packed into rows, best fit:
    each row takes the longest buffered piece that still fits; when none fits, the longest piece is
    split and its rest waits in the buffer as a new piece starting with <|bos|> (never cropped away)."""

    def __init__(self, files, lane, n_lanes, state=None, buffer_size=32):
        self.files, self.lane, self.n_lanes, self.buffer_size = files, lane, n_lanes, buffer_size
        self.bos = tokenizer.bos_id
        self.docs = self._stream()
        self.pieces = []  # [position of the doc in this lane's stream, offset into its tokens, tokens]
        self.next_pos = 0
        if state:  # replay the stream up to where it stood, re-tokenizing the buffered documents
            texts = {pos: None for pos, _ in state["pieces"]}
            while self.next_pos < state["next_pos"]:
                pos, text = next(self.docs)
                self.next_pos = pos + 1
                if pos in texts:
                    texts[pos] = text
            self.pieces = [[pos, off, [self.bos] + tokenizer.encode(texts[pos])[off:]] for pos, off in state["pieces"]]

    def _stream(self):  # (position, text), forever: the corpus repeats in epochs
        pos = 0
        while True:
            n = 0
            for f in self.files:
                for text in iter_documents(f):
                    if n % self.n_lanes == self.lane:
                        yield pos, text
                        pos += 1
                    n += 1
            if pos == 0:
                raise UserError(f"no documents for lane {self.lane} in {self.files[0].parent}: rerun `python data/corpus.py`")

    def row(self, size):
        row = []
        while len(row) < size:
            while len(self.pieces) < self.buffer_size:
                pos, text = next(self.docs)
                self.next_pos = pos + 1
                self.pieces.append([pos, 0, [self.bos] + tokenizer.encode(text)])
            room = size - len(row)
            fits = [p for p in self.pieces if len(p[2]) <= room]
            if fits:
                best = max(fits, key=lambda p: len(p[2]))
                self.pieces.remove(best)
                row += best[2]
            else:  # split the longest piece: its rest continues in a later row
                p = max(self.pieces, key=lambda p: len(p[2]))
                row += p[2][:room]
                p[1] += room - 1
                p[2] = [self.bos] + p[2][room:]
        return row

    def batch(self, B, T):
        rows = torch.tensor([self.row(T + 1) for _ in range(B)], dtype=torch.long)
        x, y = rows[:, :-1], rows[:, 1:]
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def state(self):
        return {"next_pos": self.next_pos, "pieces": [[p[0], p[1]] for p in self.pieces]}

# Lanes make the batch independent of the process count: the global batch is world x grad_accum
# micro-batches, micro-batch m of rank r always comes from lane r*grad_accum + m, so 2 processes
# and 1 process with 2 accumulation steps see exactly the same rows.
n_lanes = world * grad_accum
train_files = corpus_files("train")
lane_states = resume_meta["lanes"] if resume_meta else [None] * n_lanes
lanes = [Lane(train_files, rank * grad_accum + m, n_lanes, lane_states[rank * grad_accum + m]) for m in range(grad_accum)]
val_files = corpus_files("val")
val_steps = max(1, args.eval_tokens // (B * T * world))

def val_batches():  # the same val rows at every evaluation: a fresh lane per rank
    lane = Lane(val_files, rank, world)
    return (lane.batch(B, T) for _ in range(val_steps))

# -----------------------------------------------------------------------------
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

# -----------------------------------------------------------------------------
# Training loop: eval, sample and save at the top of a step; the last iteration only does those
logger = JsonlLogger("pretrain", resume_step=start_step if args.resume else None, enabled=master, world=world)
prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):", "If 5 apples cost 10 dollars,"]
val_bpb, min_val_bpb = (resume_meta["metrics"]["val_bpb"], resume_meta["metrics"]["min_val_bpb"]) if resume_meta else (None, float("inf"))
t_start = time.time()
for step in range(start_step, num_steps + 1):
    last = step == num_steps
    if (last or (args.eval_every > 0 and step % args.eval_every == 0)) and not (args.resume and step == start_step):
        model.eval()
        val_bpb = evaluate_loss(model, val_batches(), tokenizer.token_bytes)["bpb"]
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step}/{num_steps} | val bpb {val_bpb:.4f}")
        logger.log(step=step, val_bpb=val_bpb)
        model.train()
    if master and (last or (args.sample_every > 0 and step % args.sample_every == 0 and step > 0)):
        orig_model.eval()
        for prompt in prompts:
            ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
            out, _ = generate_batch(orig_model, ids, max_tokens=24, temperature=0, tokenizer=tokenizer)
            print0(f"  sample: {prompt}{tokenizer.decode([t for t in out[0] if t != tokenizer.bos_id])!r}")
        orig_model.train()
    if (last or (args.save_every > 0 and step % args.save_every == 0)) and step > start_step:
        meta = dict(model_config=vars(config), tokenizer_hash=tokenizer.hash, args=vars(args), lanes_total=n_lanes,
                    total_batch=total_batch, world_size=world, num_steps=num_steps, train_time=time.time() - t_start,
                    metrics=dict(val_bpb=val_bpb, min_val_bpb=min_val_bpb))
        save_checkpoint("pretrain", step, orig_model, optimizer, meta, args.keep, [lane.state() for lane in lanes])
    if last:
        break

    # one optimizer step over grad_accum micro-batches
    t0 = time.time()
    train_loss = step_backward(model, [lane.batch(B, T) for lane in lanes])
    lrm = lr_multiplier(step)
    optimizer.set_lr(lrm)
    optimizer.param_groups[0]["momentum"] = muon_momentum(step)  # group 0: the Muon matrices
    optimizer.step()
    model.zero_grad(set_to_none=True)
    dt = time.time() - t0
    if not math.isfinite(train_loss):
        raise SystemExit(f"error: loss is {train_loss} at step {step}: stopped without saving; the last good "
                         f"checkpoint in {base_dir() / 'checkpoints' / 'pretrain'} is intact. Lower the learning "
                         "rates and rerun (or --resume)")
    logger.train_step(step + 1, num_steps, train_loss, lrm * args.matrix_lr, dt, total_batch, flops_per_token)

print0(f"done: {num_steps} steps in {(time.time() - t_start) / 60:.1f} min, val bpb {val_bpb:.4f}")
compute_cleanup()
