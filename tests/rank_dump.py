"""Run train.py or grpo.py unchanged and, when its training loop ends, save this rank's model state (weights
and buffers, router biases included) to OUT_DIR/rank{RANK}.pt, so a test can compare the ranks of a
torchrun job with each other and with the checkpoint rank 0 wrote. Used by tests/test_ranks.py:

    torchrun --standalone --nproc_per_node=2 tests/rank_dump.py train --out_dir=DIR [train.py flags]
    torchrun --standalone --nproc_per_node=2 tests/rank_dump.py grpo --toy_reward --out_dir=DIR [grpo.py flags]

Both scripts call `train_loop(run, stop)` with a run object holding the model (`run.raw` in train.py,
`run.model` in grpo.py); this wrapper replaces that module attribute with the original loop followed by
the dump, so nothing in the scripts themselves changes. `--toy_reward` (grpo only) replaces tasks.reward
by `toy_reward`, which a random model already earns in varying amounts, so the groups have non-zero
advantages and the policy really moves in a short run.
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dump_after(loop, attr: str):
    """Wrap a training loop: run it, then write this rank's state dict (CPU tensors) atomically."""
    def wrapped(run, stop):
        """The original loop, then OUT_DIR/rank{RANK}.pt."""
        loop(run, stop)
        state = {k: v.detach().cpu().clone() for k, v in getattr(run, attr).state_dict().items()}
        path = Path(run.cfg.out_dir) / f"rank{os.environ.get('RANK', '0')}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"step": run.step, "model": state}, tmp)
        os.replace(tmp, path)
    return wrapped


def toy_reward(completion: str, problem, w_acc: float = 1.0, w_fmt: float = 0.1) -> dict:
    """A reward in [0, 1] that differs between random completions: their length in characters, mod 7, / 6."""
    value = (len(completion) % 7) / 6
    return {"accuracy": value, "format": 0.0, "total": w_acc * value}


def main() -> None:
    """`rank_dump.py train|grpo [flags]`: run that script's main() with the dump hook installed."""
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "grpo"):
        raise SystemExit("usage: rank_dump.py train|grpo [flags of that script]")
    which, flags = sys.argv[1], sys.argv[2:]
    if which == "train":
        import train as script
        attr = "raw"
    else:
        import grpo as script
        import tasks
        attr = "model"
        if "--toy_reward" in flags:
            flags.remove("--toy_reward")
            tasks.reward = toy_reward
    script.train_loop = dump_after(script.train_loop, attr)
    script.main(flags)


if __name__ == "__main__":
    main()
