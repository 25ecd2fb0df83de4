"""
tinyseek/cli.py -- the plumbing every script shares, kept out of the scripts so they read as lectures:
dataclass -> argparse flags, device choice, and torch.distributed setup under torchrun.
"""

import argparse
import dataclasses
import os
import sys

import torch
import torch.distributed as dist


def _parse_bool(text: str) -> bool:
    """'true/false/1/0/yes/no' -> bool, for --flag=value style booleans."""
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(cls, argv=None, description: str = ""):
    """Turn the dataclass `cls` into argparse flags (`--field=value`) and return an instance.

    Every field becomes a flag of its own type (bools accept true/false; `--flag` alone means true;
    `int | None` style fields accept 'none'). Unknown flags or wrong types exit with argparse's usage message,
    which lists every valid flag. `--help` shows each field's metadata["help"] and its default.
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = _help_with_default(f.metadata.get("help", ""), default)
        kind = f.type if isinstance(f.type, type) else type(default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=default,
                                help=help_text)
        elif default is None:
            parser.add_argument(f"--{f.name}", type=_optional(f.type), default=None, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return cls(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


def _help_with_default(help_text: str, default) -> str:
    """The help text followed by '(default: X)'. Built here rather than by ArgumentDefaultsHelpFormatter,
    which shows no default at all for a field without a help text, and an empty string as nothing."""
    if "(default" in help_text:                        # the text already says what the default means
        return help_text
    shown = repr(default) if default == "" else str(default)
    return f"{help_text} (default: {shown.replace('%', '%%')})".lstrip()


def _optional(annotation):
    """Parser for 'X | None' fields given as strings: 'none' -> None, else int, then float, else str."""
    def parse(text: str):
        if text.lower() == "none":
            return None
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text
    return parse


def print_config(cfg, title: str = "config") -> None:
    """Print the effective configuration, one `key = value` per line."""
    print(f"---- {title} ----")
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k} = {v!r}")


def pick_device(name: str) -> str:
    """'auto' -> cuda if available, else mps, else cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={name} but no CUDA GPU is visible; use --device=cpu or --device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit("--device=mps but MPS is not available; use --device=cpu or --device=auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise SystemExit(f"unknown --device={name}; choose auto, cpu, cuda, cuda:N or mps")
    return name


@dataclasses.dataclass
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 when run as a plain script)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when running as one of several torchrun processes."""
        return self.world_size > 1

    @property
    def master(self) -> bool:
        """Rank 0 logs, evaluates and writes files."""
        return self.rank == 0


def setup_distributed(device: str) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): nccl on CUDA, gloo on CPU.

    Returns (Dist, device) where device is this process's own GPU (cuda:LOCAL_RANK) on CUDA."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return d, device


def cleanup_distributed(d: Dist, wait: bool = True) -> None:
    """Leave the process group (no-op for a single process).

    wait=True first waits for every rank (a barrier): rank 0 evaluates and writes files at the end while the
    others are done, and a rank that tears its connections down while a peer is still busy can abort at
    exit. After an error there is no barrier (the other ranks may never arrive)."""
    if d.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
