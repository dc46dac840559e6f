"""
Benchmark: one pretraining step of the cpu-preset model (depth 4, width 256, context 256, vocab 8192,
32 rows = 8,192 tokens a step), model.py as it is now against model.py at a git revision, and against
variants that put back one speed trick at a time. Not collected by pytest; run it on an idle machine:

    python tests/bench_pretrain.py                          # now vs HEAD, bf16 (where native) + fp32, compiled
    python tests/bench_pretrain.py --rev 3cfac9b --compile 0 --dtypes fp32
    python tests/bench_pretrain.py --tricks                 # + one variant per trick (see TRICKS)

Every configuration lives in its own process (its own allocator settings, compile caches and peak
memory). After each has compiled and warmed up alone, they take turns one step at a time in a
rotating order, so that they all meet the same load. Each figure is the median over --steps steps of
forward + backward + optimizer step on random tokens; `fwd+bwd` leaves out the optimizer step;
`first s` is the first step (where torch.compile compiles); `peak MB` is the process's peak RSS.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T, L = 256, 4
V = int(os.environ.get("BENCH_VOCAB", 8192))
TRICKS = {  # name: what the variant changes in the current model.py (see patch())
    "- fused loss": "without the Speed section's loss Function: the plain compiled loss on the CPU too",
    "- bf16 Newton-Schulz": "Newton-Schulz in fp32 in a bf16 run (now: in the dtype the run computes in)",
    "- malloc/THP switch": "without the Speed section's allocator settings (glibc may mmap and trim again)",
    "+ hand-written backwards": "HEAD's RMSNorm, rotary + QK-norm and ReLU^2 autograd Functions",
    "- compiled optimizer": "the Muon/AdamW updates run eagerly",
}


def worker(cfg):
    """One configuration: build, warm up, then one timed step per 'step' line on stdin."""
    import importlib.util
    import torch
    tricks = cfg["trick"].split(",") if cfg["trick"] else []
    os.environ["FLATCHAT_DTYPE"] = cfg["dtype"]  # as run.sh sets it: model.py's optimizer follows it
    if "- malloc/THP switch" in tricks:  # a model.py that switches at import time finds no libc, no huge pages
        import ctypes
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
        ctypes.CDLL = lambda *a, **k: (_ for _ in ()).throw(OSError("no libc in this variant"))
    sys.path.insert(0, cfg["src"])  # its tokenizer.py too
    spec = importlib.util.spec_from_file_location("model", Path(cfg["src"]) / "model.py")
    M = sys.modules["model"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(M)
    if hasattr(M, "keep_freed_memory") and "- malloc/THP switch" not in tricks:
        M.keep_freed_memory()  # what compute_init does on a CPU, before the first tensor
    for trick in tricks:
        patch(M, trick)
    torch.manual_seed(0)
    H = 2
    model = M.GPT(M.GPTConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=64 * L))
    model.init_weights()
    compile_opt = cfg["compile"] and "- compiled optimizer" not in tricks
    try:
        opt = model.setup_optimizer(compile=compile_opt)
    except TypeError:  # a model.py from before the optimizer could compile
        opt = model.setup_optimizer()
    run = torch.compile(model, dynamic=False) if cfg["compile"] else model
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["dtype"] == "bf16" else torch.autocast("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (32, T), generator=g), torch.randint(0, V, (32, T), generator=g)

    def step():
        t0 = time.perf_counter()
        with amp:
            loss = run(x, y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t1 - t0

    first = step()[0]
    step()
    print(json.dumps(dict(first=first, flops=model.estimate_flops())), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(json.dumps(step()), flush=True)
    print(json.dumps(dict(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)), flush=True)


def patch(M, trick):
    """Take one speed trick out of the current model module M, or put one of HEAD's back in."""
    import torch
    import torch.nn.functional as F
    if trick == "- fused loss":
        cap = M.SOFTCAP
        M.softcap_cross_entropy = lambda h, w, t, grad: F.cross_entropy(cap * torch.tanh(F.linear(h, w).float() / cap),
                                                                        t, ignore_index=-1, reduction="none")
    elif trick == "- bf16 Newton-Schulz":
        ns = M.newton_schulz
        M.newton_schulz = lambda G, steps=5, dtype=None: ns(G, steps, torch.float32)
    elif trick == "+ hand-written backwards":
        old = load_rev_module(ARGS_REV, "model_head")
        M.norm = old.RMSNorm.apply
        M.MLP.forward = lambda self, x: self.c_proj(old.ReluSquared.apply(self.c_fc(x)))

        def attn_forward(self, x, cos, sin, kv_cache):  # HEAD's rotary + QK-norm in one Function
            B, T_, C = x.shape
            q = old.rotary_norm(self.c_q(x).view(B, T_, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
            k = old.rotary_norm(self.c_k(x).view(B, T_, self.n_kv_head, self.head_dim), cos, sin).transpose(1, 2)
            v = self.c_v(x).view(B, T_, self.n_kv_head, self.head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T_, C))
        M.Attention.forward = attn_forward


def load_rev_module(rev, name):
    """model.py at a git revision, imported as `name` (its tokenizer.py is the current one)."""
    import importlib.util
    d = Path(tempfile.mkdtemp(prefix="flatchat_bench_"))
    src = git_show(rev, "model.py").replace("ctypes.CDLL(None)", "ctypes.CDLL('no such library')")  # no malloc
    (d / "model.py").write_text(src.replace('os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")', ""))  # switch
    spec = importlib.util.spec_from_file_location(name, d / "model.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # torch.compile looks it up there
    spec.loader.exec_module(module)
    return module


def git_show(rev, path):
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def checkout(rev):
    """A temp dir holding model.py and tokenizer.py as they are at rev."""
    d = Path(tempfile.mkdtemp(prefix="flatchat_bench_"))
    for f in ("model.py", "tokenizer.py"):
        (d / f).write_text(git_show(rev, f))
    return str(d)


ARGS_REV = os.environ.get("BENCH_REV", "HEAD")

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description="Time a cpu-preset pretraining step: now vs a revision, and tricks.")
    parser.add_argument("--rev", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile the model (1/0), as the cpu preset does")
    parser.add_argument("--dtypes", default="", help="comma list of fp32,bf16 (default: both where the CPU has bf16 units)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocab size (the cpu preset's: 8192)")
    parser.add_argument("--tricks", action="store_true", help="add one variant of the current model per trick")
    parser.add_argument("--only-tricks", default="", help="';'-separated variants, each a comma list of TRICKS (implies --tricks)")
    args = parser.parse_args()
    import torch
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16", "fp32"] if native_bf16 else ["fp32"])
    tricks = args.only_tricks.split(";") if args.only_tricks else (list(TRICKS) if args.tricks else [])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")
    revs = {"now": str(ROOT), args.rev: checkout(args.rev)}
    os.environ["BENCH_REV"], os.environ["BENCH_VOCAB"] = args.rev, str(args.vocab)
    configs = [dict(name=name, src=src, dtype=d, compile=args.compile, trick="") for d in dtypes for name, src in revs.items()]
    configs += [dict(name=f"now {t}", src=str(ROOT), dtype=d, compile=args.compile, trick=t) for d in dtypes for t in tricks]
    procs, results = [], []
    for cfg in configs:  # start and warm up one at a time: compile times measured alone
        p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
        info = json.loads(p.stdout.readline())
        procs.append(p), results.append(dict(cfg, **info, times=[]))
    for i in range(args.steps):
        order = list(range(len(procs)))
        order = order[i % len(order):] + order[:i % len(order)]
        for k in (order[::-1] if (i // len(order)) % 2 else order):
            procs[k].stdin.write("step\n"), procs[k].stdin.flush()
            results[k]["times"].append(json.loads(procs[k].stdout.readline()))
    for p, r in zip(procs, results):
        p.stdin.write("exit\n"), p.stdin.flush()
        r.update(json.loads(p.stdout.readline()))
        p.wait()
    print(f"load average {os.getloadavg()[0]:.2f} at the end; {args.steps} steps each, medians")
    print(f"{'configuration':<32}{'dtype':<6}{'ms/step':>9}{'fwd+bwd':>9}{'tok/s':>9}{'GFLOP/s':>9}{'first s':>9}"
          f"{'peak MB':>9}{'vs now':>8}")
    base = {}
    for r in results:
        r["dt"] = statistics.median(t for t, _ in r["times"])
        r["fb"] = statistics.median(f for _, f in r["times"])
        base.setdefault(r["dtype"], r["dt"]) if r["name"] == "now" else None
    for r in results:
        tok_s = 32 * T / r["dt"]
        print(f"{r['name']:<32}{r['dtype']:<6}{r['dt'] * 1000:>9,.0f}{r['fb'] * 1000:>9,.0f}{tok_s:>9,.0f}"
              f"{r['flops'] * tok_s / 1e9:>9.1f}{r['first']:>9.1f}{r['peak_mb']:>9,.0f}"
              f"{base[r['dtype']] / r['dt']:>7.2f}x")
    print("vs now: the current model's step time / this configuration's (above 1 = faster than now)")
