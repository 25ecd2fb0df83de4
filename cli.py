"""
tinyseek/cli.py -- the plumbing every script shares, kept out of the scripts so they read as lectures:
dataclass -> argparse flags, device choice, torch.distributed setup under torchrun, and what every long run
needs: progress with an ETA, a graceful Ctrl-C, and a metrics log (JSON lines, optionally a tracker).
"""

import argparse
import dataclasses
import gc
import json
import os
import re
import signal
import sys
from pathlib import Path

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


def invalid_flag(cfg, name: str, rule: str):
    """Raise the ValueError a config's __post_init__ uses for a bad flag: '--name=value is invalid: rule'
    (parse_config turns it into one usage line, no traceback)."""
    raise ValueError(f"--{name}={getattr(cfg, name)!r} is invalid: {rule}")


def _help_with_default(help_text: str, default) -> str:
    """The help text followed by '(default: X)'. Built here rather than by ArgumentDefaultsHelpFormatter,
    which shows no default at all for a field without a help text, and an empty string as nothing. A '%'
    is doubled: argparse reads help texts as %-format strings."""
    help_text = help_text.replace("%", "%%")
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


MPS_NOTE = ("note: --device=mps (Apple GPU) is untested in tinyseek; if a run fails or its numbers look wrong, "
            "compare with --device=cpu, which is fast enough for the tiny preset")


def pick_device(name: str) -> str:
    """'auto' -> cuda if available, else cpu; an explicit device that is absent is an error.

    Apple's 'mps' is never picked by 'auto': no tinyseek run has been checked on it, so a student's first
    command on a Mac runs on the tested CPU path, and 'mps' only when asked for (with a one-line note)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={name} but no CUDA GPU is visible; use --device=cpu or --device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit("--device=mps but MPS is not available; use --device=cpu or --device=auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise SystemExit(f"unknown --device={name}; choose auto, cpu, cuda, cuda:N or mps")
    if name == "mps":
        print(MPS_NOTE, file=sys.stderr)
    return name


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def valid_device_name(name: str) -> bool:
    """True for a --device value pick_device understands; configs check this right after parsing (whether
    that device is present is pick_device's check, when the device is picked)."""
    return re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name) is not None


def parse_command(commands: dict, argv=None, prog: str = "", description: str = ""):
    """`prog COMMAND [--flag=value ...]` for scripts with subcommands: returns (COMMAND, its config).

    `commands` maps each command to (one-line summary, dataclass); the flags after the command are parsed
    by parse_config with that command's own dataclass, so `prog COMMAND --help` lists exactly its flags
    and its __post_init__ checks them. `prog --help` prints every command with its flags and exits 0; a
    missing or unknown command exits with the usage line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: {prog} {{{','.join(commands)}}} [--flag=value ...]"
    if argv and argv[0] in ("-h", "--help"):
        lines = [usage, "", description, "", f"commands (`{prog} COMMAND --help` for one of them):"]
        for name, (summary, cls) in commands.items():
            lines.append(f"\n  {name}: {summary}")
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"    --{f.name}={default!r}".ljust(36) + f" {f.metadata.get('help', '')}".rstrip())
        print("\n".join(lines))
        raise SystemExit(0)
    if not argv or argv[0] not in commands:
        got = f"got {argv[0]!r}; " if argv else ""
        raise SystemExit(f"{usage}; {got}`{prog} --help` lists the commands and their flags")
    summary, cls = commands[argv[0]]
    return argv[0], parse_config(cls, argv[1:], description=f"{prog} {argv[0]}: {summary}")


def autocast_context(dtype: str, device: str):
    """bf16 autocast (matmuls in bfloat16, master weights and optimizer state in float32) or a disabled one.
    'auto' picks bf16 on a CUDA GPU that supports it, float32 elsewhere."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


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


