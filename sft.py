"""
sft.py: supervised finetuning on conversations, one conversation per row, loss only on the tokens the
assistant writes (the render_conversation mask). Reads checkpoints/midtrain (`python midtrain.py`) and
data/chat/*.jsonl (`python data/chat_data.py`); writes checkpoints/sft/step_N and logs/sft.jsonl.

    python sft.py                                             # from the latest midtrain checkpoint
    python sft.py --source pretrain                           # straight from the base model
    python sft.py --lora-rank 8                               # LoRA: adapters only, the rest frozen
    torchrun --standalone --nproc_per_node=8 sft.py           # 8 GPUs
    python sft.py --resume                                    # continue the latest sft checkpoint
"""

import json
import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from model import (JsonlLogger, UserError, amp_ctx, catch_stop_signals, compute_cleanup, compute_init,
                   distributed, evaluate_loss, exit_stopped, fit_threads, generate_batch, load_adapters,
                   load_model, lock_stage, not_finite, out_of_memory, print0, save_checkpoint, stop_requested,
                   sync)
from tokenizer import Parser, ranged, read_mixture

# -----------------------------------------------------------------------------
# Arguments
parser = Parser(description="Supervised finetuning on conversations.")
add = parser.add_argument
add("--source", default="midtrain", choices=["midtrain", "pretrain"], help="checkpoint stage to start from")
add("--source-step", type=ranged(int, 0, sentinel=-1), default=-1,
    help="step of that checkpoint (-1 = latest)")
# batch
add("--max-seq-len", type=ranged(int, 2, sentinel=-1), default=-1,
    help="longest row in tokens; longer conversations are cut (-1 = inherit)")
add("--device-batch-size", type=ranged(int, 1, sentinel=-1), default=4,
    help="conversations per forward pass per process")
add("--examples-per-step", type=ranged(int, 1), default=32,
    help="conversations per optimizer step (all processes)")
add("--num-epochs", type=ranged(float, 0.01), default=1.0, help="passes over the mixture (sets the steps)")
add("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1,
    help="optimizer steps (-1 = from --num-epochs)")
# optimization: finetuning is gentle, the base learning rates x --init-lr-frac, decaying linearly to 0
add("--matrix-lr", type=ranged(float, 0), default=0.02, help="Muon learning rate of the block matrices")
add("--embedding-lr", type=ranged(float, 0), default=0.2, help="AdamW lr of the embedding (at width 768)")
add("--unembedding-lr", type=ranged(float, 0), default=0.004, help="AdamW lr of the head (at width 768)")
add("--init-lr-frac", type=ranged(float, 0), default=0.02, help="all learning rates x this")
# LoRA
add("--lora-rank", type=ranged(int, 0), default=0, help="train rank-r adapters, the rest frozen (0 = off)")
add("--lora-alpha", type=ranged(float, 0), default=16.0, help="the adapters' update is x alpha / rank")
add("--lora-targets", default="q,k,v,o", help="comma list of q, k, v, o (attention) and mlp")
add("--lora-lr", type=ranged(float, 0), default=1e-3, help="AdamW learning rate of the adapters")
# data
add("--chat-file", action="append", default=[], metavar="PATH[:WEIGHT]",
    help="your own conversations beside the mixture (JSONL of {messages} or {prompt, response}), each row "
    "WEIGHT times a pass; every 50th is val; repeatable")
add("--mixture", default="auto", choices=["auto", "gpu", "cpu"],
    help="the built-in conversation mixture: gpu (nanochat's) or cpu (for a tiny model); auto: by device")
add("--skip-bad", action="store_true", help="skip bad conversation lines (counted), not stop")
add("--dump-batches", default="", help="append each micro-batch (x, y) to this JSONL file")
add("--seed", type=ranged(int, 0), default=42, help="random seed: data order")
# evaluation, checkpoints
add("--eval-every", type=ranged(int, 1, sentinel=-1), default=100,
    help="steps between evals (-1 = at the end)")
add("--eval-rows", type=ranged(int, 1), default=128, help="val conversations per evaluation (all processes)")
add("--save-every", type=ranged(int, 1, sentinel=-1), default=-1,
    help="steps between saves (-1 = at the end)")
add("--keep", type=ranged(int, 0), default=2, help="checkpoints to keep (0 = all)")
add("--resume", action="store_true", help="continue from this stage's latest complete checkpoint")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init, and the model: the source checkpoint (or our own latest one and its optimizer state with --resume)
ddp, rank, local_rank, world, device = compute_init(args.seed)
lock_stage("sft", args.resume)  # one live run per stage; an earlier run is kept
from_stage, from_step = args.source, None if args.source_step == -1 else args.source_step
if args.resume:  # our own latest checkpoint instead, with its optimizer state
    from_stage, from_step = "sft", None
