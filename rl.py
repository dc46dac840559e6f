"""
rl.py: reinforcement learning on GSM8K, nanochat's simplified GRPO. For each question the SFT model
samples a group of answers from one prefill (calculator on); an answer whose last number is right earns
reward 1, else 0; a sample's advantage is its reward minus its group's mean. The loss raises the
log-probability of the tokens the model sampled in proportion to their advantage: on-policy, no
reference model, no KL penalty, no ratio clipping. The prompt and the calculator's output are read, not
written, by the model, so they carry no loss.

    python rl.py                                              # from the latest sft checkpoint
    python rl.py --num-steps 20 --examples-per-step 4 --num-samples 4 --max-new-tokens 128 \\
        --eval-every 10 --eval-examples 20                    # a few minutes on a CPU
    torchrun --standalone --nproc_per_node=8 rl.py            # 8 GPUs, each samples its own questions
    python rl.py --resume                                     # continue the latest rl checkpoint

Reads checkpoints/sft (`python sft.py`), data/chat/gsm8k_train.jsonl and data/eval/gsm8k_test.jsonl
(`python data/chat_data.py --only gsm8k`); writes checkpoints/rl/step_N and logs/rl.jsonl.
The script runs under `if __name__ == "__main__"` so that tests can import the functions above it.
"""

import math
import time

import torch
import torch.distributed as dist

from model import (UserError, add_training_args, amp_ctx, catch_stop_signals, compute_cleanup, due, epoch_order, exit_stopped, generate_batch,
                   gsm8k_reward, JsonlLogger, print0, save_checkpoint, start_from_checkpoint, stop_requested)
from tokenizer import Parser, base_dir, ranged, read_conversations

# -----------------------------------------------------------------------------
# Reward: model.gsm8k_reward (the last number of the reply against the reference, as evaluate.py scores)

def reference(conv):
    """The number a GSM8K answer must end with: the eval file's "answer", else what follows '####' in the
    reference solution of a train conversation (None when there is no '####')."""
    if "answer" in conv:
        return str(conv["answer"]).replace(",", "").strip()
    content = conv["messages"][-1]["content"]
    text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    return text.split("####")[-1].strip().replace(",", "") if "####" in text else None

# -----------------------------------------------------------------------------
# Rollouts and the policy-gradient loss

def rollout(model, tokenizer, conv, num_samples, seed, max_tokens, temperature=1.0, top_k=None):
    """num_samples answers to the user question of conv from one prefill (KV cache shared, calculator on):
    (prompt ids, completions, masks (1 = sampled, 0 = forced by the tool), rewards, decoded replies)."""
    prompt = tokenizer.render_for_completion(conv)  # the reference solution, if any, is dropped
    max_tokens = min(max_tokens, model.cos.size(1) - len(prompt))  # not past the rotary table (10x the context)
    seqs, masks = generate_batch(model, prompt, num_samples=num_samples, max_tokens=max_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed, tokenizer=tokenizer)
    replies = [tokenizer.decode([t for t in s if tokenizer.token_bytes[t] > 0]) for s in seqs]  # no specials
    ref = reference(conv)
    return prompt, seqs, masks, [gsm8k_reward(r, ref) for r in replies], replies

def advantages(rewards, std_norm=False):
    """Reward minus the group mean (the baseline), optionally divided by the group's std."""
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = r - r.mean()
    return adv / (r.std(correction=0) + 1e-4) if std_norm else adv

def group_batch(prompt, seqs, masks, pad, device="cpu"):
    """Inputs and targets (n, L) of one group, a row per sample: prompt + completion, shifted by one.
    A target is -1 (no loss) unless the model sampled that token: the prompt, the tool's forced output
    and the padding carry no gradient."""
    rows = [prompt + s for s in seqs]
    L = max(map(len, rows)) - 1
    x = [r[:-1] + [pad] * (L + 1 - len(r)) for r in rows]
    y = [[-1] * (len(prompt) - 1) + [t if m else -1 for t, m in zip(s, ms)] + [-1] * (L + 1 - len(r))
         for s, ms, r in zip(seqs, masks, rows)]
    return torch.tensor(x, dtype=torch.long, device=device), torch.tensor(y, dtype=torch.long, device=device)

