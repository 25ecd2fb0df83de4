"""
tinyseek/checkpoint.py -- saving and loading checkpoints safely (and any other file a run writes, atomically),
shared by train.py, grpo.py and sample.py.

A checkpoint is a plain dict:
    {"model": state_dict, "model_args": dict, "tokenizer": dict, "config": dict, "kind": str, ...}
plus whatever a script needs to resume (optimizer state, step, RNG states, data position). Only tensors
and plain Python values are stored, so it loads with `torch.load(..., weights_only=True)`, which cannot
run code hidden in a malicious file. Writes go to a temporary file in the same folder that is flushed to
the disk (fsync) and then renamed over the target: a process killed in the middle of a save leaves the
previous file as it was (the rename is atomic), and so does a power cut (without the fsync the rename
could reach the disk before the data, leaving an empty or partial file under the old name). A file that
cannot be read anyway (truncated by a full disk, damaged in a copy) gives one line naming it.

A file can also be damaged where the format does not notice: torch.load does not check the zip's CRCs, so
flipped bytes inside a tensor load as different weights, silently. Every checkpoint therefore stores a
SHA-256 of its weights ("model_sha256", over each tensor's name, dtype, shape and bytes), and loading
recomputes it; a mismatch is one line naming the file and what to do. Checkpoints written before the
checksum existed have none and load as before.
"""

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import torch

from model import ModelArgs, Transformer
from tokenizer import Tokenizer


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def _atomic_write(path, write) -> None:
    """Call `write(f)` on a binary file `path`.tmp, fsync it, rename it over `path`, fsync the folder.

    os.replace is atomic (POSIX and Windows): a reader, or the next run after a kill, sees the old file or
    the new one, never a mixture. The fsync before the rename makes the data durable before the name
    points at it, which is what survives a power cut; the folder's fsync makes the rename itself durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)           # e.g. a full disk: leave no half-written .tmp behind
        raise
    if os.name == "posix":                    # a folder cannot be opened for fsync on Windows
        try:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:                       # some file systems refuse fsync on a folder; the data is safe
            pass


def weights_sha256(state: dict) -> str:
    """Hex SHA-256 of a state dict: each tensor's name, dtype, shape and raw bytes, in sorted name order.

    Bit-exact: the same weights on any device give the same digest, and one flipped bit changes it."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, payload: dict) -> None:
    """Atomically and durably write `payload` (a dict of tensors and plain values) to `path` with torch.save.
    A payload with weights ("model") gets their checksum ("model_sha256"), which read_checkpoint verifies."""
    if "model" in payload:
        payload = {**payload, "model_sha256": weights_sha256(payload["model"])}
    _atomic_write(path, lambda f: torch.save(payload, f))


def write_jsonl(path, rows: list[dict]) -> None:
    """Atomically write one JSON object per line (evaluation records, SFT data, results): a reader never
    sees half a file, and an interrupted write leaves the previous file as it was."""
    _atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")))


def _unreadable(path: Path, error: Exception) -> str:
    """Why torch.load failed on `path`, in a few words on one line. torch's own messages run over several
    lines and suggest retrying with weights_only=False, i.e. running whatever code the file holds: never
    pass that on."""
    refused = re.search(r"GLOBAL (\S+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        return (f"it holds a {refused.group(1)} object, which a safe load refuses (unpickling it could run "
                "code hidden in the file)")
    return (f"it is truncated or corrupt ({path.stat().st_size} bytes that torch.load cannot read: an "
            "interrupted copy or a full disk?)")


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
        raise CheckpointError(f"{path} is not a readable tinyseek checkpoint: {_unreadable(path, e)}; "
                              f"recreate it with `{hint}`") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict; recreate it with `{hint}`")
    for key in ("model", "model_args", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks the '{key}' entry; recreate it with `{hint}`")
    stored = ckpt.get("model_sha256")                   # None: written before checksums, loads as before
    if stored is not None and weights_sha256(ckpt["model"]) != stored:
        raise CheckpointError(f"{path} is damaged: its weights do not match the checksum stored when it was "
                              f"written (bytes changed on disk or in a copy); copy it again from a good source "
                              f"or recreate it with `{hint}`")
    return ckpt


def rank_rng_states(ckpt: dict, rank: int, world_size: int, path) -> dict:
    """This rank's RNG states from a checkpoint, for an exact --resume on `world_size` ranks.

    Each rank draws its own data (seeded with its rank), so the trainers gather every rank's states into
    ckpt["rng_ranks"] (a list indexed by rank) when they save. A checkpoint from before that holds rank 0's
    alone in ckpt["rng"]: fine for one process, but on several ranks every rank would restore rank 0's
    streams and draw the same data, so that is refused, as is a different number of ranks."""
    ranks = ckpt.get("rng_ranks")
    if ranks is None:
        if world_size > 1:
            raise CheckpointError(f"{path} holds the RNG state of one rank only (written before per-rank states "
                                  "were saved); resume it as a single process, or start the run again")
        return ckpt["rng"]
    if len(ranks) != world_size:
        raise CheckpointError(f"{path} was written by a run on {len(ranks)} rank(s) and this one has {world_size}; "
                              f"resume on {len(ranks)} (torchrun --nproc_per_node={len(ranks)}), or start the "
                              "run again")
    return ranks[rank]


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
