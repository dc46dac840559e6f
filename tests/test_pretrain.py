"""pretrain.py end to end on a tiny model: loss falls, exact resume after SIGKILL, torchrun == 1 process."""

import shutil

import torch

from conftest import fresh_home, read_log, run_killed, run_script

TINY = ["--depth", 2, "--max-seq-len", 64, "--device-batch-size", 4, "--total-batch-size", 512,
        "--eval-tokens", 2048, "--eval-every", 4, "--sample-every", -1]


def train_losses(home):
    return [r["loss"] for r in read_log(home, "pretrain") if "loss" in r]


def test_smoke_training_loss_falls_and_samples(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    out = run_script("pretrain.py", *TINY, "--num-steps", 30, "--matrix-lr", 0.05, "--embedding-lr", 0.3,
                     "--sample-every", 30, home=home).stdout
    losses = train_losses(home)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    bpbs = [r["val_bpb"] for r in read_log(home, "pretrain") if "val_bpb" in r]
    assert bpbs[-1] < bpbs[0]
    assert "sample: Once upon a time," in out and "| tok/s" not in out and " tok/s | " in out
    assert (home / "checkpoints/pretrain/step_000030/meta.json").exists()


def test_bf16_autocast_on_cpu_trains(tiny_home, tmp_path):
    """FLATCHAT_DTYPE=bf16, which run.sh's cpu preset sets where the CPU has bf16 units: the loss falls too."""
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 20, "--matrix-lr", 0.05, "--embedding-lr", 0.3, home=home,
               env={"FLATCHAT_DTYPE": "bf16"})
    losses = train_losses(home)
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_compile_without_a_cxx_compiler_falls_back_to_eager(tiny_home, tmp_path):
    """--compile 1 on a CPU whose C++ toolchain is missing (CXX points nowhere): inductor fails, the step
    runs eagerly and training goes on (a warning, not a crashed run)."""
    home = fresh_home(tiny_home, tmp_path / "home")
    proc = run_script("pretrain.py", *TINY, "--num-steps", 2, "--compile", 1, home=home,
                      env={"CXX": str(tmp_path / "no-such-g++")})
    assert len(train_losses(home)) == 2 and "InvalidCxxCompiler" in proc.stderr


def test_resume_after_sigkill_is_bitwise_identical(tiny_home, tmp_path):
    straight = fresh_home(tiny_home, tmp_path / "a")
    run_script("pretrain.py", *TINY, "--num-steps", 12, "--save-every", 6, home=straight)
    killed = fresh_home(tiny_home, tmp_path / "b")
    run_killed("pretrain.py", *TINY, "--num-steps", 12, "--save-every", 6, home=killed,
                      checkpoint=killed / "checkpoints/pretrain/step_000006")
    assert not (killed / "checkpoints/pretrain/step_000012").exists()
    run_script("pretrain.py", *TINY, "--num-steps", 12, "--save-every", 6, "--resume", home=killed)
    assert train_losses(killed) == train_losses(straight) and len(train_losses(straight)) == 12
    a = torch.load(straight / "checkpoints/pretrain/step_000012/model.pt", weights_only=True)
    b = torch.load(killed / "checkpoints/pretrain/step_000012/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_match_one_process(tiny_home, tmp_path):
    one = fresh_home(tiny_home, tmp_path / "one")
    two = fresh_home(tiny_home, tmp_path / "two")
    env = {"OMP_NUM_THREADS": "1"}
    run_script("pretrain.py", *TINY, "--num-steps", 5, home=one, env=env)  # 2 accumulation steps
    run_script("pretrain.py", *TINY, "--num-steps", 5, home=two, env=env, torchrun=2)  # 2 ranks x 1
    l1, l2 = train_losses(one), train_losses(two)
    assert len(l1) == len(l2) == 5
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, (l1, l2)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_home, tmp_path):
    home = fresh_home(tiny_home, tmp_path / "home")
    run_script("pretrain.py", *TINY, "--num-steps", 2, home=home)
    # the architecture is too robust to diverge on demand (norms + soft-capped logits), so poison the
    # weights of a copy of the checkpoint instead: the resumed run must see nan and stop
    good = home / "checkpoints/pretrain/step_000002"
    bad = good.parent / "step_000003"
    shutil.copytree(good, bad)
    state = torch.load(bad / "model.pt", weights_only=True)
    state["lm_head.weight"][0, 0] = float("nan")
    torch.save(state, bad / "model.pt")
    meta = (bad / "meta.json").read_text().replace('"step": 2', '"step": 3')
    (bad / "meta.json").write_text(meta)
    proc = run_script("pretrain.py", *TINY, "--num-steps", 6, "--resume", home=home, check=False)
    assert proc.returncode != 0 and "loss is nan at step 3" in proc.stderr
    assert "Traceback" not in proc.stderr and "is intact" in proc.stderr
    assert sorted(p.name for p in good.parent.iterdir()) == ["step_000002", "step_000003"]


def test_missing_corpus_is_one_clear_line(tmp_path, tiny_home):
    home = tmp_path / "empty"
    (home / "tokenizer").mkdir(parents=True)
    shutil.copy(tiny_home / "tokenizer/tokenizer.json", home / "tokenizer")
    proc = run_script("pretrain.py", *TINY, home=home, check=False)
    assert proc.returncode == 2 and "python data/corpus.py" in proc.stderr and "Traceback" not in proc.stderr
