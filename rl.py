"""
rl.py: reinforcement learning on GSM8K, nanochat's simplified GRPO. The SFT model samples a group of
answers to each question (calculator on); a right '#### N' earns reward 1, else 0, and the loss raises the
log-probability of each sampled token by its answer's reward minus the group's mean (on-policy, no KL, no
clipping; the prompt and the tool's output carry no loss). --task arithmetic: the one-step arithmetic of the
cpu preset's small model instead (the reply's last number must be the result), evaluated on tinychat's.
--method dpo: preference optimisation instead, the first right answer chosen and the first wrong one
rejected (or pairs from --pairs), against the frozen starting model.

    python rl.py                                              # from the latest sft checkpoint
    python rl.py --num-steps 20 --examples-per-step 4 --num-samples 4 --max-new-tokens 128 \\
        --eval-every 10 --eval-examples 20                    # a few minutes on a CPU
    python rl.py --task arithmetic --num-steps 20             # the cpu preset: one-step arithmetic
    python rl.py --method dpo --beta 0.1                      # DPO on pairs sampled from GSM8K
    python rl.py --method dpo --pairs prefs.jsonl             # DPO on your own preference pairs
    torchrun --standalone --nproc_per_node=8 rl.py            # 8 GPUs, each samples its own questions
    python rl.py --resume                                     # continue the latest rl checkpoint

Reads checkpoints/sft (`python sft.py`), data/chat/gsm8k_train.jsonl and data/eval/gsm8k_test.jsonl
(`python data/chat_data.py --only gsm8k`); writes checkpoints/rl/step_N and logs/rl.jsonl.
"""

import json
import math
import random
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import (JsonlLogger, UserError, amp_ctx, catch_stop_signals, compute_cleanup, compute_init,
                   exit_stopped, final_number_reward, fit_threads, generate_batch, gsm8k_reward, load_model,
                   lock_stage, not_finite, print0, save_checkpoint, stop_requested)
from tokenizer import Parser, base_dir, ranged, read_conversations

# -----------------------------------------------------------------------------
# Tasks and rewards (model.py's, as evaluate.py scores them): GSM8K's number after '####', or the last number
# of a one-step arithmetic reply (the cpu preset's). Train conversations from data/chat, eval rows data/eval.

TASKS = {"gsm8k": ("gsm8k_train.jsonl", "gsm8k_test.jsonl", gsm8k_reward),
         "arithmetic": ("arithmetic.jsonl", "tinychat.jsonl", final_number_reward)}

def reference(conv, task="gsm8k"):
    """The number an answer must end with: the eval file's "answer", else in the reference reply of a train
    conversation what follows '####' (GSM8K's solutions end with it) or the last number (arithmetic's
    result); None when there is none."""
    if "answer" in conv:
        return str(conv["answer"]).replace(",", "").strip()
    content = conv["messages"][-1]["content"]
    if not isinstance(content, str):  # the reply's parts but the tool call (its output counts)
        content = "".join(p["text"] for p in content if p["type"] != "python")
    if task == "gsm8k":
        return content.split("####")[-1].strip().replace(",", "") if "####" in content else None
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", content)
    return numbers[-1].replace(",", "") if numbers else None

def load_task(path, task):
    """The conversations of a task's file, each with a reference number (one clear error otherwise); the
    tinychat file's arithmetic rows only."""
    if not path.exists():
        step = path.stem.split("_")[0]
        raise UserError(f"no {path}: create it with `python data/chat_data.py --only {step}`")
    convs, _ = read_conversations(path)
    if path.name == "tinychat.jsonl":
        convs = [c for c in convs if c.get("category") == task]
    for n, conv in enumerate(convs, 1):
        if reference(conv, task) is None:
            raise UserError(f"{path}: conversation {n} has no reference answer ('#### N' or a number in the "
                            "assistant's last message, or an \"answer\" field): fix the line or rerun "
                            "data/chat_data.py")
    return convs

# -----------------------------------------------------------------------------
# Rollouts and the policy-gradient loss