model, tokenizer, src_meta, optim_state = load_model(from_stage, device, from_step, load_optim=args.resume)
source = src_meta["source"] if args.resume else dict(stage=args.source, step=src_meta["step"])
print0(f"loaded {from_stage} step {src_meta['step']}")
if args.max_seq_len == -1:
    args.max_seq_len = src_meta["args"]["max_seq_len"]
    print0(f"inherited max_seq_len = {args.max_seq_len}")
if args.lora_rank:
    if args.resume:  # a LoRA checkpoint holds merged weights: continue from its base, with its own adapters
        model = load_model(source["stage"], device, source["step"], tokenizer)[0]
    trainable, total = model.add_lora(args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
    if args.resume:
        model.load_state_dict(load_adapters("sft", src_meta["step"], device), strict=False)
    print0(f"LoRA rank {args.lora_rank} on {args.lora_targets}: {trainable:,} trainable parameters of "
           f"{total:,} ({100 * trainable / total:.2f}%), the rest frozen")
frac = args.init_lr_frac
optimizer = model.setup_optimizer(args.matrix_lr * frac, args.embedding_lr * frac, args.unembedding_lr * frac,
                                  lora_lr=args.lora_lr)
if args.resume:
    optimizer.load_state_dict(optim_state)
model.train()
step_model = model  # what the training step runs
if ddp:  # torchrun: the gradients are summed over the ranks during the backward pass
    step_model = distributed(model, device)
B, T = args.device_batch_size, args.max_seq_len
if args.examples_per_step % (B * world):
    raise UserError(f"--examples-per-step {args.examples_per_step} is not a multiple of {B * world}, what "
                    "one forward pass of all processes takes: change it or --device-batch-size")
grad_accum = args.examples_per_step // (B * world)  # micro-batches per optimizer step

# -----------------------------------------------------------------------------
# Data: the preset's SFT mixture (a source's weight: how many times its rows appear an epoch), rendered once
MIXTURES = {
    "gpu": {"smoltalk": 1, "identity": 4, "arc_easy_train": 1, "arc_challenge_train": 1, "mmlu_dev": 1,
            "gsm8k_train": 1, "spelling": 1, "dolly": 1},  # nanochat's
    "cpu": {"identity": 1, "arithmetic": 1, "spelling": 2, "stories": 4, "dolly_short": 1},  # a tiny model's
}
mixture = args.mixture
if mixture == "auto":  # the gpu mixture where a GPU trains, the cpu one on a CPU
    mixture = "gpu" if device.type == "cuda" else "cpu"
MIXTURE = MIXTURES[mixture]
print0(f"mixture ({mixture}; sources not listed are absent: online-only, or not fetched yet):")
train_convs, n_bad = read_mixture(MIXTURE, "", args.skip_bad, print0, args.chat_file)
val_convs, _ = read_mixture(MIXTURE, "val", args.skip_bad, lambda _: None, args.chat_file)
train_rows, val_rows = tokenizer.render_all(train_convs, T + 1), tokenizer.render_all(val_convs, T + 1)

class Lane:
    """Lane `lane` of n_lanes: every n_lanes-th conversation of a seeded order (reshuffled each epoch), one
    per row, B rows padded to the longest (rounded up). A conversation whose targets are all -1 (the
    assistant's part was cut off by --max-seq-len) is skipped, and counted."""

    def __init__(self, rows, lane, n_lanes, B, T, pad, seed, device, state=None):
        self.rows, self.lane, self.n_lanes = rows, lane, n_lanes
        self.B, self.T, self.pad, self.seed, self.device = B, T, pad, seed, device
        self.pos, self.skipped = (state["pos"], state["skipped"]) if state else (0, 0)
        self.order = {}

    def next_row(self):  # (ids, targets) of the next conversation that has a target
        for _ in range(len(self.rows)):
            epoch, i = divmod(self.pos * self.n_lanes + self.lane, len(self.rows))
            if epoch not in self.order:  # a seeded permutation per epoch, the same on every rank
                n = len(self.rows)
                self.order = {epoch: random.Random(self.seed + epoch).sample(range(n), n)}
            self.pos += 1
            ids, targets = self.rows[self.order[epoch][i]]
            if (targets >= 0).any():
                return ids, targets
            self.skipped += 1
        raise UserError("no conversation keeps an assistant token within --max-seq-len: raise it")

    def batch(self):  # inputs and targets (B, L), L <= T
        rows = [self.next_row() for _ in range(self.B)]
        # a multiple of 32: few distinct shapes (oneDNN caches kernels per shape: cpu preset 2.4 GB -> 0.8)
        L = min(self.T, -(-max(len(ids) - 1 for ids, _ in rows) // 32) * 32)
        x, y = np.full((self.B, L), self.pad), np.full((self.B, L), -1)  # padding: <|bos|>, no target
        for b, (ids, targets) in enumerate(rows):
            x[b, :len(ids) - 1] = ids[:-1]
            y[b, :len(targets)] = targets
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def state(self):
        return {"pos": self.pos, "skipped": self.skipped}

# micro-batch m of rank r always reads lane r * grad_accum + m: N processes see what 1 process with N
# accumulation steps sees
n_lanes = world * grad_accum
states = src_meta["lanes"] if args.resume else [None] * n_lanes
if len(states) != n_lanes:
    raise UserError(f"--resume needs the batch layout of the checkpoint ({len(states)} lanes, now {n_lanes}):"
                    " use the same batch sizes and number of processes")
lanes = [Lane(train_rows, i, n_lanes, B, T, tokenizer.bos_id, args.seed, device, states[i])
         for i in range(rank * grad_accum, (rank + 1) * grad_accum)]
val_steps = max(1, args.eval_rows // (B * world))
num_steps = args.num_steps
if num_steps == -1:  # --num-epochs passes over the mixture
    num_steps = max(1, int(args.num_epochs * len(train_convs)) // args.examples_per_step)
print0(f"{len(train_convs):,} conversations ({n_bad} bad lines skipped), {num_steps} steps of "
       f"{args.examples_per_step} ({B} x {world} processes x {grad_accum} accumulation)")

def lr_multiplier(step):  # a linear decay to 0
    return 1.0 - step / num_steps

# -----------------------------------------------------------------------------
# Training loop: eval and save at the top of a step; the last iteration only does those
start_step = src_meta["step"] if args.resume else 0
logger = JsonlLogger("sft", start_step if args.resume else None, enabled=rank == 0, world=world)
val_loss = src_meta["metrics"]["val_loss"] if args.resume else None  # (evaluated before it was saved)
flops_per_token, t_start = model.estimate_flops(), time.time()
catch_stop_signals()  # SIGTERM / Ctrl-C: finish the step, save, stop
for step in range(start_step, num_steps + 1):
    last = step == num_steps
    stop = stop_requested(device)  # SIGTERM or Ctrl-C on some rank
    evaluated = args.resume and step == start_step
    if (last or args.eval_every > 0 and step % args.eval_every == 0) and not stop and not evaluated:
        val_lane = Lane(val_rows, rank, world, B, T, tokenizer.bos_id, args.seed, device)  # the same rows
        model.eval()
        val_loss = evaluate_loss(model, (val_lane.batch() for _ in range(val_steps)))["loss"]
        model.train()
        print0(f"step {step}/{num_steps} | val loss {val_loss:.4f}")
        logger.log(step=step, val_loss=val_loss)
    if (last or stop or args.save_every > 0 and step % args.save_every == 0) and step > start_step:
        meta = dict(model_config=vars(model.config), tokenizer_hash=tokenizer.hash, args=vars(args),
                    num_steps=num_steps, source=source, metrics=dict(val_loss=val_loss),
                    train_time=time.time() - t_start)
        save_checkpoint("sft", step, model, optimizer, meta, args.keep, [lane.state() for lane in lanes])
    if stop:
        exit_stopped(step, step > start_step)
    if last:
        break

    # one optimizer step: the mean loss over every assistant token of the micro-batches of all ranks
    fit_threads(device)  # on a CPU: one thread per core that other processes leave free
    sync(device)
    t0 = time.time()
    batches = [lane.batch() for lane in lanes]
    wait = time.time() - t0  # the step's time spent waiting for its data
    if args.dump_batches:
        with open(args.dump_batches, "a") as f:
            f.writelines(json.dumps(dict(x=x.tolist(), y=y.tolist())) + "\n" for x, y in batches)
    lrm = lr_multiplier(step)
    optimizer.set_lr(lrm)
    n = sum((y >= 0).sum() for _, y in batches).double()  # target tokens of this rank...
    if ddp:
        dist.all_reduce(n)  # ... and of all ranks: every token weighs the same (DDP sums the gradients)
    n = n.clamp(min=1)
    train_loss = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for i, (x, y) in enumerate(batches):
            if ddp:  # sum over the ranks in the last micro-batch's backward pass only
                step_model.require_backward_grad_sync = i == len(batches) - 1
            with amp_ctx(device):
                loss = step_model(x, y, loss_reduction="none").sum() / n
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
        raise not_finite(train_loss, step, "--init-lr-frac")
    sync(device)
    logger.train_step(step + 1, num_steps, train_loss, lrm * optimizer.param_groups[0]["initial_lr"],
                      time.time() - t0, sum(x.numel() for x, _ in batches) * world, flops_per_token, wait,
                      skipped=sum(lane.skipped for lane in lanes))
print0(f"done: {num_steps} steps in {(time.time() - t_start) / 60:.1f} min, val loss {val_loss:.4f}")

# -----------------------------------------------------------------------------
# What it learned: greedy replies to a few questions
if rank == 0:
    model.eval()
    for question in ["What is 12 times 34?", "Who are you?", "Spell the word 'apple' letter by letter."]:
        ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": question}]})
        out, _ = generate_batch(model, ids, max_tokens=64, temperature=0, tokenizer=tokenizer)
        print0(f"  {question} -> {tokenizer.decode(out[0])!r}")
compute_cleanup()
