"""
tinyseek/extras/bench.py -- DeepSeek-V3's claims, measured side by side on your own machine.

    python -m extras.bench                          # full run: docs/bench/results.md (with its run time) + plots
    python -m extras.bench --quick                  # every row with tiny budgets (~3 min): a smoke test, not a result
    python -m extras.bench --only=1,3               # a subset of the comparisons
    python -m extras.bench --only=6b --device=cuda  # the GPU row: `small`, bf16 autocast, torch.compile

Each row is one short function that measures both arms of a comparison in one process (this one; the
decoding rows 1b, 4b and 8b a fresh one each, see fresh_process), on the same weights, data and seed, and
returns its numbers as a dict. The arms differ in exactly the thing compared:
`arm_configs()`, `decode_configs()` and `grpo_configs()` build them from one base and `check_arms()` refuses
a pair that differs in anything else. Timed arms run interleaved (A, B, A, B, ...) and report medians.
The text of results.md -- what each row compares and how to read it -- is docs/bench/template.md, filled
from the numbers with str.format. Rows: 1a/1b MLA cache size and absorbed-vs-naive decoding, 2a/2b MoE vs
dense (built-in data, a text file), 3 load balancing, 4a/4b MTP loss and MTP speculative decoding, 5a/5b FP8
vs BF16 and accumulation precision, 6a/6b training efficiency (CPU, GPU), 7 GRPO step time, 8a/8b against
transformers' DeepseekV3ForCausalLM.

Outputs in --out_dir (default docs/bench/): results.md, results.json (every number), the plots, profile_*.txt
(row 8, when tinyseek is the slower side) and runs/ (each training arm's train.py outputs, the text corpus).
"""

import ast
import contextlib
import copy
import functools
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import grpo
import sample
import tasks
import train
from checkpoint import load_model, read_checkpoint
from cli import (
    DEVICE_CHOICES,
    parse_config,
    pick_device,
    print_config,
    valid_device_name,
)
from extras.fp8 import matmul_limited_acc
from model import KVCache, ModelArgs, Transformer, kv_cache_numbers_per_token
from train import count_params, flops_per_token

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docs" / "bench" / "template.md"
NOISE = 0.05        # ratios within 5% of 1 are read as "no clear difference"

# ----------------------------------------------------------------------------------------------------
# 1. Configuration and budgets
# ----------------------------------------------------------------------------------------------------


def flag(default, help_text: str):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class BenchConfig:
    """Every flag of `python -m extras.bench`; each field is `--name=value` on the command line."""
    quick: bool = flag(False, "tiny budgets everywhere: a smoke test, not a result")
    out_dir: str = flag(str(ROOT / "docs" / "bench"), "where results and plots go (relative: to the current folder)")
    seconds_per_arm: float = flag(0.0, "row 2: seconds per arm at equal wall-clock; 0 = quick 8, full 90")
    steps_per_arm: int = flag(0, "rows 2-5: steps per arm at equal steps; 0 = quick 24, full 200")
    device: str = flag("cpu", "cpu, cuda, cuda:N, mps, auto (row 6b runs on CUDA whenever a GPU is visible)")
    compile: bool = flag(True, "row 6b: torch.compile the model")
    seed: int = flag(1337, "one seed for every arm (row 5a adds seed+1, seed+2)")
    only: str = flag("", "comparisons to run, e.g. 1,3, or single rows, e.g. 6b (empty: all eight)")

    def __post_init__(self):
        """Reject flags that make no sense, saying what is allowed."""
        for name in ("seconds_per_arm", "steps_per_arm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: must be >= 0 (0 = the mode's default)")
        if not valid_device_name(self.device):
            raise ValueError(f"--device={self.device!r} is invalid: choose {DEVICE_CHOICES}")
        self.selected()

    def selected(self) -> list[str]:
        """The rows picked by --only, in table order: a number picks all its rows (6: 6a, 6b, 6c), a row id just
        that row (6b); empty picks every row."""
        picks = [s.strip().lower() for s in self.only.split(",") if s.strip()]
        bad = [p for p in picks if p not in {*ROWS, *(rid[0] for rid in ROWS)}]
        if bad:
            raise ValueError(f"--only={self.only!r}: give comparison numbers 1-8 or row ids such as 6b, separated "
                             f"by commas, e.g. --only=1,3 or --only=6b (not {', '.join(bad)}); rows: {', '.join(ROWS)}")
        return [rid for rid in ROWS if not picks or rid in picks or rid[0] in picks]


@dataclass(frozen=True)
class Budget:
    """How much work each comparison does; one instance for --quick, one for the full run."""
    seconds_per_arm: float     # row 2, equal wall-clock
    steps_per_arm: int         # rows 2-5, equal steps (equal tokens)
    n_examples: int            # documents in the built-in corpus
    batch_size: int
    block_size: int
    eval_iters: int            # val batches for the final val loss (the same fixed batches for every arm)
    log_interval: int
    tiny_context: int          # row 1b: prompt tokens for `tiny`
    small_context: int         # row 1b: prompt tokens for `small`
    decode_new: int            # row 1b: new tokens per timed decode
    repeats: int               # timed repeats per arm, interleaved; the median counts
    fp8_seeds: int             # row 5a: seeds per arm
    spec_prompts: int          # row 4b: held-out questions decoded
    new_tokens: int            # rows 4b and 7: completion length limit
    grpo_prompts: int          # row 7: questions per step
    grpo_steps: int            # row 7: steps per G (the first is a warm-up, not counted)
    hf_decode: int             # row 8b: new tokens decoded
    compile_decode: bool       # row 8b: also time tinyseek's decoding step compiled (about a minute to compile)
    gpu_steps: int             # row 6b: steps of `small` on the GPU per attention path (the first quarter of the
                               # log lines, compilation and warm-up, is left out of the tokens/s and MFU)


QUICK = Budget(seconds_per_arm=8, steps_per_arm=24, n_examples=6000, batch_size=8, block_size=64, eval_iters=5,
               log_interval=2, tiny_context=1000, small_context=64, decode_new=4, repeats=2, fp8_seeds=3,
               spec_prompts=3, new_tokens=40, grpo_prompts=2, grpo_steps=2, hf_decode=24, gpu_steps=30,
               compile_decode=False)
FULL = Budget(seconds_per_arm=90, steps_per_arm=200, n_examples=60000, batch_size=16, block_size=128,
              eval_iters=20, log_interval=10, tiny_context=1000, small_context=2048, decode_new=32, repeats=3,
              fp8_seeds=3, spec_prompts=10, new_tokens=64, grpo_prompts=8, grpo_steps=3, hf_decode=128,
              gpu_steps=120, compile_decode=True)


def budget(cfg: BenchConfig) -> Budget:
    """The mode's budget with --seconds_per_arm / --steps_per_arm applied."""
    b = QUICK if cfg.quick else FULL
    return replace(b, seconds_per_arm=cfg.seconds_per_arm or b.seconds_per_arm,
                   steps_per_arm=cfg.steps_per_arm or b.steps_per_arm)


# ----------------------------------------------------------------------------------------------------
# 2. The arms: every pair built from one base, differing in exactly the thing compared
# ----------------------------------------------------------------------------------------------------

