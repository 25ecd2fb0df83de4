"""Issue 33, items 1 and 2: the trainers past one process.

  1. every collective of train.py and grpo.py gets its tensor on the run's device (nccl refuses CPU tensors),
     checked without a GPU by a spy on the collectives while the default device is another one
  2. --resume on two ranks continues every rank's own RNG streams: a run split in two and resumed ends with
     the same weights as the unsplit run, for train.py and for grpo.py (torchrun, 2 CPU ranks, gloo)

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_multirank.py -q    (-m 'not slow' skips the torchrun runs)
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from test_grpo import save_tiny_checkpoint, tiny_args
from test_train import SMALL

import cli
import grpo
from checkpoint import CheckpointError, rank_rng_states
from cli import Dist
from model import Transformer

REPO = Path(__file__).resolve().parent.parent


# ---- 1. collectives on the run's device ---------------------------------------------------------------

class CollectiveSpy:
    """Stands in for torch.distributed's all_reduce and broadcast in a job of two ranks that hold the same
    values: checks that each tensor is on the run's device, and not float64 (which MPS lacks)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.calls = []

    def check(self, name: str, t: torch.Tensor) -> None:
        """Record the call; fail if the tensor is not where the process group of this run would need it."""
        self.calls.append(name)
        assert t.device == self.device, f"{name} got a tensor on {t.device}; the run is on {self.device}"
        assert t.dtype != torch.float64, f"{name} got a float64 tensor (MPS has no float64)"

    def all_reduce(self, t, *args, **kwargs):
        """Sum over two ranks holding the same tensor."""
        self.check("all_reduce", t)
        t.mul_(2)

    def broadcast(self, t, *args, **kwargs):
        """Rank 0's tensor: the same as this one."""
        self.check("broadcast", t)


def test_every_collective_takes_its_tensor_on_the_run_device(monkeypatch):
    """The run is on the CPU while the default device is 'meta': a tensor made without naming the run's
    device lands on meta, which is what a CPU tensor under an nccl group on a GPU is, a tensor on a device
    the group does not serve."""
    spy = CollectiveSpy("cpu")
    monkeypatch.setattr(dist, "all_reduce", spy.all_reduce)
    monkeypatch.setattr(dist, "broadcast", spy.broadcast)
    monkeypatch.setattr(grpo, "_world_size", lambda: 2)
    two_ranks = Dist(rank=0, local_rank=0, world_size=2)
    torch.manual_seed(0)
    model = Transformer(tiny_args(64))
    model.train()
    model(torch.randint(0, 64, (2, 8)))                      # some expert load to average
    with torch.device("meta"):
        stats = grpo._mean_over_ranks({"reward": 0.25, "kl": 0.5}, ("reward", "kl"), "cpu")
        assert stats == {"reward": 0.25, "kl": 0.5}          # the mean of two equal ranks
        run = SimpleNamespace(cfg=SimpleNamespace(max_seconds=0.0), ddp=two_ranks, device="cpu", elapsed=0.0)
        assert grpo.should_stop(run, SimpleNamespace(requested=True), time.perf_counter(), 0.0) is True
        assert cli.from_rank0([1.0, 0.5], two_ranks, "cpu") == [1.0, 0.5]
    grpo.sync_router_bias(model, True)                       # its tensor is the model's own expert load
    assert spy.calls == ["all_reduce", "broadcast", "broadcast", "all_reduce"]


def test_rng_states_of_each_rank_and_the_refusals():
    ckpt = {"rng": {"seed": 0}, "rng_ranks": [{"seed": 0}, {"seed": 1}]}
    assert rank_rng_states(ckpt, 1, 2, "ckpt.pt") == {"seed": 1}
    with pytest.raises(CheckpointError, match="2 rank.*this one has 4.*--nproc_per_node=2"):
        rank_rng_states(ckpt, 0, 4, "ckpt.pt")
    old = {"rng": {"seed": 0}}                               # written before per-rank states
    assert rank_rng_states(old, 0, 1, "ckpt.pt") == {"seed": 0}
    with pytest.raises(CheckpointError, match="one rank only"):
        rank_rng_states(old, 1, 2, "ckpt.pt")


# ---- 2. exact resume on two ranks -----------------------------------------------------------------------

def torchrun(script: str, *flags: str) -> None:
    """tests/torchrun_driver.py `script` on 2 CPU ranks (gloo), one thread each; fails the test on an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "torchrun_driver.py"), script, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def max_weight_diff(a: Path, b: Path) -> float:
    """max |w_a - w_b| over every tensor of two checkpoints (router biases included)."""
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def split_and_resume(script: str, tmp_path: Path, flags: list, total: int, split: int) -> tuple[Path, Path]:
    """The unsplit run of `total` steps and the run stopped after `split` steps then resumed; their folders.
    The flags must make the schedules depend on the step only (not on max_iters)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(script, *flags, f"--max_iters={total}", f"--out_dir={straight}")
    torchrun(script, *flags, f"--max_iters={split}", f"--out_dir={resumed}")
    torchrun(script, *flags, f"--max_iters={total}", f"--out_dir={resumed}", "--resume")
    return straight, resumed


@pytest.mark.slow
def test_grpo_resume_on_two_ranks_is_exact(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "base.pt")
    # lr_decay=false: during warmup the lr depends on the step alone; n_eval=0: only the weights matter
    flags = [f"--init_from={ckpt}", "--prompts_per_step=4", "--group_size=4", "--max_new_tokens=12", "--n_eval=0",
             "--device=cpu", "--lr=3e-3", "--lr_decay=false", "--mask_truncated=false", "--seed=3"]
    straight, resumed = split_and_resume("grpo", tmp_path, flags, total=4, split=2)
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    ranks = a["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["sample"], ranks[1]["sample"])  # each rank its own stream
    assert max_weight_diff(straight / "ckpt.pt", resumed / "ckpt.pt") == 0.0
    base = torch.load(ckpt, weights_only=True)["model"]
    assert any(not torch.equal(v, base[k]) for k, v in a["model"].items() if "bias" not in k)  # it did train


@pytest.mark.slow
def test_train_resume_on_two_ranks_is_exact(tmp_path):
    # warmup longer than the run and no V3 schedules: lr, MTP weight and bias speed depend on the step alone
    flags = [*SMALL, "--warmup_iters=100", "--v3_schedules=false"]
    straight, resumed = split_and_resume("train", tmp_path, flags, total=6, split=3)
    ranks = torch.load(straight / "ckpt.pt", weights_only=True)["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["data"], ranks[1]["data"])
    assert max_weight_diff(straight / "ckpt.pt", resumed / "ckpt.pt") == 0.0