def from_rank0(values: list[float], ddp: Dist, device) -> list[float]:
    """Rank 0's `values` on every rank (a broadcast); the values themselves when running alone.

    Decisions every rank must take together (stop now, how much of a seconds budget is spent) come from rank
    0: each rank's own clock and signals differ, and ranks that stop at different steps deadlock in the next
    collective. The tensor lives on the run's device, the one the process group serves (nccl refuses CPU
    tensors), in float32, which every backend (MPS too) supports."""
    if not ddp.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float32, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def all_ranks(obj, ddp: Dist) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank ([obj] when running alone): an all_gather of picklable
    objects, e.g. the RNG states each rank must get back on --resume. torch serialises the objects into byte
    tensors on the group's device itself (the current CUDA device under nccl, the CPU under gloo)."""
    if not ddp.enabled:
        return [obj]
    out = [None] * ddp.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup_distributed(d: Dist, wait: bool = True) -> None:
    """Leave the process group (no-op for a single process).

    wait=True first waits for every rank (a barrier): rank 0 evaluates and writes files at the end while the
    others are done, and a rank that tears its connections down while a peer is still busy can abort at
    exit. After an error there is no barrier (the other ranks may never arrive). The caller drops its DDP
    wrapper first; the garbage collection here then frees it (DDP's hooks form reference cycles) and with it
    the last reference to the process group and the work of its last collectives, while the interpreter is
    fully alive. Left to the interpreter's shutdown, gloo's worker threads can be destroyed in the middle of
    that work, which aborts the process ("terminate called without an active exception")."""
    if d.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Long runs: progress with an ETA, Ctrl-C / SIGTERM handled between steps, metrics to file (and trackers)
# ----------------------------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    """12 -> '12s', 754 -> '12m34s', 7384 -> '2h03m'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress(step: int, total: int, elapsed: float, fraction: "float | None" = None) -> str:
    """'step 120/750 (16%) | ETA 2m31s': where a loop stands and when it will end at its average pace so far.

    `fraction` (default step / total) is the share of the budget used; a run with a seconds budget passes the
    larger of its step and time fractions, so the ETA is whichever budget ends first."""
    frac = min(1.0, step / total if fraction is None else fraction)
    eta = format_seconds(elapsed * (1 - frac) / frac) if frac > 0 else "?"
    return f"step {step}/{total} ({100 * frac:.0f}%) | ETA {eta}"


class GracefulStop:
    """Catch Ctrl-C (SIGINT) and SIGTERM while a training loop runs: the loop finishes its step, writes a
    checkpoint and exits, instead of dying with a half-written state. Use as a context manager; `requested`
    turns true when a signal arrives. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        """Remember the signal; the loop checks `requested` between steps."""
        self.signum = signum

    @property
    def requested(self) -> bool:
        """True once SIGINT or SIGTERM arrived."""
        return self.signum is not None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


LOG_TO = ("jsonl", "tensorboard", "wandb")


class MetricsLog:
    """Every record of a run goes to out_dir/metrics.jsonl (always) and, with --log_to, to a tracker:
    tensorboard (event files in out_dir/tensorboard, through torch.utils.tensorboard; `pip install tensorboard`)
    or wandb (`pip install wandb`; set WANDB_MODE=offline to log without a network). Numbers become scalars
    plotted against record["step"]; strings and other values stay in the JSON lines only."""

    def __init__(self, out_dir, log_to: str = "jsonl", config: "dict | None" = None, run_name: str = "tinyseek",
                 append: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        if not append:
            self.path.write_text("")
        self.tb = self.wandb = None
        if log_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:   # torch imports the optional tensorboard package lazily
                raise SystemExit(f"--log_to=tensorboard needs the tensorboard package: pip install tensorboard "
                                 f"({e})") from None
            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        elif log_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--log_to=wandb needs the wandb package: pip install wandb "
                                 "(WANDB_MODE=offline logs without a network)") from None
            self.wandb = wandb.init(project="tinyseek", name=run_name, config=config or {}, dir=str(out_dir))

    def log(self, record: dict) -> None:
        """Append one record (it must carry "step") and send its numbers to the tracker."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        """Flush and close the tracker (metrics.jsonl is already complete)."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
