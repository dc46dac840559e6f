"""The whole pipeline: `bash run.sh --preset smoke` from the mirror into an empty base dir, every stage
talking to the next only through files on disk, ending in a report card with every column."""

import os
import re
import subprocess
import sys

from conftest import ROOT, read_log


def test_smoke_preset_runs_every_stage_and_writes_the_report_card(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "FLATCHAT_HOME": str(home), "PYTHON": sys.executable}  # the tests' interpreter
    proc = subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        assert list((home / "checkpoints" / stage).glob("step_*/meta.json")), stage
        assert (home / "logs" / f"run_{stage}.txt").exists()
    card = (home / "report.md").read_text()
    header = next(line for line in card.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["metric", "chance", "BASE", "MID", "SFT", "RL"]
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| ")}
    assert re.search(r"\d\.\d{4}", rows["bpb"].split("|")[3])  # BASE bpb measured
    for metric in ("ARC-E", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        cells = [c.strip() for c in rows[metric].split("|")[4:7]]  # MID, SFT, RL
        assert all(re.fullmatch(r"-?\d\.\d{4}( \(chance\))?", c) for c in cells), (metric, cells)
    assert re.fullmatch(r"0\.2\d{3}", rows["MMLU"].split("|")[2].strip())  # 4 choices: chance ~0.25
    assert "CORE over 18 of 22 tasks" in card
    pre = [r["loss"] for r in read_log(home, "pretrain") if "loss" in r]
    assert pre[-1] < pre[0]  # the smoke model learned something
    assert "Chat with your model" in proc.stdout
    # the skip rule: a second run finds every output and reruns nothing but the report
    again = subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "smoke"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("output exists, skipped") == 6
