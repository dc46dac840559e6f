"""
sft.py: supervised finetuning on conversations, one conversation per row, loss only on the tokens the
assistant writes (the render_conversation mask).

    python sft.py                                             # from the latest midtrain checkpoint
    python sft.py --source pretrain                           # straight from the base model
    torchrun --standalone --nproc_per_node=8 sft.py           # 8 GPUs
    python sft.py --resume                                    # continue the latest sft checkpoint

Reads checkpoints/midtrain (`python midtrain.py`) and data/chat/*.jsonl (`python data/chat_data.py`);
writes checkpoints/sft/step_N and logs/sft.jsonl.
"""

import argparse
import json
import time

import numpy as np
import torch

from model import (UserError, compute_cleanup, compute_init, epoch_order, JsonlLogger, load_model, print0,
                   print_answers, save_checkpoint, sync, train_step)
from tokenizer import read_mixture

# -----------------------------------------------------------------------------
# Arguments
parser = argparse.ArgumentParser(description="Supervised finetuning on conversations.")
parser.add_argument("--source", default="midtrain", choices=["midtrain", "pretrain"], help="checkpoint stage to start from")
parser.add_argument("--source-step", type=int, default=-1, help="step of that checkpoint (-1 = latest)")
# batch
parser.add_argument("--max-seq-len", type=int, default=-1, help="longest row in tokens; longer conversations are cut (-1 = inherit)")
parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per process")
parser.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step (all processes)")
parser.add_argument("--num-epochs", type=float, default=1.0, help="passes over the mixture (sets the steps)")
parser.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
# optimization
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate of the block matrices")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding (at width 768)")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the output head (at width 768)")
parser.add_argument("--init-lr-frac", type=float, default=0.02, help="all learning rates x this (finetuning is gentle)")
# data
parser.add_argument("--dump-batches", default="", help="append every micro-batch (x, y) as a JSON line to this file, to see what the loop trains on")
parser.add_argument("--skip-bad", action="store_true", help="skip malformed conversation lines (counted) instead of stopping")
parser.add_argument("--seed", type=int, default=42, help="seed of the shuffle")
# evaluation, checkpoints
parser.add_argument("--eval-every", type=int, default=100, help="steps between val loss evaluations (-1 = only at the end)")
parser.add_argument("--eval-rows", type=int, default=128, help="val conversations per evaluation (all processes)")
parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = only at the end)")
parser.add_argument("--keep", type=int, default=2, help="checkpoints to keep (0 = all)")
parser.add_argument("--resume", action="store_true", help="continue from the latest complete sft checkpoint")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init, and the model: the source checkpoint (or our own latest one with --resume)
ddp, rank, local_rank, world, device = compute_init(args.seed)
master = rank == 0
stage, step_ = ("sft", None) if args.resume else (args.source, None if args.source_step < 0 else args.source_step)
model, tokenizer, src_meta, optim_state = load_model(stage, device, step=step_, load_optim=True)
if args.max_seq_len == -1:
    args.max_seq_len = src_meta["args"]["max_seq_len"]
    print0(f"inherited max_seq_len={args.max_seq_len} from {stage} step {src_meta['step']}")
B, T = args.device_batch_size, args.max_seq_len
if args.examples_per_step % (B * world):
    raise UserError(f"--examples-per-step {args.examples_per_step} is not a multiple of device batch x world "
                    f"= {B * world}: change one of them")
grad_accum = args.examples_per_step // (B * world)
frac = args.init_lr_frac
optimizer = model.setup_optimizer(args.matrix_lr * frac, args.embedding_lr * frac, args.unembedding_lr * frac)
if args.resume:
    optimizer.load_state_dict(optim_state)
model.train()

# -----------------------------------------------------------------------------
# Data: the SFT mixture (a source's weight is how many times its rows appear per epoch), rendered once
MIXTURE = {"smoltalk": 1, "identity": 4, "arc_easy_train": 1, "arc_challenge_train": 1, "mmlu_dev": 1,
           "gsm8k_train": 1, "spelling": 1, "dolly": 1}
print0("mixture (sources not listed are absent: online-only, or not fetched yet):")
train_convs, n_bad = read_mixture(MIXTURE, "", args.skip_bad, print0)
val_convs, _ = read_mixture(MIXTURE, "val", args.skip_bad, lambda _: None)
train_rows, val_rows = tokenizer.render_all(train_convs, T + 1), tokenizer.render_all(val_convs, T + 1)