def rollout(model, tokenizer, conv, num_samples, seed, max_tokens, temperature=1.0, top_k=None,
            task="gsm8k"):
    """num_samples answers to the user question of conv from one prefill (KV cache shared, calculator on):
    (prompt ids, completions, masks (1 = sampled, 0 = forced by the tool), rewards, decoded replies)."""
    prompt = tokenizer.render_for_completion(conv)  # the reference solution, if any, is dropped
    max_tokens = min(max_tokens, model.cos.size(1) - len(prompt))  # not past the rotary table (10x context)
    seqs, masks = generate_batch(model, prompt, num_samples=num_samples, max_tokens=max_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed, tokenizer=tokenizer)
    replies = [tokenizer.decode([t for t in s if tokenizer.token_bytes[t] > 0]) for s in seqs]  # no specials
    ref, reward = reference(conv, task), TASKS[task][2]
    return prompt, seqs, masks, [reward(r, ref) for r in replies], replies

def advantages(rewards, std_norm=False):
    """Reward minus the group mean (the baseline), optionally divided by the group's std."""
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = r - r.mean()
    return adv / (r.std(correction=0) + 1e-4) if std_norm else adv

def group_batch(prompt, seqs, masks, pad, device="cpu"):
    """Inputs and targets (n, L) of one group, a row per sample: prompt + completion, shifted by one.
    A target is -1 (no loss) unless the model sampled that token."""
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

def sum_gradients(model):
    """Sum every gradient over the processes in one flat buffer: a process may have had no backward pass
    (nothing to learn from its questions), where DistributedDataParallel would wait for it."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a rank with nothing to learn this step joins with zeros
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    sums = flat.split([p.numel() for p in params])
    torch._foreach_copy_([p.grad for p in params], [s.view_as(p) for s, p in zip(sums, params)])

# -----------------------------------------------------------------------------
# DPO: a chosen and a rejected answer to one prompt, against the frozen starting model

def sequence_logps(model, x, y):
    """Each row's summed log-probability of its target tokens (n,): what the model assigns an answer."""
    with amp_ctx(x.device):
        return -model(x, y, loss_reduction="none").sum(-1)

def dpo_loss(policy, reference, beta):
    """DPO (Rafailov et al. 2023) on summed log-probabilities (chosen, rejected) of the policy and of the
    frozen reference: -log sigmoid(margin), margin = beta x how much more the policy raised the chosen
    answer than the rejected one (the implicit reward margin). Returns (loss, margin)."""
    margin = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    return -F.logsigmoid(margin), margin.detach()

def read_pairs(path, tokenizer):
    """Preference pairs from a JSONL file, one {"prompt": str | "conversation": {"messages": [...]},
    "chosen": reply, "rejected": reply} per line (a reply: a string or assistant parts), each rendered by
    the chat format as (prompt ids, [chosen ids, rejected ids], [their masks])."""
    pairs = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "prompt" in row:
                row["conversation"] = {"messages": [{"role": "user", "content": row["prompt"]}]}
            messages = row["conversation"]["messages"]
            convs = [{"messages": [*messages, {"role": "assistant", "content": row[k]}]}
                     for k in ("chosen", "rejected")]
            rendered = [tokenizer.render_conversation(conv, max_tokens=10**9) for conv in convs]
            prompt = tokenizer.render_for_completion({"messages": messages})
        except (ValueError, KeyError, TypeError) as e:
            why = e if isinstance(e, ValueError) else f"missing or wrong field {e}"
            shape = '{"prompt" or "conversation", "chosen", "rejected"}'
            raise UserError(f"{path}:{n}: {why} (each line: {shape})") from None
        answers = [ids[len(prompt):] for ids, _ in rendered]
        pairs.append((prompt, answers, [mask[len(prompt):] for _, mask in rendered]))
    if not pairs:
        raise UserError(f"{path}: no preference pairs in it")
    return pairs

