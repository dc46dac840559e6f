"""
model.py: what every stage must agree on, in the order the data flows through it:

1. the transformer (GPT) and its loss; LoRA adapters
2. the optimizer: Muon for the block matrices, AdamW for the rest (one class, one state_dict)
3. the scores that stages and evaluate.py compute alike (loss / bits per byte, the GSM8K reward)
4. generation: KV cache, penalties, sampling, the calculator tool, generate()
5. the runtime: UserError, device and dtype, torchrun, print0, the JSONL logger, the step's error lines
6. checkpoints (save, load, latest, verify, the stage lock) and the stop signals (SIGTERM, Ctrl-C)
7. Speed: what a CPU step needs beyond torch.compile (thread fitting, the allocator switch, the fused loss)

Each stage writes its own training step and loop with these parts. Importing this file changes nothing in
the process; compute_init(), which every training stage and evaluate.py call first, does: a UserError
becomes one line and exit code 2 (tokenizer.exit_on_user_error), and on a CPU the allocator keeps freed
memory for the next step (keep_freed_memory, in Speed).

The model, one line per design choice (nanochat's):
- rotary position embeddings on q and k (the two halves of a head turn as pairs), then QK-norm;
- RMSNorm without learnable parameters, pre-norm, plus a norm after the token embedding;
- ReLU-squared MLP (4x wide); no biases; untied token embedding and output head;
- logits soft-capped with SOFTCAP * tanh(logits / SOFTCAP); grouped-query attention when n_kv_head < n_head;
- init: output projections zero (each block starts as the identity), a tiny head (std 1e-3).
"""

import contextlib
import ctypes
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from tokenizer import Tokenizer, UserError, base_dir, check_home, exit_on_user_error

# -----------------------------------------------------------------------------
# The transformer

SOFTCAP = 15  # logits are squashed into (-SOFTCAP, SOFTCAP): both loss paths (GPT.logits, Speed) read it
MOE_AUX = 0.01  # weight of a mixture of experts' load-balancing loss in the training loss (Switch: 0.01)

@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    num_experts: int = 1  # MLPs per block: 1 = dense, more = a mixture of experts (MoE)
    experts_per_token: int = 1  # how many of them each token goes through (MoE)

def norm(x):  # RMSNorm without a learnable scale, in x's dtype (CUDA autocast would return fp32)
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)

def rotary(x, cos, sin):  # x (B, T, H, D); cos, sin (1, T, 1, D/2): pairs (x1[i], x2[i]) turn by the angles
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

