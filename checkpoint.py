"""
tinyseek/checkpoint.py -- saving and loading checkpoints safely (and any other file a run writes, atomically),
shared by train.py, grpo.py and sample.py.

A checkpoint is a plain dict:
    {"model": state_dict, "model_args": dict, "tokenizer": dict, "config": dict, "kind": str, ...}
plus whatever a script needs to resume (optimizer state, step, RNG states, data position). Only tensors
and plain Python values are stored, so it loads with `torch.load(..., weights_only=True)`, which cannot
run code hidden in a malicious file. Writes go to a temporary file in the same folder that is then
renamed over the target: an interrupted save never leaves a half-written checkpoint behind.
"""

import json
import os
from pathlib import Path

import torch

from model import ModelArgs, Transformer
from tokenizer import Tokenizer


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def save_checkpoint(path, payload: dict) -> None:
    """Atomically write `payload` (a dict of tensors and plain values) to `path` with torch.save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)                     # atomic on POSIX and Windows


def write_jsonl(path, rows: list[dict]) -> None:
    """Atomically write one JSON object per line (evaluation records, SFT data, results): a reader never
    sees half a file, and an interrupted write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def read_checkpoint(path, hint: str = "python train.py") -> dict:
    """Load a checkpoint dict (weights_only) with clear errors; `hint` is the command that makes one."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; run `{hint}` first to create one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path} is not a readable tinyseek checkpoint ({type(e).__name__}: {e}); "
                              f"recreate it with `{hint}`") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict; recreate it with `{hint}`")
    for key in ("model", "model_args", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks the '{key}' entry; recreate it with `{hint}`")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu", **arg_overrides) -> tuple[Transformer, Tokenizer]:
    """Build the model and tokenizer stored in a checkpoint dict and load the weights strictly.

    `arg_overrides` may change runtime-only fields such as attn_impl (they do not change any weight)."""
    try:
        args = ModelArgs(**{**ckpt["model_args"], **arg_overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint model_args are not valid for this version of model.py: {e}") from e
    tok = Tokenizer.from_dict(ckpt["tokenizer"])
    model = Transformer(args)
    check_state_dict(model, ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), tok


def check_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} weight(s), e.g. '{missing[0]}'; "
                              "it was made for a different model configuration")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected weight(s), e.g. '{extra[0]}'; "
                              "it was made for a different model configuration")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"shape mismatch for '{k}': checkpoint {tuple(state[k].shape)} vs model "
                                  f"{tuple(v.shape)}; the model arguments differ")


def load_model(path, device="cpu", hint: str = "python train.py", **arg_overrides):
    """read_checkpoint + model_from_checkpoint: returns (model in eval mode, tokenizer, checkpoint dict)."""
    ckpt = read_checkpoint(path, hint)
    model, tok = model_from_checkpoint(ckpt, device, **arg_overrides)
    return model.eval(), tok, ckpt