def pg_loss(model, x, y, adv):
    """-sum(advantage * log p(sampled token)) / number of sampled tokens (REINFORCE, per-token normalised)."""
    with amp_ctx(x.device):
        logp = -model(x, y, loss_reduction="none")  # (n, L), 0 where y == -1
    return -(adv.to(logp.device)[:, None] * logp).sum() / (y >= 0).sum().clamp(min=1)

def load_gsm8k(path):
    """The conversations of a GSM8K file, each with a reference number (one clear error otherwise)."""
    if not path.exists():
        raise UserError(f"no {path}: create it with `python data/chat_data.py --only gsm8k`")
    convs, _ = read_conversations(path)
    for n, conv in enumerate(convs, 1):
        if reference(conv) is None:
            raise UserError(f"{path}: conversation {n} has no reference answer ('#### N' in the assistant's "
                            "last text part, or an \"answer\" field): fix the line or rerun data/chat_data.py")
    return convs

if __name__ == "__main__":
    # -------------------------------------------------------------------------
    # Arguments
    parser = Parser(description="Reinforcement learning on GSM8K (group-baseline policy gradient).")
    parser.add_argument("--source-step", type=ranged(int, 0, sentinel=-1), default=-1, help="sft checkpoint step to start from (-1 = latest)")
    # rollouts
    parser.add_argument("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1, help="optimizer steps (-1 = one pass over GSM8K train)")
    parser.add_argument("--examples-per-step", type=ranged(int, 1), default=16, help="questions per step (all processes together)")
    parser.add_argument("--num-samples", type=ranged(int, 2), default=16, help="answers sampled per question (the group)")
    parser.add_argument("--max-new-tokens", type=ranged(int, 1), default=256, help="longest answer in tokens")
    parser.add_argument("--temperature", type=ranged(float, 0), default=1.0, help="sampling temperature (training and eval)")
    parser.add_argument("--top-k", type=ranged(int, 0), default=50, help="sample among the k likeliest tokens (0 = off)")
    parser.add_argument("--std-norm", action="store_true", help="also divide advantages by the group's std")
    parser.add_argument("--eval-examples", type=ranged(int, 0), default=400, help="first N questions of gsm8k_test evaluated (0 = no eval)")
    parser.add_argument("--eval-samples", type=ranged(int, 1), default=4, help="k answers per eval question: pass@1 and pass@k")
    add_training_args(parser, init_lr_frac=0.05, eval_every=60, save_every=60)  # the lrs decay linearly to 0
    args = parser.parse_args()

    # -------------------------------------------------------------------------
    # Init, and the model: the sft checkpoint (or our own latest one with --resume)
    rank, world, device, model, tokenizer, src_meta, optimizer = start_from_checkpoint(args, "rl", "sft", args.source_step)
    ddp, master = world > 1, rank == 0
    if args.examples_per_step <= 0 or args.examples_per_step % world:
        raise UserError(f"--examples-per-step {args.examples_per_step} must be a positive multiple of the {world} "
                        "processes: change one of them")
    Q = args.examples_per_step // world  # questions per process per step
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)

    # -------------------------------------------------------------------------
    # Data: the train questions as one stream in a seeded order (reshuffled each epoch); at each step the
    # processes take the next examples_per_step of it, each its own slice. The eval slice is fixed.
    train = load_gsm8k(base_dir() / "data" / "chat" / "gsm8k_train.jsonl")
    evals = load_gsm8k(base_dir() / "data" / "eval" / "gsm8k_test.jsonl")[:args.eval_examples] if args.eval_examples > 0 else []
    num_steps = args.num_steps if args.num_steps > 0 else max(1, len(train) // args.examples_per_step)
    print0(f"{len(train):,} train questions, {len(evals)} eval questions; {num_steps} steps of {args.examples_per_step} "
           f"questions x {args.num_samples} samples ({Q} per process x {world})")

    def question(pos):
        """The pos-th question of the stream; its samples are seeded by pos alone, so a resumed run (or
        another number of processes) draws exactly the same answers."""
        epoch, i = divmod(pos, len(train))
        return train[epoch_order(len(train), args.seed, epoch)[i]], args.seed + pos

    def evaluate_gsm8k():
        """pass@1 (mean correctness of the k samples) and pass@k (any of the k right) over the eval slice,
        split over the processes; each question has a fixed seed, so evals differ only by the model."""
        sums, first = torch.zeros(3, dtype=torch.float64, device=device), None  # pass@1, pass@k, questions
        for i in range(rank, len(evals), world):
            _, _, _, rewards, replies = rollout(model, tokenizer, evals[i], args.eval_samples, args.seed + 10**9 + i, **sampling)
            sums += torch.tensor([sum(rewards) / len(rewards), max(rewards), 1.0], device=device)
            first = first or (evals[i], replies[0], rewards[0])
        if ddp:
            dist.all_reduce(sums)
        return (sums[0] / sums[2].clamp(min=1)).item(), (sums[1] / sums[2].clamp(min=1)).item(), first

    # -------------------------------------------------------------------------
    # Training loop: eval and save at the top of a step; the last iteration only does those
    start_step = src_meta["step"] if args.resume else 0
    pos = src_meta["pos"] if args.resume else 0  # questions taken so far by all processes together
    logger = JsonlLogger("rl", resume_step=start_step if args.resume else None, enabled=master, world=world)
    flops_per_token = model.estimate_flops()
    metrics, t_start = src_meta.get("metrics", {}) if args.resume else {}, time.time()
    catch_stop_signals()  # SIGTERM / Ctrl-C: finish the step, save, stop
    for step in range(start_step, num_steps + 1):
        last, stop = step == num_steps, stop_requested(device)  # stop: SIGTERM or Ctrl-C on some rank
        if evals and due(step, args.eval_every, last) and not stop and (step > start_step or not args.resume):
            pass1, passk, first = evaluate_gsm8k()
            metrics = dict(gsm8k_pass1=pass1, gsm8k_passk=passk)
            print0(f"step {step}/{num_steps} | gsm8k pass@1 {pass1:.4f} | pass@{args.eval_samples} {passk:.4f}")
            if first:
                print0(f"  sample: {first[0]['messages'][0]['content'][:80]!r} -> {first[1][:200]!r} (reward {first[2]:.0f})")
            logger.log(step=step, **metrics)
        if (due(step, args.save_every, last) or stop) and step > start_step:
            source = src_meta["source"] if args.resume else dict(stage="sft", step=src_meta["step"])
            meta = dict(model_config=vars(model.config), tokenizer_hash=tokenizer.hash, args=vars(args), pos=pos,
                        num_steps=num_steps, source=source, metrics=metrics, train_time=time.time() - t_start)
            save_checkpoint("rl", step, model, optimizer, meta, keep=args.keep)
        if stop:
            exit_stopped(step, step > start_step)
        if last:
            break

        # rollouts, then one backward per question whose group has a signal
        t0 = time.time()
        stats = torch.zeros(6, dtype=torch.float64, device=device)  # loss, reward sum, completion tokens, samples, zero-adv groups, tokens
        for i in range(Q):
            conv, seed = question(pos + rank * Q + i)
            prompt, seqs, masks, rewards, replies = rollout(model, tokenizer, conv, args.num_samples, seed, **sampling)
            n_tok = sum(map(len, seqs))
            stats += torch.tensor([0, sum(rewards), n_tok, len(seqs), 0, len(prompt) * len(seqs) + n_tok], device=device)
            if len(set(rewards)) == 1:  # all right or all wrong: zero advantage, nothing to learn
                stats[4] += 1
                continue
            x, y = group_batch(prompt, seqs, masks, tokenizer.bos_id, device)
            loss = pg_loss(model, x, y, advantages(rewards, args.std_norm)) / Q  # mean over this process's questions
            loss.backward()
            stats[0] += loss.detach()
        pos += args.examples_per_step
        if ddp:
            dist.all_reduce(stats)
        loss, reward_sum, n_tok, n_samples, zero_adv, tokens = stats.tolist()
        lrm = 1.0 - step / num_steps  # linear decay to 0
        if zero_adv < args.examples_per_step:  # some process has a gradient (the others join with zeros)
            optimizer.set_lr(lrm)
            optimizer.step()
        model.zero_grad(set_to_none=True)
        loss /= world
        if not math.isfinite(loss):
            raise SystemExit(f"error: loss is {loss} at step {step}: stopped; the last good checkpoint is intact. "
                             "Lower --init-lr-frac and rerun")
        logger.train_step(step + 1, num_steps, loss, lrm * args.matrix_lr * args.init_lr_frac, time.time() - t0, int(tokens),
                          flops_per_token, reward=reward_sum / n_samples, seq_len=n_tok / n_samples, zero_adv=int(zero_adv))

    print0(f"done: {num_steps} steps in {(time.time() - t_start) / 60:.1f} min, {metrics}")
    compute_cleanup()
