"""The CUDA branches, run on the CPU before a GPU ever sees them: the depth dial at every depth, the GPU
forward + backward as one compiled graph with the plain loss, the dtypes under CUDA autocast (fake CUDA
tensors), compiled bf16 Newton-Schulz, the out-of-memory line, the peak-FLOPs table, the NCCL branch of
compute_init, the memory estimate behind the GPU's default batch, a resume that keeps AdamW's step
counters on the CPU, and the device check's --dry-run."""

import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

from conftest import ROOT, fresh_home

import model as M  # noqa: E402
import pretrain  # noqa: E402


def config_of(depth, seq=64, vocab=512):
    width, heads = pretrain.depth_dial(depth)
    return M.GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads,
                       n_embd=width)


def test_every_depth_from_1_to_40_builds_and_runs_on_heads_of_128():
    for depth in range(1, 41):
        width, heads = pretrain.depth_dial(depth)
        assert width >= 64 * depth and width % heads == 0 and (width // heads == 128 or heads == 1), depth
        with torch.device("meta"):
            model = M.GPT(config_of(depth, seq=16))
            logits = model(torch.zeros(1, 16, dtype=torch.long))
        assert logits.shape == (1, 16, 512), depth
    assert pretrain.depth_dial(5) == (384, 3) and pretrain.depth_dial(20) == (1280, 10)
    assert pretrain.depth_dial(1) == (64, 1) and pretrain.depth_dial(4) == (256, 2)  # the cpu preset's shape


def test_the_gpu_forward_and_backward_compile_to_one_graph_with_the_plain_loss():
    """Off the CPU (meta here, as on CUDA) the loss is F.cross_entropy of the soft-capped logits, inside the
    one graph torch.compile makes (fullgraph: no break), and the backward runs through it."""
    with torch.device("meta"):
        model = M.GPT(config_of(2))
        x, y = torch.zeros(2, 64, dtype=torch.long), torch.zeros(2, 64, dtype=torch.long)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    loss = torch.compile(model, backend=backend, fullgraph=True)(x, y, loss_reduction="none").sum()
    loss.backward()
    targets = [str(n.target) for n in graphs[0].graph.nodes]
    assert len(graphs) == 1 and any("tanh" in t for t in targets) and any("cross_entropy" in t for t in targets)
    assert model.lm_head.weight.grad.shape == model.lm_head.weight.shape
    torch._dynamo.reset()


DTYPES = r"""
import torch, torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
import model as M
cfg = M.GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
with torch.device("meta"):
    m = M.GPT(cfg)
seen = {}
def record(q, k, v, **kw):  # (B, H, T, D) in, as SDPA: its output laid out (B, T, H, D), as CUDA's kernels do
    seen.setdefault("sdpa", [str(t.dtype) for t in (q, k, v)])
    B, H, T, D = q.shape
    return torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
M.F.scaled_dot_product_attention = record
def note(name):  # a forward pre-hook that notes the dtype of the module's input (and changes nothing)
    return lambda mod, args: seen.setdefault(name, str(args[0].dtype)) and None
m.blocks[0].register_forward_pre_hook(note("stream"))
m.blocks[0].mlp.register_forward_pre_hook(note("mlp_in"))
with FakeTensorMode():  # CUDA tensors without a GPU: shapes, dtypes and CUDA's autocast policy, no data
    for mod in m.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(torch.empty(p.shape, device="cuda"), requires_grad=False)
        for name, b in list(mod._buffers.items()):
            mod._buffers[name] = torch.empty(b.shape, device="cuda")
    torch.set_autocast_enabled("cuda", True)  # what torch.autocast("cuda", bfloat16) sets, on a CPU build
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        seen["norm"] = str(M.norm(torch.empty(2, 8, 128, device="cuda", dtype=torch.bfloat16)).dtype)
        seen["logits"] = str(m(torch.zeros(2, 16, dtype=torch.long, device="cuda")).dtype)
    except RuntimeError as e:  # an op the CPU build cannot fake on "cuda": say how far it got
        seen["stopped"] = str(e)[:80]
    finally:
        torch.set_autocast_enabled("cuda", False)
print(seen)
"""


def test_dtypes_under_cuda_autocast_are_as_designed():
    """bf16 where the design wants it on a GPU: the residual stream (the embedding's output is cast), what
    RMSNorm returns (CUDA's autocast computes it in fp32), q, k and v reaching SDPA (so the KV cache, which
    takes k's and v's dtype, is bf16 too); the logits fp32 for the softmax."""
    out = subprocess.run([sys.executable, "-c", DTYPES], cwd=ROOT, capture_output=True, text=True, timeout=120)
    seen = eval(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-1500:]
    assert seen == {"norm": "torch.bfloat16", "stream": "torch.bfloat16", "sdpa": ["torch.bfloat16"] * 3,
                    "mlp_in": "torch.bfloat16", "logits": "torch.float32"}, seen
    cache = M.KVCache(2, 8)
    k = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    cache.insert(0, k, k)
    assert cache.k.dtype == torch.bfloat16


def test_compiled_bf16_newton_schulz_matches_eager():
    """The optimizer's Muon update as a bf16 run compiles it (on a GPU, and on the cpu preset's bf16 path)."""
    torch.manual_seed(0)
    G = torch.randn(3, 64, 32)
    eager = M.newton_schulz(G, 5, torch.bfloat16)
    compiled = torch.compile(M.newton_schulz, dynamic=False)(G, 5, torch.bfloat16)
    assert compiled.dtype == G.dtype and (compiled - eager).abs().max() < 0.05
    s = torch.linalg.svdvals(compiled.double())  # orthogonalised: singular values near 1
    assert s.min() > 0.5 and s.max() < 1.5


def test_out_of_memory_names_a_device_batch_that_keeps_the_total(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    code = ("import runpy, sys, torch, model\n"
            "def boom(*args, **kw): raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')\n"
            "model.GPT.forward = boom\n"
            "sys.argv = ['pretrain.py', '--depth', '2', '--max-seq-len', '64', '--device-batch-size', '4',\n"
            "            '--total-batch-size', '512', '--compile', '0', '--num-steps', '2', '--bench']\n"
            "runpy.run_path('pretrain.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLATCHAT_HOME": str(home)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: out of GPU memory with --device-batch-size 4: --device-batch-size 2 keeps the same total batch "
        "(more accumulation steps)")


def test_peak_flops_for_every_table_entry(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key, flops in M.PEAK_BF16:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=f"NVIDIA {key} 80GB": name)
        assert M.peak_flops() == flops, key  # "H100 PCIe" before "H100": the first contained name wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Unknown GPU")
    assert M.peak_flops() == 0.0


def test_compute_init_under_torchrun_on_gpus_takes_nccl_and_the_local_gpu(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # compute_init installs its own
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "FLATCHAT_DEVICE": "cuda"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("device", d))
    monkeypatch.setattr(M.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: calls.setdefault("matmul", p))
    ddp, rank, local_rank, world, device = M.compute_init(7)
    assert (ddp, rank, local_rank, world, str(device)) == (True, 3, 1, 4, "cuda:1")
    assert calls == {"device": device, "backend": "nccl", "matmul": "high"}
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_the_memory_estimate_is_what_autograd_keeps_and_the_gpu_preset_fits_80_gb(monkeypatch):
    """micro_batch_bytes' `kept` against the bytes autograd really saves for the backward pass (eager fp32,
    the GPU's plain loss), at several shapes; then the default batch at depths 20 and 26 with the gpu
    preset's 65,536-token vocabulary fits an 80 GB card by the estimate."""
    plain = lambda h, w, t, grad: F.cross_entropy(M.SOFTCAP * torch.tanh(F.linear(h, w).float() / M.SOFTCAP), t,
                                                  ignore_index=-1, reduction="none")
    monkeypatch.setattr(M, "softcap_cross_entropy", plain)
    for depth, seq, vocab, rows in ((1, 64, 512, 2), (2, 32, 4096, 3), (4, 64, 1024, 2)):
        config = config_of(depth, seq, vocab)
        model = M.GPT(config)
        seen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved = [0]

        def keep(t):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                saved[0] += t.untyped_storage().nbytes()
            return t
        x = torch.randint(0, vocab, (rows, seq))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(x, x)
        kept, peak = pretrain.micro_batch_bytes(config, rows, act_bytes=4)
        assert abs(kept - saved[0]) < 0.1 * saved[0] and peak > kept, (depth, kept, saved[0])
    for depth in (20, 26):
        config = config_of(depth, seq=2048, vocab=65536)
        with torch.device("meta"):
            num_params = M.GPT(config).num_params()
        rows = pretrain.fit_device_batch(config, num_params, free_bytes=79 * 2**30)
        need = 16 * num_params + pretrain.micro_batch_bytes(config, rows)[1]
        assert rows >= 1 and need < 0.9 * 79 * 2**30, (depth, rows, need / 2**30)


def test_a_resume_leaves_adamw_step_counters_on_the_cpu(tmp_path, monkeypatch):
    """torch.optim keeps AdamW's 0-d step tensors on the CPU; loading a checkpoint for another device (meta
    here, as a GPU) moves the moments there and leaves the counters where they were."""
    monkeypatch.setenv("FLATCHAT_HOME", str(tmp_path))
    model = M.GPT(config_of(1, seq=16, vocab=300))
    optimizer = model.setup_optimizer()
    model(torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)).backward()
    optimizer.step()
    M.save_checkpoint("pretrain", 1, model, optimizer, {"model_config": vars(model.config), "args": {}})
    _, optim_state, _, _ = M.load_checkpoint("pretrain", device="meta", load_optim=True)
    with torch.device("meta"):
        moved = M.GPT(model.config)
    fresh = moved.setup_optimizer()
    fresh.load_state_dict(optim_state)
    adam = fresh.state[moved.wte.weight]
    assert adam["step"].device.type == "cpu" and adam["step"].item() == 1 and adam["exp_avg"].is_meta


def test_the_device_check_dry_run_runs_every_step(tmp_path):
    """tests/gpu_check.py --dry-run: the GPU check's steps on this CPU at tiny sizes, so it cannot rot unseen
    (nanochat's steps run where its imports are installed, and are skipped, said, where not)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tests/gpu_check.py", "--dry-run", "--deadline", "170", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for step in ("probe", "flatchat_d12", "flatchat_d20", "smoke"):
        assert f"{step}: exit 0" in summary, summary
    assert "nanochat_d12: exit 0" in summary or "nanochat steps: skipped" in summary, summary
    rows = [line for line in summary.splitlines() if re.match(r"flatchat_d\d+ +\d+ ", line)]  # the table
    assert len(rows) == 2 and all(float(r.split()[4].replace(",", "")) > 0 for r in rows), summary
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
