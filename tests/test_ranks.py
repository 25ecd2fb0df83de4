"""Multi-rank consistency under torchrun: after N steps on 2 CPU ranks (gloo), every rank holds the same
weights and the same router biases, for train.py and for grpo.py, and rank 0's checkpoint holds them too.

DDP keeps the weights equal by averaging gradients; the router biases are buffers DDP does not touch
(broadcast_buffers=False), so they stay equal only because each script sums (train.py) or averages
(grpo.py) the expert loads across ranks before the bias step. A rank that used its own load would drift
silently: the exit code and step count would not show it, these comparisons do.

Not compared with a single process: each rank draws its own batches (train.py seeds its data generator
with seed + rank, grpo.py its questions and samples likewise), so a 2-rank run sees different data than one
process with the same global batch, and the design does not promise equal weights there.

Each rank's state is dumped by tests/rank_dump.py, which runs the scripts unchanged.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_ranks.py -q          (about a minute; marked slow)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_grpo import save_tiny_checkpoint
from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def torchrun(script: str, out: Path, *flags: str) -> dict:
    """Run tests/rank_dump.py on 2 CPU ranks; return {rank: state dict} and rank 0's checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "rank_dump.py"), script, f"--out_dir={out}", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dumps = {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    return dumps, ckpt


def assert_ranks_agree(dumps: dict, ckpt: dict, steps: int, trained: str = "") -> None:
    """Both ranks ran `steps` steps and hold bit-identical tensors, equal to the checkpoint's; the router
    biases of the layers that trained (names starting with `trained`) have moved, so their equality is not
    that of untouched zeros."""
    a, b = dumps[0]["model"], dumps[1]["model"]
    assert dumps[0]["step"] == dumps[1]["step"] == ckpt["step"] == steps
    assert a.keys() == b.keys() and set(ckpt["model"]) <= set(a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"ranks differ in {differ[:8]}"
    assert all(torch.equal(ckpt["model"][k], a[k]) for k in ckpt["model"])
    biases = [k for k in a if k.endswith("gate.bias") and k.startswith(trained)]
    assert biases and all(a[k].abs().sum() > 0 for k in biases), "router biases never moved"


@pytest.mark.slow
def test_train_ranks_hold_identical_weights_and_router_biases(tmp_path):
    dumps, ckpt = torchrun("train", tmp_path, *SMALL, f"--max_iters={STEPS}")
    assert_ranks_agree(dumps, ckpt, STEPS)


@pytest.mark.slow
def test_grpo_ranks_hold_identical_weights_and_router_biases(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "init.pt")
    # an odd number of bias steps (mu=1, 3 steps of +-gamma each) cannot cancel back to zero
    dumps, ckpt = torchrun("grpo", tmp_path / "run", "--toy_reward", f"--init_from={init}",
                           f"--max_iters={STEPS // 2}", "--n_eval=2", "--eval_interval=1", "--prompts_per_step=4",
                           "--group_size=4", "--max_new_tokens=8", "--mask_truncated=false", "--beta=0.04", "--mu=1",
                           "--device=cpu")
    assert_ranks_agree(dumps, ckpt, STEPS // 2, trained="layers.")      # RL does not run the MTP module
    init_state = torch.load(init, weights_only=True)["model"]
    moved = [k for k in init_state if not k.startswith("mtp") and not torch.equal(init_state[k], ckpt["model"][k])]
    assert len(moved) > len(init_state) // 2                       # the policy really was updated