class Lane:
    """Every n_lanes-th conversation of the shuffled mixture (reshuffled each epoch), one per row, padded
    to the longest row of the batch. A row whose targets are all -1 (the assistant's part was cut off by
    --max-seq-len) is skipped."""

    def __init__(self, rows, lane, n_lanes, state=None):
        self.rows, self.lane, self.n_lanes = rows, lane, n_lanes
        self.pos, self.skipped = (state["pos"], state["skipped"]) if state else (0, 0)

    def next_row(self):
        while True:
            epoch, i = divmod(self.pos * self.n_lanes + self.lane, len(self.rows))
            ids, targets = self.rows[epoch_order(len(self.rows), args.seed, epoch)[i]]
            self.pos += 1
            if (targets >= 0).any():
                return ids[:-1], targets
            self.skipped += 1

    def batch(self):
        rows = [self.next_row() for _ in range(B)]
        L = max(len(ids) for ids, _ in rows)
        x, y = np.full((B, L), tokenizer.bos_id), np.full((B, L), -1)  # padding: <|bos|>, no target
        for b, (ids, targets) in enumerate(rows):
            x[b, :len(ids)], y[b, :len(targets)] = ids, targets
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def state(self):
        return {"pos": self.pos, "skipped": self.skipped}

n_lanes = world * grad_accum
lane_states = src_meta["lanes"] if args.resume else [None] * n_lanes
if len(lane_states) != n_lanes:
    raise UserError(f"--resume needs the batch layout of the checkpoint ({len(lane_states)} lanes, now {n_lanes}): "
                    "use the same --device-batch-size, --examples-per-step and number of processes")
lanes = [Lane(train_rows, rank * grad_accum + m, n_lanes, lane_states[rank * grad_accum + m]) for m in range(grad_accum)]
num_steps = args.num_steps if args.num_steps > 0 else max(1, int(args.num_epochs * len(train_convs)) // args.examples_per_step)
print0(f"{len(train_convs):,} conversations ({n_bad} bad lines skipped), {num_steps} steps of "
       f"{args.examples_per_step} ({B} x {world} processes x {grad_accum} accumulation)")

def val_batches():
    lane = Lane(val_rows, rank, world)
    return (lane.batch() for _ in range(max(1, args.eval_rows // (B * world))))

# -----------------------------------------------------------------------------
# Training loop: eval and save at the top of a step; the last iteration only does those
start_step = src_meta["step"] if args.resume else 0
logger = JsonlLogger("sft", resume_step=start_step if args.resume else None, enabled=master, world=world)
flops_per_token = model.estimate_flops()
val_loss = src_meta["metrics"]["val_loss"] if args.resume else None  # the eval of the resumed step ran before its save
t_start = time.time()
for step in range(start_step, num_steps + 1):
    last = step == num_steps
    if (last or (args.eval_every > 0 and step % args.eval_every == 0)) and not (args.resume and step == start_step):
        val_loss = logger.eval(model, val_batches(), step, num_steps)
    if (last or (args.save_every > 0 and step % args.save_every == 0)) and step > start_step:
        meta = dict(model_config=vars(model.config), tokenizer_hash=tokenizer.hash, args=vars(args),
                    num_steps=num_steps, source=src_meta["source"] if args.resume else dict(stage=stage, step=src_meta["step"]),
                    metrics=dict(val_loss=val_loss), train_time=time.time() - t_start)
        save_checkpoint("sft", step, model, optimizer, meta, args.keep, [lane.state() for lane in lanes])
    if last:
        break

    sync(device)
    t0 = time.time()
    batches = [lane.batch() for lane in lanes]
    wait = time.time() - t0
    if args.dump_batches:
        with open(args.dump_batches, "a") as f:
            f.writelines(json.dumps(dict(x=x.tolist(), y=y.tolist())) + "\n" for x, y in batches)
    lrm = 1.0 - step / num_steps  # linear decay to 0
    optimizer.set_lr(lrm)
    train_loss = train_step(model, optimizer, batches, step)
    sync(device)
    logger.train_step(step + 1, num_steps, train_loss, lrm * args.matrix_lr * frac, time.time() - t0,
                      sum(x.numel() for x, _ in batches) * world, flops_per_token, wait,
                      skipped=sum(lane.skipped for lane in lanes))

if master:
    print_answers(model, tokenizer, ["What is 12 times 34?", "Who are you?", "Spell the word 'apple' letter by letter."])
print0(f"done: {num_steps} steps in {(time.time() - t_start) / 60:.1f} min, val loss {val_loss:.4f}")
compute_cleanup()
