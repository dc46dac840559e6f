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

from model import (ConversationLane, add_training_args, compute_cleanup, finetune_loop, grad_accum_steps, print0,
                   print_answers, start_from_checkpoint)
from tokenizer import Parser, ranged, read_mixture

# -----------------------------------------------------------------------------
# Arguments (the shape flags inherit from the base checkpoint)
parser = Parser(description="Midtrain the base model on a conversation mixture.")
add = parser.add_argument
add("--source-step", type=ranged(int, 0, sentinel=-1), default=-1, help="pretrain checkpoint step (-1 = latest)")
add("--max-seq-len", type=ranged(int, 2, sentinel=-1), default=-1, help="context length in tokens (-1 = inherit)")
add("--device-batch-size", type=ranged(int, 1, sentinel=-1), default=-1,
    help="rows per forward pass per process (-1 = inherit)")
add("--total-batch-size", type=ranged(int, 1, sentinel=-1), default=-1, help="tokens per optimizer step (-1 = inherit)")
add("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1, help="optimizer steps (-1 = one pass)")
add("--warmdown-ratio", type=ranged(float, 0, 1), default=0.2, help="fraction of steps of linear lr decay to 0")
add("--eval-rows", type=ranged(int, 1), default=256, help="val rows per evaluation (all processes together)")
add_training_args(parser, init_lr_frac=1.0, chat=True)  # the base model's learning rates, x --init-lr-frac
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init, and the model: the base checkpoint (or our own latest one with --resume)
rank, world, device, model, tokenizer, src_meta, optimizer = start_from_checkpoint(
    args, "midtrain", "pretrain", inherit=("max_seq_len", "device_batch_size", "total_batch_size"))
B, T = args.device_batch_size, args.max_seq_len
grad_accum = grad_accum_steps(args.total_batch_size, B * T * world, "--total-batch-size")

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

class Lane(ConversationLane):
    """Conversations packed best-fit into rows of T+1 tokens without crossing rows (each row takes the
    longest buffered one that still fits); the rest of a row is padding with target -1."""

    def __init__(self, rows, lane, n_lanes, seed, state=None, buffer_size=16):
        super().__init__(rows, lane, n_lanes, seed, state)
        self.buffer_size = buffer_size
        self.pieces = [(p, *self.row(p)) for p in state["pieces"]] if state else []  # (position, ids, targets)

    def batch(self):
        x, y = np.full((B, T), tokenizer.bos_id), np.full((B, T), -1)  # padding: <|bos|>, no target
        for b in range(B):
            n = 0
            while True:
                while len(self.pieces) < self.buffer_size:
                    self.pieces.append(self.next_row())
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
        return {**super().state(), "pieces": [p[0] for p in self.pieces]}

num_steps = args.num_steps
if num_steps == -1:  # one pass: the mixture's tokens over the tokens per step
    num_steps = max(1, math.ceil(sum(len(ids) for ids, _ in train_rows) / args.total_batch_size))
print0(f"{len(train_convs):,} training rows, {n_bad} bad lines skipped; {num_steps} steps of "
       f"{args.total_batch_size:,} tokens ({B} x {T} x {world} processes x {grad_accum} accumulation)")

# -----------------------------------------------------------------------------
# Training loop (model.finetune_loop): flat learning rate, then a linear decay to 0 over the last steps
warmdown = max(1, round(args.warmdown_ratio * num_steps))
finetune_loop("midtrain", args, model, tokenizer, optimizer, src_meta, Lane, train_rows, val_rows, grad_accum,
              num_steps, lr_multiplier=lambda step: min(1.0, (num_steps - step) / warmdown))
print_answers(model, tokenizer, ["What is 12 times 34?", "Who are you?", "How many 'r' are in 'strawberry'?"])
compute_cleanup()
