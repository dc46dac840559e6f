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


import numpy as np
import torch

from model import (UserError, add_training_args, compute_cleanup, epoch_order, finetune_loop, make_lanes, print0,
                   print_answers, start_from_checkpoint)
from tokenizer import Parser, ranged, read_mixture

# -----------------------------------------------------------------------------
# Arguments
parser = Parser(description="Supervised finetuning on conversations.")
parser.add_argument("--source", default="midtrain", choices=["midtrain", "pretrain"], help="checkpoint stage to start from")
parser.add_argument("--source-step", type=ranged(int, 0, sentinel=-1), default=-1, help="step of that checkpoint (-1 = latest)")
parser.add_argument("--max-seq-len", type=ranged(int, 2, sentinel=-1), default=-1, help="longest row in tokens; longer conversations are cut (-1 = inherit)")
parser.add_argument("--device-batch-size", type=ranged(int, 1, sentinel=-1), default=4, help="conversations per forward pass per process")
parser.add_argument("--examples-per-step", type=ranged(int, 1), default=32, help="conversations per optimizer step (all processes)")
parser.add_argument("--num-epochs", type=ranged(float, 0.01), default=1.0, help="passes over the mixture (sets the steps)")
parser.add_argument("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1, help="optimizer steps (-1 = from --num-epochs)")
parser.add_argument("--eval-rows", type=ranged(int, 1), default=128, help="val conversations per evaluation (all processes)")
parser.add_argument("--dump-batches", default="", help="append every micro-batch (x, y) as a JSON line to this file")
parser.add_argument("--skip-bad", action="store_true", help="skip malformed conversation lines (counted) instead of stopping")
add_training_args(parser, init_lr_frac=0.02, lora=True)  # finetuning is gentle: the base learning rates x 0.02
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init, and the model: the source checkpoint (or our own latest one with --resume)
rank, world, device, model, tokenizer, src_meta, optimizer = start_from_checkpoint(args, "sft", args.source, args.source_step)
if args.max_seq_len == -1:
    args.max_seq_len = src_meta["args"]["max_seq_len"]
    print0(f"inherited max_seq_len = {args.max_seq_len}")
B, T = args.device_batch_size, args.max_seq_len
if args.examples_per_step % (B * world):
    raise UserError(f"--examples-per-step {args.examples_per_step} is not a multiple of device batch x world "
                    f"= {B * world}: change one of them")
grad_accum = args.examples_per_step // (B * world)

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

lanes = make_lanes(lambda lane, n, state: Lane(train_rows, lane, n, state), rank, world, grad_accum,
                   src_meta["lanes"] if args.resume else None)
num_steps = args.num_steps if args.num_steps > 0 else max(1, int(args.num_epochs * len(train_convs)) // args.examples_per_step)
print0(f"{len(train_convs):,} conversations ({n_bad} bad lines skipped), {num_steps} steps of "
       f"{args.examples_per_step} ({B} x {world} processes x {grad_accum} accumulation)")

def val_batches():
    lane = Lane(val_rows, rank, world)
    return (lane.batch() for _ in range(max(1, args.eval_rows // (B * world))))

# -----------------------------------------------------------------------------
# Training loop (model.finetune_loop): the learning rate decays linearly to 0
finetune_loop("sft", args, model, tokenizer, optimizer, src_meta, lanes, val_batches, num_steps,
              lr_multiplier=lambda step: 1.0 - step / num_steps)
if rank == 0:  # a few answers from the final model, to see what it learned
    print_answers(model, tokenizer, ["What is 12 times 34?", "Who are you?", "Spell the word 'apple' letter by letter."])
compute_cleanup()
