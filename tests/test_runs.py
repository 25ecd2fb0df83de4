"""Long runs as a user lives them: progress lines with an ETA, an interrupted GRPO run resumed exactly,
metrics sent to TensorBoard and read back, bf16 autocast end to end on the CPU, relative paths counted from
the current folder.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_runs.py -q
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_grpo import save_tiny_checkpoint
from test_train import SMALL

import grpo
import tasks
import train
from cli import format_seconds, progress

ROOT = Path(__file__).resolve().parents[1]
GRPO_SMALL = ["--prompts_per_step=4", "--group_size=4", "--max_new_tokens=24", "--n_eval=8", "--eval_batch_size=8",
              "--device=cpu", "--seed=3"]


# ---- progress and ETA ---------------------------------------------------------------------------------

def test_progress_line_shows_step_total_percent_and_eta():
    assert progress(120, 750, 60.0) == "step 120/750 (16%) | ETA 5m15s"
    assert progress(750, 750, 300.0) == "step 750/750 (100%) | ETA 0s"
    assert progress(0, 10, 0.0).endswith("ETA ?")
    # a seconds budget that ends first sets the fraction (and so the ETA)
    assert progress(10, 1000, 30.0, fraction=0.5) == "step 10/1000 (50%) | ETA 30s"
    assert [format_seconds(s) for s in (0, 59.4, 61, 3600 + 180)] == ["0s", "59s", "1m01s", "1h03m"]


def test_train_log_lines_carry_progress_and_eta(tmp_path, capsys):
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_iters=10"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ") and "loss" in ln]
    assert lines and all(re.match(r"step \d+/10 \(\d+%\) \| ETA (\d+[hms]|\d+m\d\ds|\?)", ln) for ln in lines), lines
    assert lines[-1].startswith("step 10/10 (100%)")


# ---- GRPO: Ctrl-C / SIGTERM, then --resume, equals one uninterrupted run ------------------------------------

def varied_reward(text, problem, w_acc=1.0, w_fmt=0.1):
    """A rule that an untrained model's random completions pass about half the time, so groups have signal."""
    acc = float(sum(map(ord, text)) % 2)
    return {"accuracy": acc, "format": 0.0, "total": w_acc * acc}


def test_grpo_resume_is_exact(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "base.pt")
    monkeypatch.setattr(grpo.tasks, "reward", varied_reward)
    flags = [*GRPO_SMALL, f"--init_from={ckpt}", "--max_iters=4", "--eval_interval=2", "--dynamic_sampling",
             "--mu=2", "--mask_truncated=false", "--lr=3e-3"]
    straight = grpo.main([*flags, f"--out_dir={tmp_path / 'straight'}"])
    real_step, calls = grpo.grpo_step, {"n": 0}

    def step_then_signal(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:                    # SIGTERM arrives during step 3: it finishes, checkpoints, exits
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **kw)

    monkeypatch.setattr(grpo, "grpo_step", step_then_signal)
    first = grpo.main([*flags, f"--out_dir={tmp_path / 'split'}"])
    monkeypatch.setattr(grpo, "grpo_step", real_step)
    assert first["interrupted"] and first["step"] == 3
    assert "--resume" in capsys.readouterr().out      # the interrupted run says how to continue
    second = grpo.main([*flags, f"--out_dir={tmp_path / 'split'}", "--resume"])
    assert second["step"] == 4 and not second["interrupted"]
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k              # bit-identical, router biases included
    assert straight["accuracy"] == second["accuracy"]
    def untimed(history):
        """The records without their timings (seconds and tokens/s differ from run to run)."""
        return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]

    assert untimed(a["history"]) == untimed(b["history"])  # the same rewards, statistics and evaluations
    assert 0 < a["history"][1]["reward"] < 1             # the groups carried signal: the weights really moved
    base = torch.load(ckpt, weights_only=True)["model"]
    assert any(not torch.equal(v, base[k]) for k, v in a["model"].items() if "bias" not in k)


def test_grpo_resume_needs_a_grpo_checkpoint(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "base.pt")
    with pytest.raises(SystemExit):
        grpo.main([*GRPO_SMALL, f"--init_from={ckpt}", f"--out_dir={tmp_path}", "--resume"])
    assert "python grpo.py" in capsys.readouterr().err


# ---- tracking: TensorBoard events are written and read back --------------------------------------------------

def test_tensorboard_events_read_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train.main([*SMALL, f"--out_dir={tmp_path}", "--max_iters=10", "--log_to=tensorboard"])
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "ce", "lr", "tok_per_s", "val_loss"} <= tags
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [1, 5, 10]
    jsonl = [ln for ln in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(jsonl) == len(steps)


def test_wandb_missing_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)        # as if not installed
    with pytest.raises(SystemExit, match="pip install wandb"):
        train.main([*SMALL, f"--out_dir={tmp_path}", "--max_iters=2", "--log_to=wandb"])