if __name__ == "__main__":  # tests import the functions above
    # -------------------------------------------------------------------------
    # Arguments
    parser = Parser(description="Reinforcement learning on GSM8K (group-baseline policy gradient).")
    add = parser.add_argument
    add("--source-step", type=ranged(int, 0, sentinel=-1), default=-1,
        help="sft checkpoint step (-1 = latest)")
    add("--method", default="grpo", choices=["grpo", "dpo"],
        help="group policy gradient, or DPO on preference pairs")
    add("--task", default="gsm8k", choices=list(TASKS),
        help="gsm8k (nanochat's), or arithmetic (one step: the cpu preset's small model)")
    # rollouts
    add("--num-steps", type=ranged(int, 1, sentinel=-1), default=-1, help="optimizer steps (-1 = one pass)")
    add("--examples-per-step", type=ranged(int, 1), default=16,
        help="questions per step (all processes together)")
    add("--num-samples", type=ranged(int, 2), default=16, help="answers sampled per question (the group)")
    add("--max-new-tokens", type=ranged(int, 1), default=256, help="longest answer in tokens")
    add("--temperature", type=ranged(float, 0), default=1.0, help="sampling temperature (training and eval)")
    add("--top-k", type=ranged(int, 0), default=50, help="sample among the k likeliest tokens (0 = off)")
    add("--std-norm", action="store_true", help="also divide advantages by the group's std")
    # DPO
    add("--beta", type=ranged(float, 0.0), default=0.1,
        help="DPO: strength of the pull towards the reference model")
    add("--pairs", default="",
        help="DPO: a JSONL file of preference pairs (default: pairs sampled from GSM8K)")
    # optimization: the base model's learning rates x --init-lr-frac, decaying linearly to 0
    add("--matrix-lr", type=ranged(float, 0), default=0.02, help="Muon learning rate of the block matrices")
    add("--embedding-lr", type=ranged(float, 0), default=0.2, help="AdamW lr of the embedding (at width 768)")
    add("--unembedding-lr", type=ranged(float, 0), default=0.004, help="AdamW lr of the head (at width 768)")
    add("--init-lr-frac", type=ranged(float, 0), default=0.05, help="all learning rates x this")
    add("--seed", type=ranged(int, 0), default=42, help="random seed: question order, samples")
    # evaluation, checkpoints
    add("--eval-every", type=ranged(int, 1, sentinel=-1), default=60,
        help="steps between evals (-1 = at the end)")
    add("--eval-examples", type=ranged(int, 0), default=400,
        help="first N gsm8k_test questions evaluated (0 = none)")
    add("--eval-samples", type=ranged(int, 1), default=4, help="k answers per eval question: pass@1, pass@k")
    add("--save-every", type=ranged(int, 1, sentinel=-1), default=60,
        help="steps between saves (-1 = at the end)")
    add("--keep", type=ranged(int, 0), default=2, help="checkpoints to keep (0 = all)")
    add("--resume", action="store_true", help="continue from this stage's latest complete checkpoint")
    args = parser.parse_args()

    # -------------------------------------------------------------------------
    # Init, and the model: the sft checkpoint (or our own latest one and its optimizer state with --resume)
    ddp, rank, local_rank, world, device = compute_init(args.seed)
    lock_stage("rl", args.resume)  # one live run per stage; an earlier run is kept
    from_stage, from_step = "sft", None if args.source_step == -1 else args.source_step
    if args.resume:  # our own latest checkpoint instead, with its optimizer state
        from_stage, from_step = "rl", None
    model, tokenizer, src_meta, optim_state = load_model(from_stage, device, from_step,
                                                         load_optim=args.resume)
    source = src_meta["source"] if args.resume else dict(stage="sft", step=src_meta["step"])
    print0(f"loaded {from_stage} step {src_meta['step']}")
    frac = args.init_lr_frac
    optimizer = model.setup_optimizer(args.matrix_lr * frac, args.embedding_lr * frac,
                                      args.unembedding_lr * frac)
    if args.resume:
        optimizer.load_state_dict(optim_state)
    model.train()
    if args.examples_per_step % world:
        raise UserError(f"--examples-per-step {args.examples_per_step} is not a multiple of the {world} "
                        "processes: change one of them")
    Q = args.examples_per_step // world  # questions per process per step
    train_file, eval_file, _ = TASKS[args.task]
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                    task=args.task)
    dpo = args.method == "dpo"
    if dpo:  # DPO's reference: the frozen model this run started from
        reference_model = load_model(source["stage"], device, source["step"], tokenizer)[0]
        reference_model.requires_grad_(False)

    # -------------------------------------------------------------------------
    # Data: the train questions as one stream in a seeded order (reshuffled each epoch); at each step the
    # processes take the next examples_per_step of it, each its own slice. The eval slice is fixed.
    test_file = base_dir() / "data" / "eval" / eval_file
    if args.pairs:  # DPO on the file's pairs; the task's eval set is evaluated if it is there
        train, test_file = read_pairs(args.pairs, tokenizer), test_file if test_file.exists() else None
    else:
        train = load_task(base_dir() / "data" / "chat" / train_file, args.task)
    evals = []
    if args.eval_examples > 0 and test_file:
        evals = load_task(test_file, args.task)[:args.eval_examples]
    num_steps = args.num_steps if args.num_steps > 0 else max(1, len(train) // args.examples_per_step)
    print0(f"{args.method}: {len(train):,} train {'pairs' if args.pairs else 'questions'}, {len(evals)} eval "
           f"questions; {num_steps} steps of {args.examples_per_step} ({Q} per process x {world})")

    order = {}  # epoch -> a permutation of the train items

    def question(pos):
        """The pos-th item of the stream, and its seed: by pos alone, so a resumed run (or another number
        of processes) draws exactly the same answers."""
        epoch, i = divmod(pos, len(train))
        if epoch not in order:
            order[epoch] = random.Random(args.seed + epoch).sample(range(len(train)), len(train))
        return train[order[epoch][i]], args.seed + pos

    def evaluate_task():
        """pass@1 (mean correctness of the k samples) and pass@k (any of the k right) over the eval slice,
        split over the processes; each question has a fixed seed, so evals differ only by the model."""
        sums, first = torch.zeros(3, dtype=torch.float64, device=device), None  # pass@1, pass@k, questions
        for i in range(rank, len(evals), world):
            seed = args.seed + 10**9 + i  # apart from the training questions' seeds
            _, _, _, rewards, replies = rollout(model, tokenizer, evals[i], args.eval_samples, seed,
                                                **sampling)
            sums += torch.tensor([sum(rewards) / len(rewards), max(rewards), 1.0], device=device)
            first = first or (evals[i], replies[0], rewards[0])
        if world > 1:
            dist.all_reduce(sums)
        return (sums[0] / sums[2].clamp(min=1)).item(), (sums[1] / sums[2].clamp(min=1)).item(), first

    def dpo_pair(item, seed):
        """DPO's (prompt, [chosen, rejected], masks): a pair from the file, or the first right and the first
        wrong of a group of sampled answers (None when they are all right or all wrong)."""
        if args.pairs:
            return item
        prompt, seqs, masks, rewards, _ = rollout(model, tokenizer, item, args.num_samples, seed, **sampling)
        if len(set(rewards)) == 1:
            return None
        pick = [rewards.index(1.0), rewards.index(0.0)]
        return prompt, [seqs[j] for j in pick], [masks[j] for j in pick]

    # -------------------------------------------------------------------------
    # Training loop: eval and save at the top of a step; the last iteration only does those
    start_step = src_meta["step"] if args.resume else 0
    pos = src_meta["pos"] if args.resume else 0  # questions taken so far by all processes together
    logger = JsonlLogger("rl", start_step if args.resume else None, enabled=rank == 0, world=world)
    flops_per_token = model.estimate_flops()
    metrics, t_start = src_meta.get("metrics", {}) if args.resume else {}, time.time()
    catch_stop_signals()  # SIGTERM / Ctrl-C: finish the step, save, stop
    for step in range(start_step, num_steps + 1):
        last = step == num_steps
        stop = stop_requested(device)  # SIGTERM or Ctrl-C on some rank
        evaluated = args.resume and step == start_step  # (the resumed checkpoint's step was evaluated before)
        due = last or args.eval_every > 0 and step % args.eval_every == 0
        if evals and due and not stop and not evaluated:
            pass1, passk, first = evaluate_task()
            metrics = {f"{args.task}_pass1": pass1, f"{args.task}_passk": passk}
            print0(f"step {step}/{num_steps} | {args.task} pass@1 {pass1:.4f} | pass@{args.eval_samples} "
                   f"{passk:.4f}")
            if first:
                conv, reply, reward = first
                question_text = conv["messages"][0]["content"][:80]
                print0(f"  sample: {question_text!r} -> {reply[:200]!r} (reward {reward:.0f})")
            logger.log(step=step, **metrics)
        if (last or stop or args.save_every > 0 and step % args.save_every == 0) and step > start_step:
            meta = dict(model_config=vars(model.config), tokenizer_hash=tokenizer.hash, args=vars(args),
                        pos=pos, num_steps=num_steps, source=source, metrics=metrics,
                        train_time=time.time() - t_start)
            save_checkpoint("rl", step, model, optimizer, meta, keep=args.keep)
        if stop:
            exit_stopped(step, step > start_step)
        if last:
            break

        # one optimizer step over the examples_per_step questions (or pairs) of all processes, Q on each;
        # each loss is divided by examples_per_step: the gradients of all processes are summed
        fit_threads(device)  # on a CPU: one thread per core that other processes leave free
        t0 = time.time()
        stats = torch.zeros(8 if dpo else 6, dtype=torch.float64, device=device)
        for i in range(Q):
            item, seed = question(pos + rank * Q + i)
            if dpo:  # [loss, margin, right (margin > 0), logp chosen, logp rejected, pairs, skipped, tokens]
                if (pair := dpo_pair(item, seed)) is None:
                    stats[6] += 1
                    continue
                x, y = group_batch(*pair, tokenizer.bos_id, device)  # row 0: chosen, row 1: rejected
                logps = sequence_logps(model, x, y)
                with torch.no_grad():
                    ref_logps = sequence_logps(reference_model, x, y)
                loss, margin = dpo_loss(logps, ref_logps, args.beta)
                (loss / args.examples_per_step).backward()
                row = [loss.item(), margin.item(), float(margin > 0), logps[0].item(), logps[1].item(), 1, 0,
                       x.numel()]
            else:  # [loss, reward sum, completion tokens, samples, zero-advantage groups, tokens]
                prompt, seqs, masks, rewards, _ = rollout(model, tokenizer, item, args.num_samples, seed,
                                                          **sampling)
                n_tok, loss, zero_adv = sum(map(len, seqs)), 0.0, len(set(rewards)) == 1
                if not zero_adv:  # all right or all wrong: no advantage, nothing to learn from this group
                    x, y = group_batch(prompt, seqs, masks, tokenizer.bos_id, device)
                    loss = pg_loss(model, x, y, advantages(rewards, args.std_norm)) / args.examples_per_step
                    loss.backward()
                    loss = loss.item()
                row = [loss, sum(rewards), n_tok, len(seqs), zero_adv, len(prompt) * len(seqs) + n_tok]
            stats += torch.tensor(row, dtype=torch.float64, device=device)
        pos += args.examples_per_step
        if world > 1:
            dist.all_reduce(stats)
        if dpo:
            loss, margin, right, chosen, rejected, n, skipped, tokens = stats.tolist()
            learned, n = n > 0, max(n, 1)
            loss, extra = loss / n, dict(margin=margin / n, accuracy=right / n, logp_chosen=chosen / n,
                                         logp_rejected=rejected / n, skipped=int(skipped))
        else:
            loss, reward_sum, n_tok, n_samples, zero_adv, tokens = stats.tolist()
            learned = zero_adv < args.examples_per_step  # some process has a gradient (the rest join with 0s)
            extra = dict(reward=reward_sum / n_samples, seq_len=n_tok / n_samples, zero_adv=int(zero_adv))
        if not math.isfinite(loss):
            raise not_finite(loss, step, "--init-lr-frac")
        lrm = 1.0 - step / num_steps  # linear decay to 0
        if learned:
            if world > 1:  # the gradients of all processes, summed (a process with nothing to learn: zeros)
                sum_gradients(model)
            optimizer.set_lr(lrm)
            optimizer.step()
        model.zero_grad(set_to_none=True)
        logger.train_step(step + 1, num_steps, loss, lrm * args.matrix_lr * args.init_lr_frac,
                          time.time() - t0, int(tokens), flops_per_token, **extra)

    print0(f"done: {num_steps} steps in {(time.time() - t_start) / 60:.1f} min, {metrics}")
    compute_cleanup()