def rotary_tables(seq_len, head_dim, base=10000):
    """cos and sin of the angle of every position and pair: (1, T, 1, D/2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(rotary(q, cos, sin)), norm(rotary(k, cos, sin))  # rotary embeddings, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, Hkv, T_cached + T, D)
        Tq, Tk = q.size(2), k.size(2)  # Tq < Tk: new tokens after a cached prefix, which they all see
        mask = None
        if Tq != Tk:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())

class MoE(nn.Module):
    """A mixture of experts: num_experts MLPs (stacked weights) and a router that sends each token to the
    experts_per_token of them it scores highest; their outputs are mixed by those scores' softmax. Each
    forward pass keeps `aux`, Switch Transformer's load-balancing loss: num_experts x the sum over experts
    of (the share of routes to it) x (its mean router probability), 1 when the load is even. The experts
    see as many tokens as the routing sends them: shapes that change every step, so this runs eagerly."""

    def __init__(self, config):
        super().__init__()
        E, C, self.k = config.num_experts, config.n_embd, config.experts_per_token
        self.router = nn.Linear(C, E, bias=False)
        self.c_fc = nn.Parameter(torch.empty(E, 4 * C, C))  # expert e: c_fc[e] (4C, C), c_proj[e] (C, 4C)
        self.c_proj = nn.Parameter(torch.empty(E, C, 4 * C))
        self.aux = None

    def forward(self, x):  # x (B, T, C)
        flat = x.reshape(-1, x.size(-1))  # (N, C)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, experts = probs.topk(self.k, dim=-1)  # (N, K): the chosen experts, by score
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e in range(self.c_fc.size(0)):
            token, slot = (experts == e).nonzero(as_tuple=True)  # the tokens routed to expert e
            h = F.relu(flat[token] @ self.c_fc[e].t()).square() @ self.c_proj[e].t()
            out.index_add_(0, token, h * weights[token, slot, None])
        share = F.one_hot(experts, probs.size(-1)).float().mean(dim=(0, 1))  # of the routes, to each expert
        self.aux = probs.size(-1) * (share * probs.mean(dim=0)).sum()
        return out.view_as(x)

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config) if config.num_experts == 1 else MoE(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab = (config.vocab_size + 63) // 64 * 64
        self.wte = nn.Embedding(self.padded_vocab, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab, bias=False)
        # rotary tables for 10x the training context, so generation may run past it
        cos, sin = rotary_tables(config.sequence_len * 10, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)  # (1, T, 1, D/2)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform with std 1/sqrt(n_embd)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                lin.weight.uniform_(-s, s)
            block.attn.c_proj.weight.zero_()  # every block starts as the identity
            mlp = block.mlp
            if isinstance(mlp, MoE):
                mlp.router.weight.uniform_(-s, s)
                mlp.c_fc.uniform_(-s, s)
                mlp.c_proj.zero_()
            else:
                mlp.c_fc.weight.uniform_(-s, s)
                mlp.c_proj.weight.zero_()
        self.wte.weight.normal_(0.0, 1.0)
        self.lm_head.weight.normal_(0.0, 0.001)  # near-uniform first predictions
        cos, sin = rotary_tables(self.cos.size(1), 2 * self.cos.size(-1))  # (built on "meta": not there yet)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def active_params(self):  # what a token passes through: all but the experts it is not routed to (MoE)
        c = self.config
        return self.num_params() - (c.num_experts - c.experts_per_token) * 8 * c.n_embd**2 * c.n_layer

    def estimate_flops(self):  # per token, forward + backward: 6 per matmul weight, plus attention scores
        c = self.config
        matmuls = self.active_params() - self.wte.weight.numel()
        return 6 * matmuls + 12 * c.n_layer * c.n_embd * c.sequence_len

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """Logits (B, T, V) without targets; with them the loss: "mean" over the targets that are not -1,
        or "none": (B, T), 0 where the target is -1."""
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.pos
        assert t0 + T <= self.cos.size(1), f"sequence of {t0 + T} tokens is past the rotary table"
        cos, sin = self.cos.narrow(1, t0, T), self.sin.narrow(1, t0, T)
        x = norm(self.wte(idx))  # (B, T, C)
        if x.is_cuda and torch.is_autocast_enabled("cuda"):  # a GPU's residual stream in bf16, as its matmuls
            x = x.to(torch.get_autocast_dtype("cuda"))
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if targets is None:
            return self.logits(x)
        if x.is_cpu:  # the same numbers as the line below, faster and in less memory: see "Speed" at the end
            loss = softcap_cross_entropy(x.flatten(0, 1), self.lm_head.weight[:self.config.vocab_size],
                                         targets.flatten(), torch.is_grad_enabled())
        else:
            loss = F.cross_entropy(self.logits(x).flatten(0, 1), targets.flatten(), ignore_index=-1,
                                   reduction="none")
        loss = loss.view(B, T)
        if self.training and self.config.num_experts > 1:  # MoE: + the mean load-balancing loss, on every
            aux = sum(block.mlp.aux for block in self.blocks) / len(self.blocks)  # target token
            loss = loss + MOE_AUX * aux * (targets >= 0)
        if loss_reduction == "none":
            return loss
        return loss.sum() / (targets >= 0).sum().clamp(min=1)  # 0, not nan, when no token has a target

    def logits(self, x):  # (B, T, V) in fp32 for the softmax, soft-capped
        logits = self.lm_head(x).narrow(-1, 0, self.config.vocab_size).float()  # the padding columns cut
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def setup_optimizer(self, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0,
                        compile=False, lora_lr=1e-3):
        """Muon for the 2-D block matrices, AdamW for embedding and head; Adam lrs scale as 1/sqrt(width).
        With LoRA adapters (add_lora), AdamW for the adapters alone: everything else is frozen."""
        if adapters := [p for n, p in self.named_parameters() if ".lora_" in n]:
            return MuonAdamW([dict(kind="adamw", params=adapters, lr=lora_lr, initial_lr=lora_lr,
                                   weight_decay=weight_decay)])
        scale = (self.config.n_embd / 768) ** -0.5
        groups = [dict(kind="muon", params=list(self.blocks.parameters()), lr=matrix_lr, momentum=0.95),
                  dict(kind="adamw", params=[self.wte.weight], lr=embedding_lr * scale),
                  dict(kind="adamw", params=[self.lm_head.weight], lr=unembedding_lr * scale)]
        return MuonAdamW([dict(g, initial_lr=g["lr"], weight_decay=weight_decay) for g in groups], compile)

    def add_lora(self, rank, alpha, targets=("q", "k", "v", "o")):
        """Freeze every weight and give the chosen linear layers of every block a low-rank adapter (q, k, v,
        o: attention's projections; mlp: both MLP matrices). Returns (trainable, all) parameter counts."""
        names = {"q": ("attn", "c_q"), "k": ("attn", "c_k"), "v": ("attn", "c_v"), "o": ("attn", "c_proj")}
        if not set(targets) <= {*names, "mlp"}:
            raise UserError(f"--lora-targets {','.join(targets)}: a comma list of q, k, v, o and mlp")
        if "mlp" in targets and self.config.num_experts > 1:
            raise UserError("--lora-targets mlp: this model's MLPs are a mixture of experts: adapt q,k,v,o")
        pairs = [names[t] for t in targets if t != "mlp"]
        pairs += [("mlp", "c_fc"), ("mlp", "c_proj")] if "mlp" in targets else []
        self.requires_grad_(False)
        for block in self.blocks:
            for part, name in pairs:
                module = getattr(block, part)
                setattr(module, name, LoRA(getattr(module, name), rank, alpha))
        return sum(p.numel() for p in self.parameters() if p.requires_grad), self.num_params()

    def merged_state_dict(self):
        """The state dict of the plain model (what every other stage loads): LoRA layers merged."""
        merged = {f"{n}.weight": m.merged() for n, m in self.named_modules() if isinstance(m, LoRA)}
        plain = {k: v for k, v in self.state_dict().items() if ".lora_" not in k and ".base." not in k}
        return {**plain, **merged}

class LoRA(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: W x + (alpha / rank) B A x. B starts at zero,
    so training starts from the unchanged model; merged() is the single weight that computes the same."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, **kw) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self):
        return (self.base.weight + self.scale * self.lora_B @ self.lora_A).detach()

# -----------------------------------------------------------------------------
# The optimizer: Muon + AdamW in one class (one state_dict), gradients summed over ranks first

def newton_schulz(G, steps=5, dtype=torch.float32):
    """Approximately orthogonalise G (..., m, n) (the 'zeroth power' U V^T of its SVD), as in Muon; a
    stack of same-shape matrices goes through one batched matmul chain, in the dtype the run computes in."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if G.size(-2) > G.size(-1) else X).to(G.dtype)

def muon_update(params, grads, bufs, lr, momentum, steps, dtype):
    """Nesterov momentum on stacks of same-shape matrices (N, m, n), orthogonalised, then the step:
    tall matrices step sqrt(m / n) further, so every matrix moves its outputs by about the same."""
    bufs.lerp_(grads, 1 - momentum)
    update = newton_schulz(grads.lerp_(bufs, momentum), steps, dtype)
    params.sub_(update * lr * max(1, params.size(-2) / params.size(-1)) ** 0.5)

def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps):
    """AdamW for one tensor (decoupled weight decay is applied before, to every group)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    p.sub_(exp_avg / denom * (lr / (1 - beta1**step)))

class MuonAdamW(torch.optim.Optimizer):
    """compile=True runs both updates through torch.compile (one fused kernel chain per shape); the
    step and lr go in as 0-d tensors, so a new value never recompiles. Under torchrun the gradients it
    steps with are the sums over all ranks (distributed() below, or rl.py's sum_gradients)."""

    def __init__(self, param_groups, compile=False):
        defaults = dict(lr=0.0, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, momentum=0.95, ns_steps=5)
        super().__init__(param_groups, defaults)
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self.muon, self.adamw = wrap(muon_update), wrap(adamw_update)

    def set_lr(self, multiplier):
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr = torch.tensor(group["lr"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            if group["kind"] == "muon":
                by_shape = {}
                for p in params:
                    by_shape.setdefault(p.shape, []).append(p)
                for ps in by_shape.values():  # the momentum buffers stay per tensor: a plain state_dict
                    bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
                    stacks = [torch.stack(ts) for ts in (ps, [p.grad for p in ps], bufs)]
                    self.muon(*stacks, lr, torch.tensor(group["momentum"]), group["ns_steps"],
                              amp_dtype(ps[0].device))
                    torch._foreach_copy_(ps + bufs, [*stacks[0].unbind(), *stacks[2].unbind()])
                continue
            for p in params:
                s = self.state[p]
                if "step" not in s:
                    s["step"] = torch.zeros(())  # a 0-d CPU tensor, as torch.optim keeps it
                    s["exp_avg"], s["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                s["step"] += 1
                beta1, beta2 = group["betas"]
                self.adamw(p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"], lr, beta1, beta2,
                           group["eps"])

# -----------------------------------------------------------------------------
# Scores the training stages and evaluate.py compute alike

@torch.no_grad()
def evaluate_loss(model, batches, token_bytes=None):
    """Mean loss over the targets != -1 of (x, y) batches and, given each token's byte length, bits per
    byte: the summed loss (nats) of the targets over their bytes / ln 2 (vocab-size independent; special
    tokens have 0 bytes and count in neither sum). Summed over all ranks. model: also a wrapped one."""
    device = next(model.parameters()).device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # nats, targets, nats of byte tokens, bytes
    nbytes_of = torch.as_tensor(token_bytes, device=device) if token_bytes is not None else None
    for x, y in batches:
        with amp_ctx(device):
            loss = model(x, y, loss_reduction="none").double()  # (B, T)
        b = torch.where(y >= 0, nbytes_of[y.clamp(min=0)], 0) if nbytes_of is not None else (y >= 0).long()
        sums += torch.stack([loss.sum(), (y >= 0).sum(), (loss * (b > 0)).sum(), b.sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    nats, n, byte_nats, nbytes = sums.tolist()
    return dict(loss=nats / max(n, 1), bpb=byte_nats / max(nbytes, 1) / math.log(2))

def final_number_reward(reply, ref):
    """1.0 if the reply's last number equals ref as numbers ("1,234.0" == "1234"), else 0.0: tinychat's
    arithmetic score (evaluate.py) and rl.py's reward on --task arithmetic."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", reply)
    if not numbers:
        return 0.0
    try:
        return float(float(numbers[-1].replace(",", "")) == float(str(ref).replace(",", "")))
    except ValueError:
        return 0.0

def gsm8k_reward(reply, ref):
    """1.0 if the number after the reply's '#### ' marker (GSM8K solutions end with it) equals ref as numbers
    ("1,234.0" == "1234"), else 0.0, also without a marker. evaluate.py's GSM8K score and rl.py's reward."""
    m = re.search(r"####\s*(-?\d[\d,]*(?:\.\d+)?)", reply)
    try:
        return float(bool(m) and float(m[1].replace(",", "")) == float(str(ref).replace(",", "")))
    except ValueError:
        return 0.0

# -----------------------------------------------------------------------------
# Generation: KV cache, penalties, sampling, the calculator tool, generate()

class KVCache:
    """Keys and values of every layer, (L, B, H_kv, T_max, D), filled left to right."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len, self.pos = n_layer, max_len, 0
        self.k = self.v = None

    def insert(self, layer, k, v):  # k, v: (B, H_kv, T, D)
        if self.k is None:  # allocated lazily, in the dtype the model computes in
            B, H, _, D = k.shape
            self.k = torch.zeros(self.n_layer, B, H, self.max_len, D, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)
        t0, t1 = self.pos, self.pos + k.size(2)
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        if layer == self.n_layer - 1:
            self.pos = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def expand(self, n):  # a batch-1 cache (one prefill) copied into n rows, for n samples
        if self.k is not None:
            self.k = self.k.expand(-1, n, -1, -1, -1).clone()
            self.v = self.v.expand(-1, n, -1, -1, -1).clone()

def penalize(logits, counts, repetition=1.0, presence=0.0, frequency=0.0):
    """Logits (B, V) of tokens generated counts (B, V) times made less likely. repetition (CTRL's, 1 = off)
    divides a positive logit and multiplies a negative one; presence and frequency (OpenAI's, 0 = off)
    subtract once per token seen and once per time seen."""
    seen = counts > 0
    if repetition != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - presence * seen - frequency * counts

def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits (B, V): greedy at temperature 0, else top-k / top-p sampling with one
    uniform draw per row against the candidates' cumulative probabilities (torch.multinomial draws one per
    vocab entry: 0.4 ms a token on CPU)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, ids = logits.float() / temperature, None  # ids: the vocab ids of the candidate columns
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    elif top_p is not None and top_p < 1.0:
        logits, ids = logits.sort(dim=-1, descending=True)  # top-p needs them sorted
    p = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        p = p.masked_fill(p.cumsum(dim=-1) - p > top_p, 0.0)  # the smallest set with mass >= top_p
    cdf = p.cumsum(dim=-1)  # (B, K), not renormalised after top-p: the draw scales by the total
    u = torch.rand(cdf.size(0), 1, generator=rng, device=cdf.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)  # the first cdf > u: never p 0
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(-1)

def use_calculator(expr):
    """The calculator tool: arithmetic (+ - * / // % and parentheses, no powers: 2**10**9 would never end),
    'strawberry'.count('r'), and a quoted word of letters spelled backwards ('apple'[::-1]) or with dashes
    ('-'.join('apple')); the result as text, or None when the expression is not one of those."""
    expr = expr.replace(",", "").strip()
    if m := re.fullmatch(r"""(['"])(.{0,999}?)\1\.count\((['"])(.*?)\3\)""", expr):
        return str(m[2].count(m[4]))
    if m := re.fullmatch(r"""(['"]) ?([A-Za-z]{1,99})\1\[::-1\]""", expr):  # (a space before the word: ok)
        return m[2][::-1]
    if m := re.fullmatch(r"""(['"])-\1\.join\((['"]) ?([A-Za-z]{1,99})\2\)""", expr):
        return "-".join(m[3])
    if not re.fullmatch(r"[\d.+\-*/%() ]{1,200}", expr) or "**" in expr:
        return None
    try:  # only digits and operators: eval can reach nothing but arithmetic
        value = eval(expr, {"__builtins__": {}})
    except (SyntaxError, ArithmeticError, MemoryError, RecursionError, TypeError, ValueError):
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else round(value, 6)
    return str(value)

class _Row:
    """Per-sample state: tokens the tool forces next, the python expression being written, done."""

    def __init__(self):
        self.forced, self.expr, self.in_python, self.done = [], [], False, False

@torch.no_grad()
def generate(model, ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None,
             seed=42, tokenizer=None, penalties=None):
    """Prefill `ids` once, then yield (tokens, masks), one entry per sample, per step. With a tokenizer, a row
    stops after <|assistant_end|> or <|bos|> (yielded) and the calculator runs: after <|python_end|> the
    tool's <|output_start|>result<|output_end|> is forced (mask 0; sampled tokens: mask 1). Finished rows
    yield -1 until all are done. penalties: penalize()'s keywords, on the tokens this call generated."""
    device = model.get_device()
    rng = torch.Generator(device=device).manual_seed(seed)
    names = ("<|assistant_end|>", "<|bos|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
             "<|output_end|>")
    sp = {n: tokenizer.encode_special(n) for n in names} if tokenizer else {}
    stops = {sp.get("<|assistant_end|>"), sp.get("<|bos|>")} - {None}
    kv = KVCache(model.config.n_layer, len(ids) + max_tokens)
    with amp_ctx(device):
        logits = model(torch.tensor([ids], dtype=torch.long, device=device), kv_cache=kv)[:, -1]
    kv.expand(num_samples)
    logits = logits.expand(num_samples, -1)  # (B, V)
    rows = [_Row() for _ in range(num_samples)]
    counts = torch.zeros_like(logits) if penalties else None  # (B, V): how often each row generated a token
    for _ in range(max_tokens):
        if penalties:
            logits = penalize(logits.float(), counts, **penalties)
        sampled = sample_next(logits, rng, temperature, top_k, top_p).tolist()
        tokens, masks = [], []
        for row, tok in zip(rows, sampled):
            if row.done:
                tokens.append(-1)
                masks.append(0)
                continue
            forced = bool(row.forced)
            tok = row.forced.pop(0) if forced else tok
            tokens.append(tok)
            masks.append(0 if forced else 1)
            if tok in stops:
                row.done = True
            elif tok == sp.get("<|python_start|>"):
                row.in_python, row.expr = True, []
            elif tok == sp.get("<|python_end|>") and row.in_python:
                row.in_python = False
                result = use_calculator(tokenizer.decode(row.expr))
                if result is not None:
                    row.forced = [sp["<|output_start|>"], *tokenizer.encode(result), sp["<|output_end|>"]]
            elif row.in_python:
                row.expr.append(tok)
        yield tokens, masks
        if all(r.done for r in rows):
            return
        if penalties:
            counts[[i for i, t in enumerate(tokens) if t >= 0], [t for t in tokens if t >= 0]] += 1
        feed = torch.tensor([[t if t >= 0 else 0] for t in tokens], dtype=torch.long, device=device)
        with amp_ctx(device):
            logits = model(feed, kv_cache=kv)[:, -1]

def generate_batch(model, ids, num_samples=1, **kw):
    """Collect generate(): per sample its completion ids (stop token included) and their masks."""
    seqs, masks = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
    for tokens, ms in generate(model, ids, num_samples=num_samples, **kw):
        for i, (t, m) in enumerate(zip(tokens, ms)):
            if t >= 0:
                seqs[i].append(t)
                masks[i].append(m)
    return seqs, masks

# -----------------------------------------------------------------------------
# Runtime: devices, torchrun, printing, logs, the lines a failed step ends with

def autodetect_device():  # FLATCHAT_DEVICE overrides; otherwise cuda, then mps, then cpu
    gpu = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return os.environ.get("FLATCHAT_DEVICE") or gpu

def amp_dtype(device):
    """bf16 on CUDA GPUs that support it (FLATCHAT_DTYPE=fp32|bf16 overrides), else fp32."""
    kind = torch.device(device).type
    gpu_bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    want = os.environ.get("FLATCHAT_DTYPE") or ("bf16" if gpu_bf16 else "fp32")
    return torch.bfloat16 if want == "bf16" else torch.float32

def amp_ctx(device):  # autocast to amp_dtype, or nothing for fp32
    if amp_dtype(device) == torch.bfloat16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

def sync(device):  # wait for the GPU's queued work, so that a timer measures it
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def compute_init(seed=42):
    """Set up one process: (ddp, rank, local_rank, world_size, device). Distributed only under torchrun.
    Call it before the first tensor: it turns a UserError into one line and exit 2, checks the base dir,
    and on a CPU switches the allocator (keep_freed_memory), which PyTorch reads at its first allocation."""
    exit_on_user_error()
    check_home()
    device_type = autodetect_device()
    if device_type == "cpu":
        keep_freed_memory()
    ddp = "RANK" in os.environ
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else device_type)
    if device_type == "cuda":  # a GPU's allocator grows its segments: less fragmentation, fewer OOMs
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return ddp, rank, local_rank, world, device

def distributed(model, device):
    """The model wrapped for torchrun: DistributedDataParallel sums the gradients of all ranks, bucket by
    bucket while the backward pass runs (summed, not averaged as by default: each rank's loss is already its
    share of the mean over the tokens of all ranks). Its require_backward_grad_sync skips the sum in the
    micro-batches before the last of a step."""
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids, broadcast_buffers=False,
                                              gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, _sum_bucket)
    return ddp

def _sum_bucket(state, bucket):
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()

def dist_rank():
    return int(os.environ.get("RANK", 0))

def print0(*args, **kw):
    if dist_rank() == 0:
        print(*args, **kw, flush=True)

def out_of_memory(B):
    """The UserError of a step that ran out of GPU memory with B rows per forward pass."""
    fit = max(d for d in range(1, B) if B % d == 0) if B > 1 else 0
    fix = f"--device-batch-size {fit} keeps the same total batch (more accumulation steps)" if fit else \
        "lower --max-seq-len"
    return UserError(f"out of GPU memory with --device-batch-size {B}: {fix}")

def not_finite(loss, step, flag="the learning rates"):
    """The UserError of a step whose loss is nan or inf: nothing is saved, the last checkpoint stays."""
    return UserError(f"loss is {loss} at step {step}: stopped without saving; the last good checkpoint in "
                     f"{base_dir() / 'checkpoints'} is intact. Lower {flag} and rerun (or --resume)")

class JsonlLogger:
    """One JSON object per line in logs/<stage>.jsonl (rank 0). A fresh run starts a new file, a resumed one
    drops the rows past its step; the file as it was goes to logs/previous/<stage>-<time>.jsonl first."""

    def __init__(self, stage, resume_step=None, enabled=True, world=1):
        self.path = base_dir() / "logs" / f"{stage}.jsonl"
        self.enabled, self.world, self.stepped = enabled, world, False
        if enabled:
            (old := self.path.parent / "previous").mkdir(parents=True, exist_ok=True)
        if not enabled or not self.path.exists():
            return
        shutil.copy2(self.path, old / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        lines = self.path.read_text(errors="replace").splitlines() if resume_step is not None else []
        rows = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line: a killed writer
                rows.append(json.loads(line))
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")

    def train_step(self, step, num_steps, loss, lr, dt, tokens, flops_per_token, wait=0.0, **extra):
        """The one line per step every stage prints (wait: seconds the step waited for its data), and the
        same numbers as a log row; on a GPU the row has the peak memory allocated and reserved (the caching
        allocator's: what running out depends on), printed after the first step."""
        tok_per_s = tokens / dt
        flops, peak = flops_per_token * tok_per_s, peak_flops() * self.world
        speed = f"mfu {100 * flops / peak:.1f}%" if peak else f"{flops / 1e9:,.1f} GFLOP/s"
        more = "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in extra.items())
        print0(f"step {step}/{num_steps} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:,.0f} ms | "
               f"wait {wait * 1000:,.0f} ms | {tok_per_s:,.0f} tok/s | {speed}{more}")
        if peak:
            extra["mfu"] = flops / peak
        if torch.cuda.is_available():
            extra["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            extra["gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if not self.stepped:
                print0(f"peak GPU memory after the first step: {extra['gpu_peak_gib']:.1f} GiB allocated, "
                       f"{extra['gpu_reserved_gib']:.1f} GiB reserved")
        self.stepped = True
        self.log(step=step, num_steps=num_steps, loss=loss, lr=lr, dt=dt, wait=wait, tok_per_s=tok_per_s,
                 gflops=flops / 1e9, **extra)

# dense bf16 tensor-core FLOP/s per GPU, for MFU (the first name contained in the device's name wins)
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12),
             ("3090", 71e12)]

def peak_flops():
    """This process's GPU's peak from PEAK_BF16, 0 on a CPU or an unknown GPU (they print GFLOP/s)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return next((f for key, f in PEAK_BF16 if key in name), 0.0)

# -----------------------------------------------------------------------------
# Checkpoints: checkpoints/<stage>/step_NNNNNN/{model.pt, optim.pt, rng.pt, meta.json}, written atomically,
# each tensor file's sha256 in meta.json; one live run per stage

STAGE_COMMANDS = {"pretrain": "python pretrain.py", "midtrain": "python midtrain.py",
                  "sft": "python sft.py", "rl": "python rl.py"}
MODEL_FORMAT = 3  # bumped when the same weights would compute something else (3: rotary on half-split heads)

def stage_dir(stage):
    return base_dir() / "checkpoints" / stage

def save_checkpoint(stage, step, model, optimizer, meta, keep=None, lanes=None):
    """Every rank calls this: the loader states `lanes` of all ranks go into meta["lanes"] in rank order,
    rank 0 writes the checkpoint, all wait for it."""
    ddp, path = dist.is_initialized(), None
    if lanes is not None and ddp:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, lanes)
        lanes = [s for rank_lanes in everyone for s in rank_lanes]
    if not ddp or dist.get_rank() == 0:
        path = _write_checkpoint(stage, step, model, optimizer, {**meta, "lanes": lanes}, keep)
        print0(f"saved {path}")
    if ddp:
        dist.barrier()
    return path

def _write_checkpoint(stage, step, model, optimizer, meta, keep):
    """Every file into a temp dir (fsynced, meta.json last), renamed into place: a crash leaves the old set of
    checkpoints or the new one, never a torn one. A full disk stops the run in one line, no temp dir left."""
    root = stage_dir(stage)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}_{os.getpid()}"
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    adapters = {k: v for k, v in model.state_dict().items() if ".lora_" in k}  # LoRA: the merged weights too
    if adapters:
        state = model.merged_state_dict()
    else:
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    files = {"model.pt": state, "rng.pt": rng}
    if adapters:
        files["adapters.pt"] = adapters
    if optimizer is not None:
        files["optim.pt"] = optimizer.state_dict()
    name, sink = "-", _Sink()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, state in files.items():
            with open(tmp / name, "wb") as sink.f:
                torch.save(state, sink)
                sink.f.flush()
                os.fsync(sink.f.fileno())
        sums = {n: hashlib.file_digest(open(tmp / n, "rb"), "sha256").hexdigest() for n in files}
        meta = {**meta, "stage": stage, "step": step, "model_format": MODEL_FORMAT, "saved_at": time.time(),
                "sha256": sums}
        name = "meta.json"
        (tmp / name).write_text(json.dumps(meta, indent=1))
        _fsync(tmp / name)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError; the sink: why
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in _tensors(files)) / 2**20
        why = getattr(sink.error or e, "strerror", None) or str(e).splitlines()[0]
        free = shutil.disk_usage(root).free / 2**20
        raise UserError(f"could not write {tmp / name}: {why} (a checkpoint needs ~{need:,.0f} MB, "
                        f"{free:,.0f} MB are free on {root}); the latest complete checkpoint is untouched: "
                        "free some space and rerun with --resume") from None
    if stage in _earlier:  # the first save of a fresh run: the earlier run's checkpoints move aside, whole
        aside = _earlier.pop(stage)
        aside = aside.with_name(f"{aside.name}-{os.getpid()}") if aside.exists() else aside
        aside.mkdir(parents=True)
        for d in root.glob("step_*"):
            os.rename(d, aside / d.name)
        print0(f"moved the earlier run's checkpoints to {aside}")
    old = root / f".old_step_{step:06d}_{os.getpid()}"
    if final.exists():  # re-saving the same step: move the old one aside first
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    for _, _, d in _complete(stage)[:-keep] if keep else []:
        shutil.rmtree(d, ignore_errors=True)
    return final

class _Sink:
    """The file torch.save writes to, keeping the OSError of a failed write (a full disk, a size limit)."""
    f = error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()

def _fsync(path):  # a file's data, or a directory's entries, to disk
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

def _tensors(x):  # every tensor in a nest of dicts and lists
    if torch.is_tensor(x):
        return [x]
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return [t for v in items for t in _tensors(v)]

def _complete(stage, warn=False):
    """Complete checkpoints (meta.json readable), oldest save first: [(saved_at, step, dir)]; warn: say why a
    step_* dir does not count."""
    found = []
    for d in stage_dir(stage).glob("step_*"):
        try:
            found.append((json.loads((d / "meta.json").read_text())["saved_at"], int(d.name[5:]), d))
        except (OSError, ValueError, KeyError) as e:
            if warn:
                print0(f"warning: skipping {d}: its meta.json is unreadable or not JSON ({type(e).__name__})",
                       file=sys.stderr)
    return sorted(found)

def latest_step(stage):  # of the most recently saved complete checkpoint (a fresh shorter run wins), or None
    found = _complete(stage)
    return found[-1][1] if found else None

def _check(d, meta, names):
    """Why the files `names` of checkpoint dir d do not match the sha256 sums in its meta.json, or None."""
    for name in names:
        if not (d / name).exists():
            return f"{d / name} is missing"
        want = meta.get("sha256", {}).get(name)
        if want and hashlib.file_digest(open(d / name, "rb"), "sha256").hexdigest() != want:
            return f"{d / name} is damaged (truncated or changed: its sha256 does not match meta.json)"
    return None

def load_checkpoint(stage, step=None, device="cpu", load_optim=False):
    """(model_state, optim_state or None, meta, rng) of checkpoint `step`, or of the newest that verifies
    (a damaged one is passed over with a warning)."""
    every = _complete(stage, warn=True)
    found = [c for c in every if step is None or c[1] == step]
    if not found and every:
        raise UserError(f"no checkpoint at step {step} in {stage_dir(stage)}: its steps are "
                        f"{', '.join(str(c[1]) for c in sorted(every, key=lambda c: c[1]))}")
    if not found:
        raise UserError(f"no checkpoint in {stage_dir(stage)}: create it with `{STAGE_COMMANDS[stage]}`")
    names = ["model.pt", "rng.pt", "adapters.pt"] + (["optim.pt"] if load_optim else [])
    for _, _, d in reversed(found):
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("model_format", 1) != MODEL_FORMAT:
            raise UserError(f"{d} holds a model of format {meta.get('model_format', 1)}, this model.py reads "
                            f"format {MODEL_FORMAT} (its rotary layout changed): retrain from "
                            "`python pretrain.py`")
        if not (problem := _check(d, meta, [n for n in names if n in meta.get("sha256", {"model.pt": 1})])):
            break
        if step is not None or d == found[0][2]:
            before = f"; the checkpoints before it are {[c[1] for c in found[:-1]]}" if len(found) > 1 else ""
            raise UserError(f"{problem}: delete {d} (or rerun the stage that wrote it){before}")
        print0(f"warning: {problem}: using the checkpoint before it", file=sys.stderr)

    def load(name, dev):
        return torch.load(d / name, map_location=dev, weights_only=True) if (d / name).exists() else None
    try:  # weights_only: tensors only, never code (a file of pickled code fails here and says so)
        optim = load("optim.pt", "cpu") if load_optim else None  # load_state_dict moves the moments to the
        # parameters' device and leaves AdamW's step counters on the CPU, where they were
        return load("model.pt", device), optim, meta, load("rng.pt", "cpu")
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise UserError(f"{d}: cannot load its tensors on {device} ({why})") from None

def load_adapters(stage, step, device):
    """The LoRA adapters a LoRA run saved beside its merged weights (checkpoint `step` of `stage`)."""
    path = stage_dir(stage) / f"step_{step:06d}" / "adapters.pt"
    return torch.load(path, map_location=device, weights_only=True)

def check_tokenizer(meta, tokenizer, where):
    """A checkpoint's model meets only the tokenizer it was trained with (its hash is in meta.json)."""
    theirs, vocab = str(meta.get("tokenizer_hash")), meta["model_config"]["vocab_size"]
    if theirs != tokenizer.hash or vocab != tokenizer.vocab_size:
        ours = f"hash {tokenizer.hash[:12]}, vocab {tokenizer.vocab_size}"
        raise UserError(f"{where} was trained with another tokenizer (hash {theirs[:12]}, vocab {vocab}) "
                        f"than {base_dir() / 'tokenizer'} ({ours}): retrain the stages from "
                        "`python pretrain.py` on, or restore the tokenizer it was trained with")

def load_model(stage, device, step=None, tokenizer=None, load_optim=False):
    """(model, tokenizer, meta, optimizer state or None) from a checkpoint, after checking it fits the
    tokenizer; the optimizer's state (for --resume) only with load_optim."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: PyTorch sees no CUDA GPU here (torch {torch.__version__}"
                        f"{', a CPU-only build' if torch.version.cuda is None else ''}): use --device cpu")
    tokenizer = tokenizer or Tokenizer.load(base_dir() / "tokenizer")
    model_state, optim_state, meta, _ = load_checkpoint(stage, step, device, load_optim)
    check_tokenizer(meta, tokenizer, stage_dir(stage) / f"step_{meta['step']:06d}")
    model = GPT(GPTConfig(**meta["model_config"])).to(device)
    model.load_state_dict(model_state)
    model.eval()
    return model, tokenizer, meta, optim_state

_held = []  # this process's stage locks, released by the kernel when it exits (a SIGKILL included)
_earlier = {}  # stage -> where its earlier run's checkpoints go at this (fresh) run's first save

def lock_stage(stage, resume=False):
    """Refuse to start while another live run writes checkpoints/<stage> (a killed run's lock is gone with
    it); clear what killed saves left (temp dirs). A fresh run (not --resume) over an earlier run's
    checkpoints says so: its first save moves them to checkpoints/previous/<stage>-<time>/ (nothing an
    earlier run made is deleted; --keep prunes only the checkpoints of the run it writes)."""
    if dist_rank() != 0:
        return
    root = stage_dir(stage)
    root.mkdir(parents=True, exist_ok=True)
    f = open(root.parent / f".{stage}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        raise UserError(f"another run (process {pid}) is writing {root}: wait for it, or stop it "
                        f"(kill {pid})") from None
    f.truncate(0)  # "a+": the pid is written at the (new) end
    f.write(str(os.getpid()))
    f.flush()
    _held.append(f)
    for d in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:
        shutil.rmtree(d, ignore_errors=True)
    found = _complete(stage)
    if found and not resume:
        meta = json.loads((found[-1][2] / "meta.json").read_text())
        c, when = meta["model_config"], time.strftime("%Y-%m-%d %H:%M", time.localtime(found[-1][0]))
        _earlier[stage] = root.parent / "previous" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        print0(f"note: {root} holds an earlier run (latest: step {meta['step']}, depth {c['n_layer']}, width "
               f"{c['n_embd']}, saved {when}); this fresh run moves it to {_earlier[stage]} at its first "
               "save (--resume continues it instead)", file=sys.stderr)

# -----------------------------------------------------------------------------
# Stop signals: SIGTERM (a preempted node) or Ctrl-C finish the step, save, and exit

_signal = []  # the stop signals received so far

def _on_signal(signum, frame):
    if signum == signal.SIGINT and signal.SIGINT in _signal:
        print("\nsecond Ctrl-C: exiting now (checkpoints are written atomically: none is torn)",
              file=sys.stderr)
        os._exit(130)
    _signal.append(signum)
    name = signal.Signals(signum).name
    print0(f"\n{name}: stopping after this step with a checkpoint (Ctrl-C again: at once)", file=sys.stderr)

def catch_stop_signals():
    """From here on, SIGTERM and Ctrl-C ask the training loop to stop (stop_requested)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)

def stop_requested(device):
    """Did any rank get SIGTERM or Ctrl-C? All ranks learn it at the same step (one tiny all_reduce)."""
    flag = torch.tensor([float(bool(_signal))], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

def exit_stopped(step, saved):
    """After the checkpoint of a stop: say how to go on, exit non-zero (128 + the signal, as a shell does)."""
    sig = (_signal or [signal.SIGTERM])[0]
    again = "python " + " ".join(sys.argv) + ("" if "--resume" in sys.argv else " --resume")
    if saved or "--resume" in sys.argv:
        how = f"continue with: {again} (under torchrun: the same command with --resume)"
    else:
        how = "nothing was saved yet: rerun the command"
    print0(f"stopped at step {step} by {signal.Signals(sig).name}; {how}", file=sys.stderr)
    compute_cleanup()
    sys.exit(128 + sig)

# -----------------------------------------------------------------------------
# Speed: what a CPU step needs beyond torch.compile. Each piece is measured in tests/bench_pretrain.py
# (it stays for >= 10% of a cpu-preset step, or for the memory it saves) and tested against the plain code.

_load = {}  # the last /proc reading, when the thread count first stopped fitting, the counts used so far

def free_cores():
    """How many of this process's cores no other process kept busy since the last call (None: no reading)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        mine = sum(int(t) for t in f.read().rsplit(")", 1)[1].split()[11:15])  # utime stime cutime cstime
    now, last = (sum(ticks) - ticks[3] - ticks[4], mine, sum(ticks)), _load.get("last")  # not idle, iowait
    _load["last"] = now
    if last is None or now[2] <= last[2]:
        return None
    busy, ours, total = (a - b for a, b in zip(now, last))
    cores = len(os.sched_getaffinity(0))
    others = max(0.0, busy - ours) / total * os.cpu_count()  # cores kept busy by other processes
    return max(1, min(cores, cores - round(others)))

def fit_threads(device, hold=0.0):
    """On a CPU, one thread per core that other processes leave free: a thread sharing its core with a busy
    process stalls every parallel region (steps 7-40x slower on 2 cores, not 2x). Under torch.compile a
    thread count is built into the kernels: a count not used before recompiles (30-40 s on the cpu preset),
    so it is taken only once the load has held for `hold` seconds (rent until renting cost what buying
    does); a count already compiled is taken at once. OMP_NUM_THREADS set by the user wins."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS") or not os.path.exists("/proc/stat"):
        return
    used = _load.setdefault("used", {torch.get_num_threads()})
    want, now = free_cores(), time.monotonic()
    if want is None or want == torch.get_num_threads():
        _load["since"] = None
        return
    _load["since"] = _load.get("since") or now
    if want in used or now - _load["since"] >= hold:
        if not _load.get("said"):  # said once, on stderr (never into a server's stdout)
            print0(f"threads: {torch.get_num_threads()} -> {want} (other processes keep cores busy; later "
                   "changes are not printed)", file=sys.stderr)
            _load["said"] = True
        torch.set_num_threads(want)
        used.add(want)
        _load["since"] = None

def keep_freed_memory():
    """Every step frees and re-allocates large tensors (activations, the loss's (N, V) logits). Here glibc
    keeps freed blocks for reuse (no mmap, no trim) and PyTorch puts large ones on transparent huge pages:
    later steps reuse pages that are already mapped instead of faulting fresh ones in (1.07-1.23x steps);
    the price is that a CPU run's memory stays at its peak (+15-19% RSS on the cpu preset). PyTorch reads
    THP_MEM_ALLOC_ENABLE at its first allocation: call this before any tensor exists."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None)
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no block gets its own mapping
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back

class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row F.cross_entropy(c tanh(h @ w.T / c), targets), c = SOFTCAP (0 where the target is -1), a few
    rows at a time in fp32 buffers that stay in cache. With z = h @ (w * 2/c).T and u = sigmoid(z), the
    soft-capped logits are s = 2c u - c: exp(2c u) needs no max pass (it stays below e^2c: fine in fp32 up
    to c ~ 35). Forward also writes d loss / d z / 2c = (softmax - onehot) u (1 - u) over the z it has used,
    so backward is two matmuls and no fp32 (N, V) tensor is ever made: cpu-preset steps 1.06-1.3x faster
    than with the compiled plain loss and a fifth less peak memory; at vocab 32768 (eager fp32) 1.8x faster
    in 3.1 GB instead of 8.3."""

    @staticmethod
    def forward(ctx, h, w, targets, backward, rows=32):  # h (N, C), w (V, C), targets (N,)
        c = SOFTCAP
        z = F.linear(h, w * (2 / c))  # (N, V), bf16 under autocast
        kw = dict(device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
        t, loss = targets.clamp(min=0)[:, None], torch.empty(len(z), **kw)
        u, e = torch.empty(2, min(rows, len(z)), z.size(1), **kw)
        for i in range(0, len(z), rows):
            zi, ui, ei, ti = z[i:i + rows], u[:len(z) - i], e[:len(z) - i], t[i:i + rows]
            ui.copy_(zi).sigmoid_()
            sums = torch.mul(ui, 2 * c, out=ei).exp_().sum(1, keepdim=True)
            loss[i:i + rows] = (sums.log() - 2 * c * ui.gather(1, ti)).squeeze(1)  # logsumexp(s) - s[target]
            if backward:
                ei.div_(sums).scatter_add_(1, ti, -torch.ones_like(sums))  # softmax - onehot
                torch.mul(ei, ui.addcmul_(ui, ui, value=-1), out=zi)
        ctx.save_for_backward(h, w, z, targets)
        return loss.masked_fill_(targets < 0, 0.0)

    @staticmethod
    def backward(ctx, g):  # d loss / d h = 4 g dz @ w, d loss / d w = 4 dz.T @ (g h)   (4 = 2c x 2/c)
        h, w, dz, targets = ctx.saved_tensors
        g = (4 * g * (targets >= 0))[:, None]
        dh = (dz @ w.to(dz.dtype)).to(h.dtype).mul_(g) if ctx.needs_input_grad[0] else None
        dw = (dz.t() @ (h * g).to(dz.dtype)).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None

# a graph break under torch.compile: the Function runs as written
softcap_cross_entropy = torch.compiler.disable(SoftcapCrossEntropy.apply)
