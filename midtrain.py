"""
midtrain.py: teach the base model the chat format, its special tokens, the calculator tool and
multiple choice, by training on a mixture of conversations (loss only on what the assistant says).

    python midtrain.py                                        # CPU or one GPU, inherits the base shape
    torchrun --standalone --nproc_per_node=8 midtrain.py      # 8 GPUs
    python midtrain.py --resume                               # continue the latest midtrain checkpoint

Reads checkpoints/pretrain (`python pretrain.py`) and data/chat/*.jsonl (`python data/chat_data.py`);
writes checkpoints/midtrain/step_N and logs/midtrain.jsonl.
"""

import math

import numpy as np
import torch

from model import (UserError, add_training_args, compute_cleanup, epoch_order, finetune_loop, make_lanes, print0,
                   print_answers, start_from_checkpoint)
from tokenizer import Parser, ranged, read_mixture

# -----------------------------------------------------------------------------
# Arguments
parser = Parser(description="Midtrain the base model on a conversation mixture.")
parser.add_argument("--source-step", type=ranged(int, 0, sentinel=-1), default=-1, help="pretrain checkpoint step to start from (-1 = latest)")
# batch (-1 = inherit from the base checkpoint)
parser.add_argument("--max-seq-len", type=ranged(int, 2, sentinel=-1), default=-1, help="context length in tokens (-1 = inherit)")
parser.add_argument("--device-batch-size", type=ranged(int, 1, sentinel=-1), default=-1, help="rows per forward pass per process (-1 = inherit)")
parser.add_argument("--total-batch-size", type=ranged(int, 1, sentinel=-1), default=-1, help="tokens per optimizer step (-1 = inherit)")
parser.add_argument("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1, help="optimizer steps (-1 = one pass over the mixture)")
parser.add_argument("--warmdown-ratio", type=ranged(float, 0, 1), default=0.2, help="fraction of steps of linear lr decay to 0")
parser.add_argument("--eval-rows", type=ranged(int, 1), default=256, help="val rows per evaluation (all processes together)")
parser.add_argument("--dump-batches", default="", help="append every micro-batch (x, y) as a JSON line to this file")
parser.add_argument("--skip-bad", action="store_true", help="skip malformed conversation lines (counted) instead of stopping")
add_training_args(parser, init_lr_frac=1.0, lora=True)  # the base model's learning rates, x --init-lr-frac
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init, and the model: the base checkpoint (or our own latest one with --resume)
rank, world, device, model, tokenizer, src_meta, optimizer = start_from_checkpoint(args, "midtrain", "pretrain", args.source_step)
for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
    if getattr(args, name) == -1:  # shape flags inherit from the checkpoint we start from
        setattr(args, name, src_meta["args"][name])
        print0(f"inherited {name} = {getattr(args, name)}")
B, T = args.device_batch_size, args.max_seq_len
if args.total_batch_size % (B * T * world):
    raise UserError(f"--total-batch-size {args.total_batch_size} is not a multiple of {B * T * world} "
                    "(device batch x seq len x world): change one of them")
grad_accum = args.total_batch_size // (B * T * world)

# -----------------------------------------------------------------------------
# Data: the mixture, rendered once on every core. A source's weight is how many times its rows appear per pass.
MIXTURE = {
    "smoltalk": 1,  # general chat (online only)
    "identity": 8,  # who the assistant is: small set, seen often
    "mmlu_dev": 2, "mmlu_aux_train": 1, "arc_easy_train": 1, "arc_challenge_train": 1,  # multiple choice
    "gsm8k_train": 1,  # math with calculator tool calls
    "spelling": 1,  # letters and counting, with str.count tool calls
    "dolly": 1,  # short instructions
}
print0("mixture:")
train_convs, n_bad = read_mixture(MIXTURE, "", args.skip_bad, print0)
print0("validation:")
val_convs, _ = read_mixture(MIXTURE, "val", args.skip_bad, print0)
train_rows, val_rows = tokenizer.render_all(train_convs, T + 1), tokenizer.render_all(val_convs, T + 1)

class Lane:
    """Conversations (every n_lanes-th of the shuffled mixture, reshuffled each epoch) packed best-fit
    into rows of T+1 tokens without crossing rows; the rest of a row is padding with target -1."""

    def __init__(self, rows, lane, n_lanes, state=None, buffer_size=16):
        self.rows, self.lane, self.n_lanes, self.buffer_size = rows, lane, n_lanes, buffer_size
        self.pos, self.skipped = (state["pos"], state["skipped"]) if state else (0, 0)
        self.pieces = [(p, *self._row(p)) for p in state["pieces"]] if state else []  # (position, ids, targets)

    def _row(self, pos):
        epoch, i = divmod(pos * self.n_lanes + self.lane, len(self.rows))
        return self.rows[epoch_order(len(self.rows), args.seed, epoch)[i]]

    def _pull(self):  # the next conversation with at least one target (not all cut off by T)
        for _ in range(len(self.rows)):
            ids, tgt = self._row(self.pos)
            self.pos += 1
            if (tgt >= 0).any():
                return self.pieces.append((self.pos - 1, ids, tgt))
            self.skipped += 1
        raise UserError(f"no conversation keeps an assistant token within --max-seq-len {T}: raise it")

    def batch(self):
        x, y = np.full((B, T), tokenizer.bos_id), np.full((B, T), -1)  # padding: <|bos|>, no target
        for b in range(B):
            n = 0
            while True:
                while len(self.pieces) < self.buffer_size:
                    self._pull()
                fits = [p for p in self.pieces if len(p[1]) <= T + 1 - n]
                if not fits:
                    break
                best = max(fits, key=lambda p: len(p[1]))
                self.pieces.remove(best)
                ids, tgt = best[1][:T - n], best[2][:T - n]  # the last token of a full row is only a target
                x[b, n:n + len(ids)], y[b, n:n + len(tgt)] = ids, tgt  # y[b, n - 1] (-1): the next <|bos|>, untrained
                n += len(best[1])
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def state(self):
        return {"pos": self.pos, "pieces": [p[0] for p in self.pieces], "skipped": self.skipped}

lanes = make_lanes(lambda lane, n, state: Lane(train_rows, lane, n, state), rank, world, grad_accum,
                   src_meta["lanes"] if args.resume else None)
num_steps = args.num_steps
if num_steps == -1:  # one pass: the mixture's tokens over the tokens per step
    num_steps = max(1, math.ceil(sum(len(ids) for ids, _ in train_rows) / args.total_batch_size))
print0(f"{len(train_convs):,} training rows, {n_bad} bad lines skipped; {num_steps} steps of "
       f"{args.total_batch_size:,} tokens ({B} x {T} x {world} processes x {grad_accum} accumulation)")

def val_batches():  # the same val rows every time
    lane = Lane(val_rows, rank, world)
    return (lane.batch() for _ in range(max(1, args.eval_rows // (B * world))))

# -----------------------------------------------------------------------------
# Training loop (model.finetune_loop): flat learning rate, then a linear decay to 0 over the last steps
warmdown = max(1, round(args.warmdown_ratio * num_steps))
finetune_loop("midtrain", args, model, tokenizer, optimizer, src_meta, lanes, val_batches, num_steps,
              lr_multiplier=lambda step: min(1.0, (num_steps - step) / warmdown))
if rank == 0:  # a few answers from the final model, to see what it learned
    print_answers(model, tokenizer, ["What is 12 times 34?", "Who are you?", "How many 'r' are in 'strawberry'?"])
compute_cleanup()
