"""
Benchmark: one pretraining step of the cpu-preset model (depth 4, width 256, context 256, vocab 8192)
against a plain nanoGPT-style model of the same size, fp32 and bf16, next to the machine's measured
fp32 matmul peak (measured before and after). Not collected by pytest; run it on a quiet machine:

    python tests/bench_pretrain.py [--steps 5] [--batch 32] [--compile 1]

Each figure is the median over --steps timed steps (after 2 warmup steps) of forward + backward +
optimizer step on random tokens; the configurations take turns step by step in a rotating order, so
that they meet the same load on a shared machine. With --compile 1 both models are also timed under
torch.compile (the compile time, in the warmup, is printed apart). FLOPs per token are counted the
same way for both models (6 x matmul weights + attention), so GFLOP/s compare like with like. The
fwd+bwd column leaves the optimizer step out: Muon's Newton-Schulz costs more than AdamW's update.
"""

import argparse
import itertools
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
parser.add_argument("--batch", type=int, default=32, help="rows per step")
parser.add_argument("--compile", type=int, default=1, help="also time torch.compile'd models (1/0)")
args = parser.parse_args()
V, T, L, C, H = 8192, 256, 4, 256, 2


class BaselineBlock(nn.Module):
    """nanoGPT: LayerNorm with bias, fused qkv, GELU MLP, learned positions, tied head."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T_, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T_, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T_, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Baseline(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList([BaselineBlock() for _ in range(L)])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in nanoGPT
        for name, p in self.named_parameters():  # nanoGPT's init: N(0, 0.02), residual projections scaled down
            if p.dim() == 2:  # (PyTorch's default N(0, 1) embedding makes softmax underflow to slow denormals)
                nn.init.normal_(p, std=0.02 / (2 * L) ** 0.5 if name.endswith(("proj.weight", "out.weight")) else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, V), targets.view(-1))


def flops_per_token(model):
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe")))
    if isinstance(model, Baseline):
        matmul += V * C  # its head is the tied embedding
    return 6 * matmul + 12 * L * C * T


def step(model, opt, dtype, x, y):
    """Seconds of one forward + backward + optimizer step, and of its forward + backward."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext():
        loss = model(x, y)
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, t1 - t0


def matmul_peak():
    """fp32 GFLOP/s of large square matmuls: what this machine's BLAS can do at best."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    return best


dtypes = ("fp32", "bf16") if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ("fp32",)
if len(dtypes) == 1:
    print(f"no bf16 rows: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, it would be emulated")
torch.manual_seed(0)
peak_before = matmul_peak()
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
configs, results, fwd_bwd = {}, {}, {}
x, y = torch.randint(0, V, (args.batch, T)), torch.randint(0, V, (args.batch, T))
for name, dtype, compiled in itertools.product(("flatchat (Muon+AdamW)", "nanoGPT baseline (AdamW)"), dtypes,
                                               (False, True) if args.compile else (False,)):
    torch.manual_seed(0)
    if name.startswith("flatchat"):
        model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=C))
        model.init_weights()
        opt = model.setup_optimizer()
    else:
        model = Baseline()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    torch._dynamo.reset()  # each compiled model starts from a clean compile cache
    run = (torch.compile(model, dynamic=False) if compiled else model, opt, dtype, x, y)
    warm = step(*run)[0] + step(*run)[0]  # 2 warmup steps: where torch.compile compiles
    configs[name, dtype, compiled] = run, flops_per_token(model), warm, []
order = list(configs.values())
for i in range(args.steps):  # the configurations take turns, so that they meet the same load on this shared machine,
    turn = order[i % len(order):] + order[:i % len(order)]  # in a rotating order, forwards then backwards: with a
    for run, _, _, times in turn[::-1] if (i // len(order)) % 2 else turn:  # fixed one, some places ran ~5% slower
        times.append(step(*run))
peak_after = matmul_peak()
peak = max(peak_before, peak_after)  # measured before and after the steps: one busy moment cannot lower it
print(f"fp32 matmul peak {peak:.1f} GFLOP/s (2048^3, best of 5 before the steps, {peak_before:.1f}, and 5 after, "
      f"{peak_after:.1f})")
print(f"{'model':<34}{'dtype':<7}{'compiled':<10}{'ms/step':>9}{'fwd+bwd':>9}{'tok/s':>9}{'GFLOP/s':>9}{'% peak':>8}"
      f"{'warmup s':>10}")
for (name, dtype, compiled), (_, flops, warm, times) in configs.items():
    dt = results[name, dtype, compiled] = statistics.median(t for t, _ in times)
    fb = fwd_bwd[name, dtype, compiled] = statistics.median(t for _, t in times)  # without the optimizer step
    tok_s = args.batch * T / dt
    gflops = flops * tok_s / 1e9
    print(f"{name:<34}{dtype:<7}{'yes' if compiled else 'no':<10}{dt * 1000:>9,.0f}{fb * 1000:>9,.0f}{tok_s:>9,.0f}"
          f"{gflops:>9.1f}{100 * gflops / peak:>7.0f}%{warm:>10.1f}", flush=True)
for dtype, compiled in itertools.product(dtypes, (False, True) if args.compile else (False,)):
    ratio = results["nanoGPT baseline (AdamW)", dtype, compiled] / results["flatchat (Muon+AdamW)", dtype, compiled]
    fb = fwd_bwd["nanoGPT baseline (AdamW)", dtype, compiled] / fwd_bwd["flatchat (Muon+AdamW)", dtype, compiled]
    print(f"flatchat step speed vs the baseline, {dtype}{' compiled' if compiled else ''}: {ratio:.2f}x "
          f"(above 1 = flatchat faster); forward + backward alone: {fb:.2f}x")
fastest = min(results, key=results.get)
ours = "flatchat (Muon+AdamW)"
print(f"fastest: {fastest[0]} {fastest[1]}{' compiled' if fastest[2] else ''}; flatchat eager fp32 -> {dtypes[-1]}"
      f"{' compiled' if args.compile else ''}: {results[ours, 'fp32', False] / results[ours, dtypes[-1], bool(args.compile)]:.2f}x")
