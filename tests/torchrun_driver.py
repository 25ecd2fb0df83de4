"""Runs train.py or grpo.py as one rank of a torchrun job, for tests/test_multirank.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_driver.py grpo --flag=value ...

For grpo the task's reward is replaced by a rule that an untrained model's random completions pass about half
the time (as tests/test_runs.py does in one process), so the groups carry signal and the weights move: a run
whose every advantage is 0 would resume "exactly" whatever the RNG states were. Everything else is the real
script: its process group, its DDP, its checkpoints and --resume.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo
import train


def varied_reward(text, problem, w_acc=1.0, w_fmt=0.1):
    """Accuracy 1 for completions whose character codes sum to an odd number: about half of them."""
    acc = float(sum(map(ord, text)) % 2)
    return {"accuracy": acc, "format": 0.0, "total": w_acc * acc}


if __name__ == "__main__":
    script, argv = sys.argv[1], sys.argv[2:]
    if script == "grpo":
        grpo.tasks.reward = varied_reward
        grpo.main(argv)
    else:
        train.main(argv)