# ---- bf16 autocast end to end on the CPU -----------------------------------------------------------------

def test_bf16_autocast_trains_and_rl_tunes_on_cpu(tmp_path):
    summary = train.main([*SMALL, f"--out_dir={tmp_path / 'pre'}", "--max_iters=6", "--dtype=bfloat16"])
    fp32 = train.main([*SMALL, f"--out_dir={tmp_path / 'fp32'}", "--max_iters=6", "--dtype=float32"])
    # the same run in float32 lands on the same validation loss up to a fraction of one bf16 step at ~5.5
    # (2^-5 = 0.03), and both are below the loss of the first step: autocast trains like float32
    assert abs(summary["val_loss"] - fp32["val_loss"]) < 0.005, (summary["val_loss"], fp32["val_loss"])
    first = json.loads((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and summary["val_loss"] < first["ce"] - 0.05, (summary["val_loss"], first["ce"])
    ck = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())   # master weights stay float32
    out = grpo.main([*GRPO_SMALL, f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'rl'}",
                     "--max_iters=2", "--dtype=bfloat16"])
    records = [json.loads(line) for line in (tmp_path / "rl" / "eval_step2.jsonl").read_text().splitlines()]
    assert out["step"] == 2 and out["n"] == len(records) == 8
    for rec in records:                                      # the verifier, applied again to each completion
        assert rec["correct"] is (tasks.accuracy_reward(rec["completion"], tasks.arithmetic_problem(rec["question"]))
                                  == 1.0)
    assert out["accuracy"] == sum(r["correct"] for r in records) / 8


# ---- paths typed on the command line count from the current folder -----------------------------------------

@pytest.mark.slow
def test_relative_paths_count_from_the_current_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = save_tiny_checkpoint(tmp_path / "base.pt")
    r = subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--init_from=base.pt", "--out_dir=rl", "--max_iters=1",
                        *GRPO_SMALL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "rl" / "ckpt.pt").is_file() and ckpt.is_file()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, "--out_dir=pre", "--max_iters=2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "pre" / "ckpt.pt").is_file() and not (ROOT / "pre").exists()


# ---- the R1 recipe continues where it stopped ----------------------------------------------------------------

def test_r1_stage_skips_a_finished_run_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    from extras import r1

    cfg = r1.R1Config(n_eval=4, device="cpu")
    pipe = r1.Pipeline(cfg, tmp_path, "results.jsonl")
    argv = [*SMALL, f"--out_dir={tmp_path / 'base'}", "--max_iters=6"]
    calls = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda a: calls.append(list(a)) or real_main(a))
    pipe.stage("base", "train.py", argv)
    pipe.stage("base", "train.py", argv)                              # finished with these flags: skipped
    assert len(calls) == 1
    assert r1.stage_state(tmp_path / "base" / "ckpt.pt", "train.py", argv)[0] == "done"
    other = [*argv[:-1], "--max_iters=8"]                             # other flags: a new run
    assert r1.stage_state(tmp_path / "base" / "ckpt.pt", "train.py", other) == ("new", None)
    # a run stopped early (as by Ctrl-C) is continued with --resume, not restarted
    ck = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    ck["final"]["interrupted"] = True
    torch.save(ck, tmp_path / "base" / "ckpt.pt")
    assert r1.stage_state(tmp_path / "base" / "ckpt.pt", "train.py", argv)[0] == "interrupted"
    pipe.stage("base", "train.py", argv)
    assert len(calls) == 2 and calls[-1][-1] == "--resume"
    (tmp_path / "base" / "ckpt.pt").write_bytes(b"garbage")           # unreadable: run afresh
    assert r1.stage_state(tmp_path / "base" / "ckpt.pt", "train.py", argv) == ("new", None)


# ---- reproducibility: the same seed and thread count give the same run, bit for bit ---------------------------

def test_same_seed_and_threads_reproduce_a_run_bit_for_bit(tmp_path):
    a = train.main([*SMALL, f"--out_dir={tmp_path / 'a'}", "--max_iters=8", "--seed=5"])
    b = train.main([*SMALL, f"--out_dir={tmp_path / 'b'}", "--max_iters=8", "--seed=5"])
    train.main([*SMALL, f"--out_dir={tmp_path / 'c'}", "--max_iters=8", "--seed=6"])
    wa, wb, wc = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True)["model"] for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["val_loss"] == b["val_loss"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)             # and the seed does matter
