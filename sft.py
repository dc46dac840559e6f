"""
sft.py: supervised finetuning on conversations, one conversation per row, loss only on the tokens the
assistant writes (the render_conversation mask). Reads checkpoints/midtrain (`python midtrain.py`) and
data/chat/*.jsonl (`python data/chat_data.py`); writes checkpoints/sft/step_N and logs/sft.jsonl.

    python sft.py                                             # from the latest midtrain checkpoint
    python sft.py --source pretrain                           # straight from the base model
    torchrun --standalone --nproc_per_node=8 sft.py           # 8 GPUs
    python sft.py --resume                                    # continue the latest sft checkpoint
"""

import numpy as np
import torch

from model import (ConversationLane, add_training_args, compute_cleanup, finetune_loop, grad_accum_steps, print0,
                   print_answers, start_from_checkpoint)
from tokenizer import Parser, ranged, read_mixture

# -----------------------------------------------------------------------------
# Arguments
parser = Parser(description="Supervised finetuning on conversations.")
add = parser.add_argument
add("--source", default="midtrain", choices=["midtrain", "pretrain"], help="checkpoint stage to start from")
add("--source-step", type=ranged(int, 0, sentinel=-1), default=-1, help="step of that checkpoint (-1 = latest)")
add("--max-seq-len", type=ranged(int, 2, sentinel=-1), default=-1,
    help="longest row in tokens; longer conversations are cut (-1 = inherit)")
add("--device-batch-size", type=ranged(int, 1, sentinel=-1), default=4,
    help="conversations per forward pass per process")
add("--examples-per-step", type=ranged(int, 1), default=32, help="conversations per optimizer step (all processes)")
add("--num-epochs", type=ranged(float, 0.01), default=1.0, help="passes over the mixture (sets the steps)")
add("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1, help="optimizer steps (-1 = from --num-epochs)")
add("--eval-rows", type=ranged(int, 1), default=128, help="val conversations per evaluation (all processes)")
add_training_args(parser, init_lr_frac=0.02, chat=True)  # finetuning is gentle: the base learning rates x 0.02
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Init, and the model: the source checkpoint (or our own latest one with --resume)
rank, world, device, model, tokenizer, src_meta, optimizer = start_from_checkpoint(args, "sft", args.source,
                                                                                   inherit=("max_seq_len",))
B, T = args.device_batch_size, args.max_seq_len
grad_accum = grad_accum_steps(args.examples_per_step, B * world, "--examples-per-step")

# -----------------------------------------------------------------------------
# Data: the SFT mixture (a source's weight is how many times its rows appear per epoch), rendered once
MIXTURE = {"smoltalk": 1, "identity": 4, "arc_easy_train": 1, "arc_challenge_train": 1, "mmlu_dev": 1,
           "gsm8k_train": 1, "spelling": 1, "dolly": 1}
print0("mixture (sources not listed are absent: online-only, or not fetched yet):")
train_convs, n_bad = read_mixture(MIXTURE, "", args.skip_bad, print0)
val_convs, _ = read_mixture(MIXTURE, "val", args.skip_bad, lambda _: None)
train_rows, val_rows = tokenizer.render_all(train_convs, T + 1), tokenizer.render_all(val_convs, T + 1)

class Lane(ConversationLane):
    """One conversation per row, padded to the longest row of the batch (rounded up)."""

    def batch(self):
        rows = [self.next_row()[1:] for _ in range(B)]
        # a multiple of 32: few distinct shapes (oneDNN caches kernels per shape: the cpu preset's 2.4 GB -> 0.8)
        L = min(T, -(-max(len(ids) - 1 for ids, _ in rows) // 32) * 32)
        x, y = np.full((B, L), tokenizer.bos_id), np.full((B, L), -1)  # padding: <|bos|>, no target
        for b, (ids, targets) in enumerate(rows):
            x[b, :len(ids) - 1], y[b, :len(targets)] = ids[:-1], targets
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

num_steps = args.num_steps
if num_steps == -1:  # --num-epochs passes over the mixture
    num_steps = max(1, int(args.num_epochs * len(train_convs)) // args.examples_per_step)
print0(f"{len(train_convs):,} conversations ({n_bad} bad lines skipped), {num_steps} steps of "
       f"{args.examples_per_step} ({B} x {world} processes x {grad_accum} accumulation)")

# -----------------------------------------------------------------------------
# Training loop (model.finetune_loop): the learning rate decays linearly to 0
finetune_loop("sft", args, model, tokenizer, optimizer, src_meta, Lane, train_rows, val_rows, grad_accum, num_steps,
              lr_multiplier=lambda step: 1.0 - step / num_steps)
print_answers(model, tokenizer, ["What is 12 times 34?", "Who are you?", "Spell the word 'apple' letter by letter."])
compute_cleanup()