@dataclass
class Arm:
    """One side of a training comparison: a complete train.py configuration.

    `differs_in` names the ModelArgs fields in which this arm differs from the first arm of its comparison
    (empty for the first arm), `train_differs_in` the TrainConfig fields (row 6c: the optimizer); check_arms()
    holds the configurations to them."""
    name: str
    label: str
    train: train.TrainConfig
    differs_in: frozenset = frozenset()
    train_differs_in: frozenset = frozenset()

    def model_args(self, vocab_size: int) -> ModelArgs:
        """The ModelArgs train.py builds for this arm, given the tokenizer's vocabulary."""
        return train.model_args_from(self.train, vocab_size)


def with_model(cfg: train.TrainConfig, **overrides) -> train.TrainConfig:
    """A copy of cfg with ModelArgs overrides added to its --model string ('k=v,k=v')."""
    items = dict(item.split("=", 1) for item in cfg.model.split(",") if item)
    for k, v in overrides.items():
        items[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return replace(cfg, model=",".join(f"{k}={v}" for k, v in items.items()))


def base_train_config(cfg: BenchConfig) -> train.TrainConfig:
    """The `tiny` run every training arm starts from: equal steps, no held-out accuracy, one final eval.

    fp8_block=32 (it must divide tiny's widths 32..384) only matters when fp8 is on; it is set in the base so
    that the FP8 arm differs from the base in `fp8` alone."""
    b = budget(cfg)
    return train.TrainConfig(
        preset="tiny", model="fp8_block=32", n_examples=b.n_examples, batch_size=b.batch_size,
        block_size=b.block_size, max_iters=b.steps_per_arm, max_seconds=0.0, eval_interval=10**9,
        eval_iters=b.eval_iters, log_interval=b.log_interval, n_eval=0, device=cfg.device, seed=cfg.seed)


def dense_inter_dim(moe: ModelArgs) -> int:
    """inter_dim of an all-dense model (n_dense_layers = n_layers) that activates as many parameters per
    token as `moe`. Activated parameters grow linearly with inter_dim (3 * dim per unit and layer: w1, w2,
    w3), so two evaluations of count_params give the line; the MTP module is counted separately by
    count_params and is the same MoE block in both models."""
    target = count_params(moe)["activated"]
    at = {x: count_params(replace(moe, n_dense_layers=moe.n_layers, inter_dim=x))["activated"] for x in (1, 2)}
    return 1 + round((target - at[1]) / (at[2] - at[1]))


AUX_LOSS_ALPHA = 0.01   # the classic auxiliary-loss arm's weight (Switch Transformer's); see template.md, row 3


def arm_configs(cfg: BenchConfig, text_file: str = "corpus.txt", vocab_size: int = 512) -> dict[str, list[Arm]]:
    """The training arms of rows 2-5 and 6c, keyed by comparison. An arm name always means one and the same run.

    Row 2 runs on the built-in corpus and on `text_file` with the byte tokenizer, each at equal seconds
    and at equal steps (equal tokens). vocab_size only feeds the dense width solver, where it cancels out."""
    steps = base_train_config(cfg)
    seconds = replace(steps, max_iters=10**9, max_seconds=budget(cfg).seconds_per_arm)
    moe = train.model_args_from(seconds, vocab_size)
    dense = {"n_dense_layers": moe.n_layers, "inter_dim": dense_inter_dim(moe)}
    no_balance = {"bias_update_speed": 0.0, "seq_aux_alpha": 0.0}
    arms = {}
    for data, suffix in (("", ""), (text_file, "_text")):
        for budget_name, base in (("tokens", steps), ("seconds", seconds)):
            base = replace(base, data=data, tokenizer="char") if data else base
            moe_name = "base" if (data, budget_name) == ("", "tokens") else f"moe{suffix}_{budget_name}"
            arms[f"moe_vs_dense{suffix}_{budget_name}"] = [
                Arm(moe_name, "MoE (tiny)", base),
                Arm(f"dense{suffix}_{budget_name}", f"dense SwiGLU (inter_dim {dense['inter_dim']})",
                    with_model(base, **dense), frozenset(dense))]
    arms["balancing"] = [
        Arm("base", "aux-loss-free bias (V3)", steps),
        Arm("aux_loss", f"auxiliary loss (alpha {AUX_LOSS_ALPHA})",
            with_model(steps, bias_update_speed=0.0, seq_aux_alpha=AUX_LOSS_ALPHA), frozenset(no_balance)),
        Arm("no_balance", "no balancing", with_model(steps, **no_balance), frozenset(no_balance))]
    arms["mtp"] = [Arm("base", "with MTP (D=1)", steps),
                   Arm("no_mtp", "without MTP", with_model(steps, mtp_depth=0), frozenset({"mtp_depth"}))]
    adamw = frozenset({"optimizer", "lr"})                    # row 6c: Muon (train.py's default) vs V3's AdamW,
                                                              # each at its own default learning rate
    for budget_name, base in (("tokens", steps), ("seconds", seconds)):
        arms[f"optimizer_{budget_name}"] = [
            Arm("base" if budget_name == "tokens" else "moe_seconds", "Muon + AdamW (train.py's default)", base),
            Arm(f"adamw_{budget_name}", "AdamW (V3)", replace(base, optimizer="adamw", lr=0.0),
                train_differs_in=adamw)]
    bf16 = replace(steps, dtype="bfloat16")                  # V3's baseline: bf16 autocast (train.py --dtype)
    arms["fp8"] = [Arm("bf16", "BF16 autocast", bf16),
                   Arm("fp8", "FP8 simulation + BF16 autocast", with_model(bf16, fp8=True), frozenset({"fp8"}))]
    return arms


def config_diff(a, b) -> set[str]:
    """Names of the dataclass fields whose values differ between a and b."""
    return {f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def check_arms(arms: list[Arm], vocab_size: int = 512) -> None:
    """Raise ValueError unless every arm differs from the first exactly in its `differs_in` ModelArgs fields
    and `train_differs_in` TrainConfig fields, and in nothing else (data, seed, batch, budget, optimizer...)."""
    first = arms[0]
    for arm in arms[1:]:
        train_diff = config_diff(first.train, arm.train) - {"model"}       # `model` carries the ModelArgs diff
        model_diff = config_diff(first.model_args(vocab_size), arm.model_args(vocab_size))
        if train_diff != set(arm.train_differs_in) or model_diff != set(arm.differs_in):
            raise ValueError(f"arm '{arm.name}' should differ from '{first.name}' only in ModelArgs "
                             f"{sorted(arm.differs_in)} and TrainConfig {sorted(arm.train_differs_in)}, but differs "
                             f"in TrainConfig {sorted(train_diff)} and ModelArgs {sorted(model_diff)}")


def decode_configs(preset: str, context: int, new_tokens: int, vocab_size: int = 512) -> dict[str, ModelArgs]:
    """Row 1b's two attention paths of one random model, room for the prompt, no YaRN (as in training)."""
    n = context + new_tokens
    absorb = ModelArgs.preset(preset, vocab_size=vocab_size, max_seq_len=n, original_seq_len=n, attn_impl="absorb")
    return {"absorb": absorb, "naive": replace(absorb, attn_impl="naive")}


def grpo_configs(cfg: BenchConfig, init_from: str = "") -> dict[int, grpo.GRPOConfig]:
    """Row 7's GRPO settings for G = 4, 8, 16, differing only in group_size."""
    b = budget(cfg)
    base = grpo.GRPOConfig(init_from=init_from, out_dir="", prompts_per_step=b.grpo_prompts,
                           max_new_tokens=b.new_tokens, n_eval=0, device=cfg.device, seed=cfg.seed)
    return {g: replace(base, group_size=g) for g in (4, 8, 16)}


# ----------------------------------------------------------------------------------------------------
# 3. Shared machinery: progress, training runs, interleaved timing
# ----------------------------------------------------------------------------------------------------

class Progress:
    """Prints `<what> N/total (pct%)`, the elapsed time and an ETA (the done items' mean time per item)."""

    def __init__(self, total: int, what: str, indent: str = "  "):
        self.total, self.what, self.indent, self.done, self.t0 = total, what, indent, 0, time.perf_counter()

    def __call__(self, label: str) -> None:
        """Announce the next item."""
        elapsed = time.perf_counter() - self.t0
        eta = clock(elapsed / self.done * (self.total - self.done)) if self.done else "-"
        print(f"{self.indent}{self.what} {self.done + 1}/{self.total} ({100 * self.done / self.total:.0f}%) {label}"
              f" | {clock(elapsed)} elapsed, ETA {eta}", flush=True)
        self.done += 1


def clock(seconds: float) -> str:
    """m:ss."""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class Bench:
    """What the rows share: flags, budget, device, output folder, the training runs (each arm trains once;
    'base' serves rows 2-8), the plots, and setups that several rows use (memo)."""

    def __init__(self, cfg: BenchConfig, device: str, out: Path):
        self.cfg, self.device, self.out, self.budget = cfg, device, out, budget(cfg)
        self.text_file = out / "runs" / "corpus.txt"
        self.arms = arm_configs(cfg, str(self.text_file))
        self.runs: dict[str, dict] = {}
        self.plots: list[str] = []
        self.memo: dict = {}

    def base_arm(self) -> Arm:
        """The shared `tiny` run (aux-loss-free balancing, MTP on, fp32, built-in data)."""
        return self.arms["mtp"][0]

    def run(self, arm: Arm) -> dict:
        """Train `arm` with train.main (once; later calls return the stored result) and read back its results."""
        if arm.name in self.runs:
            if self.runs[arm.name]["train"] != arm.train:
                raise ValueError(f"two different configurations are both named '{arm.name}'")
            return self.runs[arm.name]
        if arm.train.data and not Path(arm.train.data).exists():
            write_text_corpus(Path(arm.train.data))
        run_dir = self.out / "runs" / arm.name
        summary, log_rows = run_train(arm.train, run_dir)
        steady = [r for r in log_rows if r["step"] > 1] or log_rows      # step 1 includes one-off warm-up
        args = ModelArgs(**read_checkpoint(run_dir / "ckpt.pt")["model_args"])
        res = {"train": arm.train, "args": args, "ckpt": run_dir / "ckpt.pt", "log": log_rows,
               "steps": summary["step"], "seconds": summary["seconds"], "val_loss": summary["val_loss"],
               "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
               "mfu": statistics.median(r["mfu"] for r in steady),
               "max_vio_end": statistics.mean(r["max_vio"] for r in log_rows[-max(1, len(log_rows) // 4):]),
               "params": count_params(args)}
        print(f"    '{arm.name}': {res['steps']} steps in {res['seconds']:.0f} s, val loss {res['val_loss']:.4f}, "
              f"{res['tok_per_s']:,.0f} tok/s", flush=True)
        self.runs[arm.name] = res
        return res

    def run_all(self, arms: list[Arm], plot: str = "", x: str = "step", y: str = "ce") -> dict[str, dict]:
        """check_arms, then run every arm (with progress lines); {arm name: result}. With `plot`, save the
        logged y against x (metrics.jsonl fields) of every arm as out/plot."""
        check_arms(arms)
        progress, res = Progress(len(arms), "arm", "    "), {}
        for arm in arms:
            progress(f"'{arm.name}' ({arm.label})")
            res[arm.name] = self.run(arm)
        if plot:
            self.plot(plot, {a.label: ([r[x] for r in res[a.name]["log"]], [r[y] for r in res[a.name]["log"]])
                             for a in arms}, LABELS[x], LABELS[y])
        return res

    def plot(self, name: str, series: dict, xlabel: str, ylabel: str) -> None:
        """Save out/name: one line per {label: (xs, ys)}; remember it for results.md."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, "o-" if len(xs) < 6 else "-", label=label)
        ax.set(title=name[:-4].replace("_", " "), xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=110)
        plt.close(fig)
        self.plots.append(name)


LABELS = {"step": "optimizer step", "elapsed": "wall-clock seconds of training", "ce": "train cross-entropy (nats/token)",
          "max_vio": "MaxVio = max load / mean load - 1 (mean over MoE layers)"}


def write_text_corpus(path: Path) -> Path:
    """Row 2b's plain text file, made from this repository (no download): README.md and every docstring of
    the top-level modules, ~90k characters of English prose about the code."""
    parts = [(ROOT / "README.md").read_text(encoding="utf-8")]
    for module in sorted(ROOT.glob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        parts += [d for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and (d := ast.get_docstring(node))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def run_train(cfg: train.TrainConfig, run_dir: Path) -> tuple[dict, list[dict]]:
    """train.main with cfg as flags, writing into run_dir, its log into run_dir/train.log; returns (summary, the
    logged training rows of metrics.jsonl: step, loss, ce, mtp, balance, lr, tok_per_s, mfu, max_vio, elapsed)."""
    argv = [f"--{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if f.name != "out_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        summary = train.main([*argv, f"--out_dir={run_dir}"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "loss" in r]


def interleaved(fns: dict, repeats: int, warmup: "dict | None" = None) -> tuple[dict, dict]:
    """Warm up (warmup's fns, else fns themselves), then `repeats` rounds A, B, A, B, ...: ({name: median
    seconds}, {name: [result of each call]}). Interleaving spreads slow spells of a shared machine over all
    arms; the median ignores one-off stalls."""
    for fn in (warmup or fns).values():
        fn()
    times, results = {name: [] for name in fns}, {name: [] for name in fns}
    progress = Progress(repeats, "repeat", "    ")
    for _ in range(repeats):
        progress(" / ".join(fns))
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name].append(fn())
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


def fresh_process(needs_base: bool = False):
    """Decorator for the decoding rows: run the row in a new Python process (multiprocessing's spawn, this
    process's thread count) and return its numbers and plots here.

    A decoding step of `tiny` is hundreds of small operations, so its speed depends on the state of the process
    that runs it: after the training rows, decoding in this long-lived process measured slower, and not by the
    same amount for both arms (docs/results_history.md). A fresh process measures what `sample.py` sees. With
    needs_base the base run is trained (or found) here first, so the child reads its checkpoint and this process
    still knows the run."""
    def wrap(row):
        """The row, run in a child process."""
        @functools.wraps(row)
        def run(b: Bench) -> dict:
            """row(b) in a new process: its numbers; its plots are added to b.plots."""
            if needs_base:
                b.run(b.base_arm())
            child = copy.copy(b)
            child.memo, child.plots = {}, []            # loaded models stay here; the child reports its own plots
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                numbers, plots = pool.submit(_row_in_child, row.__name__, child, torch.get_num_threads()).result()
            b.plots += plots
            return numbers
        return run
    return wrap


def _row_in_child(name: str, b: Bench, threads: int) -> tuple[dict, list]:
    """The child's side of fresh_process: the undecorated row `name` with b -> (numbers, plots)."""
    torch.set_num_threads(threads)
    return globals()[name].__wrapped__(b), b.plots


def sync() -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def judge(ratio: float) -> str:
    """How a ratio reads against the noise band: 'clearly above 1', 'clearly below 1' or 'within 5% of 1'."""
    return ("clearly above 1" if ratio > 1 + NOISE else "clearly below 1" if ratio < 1 - NOISE
            else f"within {NOISE:.0%} of 1")


def skipped(why: str, how: str) -> dict:
    """The numbers of a row that could not be measured here: the reason and what would measure it."""
    return {"skipped": why, "how": how}


# ----------------------------------------------------------------------------------------------------
# 4. The rows: one function each, returning numbers
# ----------------------------------------------------------------------------------------------------

def cache_bytes(b: Bench) -> dict:
    """1a. KV-cache bytes per token and layer, read off allocated cache tensors: latent vs per-head (MHA-size)."""
    n = {}
    for preset in ("tiny", "small"):
        args = ModelArgs.preset(preset)
        per = {impl: KVCache(args, 1, 1, attn_impl=impl).bytes_per_token_per_layer() for impl in ("absorb", "naive")}
        n |= {f"{preset}_absorb": per["absorb"], f"{preset}_naive": per["naive"],
              f"{preset}_mha_formula": 4 * kv_cache_numbers_per_token(args)["mha"],
              f"{preset}_ratio": per["absorb"] / per["naive"], f"{preset}_smaller": per["naive"] / per["absorb"]}
    v3 = kv_cache_numbers_per_token(ModelArgs.preset("671B"))
    return n | {"v3_mla": v3["mla"], "v3_mha": v3["mha"], "v3_ratio": v3["mla"] / v3["mha"]}


def decode_rate(model: Transformer, prompts: list[list[int]], n_new: int, impl: str) -> tuple[list, float]:
    """Greedy decoding with sample.decode_steps on attention path `impl`: (new tokens per row, generated
    tokens/s over all rows, prefill excluded: the clock starts when the first token exists)."""
    with sample.attention_path(model, impl):
        steps = sample.decode_steps(model, prompts, n_new, temperature=0.0)
        first = next(steps)                                                   # (B,) from the prefill
        sync()
        t0 = time.perf_counter()
        rest = list(steps)
        sync()
        dt = time.perf_counter() - t0
    return torch.stack([first, *rest], 1).tolist(), len(prompts) * len(rest) / dt


@fresh_process(needs_base=False)
def absorb_decode(b: Bench) -> dict:
    """1b. Absorbed vs naive MLA cache decoding, same random weights: tiny at ~1K context, small at ~2K, batch 1 and 8."""
    n, bu = {"new": b.budget.decode_new}, b.budget
    for preset, context, batches in (("tiny", bu.tiny_context, (1,)), ("small", bu.small_context, (1, 8))):
        args = decode_configs(preset, context, bu.decode_new)["absorb"]
        torch.manual_seed(b.cfg.seed)
        model = Transformer(args).to(b.device).eval()
        read = {impl: KVCache(args, 1, 1, attn_impl=impl).bytes_per_token_per_layer() * args.n_layers
                * (context + bu.decode_new / 2) for impl in ("absorb", "naive")}   # bytes per generated token
        for batch in batches:
            gen = torch.Generator().manual_seed(0)
            prompts = torch.randint(args.vocab_size, (batch, context), generator=gen).tolist()
            fns = {impl: functools.partial(decode_rate, model, prompts, bu.decode_new, impl) for impl in read}
            warm = {impl: functools.partial(decode_rate, model, [p[:16] for p in prompts], 2, impl) for impl in read}
            print(f"    {preset}, context {context}, batch {batch}", flush=True)
            _, runs = interleaved(fns, bu.repeats, warm)
            tok_s = {impl: statistics.median(r[1] for r in runs[impl]) for impl in fns}
            ratio, same = tok_s["absorb"] / tok_s["naive"], runs["absorb"][-1][0] == runs["naive"][-1][0]
            n |= {f"{preset}_b{batch}_{k}": v for k, v in {
                "context": context, "tok_s_absorb": tok_s["absorb"], "tok_s_naive": tok_s["naive"], "ratio": ratio,
                "judge": judge(ratio), "read_absorb_kib": read["absorb"] / 2**10, "read_naive_kib": read["naive"] / 2**10,
                "read_ratio": read["naive"] / read["absorb"], "same_tokens": "yes" if same else "no"}.items()}
        del model
    return n


def equal_budgets(b: Bench, comparison: str, plot: str, names: tuple[str, str]) -> tuple[dict, dict]:
    """Rows 2 and 6c: run the two arms of `comparison`_seconds and `comparison`_tokens (plotting the first against
    wall-clock seconds). Returns the numbers, {s|t}_{loss|steps|tok_s}_{name} and {s|t}_loss_ratio / _judge
    (first arm over second), and the equal-tokens results {name: result}."""
    n = {"seconds": b.budget.seconds_per_arm}
    for kind in ("seconds", "tokens"):
        arms = b.arms[f"{comparison}_{kind}"]
        res = b.run_all(arms, plot if kind == "seconds" else "", x="elapsed")
        pair, k = {name: res[arm.name] for name, arm in zip(names, arms)}, kind[0]
        n |= {f"{k}_{key}_{name}": r[src] for name, r in pair.items()
              for key, src in (("loss", "val_loss"), ("steps", "steps"), ("tok_s", "tok_per_s"))}
        ratio = pair[names[0]]["val_loss"] / pair[names[1]]["val_loss"]
        n |= {f"{k}_loss_ratio": ratio, f"{k}_loss_judge": judge(ratio)}
    t = b.arms[f"{comparison}_tokens"][0].train
    return n | {"tokens": t.max_iters * t.batch_size * t.block_size}, pair


def moe_dense(b: Bench, text: bool) -> dict:
    """2a/2b. MoE vs dense SwiGLU at equal activated parameters: equal seconds and equal tokens (steps)."""
    suffix = "_text" if text else ""
    n, pair = equal_budgets(b, f"moe_vs_dense{suffix}", f"moe_vs_dense{suffix}.png", ("moe", "dense"))
    pm, pd = pair["moe"]["params"], pair["dense"]["params"]                  # the equal-tokens arms
    return n | {"data": "text" if text else "built-in", "tok_ratio": n["s_tok_s_moe"] / n["s_tok_s_dense"],
                "activated_moe": pm["activated"] / 1e6, "activated_dense": pd["activated"] / 1e6,
                "total_moe": pm["total"] / 1e6, "total_dense": pd["total"] / 1e6,
                "dense_inter_dim": pair["dense"]["args"].inter_dim}


def balancing(b: Bench) -> dict:
    """3. Aux-loss-free bias vs auxiliary loss vs no balancing, equal steps: MaxVio at the end, val loss."""
    res = b.run_all(b.arms["balancing"], "balancing.png", y="max_vio")
    vio = {k: r["max_vio_end"] for k, r in res.items()}
    loss = {k: r["val_loss"] for k, r in res.items()}
    return {"vio_bias": vio["base"], "vio_aux": vio["aux_loss"], "vio_none": vio["no_balance"],
            "loss_bias": loss["base"], "loss_aux": loss["aux_loss"], "loss_none": loss["no_balance"],
            "steps": res["base"]["steps"], "bias_gain": vio["no_balance"] / max(vio["base"], 1e-9),
            "aux_gain": vio["no_balance"] / max(vio["aux_loss"], 1e-9),
            "loss_aux_over_bias": loss["aux_loss"] / loss["base"],
            "loss_judge": judge(loss["aux_loss"] / loss["base"]), "alpha": AUX_LOSS_ALPHA}


def mtp_loss(b: Bench) -> dict:
    """4a. Main-head val loss trained with vs without an MTP module, equal steps."""
    res = b.run_all(b.arms["mtp"], "mtp.png")
    base, no = res["base"], res["no_mtp"]
    ratio = base["val_loss"] / no["val_loss"]
    return {"loss_mtp": base["val_loss"], "loss_no_mtp": no["val_loss"], "steps": base["steps"], "ratio": ratio,
            "judge": judge(ratio), "step_cost": no["tok_per_s"] / base["tok_per_s"]}


@fresh_process(needs_base=True)
def mtp_speculative(b: Bench) -> dict:
    """4b. Self-speculative greedy decoding with the trained MTP module vs plain greedy: speed, same tokens."""
    base, bu = b.run(b.base_arm()), b.budget
    model, tok, _ = load_model(base["ckpt"], b.device)
    problems = tasks.heldout_problems(train.corpus_task(base["train"]), bu.spec_prompts, seed=0)
    prompts = [sample.prompt_tokens(tok, p.question) for p in problems]

    def plain(m=model):
        """Plain greedy decoding of every prompt, batch 1, latent cache."""
        return [sample.generate_batch(m, [p], bu.new_tokens, 0.0, eos_id=tok.eos_id, attn_impl="absorb")[0][0]
                for p in prompts]

    def speculative(m=model):
        """Speculative greedy decoding of every prompt: (outputs, SpecStats of each)."""
        with sample.attention_path(m, "absorb"):
            return [sample.speculative_generate(m, p, bu.new_tokens, 0.0, eos_id=tok.eos_id) for p in prompts]

    arms = {"plain": plain, "speculative": speculative}
    if bu.compile_decode:              # the same two arms with the decoding step compiled (sample.py --compile)
        compiled = sample.compile_decoding(load_model(base["ckpt"], b.device)[0])      # same weights
        arms |= {"plain_compiled": lambda: plain(compiled), "speculative_compiled": lambda: speculative(compiled)}
        t0 = time.perf_counter()
        arms["plain_compiled"](), arms["speculative_compiled"]()                     # the compiles happen here
        compile_s = time.perf_counter() - t0
    # under a second per call, and the ratio moved by 10% from run to run with 3 repeats: 3x as many
    t, outs = interleaved(arms, 3 * bu.repeats)
    stats = [s for _, s in outs["speculative"][-1]]
    same = all(outs[p][-1] == [o for o, _ in outs[s][-1]] == outs["plain"][-1]
               for p, s in (("plain", "speculative"), ("plain_compiled", "speculative_compiled")) if p in outs)
    if not same:
        print("    WARNING: speculative decoding did not reproduce plain greedy decoding", flush=True)
    drafts, tokens = sum(s.drafts for s in stats), sum(s.tokens for s in stats)
    r = {"speedup": t["plain"] / t["speculative"], "judge": judge(t["plain"] / t["speculative"]),
         "acceptance": sum(s.accepted for s in stats) / max(drafts, 1), "drafts": drafts, "tokens": tokens,
         "tokens_per_call": tokens / max(sum(s.forwards for s in stats), 1), "prompts": len(prompts),
         "plain_s": t["plain"], "spec_s": t["speculative"], "same_tokens": "yes" if same else "NO"}
    if not bu.compile_decode:
        return r | {"compiled": "compiled arms not measured in quick mode", "compiled_ratio": ""}
    # the compiled arms again at 1 thread: at 2 threads the matrix library splits a round's 2-row products across
    # the threads and the hand-off costs more than the work (F.linear, 2 x 128 input, 512 x 128 weight: 19.9 vs
    # 11.5 us at 1 thread; 1-row products are not split), and the 2-thread figure moves from one process to the
    # next (row 8b reports both thread counts too)
    threads, compiled_arms = torch.get_num_threads(), {k: arms[k] for k in ("plain_compiled", "speculative_compiled")}
    torch.set_num_threads(1)
    try:
        t1, _ = interleaved(compiled_arms, 3 * bu.repeats)
    finally:
        torch.set_num_threads(threads)
    speedup, speedup1 = (x["plain_compiled"] / x["speculative_compiled"] for x in (t, t1))
    return r | {"speedup_compiled": speedup, "plain_compiled_s": t["plain_compiled"], "compile_s": compile_s,
                "spec_compiled_s": t["speculative_compiled"], "speedup_compiled_t1": speedup1,
                "plain_compiled_t1_s": t1["plain_compiled"], "spec_compiled_t1_s": t1["speculative_compiled"],
                "compiled": (f"with the decoding step compiled ({compile_s:.0f} s to compile) "
                             f"{t['speculative_compiled']:.3f} vs {t['plain_compiled']:.3f} s at {threads} threads, "
                             f"{t1['speculative_compiled']:.3f} vs {t1['plain_compiled']:.3f} s at 1 thread"),
                "compiled_ratio": f"; compiled {speedup:.2f}x, at 1 thread {speedup1:.2f}x"}


def fp8_vs_bf16(b: Bench) -> dict:
    """5a. FP8 simulation vs BF16 (V3's baseline) at equal steps, seeds interleaved: relative val-loss gap."""
    seeds = [b.cfg.seed + i for i in range(b.budget.fp8_seeds)]
    res = {}
    for seed in seeds:                                                         # bf16, fp8, bf16, fp8, ...
        pair = [replace(arm, name=f"{arm.name}_s{seed}", train=replace(arm.train, seed=seed)) for arm in b.arms["fp8"]]
        res |= b.run_all(pair)
    bf16, fp8 = ([res[f"{k}_s{s}"]["val_loss"] for s in seeds] for k in ("bf16", "fp8"))
    gaps = [100 * (f - h) / h for f, h in zip(fp8, bf16)]                   # per seed, percent
    b.plot("fp8.png", {a.label: (seeds, [res[f"{a.name}_s{s}"]["val_loss"] for s in seeds]) for a in b.arms["fp8"]},
           "seed", "final val cross-entropy (nats/token)")
    mean_bf16 = statistics.mean(bf16)
    return {"seeds": len(seeds), "steps": b.arms["fp8"][0].train.max_iters, "loss_bf16": mean_bf16,
            "loss_fp8": statistics.mean(fp8), "gap": statistics.mean(gaps), "gap_min": min(gaps), "gap_max": max(gaps),
            "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else float("nan"),
            "bf16_spread": 100 * (max(bf16) - min(bf16)) / mean_bf16,
            "within_v3": "yes" if abs(statistics.mean(gaps)) < 0.25 else "no",
            "tok_s_bf16": statistics.median(res[f"bf16_s{s}"]["tok_per_s"] for s in seeds),
            "tok_s_fp8": statistics.median(res[f"fp8_s{s}"]["tok_per_s"] for s in seeds),
            "per_seed_bf16": bf16, "per_seed_fp8": fp8}


# Row 5b: V3 §3.3.2's accumulation experiment with a matmul that accumulates like an FP8 tensor core,
# f(a (M, K), b (K, N), mantissa_bits, n_c) -> (M, N) float32, promoting its partial sum to FP32 every n_c
# products (n_c=None: never): extras/fp8.py's matmul_limited_acc (a test swaps in a stand-in).
ACCUMULATION_MATMUL = matmul_limited_acc


def accumulation(b: Bench) -> dict:
    """5b. Max relative error of K-long dot products of E4M3 values accumulated with 14 mantissa bits, without
    and with promotion to FP32 every N_C = 128 products, for growing K (V3: nearly 2% at K = 4096 without)."""
    if ACCUMULATION_MATMUL is None:
        return skipped("not measured: no limited-precision accumulation matmul is wired into bench yet",
                       "set extras.bench.ACCUMULATION_MATMUL to model.py's limited-accumulation matmul")
    gen, n, ks = torch.Generator().manual_seed(b.cfg.seed), {}, (256, 1024, 4096, 8192)
    for k in ks:
        x = torch.rand(8, k, generator=gen).to(torch.float8_e4m3fn).float()     # (8, K) on the E4M3 grid
        w = torch.rand(k, 8, generator=gen).to(torch.float8_e4m3fn).float()     # (K, 8)
        ref = x.double() @ w.double()                                          # (8, 8) exact
        for name, n_c in (("plain", None), ("promoted", 128)):
            n[f"{name}_{k}"] = 100 * ((ACCUMULATION_MATMUL(x, w, 14, n_c).double() - ref).abs() / ref).max().item()
    return n | {"growth": ", ".join(f"K={k}: {n[f'plain_{k}']:.2f}% vs {n[f'promoted_{k}']:.3f}%" for k in ks)}


def efficiency(b: Bench) -> dict:
    """6a. Training tokens/s and MFU of the shared tiny run, as train.py measures them."""
    base = b.run(b.base_arm())
    t = base["train"]
    fpt = flops_per_token(base["args"], t.block_size)
    return {"tok_s": base["tok_per_s"], "mfu": 100 * base["mfu"], "mflop_per_token": fpt / 1e6,
            "peak_gflops": base["tok_per_s"] * fpt / base["mfu"] / 1e9 if base["mfu"] else float("nan"),
            "device": b.device, "batch": t.batch_size, "block": t.block_size, "dim": base["args"].dim}


def optimizers(b: Bench) -> dict:
    """6c. Muon for the hidden matrices (train.py's default) vs AdamW for everything (V3 §4.2): val loss at equal
    seconds and at equal steps, and what a step costs."""
    n, _ = equal_budgets(b, "optimizer", "optimizer.png", ("muon", "adamw"))
    return n | {"tok_ratio": n["t_tok_s_muon"] / n["t_tok_s_adamw"]}


def gpu_efficiency(b: Bench, device: str = "cuda", preset: str = "small", steps: "int | None" = None,
                   batch_size: int = 16, block_size: int = 1024, compile_model: "bool | None" = None,
                   n_examples: int = 60000, model: str = "") -> dict:
    """Train `preset` (with the ModelArgs overrides `model`, train.py's --model) on `device` with train.main
    (bf16 autocast on CUDA) and return tokens/s, MFU against the GPU's datasheet peak (train.GPUS), the time
    to the first logged step (compilation) and peak memory. The arguments let a test try it on a CPU."""
    steps = steps or b.budget.gpu_steps
    compile_model = b.cfg.compile if compile_model is None else compile_model
    cfg = train.TrainConfig(preset=preset, model=model, device=device, compile=compile_model, max_iters=steps,
                            batch_size=batch_size, block_size=block_size, n_eval=0, eval_interval=10**9, eval_iters=5,
                            seed=b.cfg.seed, log_interval=max(1, steps // 12), n_examples=n_examples)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    name = "_".join(["gpu", preset] + [re.sub(r"\W+", "-", model)] * bool(model))
    summary, log_rows = run_train(cfg, b.out / "runs" / name)
    steady = log_rows[len(log_rows) // 4:] or log_rows                  # skip compilation and warm-up
    return {"device": device, "name": torch.cuda.get_device_name(device) if cuda else device,
            "peak_desc": train.peak_flops(device)[1], "steps": summary["step"], "seconds": summary["seconds"],
            "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
            "mfu": 100 * statistics.median(r["mfu"] for r in steady), "first_step_s": log_rows[0]["elapsed"],
            "peak_mem": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "tokens_per_step": batch_size * block_size, "compile": compile_model, "val_loss": summary["val_loss"]}


def gpu_mode(b: Bench) -> dict:
    """6b. The GPU mode: `small` with bf16 autocast + torch.compile, tokens/s and MFU vs the datasheet peak, for
    both MLA paths in training (train_attn_impl). Naive (what 'auto' picks for `small`) attends with 12 heads
    of 96 channels and is_causal, which CUDA's FlashAttention kernel takes; absorbed attends with one 288-wide
    latent head under an explicit mask, which it does not (it wants no mask and at most 256 channels), and
    scores 3x the numbers per key. Same weights at the start, same data."""
    if not torch.cuda.is_available():
        return skipped("not measured yet: no CUDA GPU on this machine",
                       "run `python -m extras.bench --only=6b --device=cuda` on a machine with a GPU")
    device = b.device if b.device.startswith("cuda") else "cuda"
    arms, progress = {}, Progress(2, "attention path", "    ")
    for impl in ("naive", "absorb"):                 # naive first: what train.py picks for `small`
        progress(impl)
        arms[impl] = gpu_efficiency(b, device, model=f"train_attn_impl={impl}")
        a = arms[impl]
        print(f"      {impl}: {a['tok_per_s']:,.0f} tok/s, MFU {a['mfu']:.2f}%, first step {a['first_step_s']:.0f} s, "
              f"peak memory {a['peak_mem']:.1f} GiB", flush=True)
    n = arms["absorb"] | {f"naive_{k}": v for k, v in arms["naive"].items()}
    return n | {"naive_over_absorb": n["naive_tok_per_s"] / n["tok_per_s"]}


def grpo_time(b: Bench) -> dict:
    """7. GRPO seconds per step, split into sampling and update, for G = 4, 8, 16 (same start, same questions)."""
    confs = grpo_configs(b.cfg, str(b.run(b.base_arm())["ckpt"]))
    n, progress = {"prompts": b.budget.grpo_prompts, "new_tokens": b.budget.new_tokens}, Progress(len(confs), "G", "    ")
    for g, gcfg in confs.items():
        progress(f"G={g}")
        model, tok, _ = load_model(gcfg.init_from, b.device)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = grpo.make_rl_optimizer(model, gcfg)
        task, rng = grpo.make_task(gcfg), random.Random(gcfg.seed)
        generator = torch.Generator(device=b.device).manual_seed(gcfg.seed)
        reward_fn = functools.partial(tasks.reward, w_acc=gcfg.w_acc, w_fmt=gcfg.w_fmt)

        def draw(k, task=task, rng=rng):
            """k questions from the task's train split, from this G's own copy of the seeded stream."""
            return [task.sample(rng, split="train") for _ in range(k)]
        steps = [grpo.grpo_step(model, ref, optimizer, tok, draw, reward_fn, gcfg, generator=generator, lr=gcfg.lr)
                 for _ in range(b.budget.grpo_steps)]
        timed = steps[1:] or steps                                            # the first step warms up
        n |= {f"g{g}_{k}": statistics.median(s[k] for s in timed) for k in ("sample_s", "update_s")}
    gs = list(confs)
    b.plot("grpo_time.png", {part: (gs, [n[f"g{g}_{part}_s"] for g in gs]) for part in ("sample", "update")},
           "group size G", "seconds per step (median)")
    total = {g: n[f"g{g}_sample_s"] + n[f"g{g}_update_s"] for g in gs}
    return n | {"scale_16_over_4": total[16] / total[4],
                "sample_share_min": 100 * min(n[f"g{g}_sample_s"] / total[g] for g in gs),
                "sample_share_max": 100 * max(n[f"g{g}_sample_s"] / total[g] for g in gs)}


def hf_pair(b: Bench) -> "dict | str":
    """Rows 8a/8b's shared setup (made once): the base checkpoint in tinyseek and, exported by extras/hf.py,
    in transformers' DeepseekV3ForCausalLM, plus a val batch; or a string saying why that is impossible here."""
    if "hf" in b.memo:
        return b.memo["hf"]
    try:
        import transformers

        from extras import hf
    except ImportError as e:
        return b.memo.setdefault("hf", f"skipped: {e}")
    base = b.run(b.base_arm())
    ours, tok, ckpt = load_model(base["ckpt"], b.device)
    try:
        hf.export_hf(ckpt, b.out / "runs" / "hf_export")
    except hf.HFConversionError as e:
        return b.memo.setdefault("hf", f"skipped: the export to the Hugging Face format failed: {e}")
    transformers.logging.set_verbosity_error()      # its load report lists the MTP layers, which it skips
    # from_pretrained's defaults, as a user would call it (it picks the attention and experts kernels)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(b.out / "runs" / "hf_export"),
                                                               dtype=torch.float32).to(b.device)
    _, _, val, _ = train.load_data(base["train"])
    x, y = train.get_batch(val, base["train"], torch.Generator().manual_seed(0), b.device)   # (B, T), (B, T)
    kernels = (f"attention '{theirs.config._attn_implementation}', experts "
               f"'{getattr(theirs.config, '_experts_implementation', 'eager')}'")
    return b.memo.setdefault("hf", {"ours": ours, "theirs": theirs, "tok": tok, "x": x, "y": y, "kernels": kernels,
                                    "version": transformers.__version__, "diff": hf.max_logit_diff(ours.eval(), theirs, x)})


def ours_vs_theirs(b: Bench, what: str, fns: dict, tokens: int, repeats: int) -> dict:
    """Time fns {'ours', 'theirs'} interleaved: tokens/s of both and the speed ratio. When ours is slower,
    profile one call of each (tables in profile_<what>_*.txt) and name the operators with most extra time."""
    t, outs = interleaved(fns, repeats)
    n = {"tok_s_ours": tokens / t["ours"], "tok_s_theirs": tokens / t["theirs"], "speed": t["theirs"] / t["ours"],
         "judge": judge(t["theirs"] / t["ours"]), "outs": outs, "profile": "not profiled (not slower)"}
    if t["ours"] > t["theirs"] * (1 + NOISE):
        from torch.profiler import profile
        ms = {}
        for side, fn in fns.items():
            with profile() as prof:
                fn()
            avg = prof.key_averages()
            (b.out / f"profile_{what}_{side}.txt").write_text(avg.table(sort_by="self_cpu_time_total", row_limit=30))
            ms[side] = {e.key: e.self_cpu_time_total / 1e3 for e in avg}
        o, th = ms["ours"], ms["theirs"]
        n["profile"] = "; ".join(f"{op} {o[op]:.1f} vs {th.get(op, 0):.1f} ms" for op in sorted(
            o, key=lambda op: th.get(op, 0) - o[op])[:4] if o[op] > th.get(op, 0)) + f" (tables: profile_{what}_*.txt)"
    return n


def hf_train(b: Bench) -> dict:
    """8a. A training step (forward, cross-entropy, backward; same batch, same weights) vs transformers."""
    p = hf_pair(b)
    if isinstance(p, str):
        return skipped(p, "install the development requirements (transformers, safetensors)")
    x, y = p["x"], p["y"]

    def step(model, **kw):
        """logits -> cross-entropy -> backward; no optimizer."""
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(x, **kw)
        logits = out[0] if isinstance(out, tuple) else out.logits              # (B, T, V)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    fns = {"ours": functools.partial(step, p["ours"]), "theirs": functools.partial(step, p["theirs"], use_cache=False)}
    n = ours_vs_theirs(b, "train", fns, x.numel(), 2 * b.budget.repeats)      # cheap calls: more repeats
    return {k: v for k, v in n.items() if k != "outs"} | {"batch": x.shape[0], "block": x.shape[1], "diff": p["diff"],
                                                          "version": p["version"], "kernels": p["kernels"]}


@fresh_process(needs_base=True)
def hf_decode(b: Bench) -> dict:
    """8b. Greedy decoding, batch 1, each side with its own KV cache, vs transformers' generate()."""
    p = hf_pair(b)
    if isinstance(p, str):
        return skipped(p, "install the development requirements (transformers, safetensors)")
    ours, theirs, n = p["ours"].eval(), p["theirs"].eval(), b.budget.hf_decode
    prompt = p["x"][0, :32].tolist()

    @torch.no_grad()
    def decode_theirs():
        """transformers' greedy generate() with its own cache, forced to produce n tokens."""
        out = theirs.generate(torch.tensor([prompt], device=b.device), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=p["tok"].eos_id)
        return out[0, len(prompt):].tolist()
    fns = {"ours": lambda: sample.generate_batch(ours, [prompt], n, 0.0)[0][0], "theirs": decode_theirs}
    r = ours_vs_theirs(b, "decode", fns, n, 3 * b.budget.repeats)          # cheap calls: more repeats
    ours_out, theirs_out = (r["outs"][side][-1] for side in ("ours", "theirs"))
    r.pop("outs")
    # min_new_tokens makes transformers forbid EOS until n tokens exist, so it picks another token where we
    # produce EOS: the two greedy outputs are comparable up to our first EOS
    eos = p["tok"].eos_id
    upto = ours_out.index(eos) if eos in ours_out else n
    r |= {"new": n, "prompt": len(prompt), "same_upto": upto,
          "same_tokens": "yes" if ours_out[:upto] == theirs_out[:upto] else "no"}
    if not b.budget.compile_decode:
        return r | {"compiled": "not measured in quick mode", "compiled_ratio": ""}
    return r | compiled_decode_vs_hf(b, fns, prompt, n, ours_out)


def compiled_decode_vs_hf(b: Bench, fns: dict, prompt: list, n: int, eager_out: list) -> dict:
    """8b, continued: the same greedy decoding with tinyseek's per-step path compiled (sample.compile_decoding,
    what `sample.py --compile` does), interleaved with the eager and transformers arms, at the bench's thread
    count and at one thread (a decoding step of tiny is hundreds of small operations, which a second thread
    rarely speeds up). Returns the preformatted text of the results table and the numbers."""
    compiled = sample.compile_decoding(load_model(b.run(b.base_arm())["ckpt"], b.device)[0].eval())  # same weights
    t0 = time.perf_counter()
    compiled_out = sample.generate_batch(compiled, [prompt], n, 0.0)[0][0]       # the compile happens here
    compile_s = time.perf_counter() - t0
    arms = {"ours": fns["ours"], "compiled": lambda: sample.generate_batch(compiled, [prompt], n, 0.0)[0][0],
            "theirs": fns["theirs"]}
    threads, out = torch.get_num_threads(), {"compile_s": compile_s}
    for k in (threads, 1):
        torch.set_num_threads(k)
        try:
            t, _ = interleaved(arms, 3 * b.budget.repeats)
        finally:
            torch.set_num_threads(threads)
        out |= {f"t{k}_tok_s_{arm}": n / t[arm] for arm in arms}
        out |= {f"t{k}_speed_{arm}": t["theirs"] / t[arm] for arm in ("ours", "compiled")}
    same = "yes" if compiled_out == eager_out else "no"
    text = (f"compiled decoding step ({compile_s:.0f} s to compile; same tokens as eager: {same}): "
            f"{out[f't{threads}_tok_s_compiled']:.1f} tok/s at {threads} threads; at 1 thread eager / compiled / "
            f"transformers {out['t1_tok_s_ours']:.1f} / {out['t1_tok_s_compiled']:.1f} / "
            f"{out['t1_tok_s_theirs']:.1f} tok/s")
    ratio = (f"; compiled {out[f't{threads}_speed_compiled']:.2f}x; 1 thread: eager {out['t1_speed_ours']:.2f}x, "
             f"compiled {out['t1_speed_compiled']:.2f}x")
    return out | {"compiled": text, "compiled_ratio": ratio, "compiled_same_tokens": same}


ROWS = {"1a": cache_bytes, "1b": absorb_decode, "2a": functools.partial(moe_dense, text=False),
        "2b": functools.partial(moe_dense, text=True), "3": balancing, "4a": mtp_loss, "4b": mtp_speculative,
        "5a": fp8_vs_bf16, "5b": accumulation, "6a": efficiency, "6b": gpu_mode, "6c": optimizers,
        "7": grpo_time,
        "8a": hf_train, "8b": hf_decode}


# ----------------------------------------------------------------------------------------------------
# 5. Report: the template filled from the numbers -> results.md; the numbers -> results.json
# ----------------------------------------------------------------------------------------------------

def read_template(path: Path = TEMPLATE) -> dict[str, dict[str, str]]:
    """template.md as {section: {key: text}}: a section starts with '## name', then 'key: text' lines."""
    sections, current = {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^## (\S+)\s*$", line):
            current = sections.setdefault(m.group(1), {})
        elif current is not None and (m := re.match(r"^(\w+): (.*)$", line)):
            current[m.group(1)] = m.group(2)
        elif current is not None and line.startswith("- "):
            current.setdefault("items", []).append(line[2:])
    return sections


def fill(template: dict, rid: str, numbers: dict) -> dict:
    """One table row: the row's template section (the 'skipped' one for a skipped row) filled from numbers."""
    section = template["skipped" if "skipped" in numbers else rid]
    return {"id": rid, "comparison": template[rid]["comparison"].format(**numbers),
            **{k: section[k].format(**numbers) for k in ("measured", "ratio", "reading")}}


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def markdown(rows: list[dict], meta: dict, notes: list[str], plots: list[str]) -> str:
    """The results table with its date, machine and command, then the notes and the plots."""
    m = meta["machine"]
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["# tinyseek benchmark: DeepSeek-V3's ideas measured at toy scale", "", f"- date: {meta['date']}",
             f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
             + (f", GPU {m['gpu']}" if m["gpu"] else "") + f"; torch {m['torch']}, Python {m['python']}",
             f"- command: `{meta['command']}`", f"- mode: {meta['mode']}; total time {meta['seconds'] / 60:.1f} min",
             "", "| # | comparison | measured | ratio | reading |", "|---|---|---|---|---|"]
    lines += [f"| {r['id']} | " + " | ".join(cell(r[k]) for k in ("comparison", "measured", "ratio", "reading")) + " |"
              for r in rows]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "Plots:", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def main(argv: "list[str] | None" = None) -> dict:
    """Parse flags, run the selected rows, write results.md, results.json and the plots."""
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n\n")[0])
    print_config(cfg, "bench config")
    template = read_template()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(cfg, pick_device(cfg.device), out)
    t0 = time.perf_counter()
    picked = cfg.selected()
    progress, rows, numbers = Progress(len(picked), "row", ""), [], {}
    for rid in picked:
        progress(f"{rid}: {template[rid]['comparison'][:60]}...")
        numbers[rid] = ROWS[rid](b)
        rows.append(fill(template, rid, numbers[rid]))
        print(f"  {rid}: {rows[-1]['measured']}  ->  {rows[-1]['ratio']}", flush=True)
    args = sys.argv[1:] if argv is None else argv
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": " ".join(["python -m extras.bench", *args]), "mode": "quick" if cfg.quick else "full",
            "seconds": time.perf_counter() - t0, "budget": asdict(budget(cfg))}
    notes = (template["quick"]["items"] if cfg.quick else []) + [
        n.format(noise=NOISE, alpha=AUX_LOSS_ALPHA) for n in template["notes"]["items"]]
    text = markdown(rows, meta, notes, b.plots)
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "numbers": numbers, "notes": notes,
                                                  "plots": b.plots}, indent=2, default=str) + "\n")
    print("\n" + text + f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {len(b.plots)} plots in {out} "
          f"({meta['seconds'] / 60:.1f} min)")
    return {"rows": rows, "numbers": numbers, "meta": meta}


if __name__ == "__main__":
    main()
