"""
tinyseek/extras/bench.py -- DeepSeek-V3's claims, measured side by side on your own machine.

    python -m extras.bench                          # full run (~15-20 min on 2 CPU cores): docs/bench/results.md + plots
    python -m extras.bench --quick                  # every row with tiny budgets (~3 min): a smoke test, not a result
    python -m extras.bench --only=1,3               # a subset of the comparisons
    python -m extras.bench --only=6 --device=cuda   # the GPU row: `small`, bf16 autocast, torch.compile

The DeepSeek reports say each of their ideas pays off at their scale. This script asks whether it does at
ours. Every comparison runs both sides in this one process, on the same data, with the same seed, and the
sides differ in exactly the thing compared: `arm_configs()`, `decode_configs()` and `grpo_configs()` build
every arm from one base, and `check_arms()` refuses to run a pair that differs in anything else (the tests
check the same). The rows:

  1. MLA vs MHA. (a) KV-cache bytes per token and layer, read off the allocated cache tensors: the latent
     cache (absorbed MLA) against the naive path's per-head keys and values, which is what a multi-head
     attention with the same heads caches (plus the V2 formula 2 n_h d_h). (b) Greedy decoding tokens/s after
     a ~1000-token prompt, absorbed vs naive, same weights.
  2. MoE vs dense at equal activated parameters and equal wall-clock: the `tiny` MoE against a model whose
     every layer is a dense SwiGLU, its width solved so both activate the same number of parameters per
     token; both train for the same number of seconds. Val loss reached and tokens/s (moe_vs_dense.png).
  3. Load balancing: the auxiliary-loss-free bias (V3) vs a classic auxiliary loss vs nothing, at equal
     steps: expert-load imbalance MaxVio at the end and val loss (balancing.png).
  4. Multi-Token Prediction: (a) val loss of the main next-token head trained with and without an MTP
     module, equal steps (mtp.png); (b) the MTP module as a draft model: acceptance rate and speed-up of
     self-speculative greedy decoding, which must give exactly the plain greedy text.
  5. FP8 simulation vs fp32: relative val-loss gap after the same number of steps (V3 reports < 0.25% against
     BF16 at scale) and how much the simulation slows a step (fp8.png).
  6. Training efficiency: tokens/s and MFU of `tiny` against a matmul peak measured on this machine; on a
     CUDA GPU, `small` with bf16 autocast and torch.compile against the GPU's spec peak, plus peak memory.
  7. GRPO: seconds per RL step split into sampling and update, for G = 4, 8, 16 (grpo_time.png).
  8. tinyseek vs transformers' `DeepseekV3ForCausalLM` with the same weights (exported by extras/hf.py, so both
     compute the same function): a training step (forward + backward, same batch) and greedy decoding with
     each one's KV cache. When tinyseek is slower, torch.profiler's top operators of both sides say where
     the time goes. Skipped, with the reason, when transformers is not installed.

How to read the ratios. Absolute times on a shared machine are noise; a ratio of two arms measured back to
back is steadier, and timings take the best of several interleaved repeats (other programs only ever slow
a run down). Still, ratios within 5% of 1 are read as "no clear difference". The training comparisons
(rows 2-5) cannot interleave their arms, since each is one call of train.main, so they run one after the
other: a neighbour's job that starts halfway penalises one arm only, and the equal-wall-clock row 2 carries
the most of that noise. The `--quick` budgets only prove that every row runs; read the full run's table.

Outputs in --out_dir (default docs/bench/ in the repository): results.md (the table with date, machine and command),
results.json (every number), the plots, profile_*.txt (row 8), and runs/ with each training arm's train.py
outputs (checkpoint, metrics.jsonl, train.log).
"""

import contextlib
import copy
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import grpo
import tasks
import train
from checkpoint import load_model, read_checkpoint
from cli import parse_config, pick_device, print_config
from model import ModelArgs, Transformer, count_params, kv_cache_numbers_per_token
from sample import (
    attention_path,
    decode_steps,
    generate_batch,
    prompt_tokens,
    speculative_generate,
)

ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.05        # ratios within 5% of 1 are read as "no clear difference"

# ----------------------------------------------------------------------------------------------------
# 1. Configuration and budgets
# ----------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Every flag of `python -m extras.bench`; each field is `--name=value` on the command line."""
    quick: bool = field(default=False, metadata={"help": "tiny budgets everywhere (~3 min on 2 cores): a smoke test"})
    out_dir: str = field(default=str(ROOT / "docs" / "bench"), metadata={"help": "where results and plots go "
                                                                "(a relative path counts from the current folder)"})
    seconds_per_arm: float = field(default=0.0, metadata={"help": "row 2: seconds each arm trains; 0 = the "
                                                                  "mode's default (quick 8, full 90)"})
    steps_per_arm: int = field(default=0, metadata={"help": "rows 3-5: steps each arm trains; 0 = the mode's "
                                                            "default (quick 24, full 200)"})
    device: str = field(default="cpu", metadata={"help": "where the comparisons run: cpu, cuda, cuda:N, mps, auto "
                                                         "(the GPU row runs on CUDA whenever a GPU is visible)"})
    compile: bool = field(default=True, metadata={"help": "GPU row: torch.compile the model"})
    seed: int = field(default=1337, metadata={"help": "one seed for every arm"})
    only: str = field(default="", metadata={"help": "comparisons to run, e.g. 1,3 (empty: all eight)"})

    def __post_init__(self):
        """Reject flags that make no sense, saying what is allowed."""
        if self.seconds_per_arm < 0 or self.steps_per_arm < 0:
            raise ValueError("--seconds_per_arm and --steps_per_arm must be >= 0 (0 = the mode's default)")
        self.selected()

    def selected(self) -> list[int]:
        """The comparison numbers picked by --only (all of 1..8 when empty)."""
        try:
            picked = sorted({int(s) for s in self.only.split(",") if s.strip()}) or list(COMPARISONS)
        except ValueError:
            raise ValueError(f"--only={self.only!r}: give comparison numbers 1-8 separated by commas, "
                             "e.g. --only=1,3") from None
        if not set(picked) <= set(COMPARISONS):
            raise ValueError(f"--only={self.only!r}: the comparisons are numbered 1-8")
        return picked


@dataclass(frozen=True)
class Budget:
    """How much work each comparison does; one instance for --quick, one for the full run."""
    seconds_per_arm: float     # row 2, equal wall-clock
    steps_per_arm: int         # rows 3-5, equal steps
    n_examples: int            # documents in the built-in corpus
    batch_size: int
    block_size: int
    eval_iters: int            # val batches for the final val loss (the same fixed batches for every arm)
    log_interval: int
    decode_prompt: int         # row 1: prompt tokens ("1k context")
    decode_new: int            # row 1: new tokens timed
    repeats: int               # timed repeats, interleaved; the best counts
    spec_prompts: int          # row 4b: held-out questions decoded
    new_tokens: int            # rows 4b and 7: completion length limit
    grpo_prompts: int          # row 7: questions per step
    grpo_steps: int            # row 7: steps per G (the first is a warm-up, not counted)
    hf_decode: int             # row 8: new tokens decoded
    gpu_steps: int             # row 6: steps of `small` on the GPU


QUICK = Budget(seconds_per_arm=8, steps_per_arm=24, n_examples=6000, batch_size=8, block_size=64, eval_iters=5,
               log_interval=2, decode_prompt=1000, decode_new=12, repeats=2, spec_prompts=3, new_tokens=40,
               grpo_prompts=2, grpo_steps=2, hf_decode=24, gpu_steps=30)
FULL = Budget(seconds_per_arm=90, steps_per_arm=200, n_examples=60000, batch_size=16, block_size=128,
              eval_iters=20, log_interval=10, decode_prompt=1000, decode_new=64, repeats=3, spec_prompts=10,
              new_tokens=64, grpo_prompts=8, grpo_steps=3, hf_decode=128, gpu_steps=300)


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
    (empty for the first arm); check_arms() holds the configurations to it."""
    name: str
    label: str
    train: train.TrainConfig
    differs_in: frozenset = frozenset()

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


AUX_LOSS_ALPHA = 0.01
# The classic auxiliary-loss arm: no bias, and the balance loss at alpha = 0.01, the weight the Switch
# Transformer used for the kind of loss V3's bias replaces. V3 itself keeps a 100x smaller term (alpha = 1e-4)
# only against extreme imbalance within one sequence. The loss is V3's sequence-wise form (eq. 17-20), the
# one model.py implements; classic MoEs compute the same product f_i P_i over the whole batch instead.


def arm_configs(cfg: BenchConfig, vocab_size: int = 512) -> dict[str, list[Arm]]:
    """The training arms of rows 2-5, keyed by comparison. Arms named 'base' are one and the same run.

    vocab_size only feeds the dense width solver, where it cancels out (embedding and head are equal)."""
    steps = base_train_config(cfg)                                         # rows 3, 4, 5 (and 6)
    seconds = replace(steps, max_iters=10**9, max_seconds=budget(cfg).seconds_per_arm)   # row 2
    moe = train.model_args_from(seconds, vocab_size)
    dense = {"n_dense_layers": moe.n_layers, "inter_dim": dense_inter_dim(moe)}
    no_balance = {"bias_update_speed": 0.0, "seq_aux_alpha": 0.0}
    return {
        "moe_vs_dense": [
            Arm("moe", "MoE (tiny)", seconds),
            Arm("dense", f"dense SwiGLU (inter_dim {dense['inter_dim']})", with_model(seconds, **dense),
                frozenset(dense))],
        "balancing": [
            Arm("base", "aux-loss-free bias (V3)", steps),
            Arm("aux_loss", f"auxiliary loss (alpha {AUX_LOSS_ALPHA})",
                with_model(steps, bias_update_speed=0.0, seq_aux_alpha=AUX_LOSS_ALPHA), frozenset(no_balance)),
            Arm("no_balance", "no balancing", with_model(steps, **no_balance), frozenset(no_balance))],
        "mtp": [
            Arm("base", "with MTP (D=1)", steps),
            Arm("no_mtp", "without MTP", with_model(steps, mtp_depth=0), frozenset({"mtp_depth"}))],
        "fp8": [
            Arm("base", "fp32", steps),
            Arm("fp8", "FP8 simulation (E4M3, 32-wide blocks)", with_model(steps, fp8=True), frozenset({"fp8"}))],
    }


def config_diff(a, b) -> set[str]:
    """Names of the dataclass fields whose values differ between a and b."""
    return {f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def check_arms(arms: list[Arm], vocab_size: int = 512) -> None:
    """Raise ValueError unless every arm differs from the first exactly in its `differs_in` ModelArgs fields
    and in nothing else of its train.py configuration (data, seed, batch, budget, optimizer...)."""
    first = arms[0]
    for arm in arms[1:]:
        train_diff = config_diff(first.train, arm.train) - {"model"}       # `model` carries the ModelArgs diff
        model_diff = config_diff(first.model_args(vocab_size), arm.model_args(vocab_size))
        if train_diff or model_diff != set(arm.differs_in):
            raise ValueError(f"arm '{arm.name}' should differ from '{first.name}' only in ModelArgs "
                             f"{sorted(arm.differs_in)}, but differs in TrainConfig {sorted(train_diff)} and "
                             f"ModelArgs {sorted(model_diff)}")


def decode_configs(cfg: BenchConfig, vocab_size: int = 512) -> dict[str, ModelArgs]:
    """Row 1's two models: `tiny` with room for the long prompt, differing only in the attention path.

    original_seq_len = max_seq_len keeps YaRN off, as in training (both arms alike in any case)."""
    b = budget(cfg)
    n = b.decode_prompt + b.decode_new
    absorb = ModelArgs.preset("tiny", vocab_size=vocab_size, max_seq_len=n, original_seq_len=n, attn_impl="absorb")
    return {"absorb": absorb, "naive": replace(absorb, attn_impl="naive")}


def grpo_configs(cfg: BenchConfig, init_from: str = "") -> dict[int, grpo.GRPOConfig]:
    """Row 7's GRPO settings for G = 4, 8, 16, differing only in group_size."""
    b = budget(cfg)
    base = grpo.GRPOConfig(init_from=init_from, out_dir="", prompts_per_step=b.grpo_prompts,
                           max_new_tokens=b.new_tokens, max_iters=b.grpo_steps, n_eval=0, device=cfg.device,
                           seed=cfg.seed)
    return {g: replace(base, group_size=g) for g in (4, 8, 16)}


# ----------------------------------------------------------------------------------------------------
# 3. Shared machinery: running arms, timing, reading the ratios
# ----------------------------------------------------------------------------------------------------

class Bench:
    """What the comparisons share: flags, budget, device, output folder, and the training runs (each arm is
    trained once; the 'base' arm serves rows 3, 4, 5, 6, 7 and 8)."""

    def __init__(self, cfg: BenchConfig, device: str, out: Path):
        self.cfg, self.device, self.out, self.budget = cfg, device, out, budget(cfg)
        self.arms = arm_configs(cfg)
        self.runs: dict[str, dict] = {}
        self.plots: list[str] = []
        self.notes: list[str] = []
        self.details: dict = {}

    def base_arm(self) -> Arm:
        """The shared `tiny` run (aux-loss-free balancing, MTP on, fp32)."""
        return self.arms["mtp"][0]

    def run(self, arm: Arm) -> dict:
        """Train `arm` with train.main (once; later calls return the stored result) and read back its results.

        train.py's log goes to runs/<arm>/train.log; the console gets one line per arm."""
        if arm.name in self.runs:
            if self.runs[arm.name]["train"] != arm.train:
                raise ValueError(f"two different configurations are both named '{arm.name}'")
            return self.runs[arm.name]
        run_dir = self.out / "runs" / arm.name
        argv = [f"--{f.name}={getattr(arm.train, f.name)}" for f in fields(arm.train) if f.name != "out_dir"]
        print(f"  training '{arm.name}' ({arm.label}) ...", end=" ", flush=True)
        summary, log_rows = run_train(argv, run_dir)
        steady = [r for r in log_rows if r["step"] > 1] or log_rows      # step 1 includes one-off warm-up
        ckpt = read_checkpoint(run_dir / "ckpt.pt")
        args = ModelArgs(**ckpt["model_args"])
        tail = log_rows[-max(1, len(log_rows) // 4):]                     # the last quarter of the run
        res = {
            "train": arm.train, "args": args, "ckpt": run_dir / "ckpt.pt", "log": log_rows,
            "steps": summary["step"], "seconds": summary["seconds"], "val_loss": summary["val_loss"],
            "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady),
            "max_vio_end": statistics.mean(r["max_vio"] for r in tail),
            "params": count_params(args),
        }
        print(f"{res['steps']} steps in {res['seconds']:.0f} s, val loss {res['val_loss']:.4f}, "
              f"{res['tok_per_s']:,.0f} tok/s", flush=True)
        self.runs[arm.name] = res
        return res

    def run_all(self, arms: list[Arm]) -> dict[str, dict]:
        """check_arms, then run every arm; {arm name: result}."""
        check_arms(arms)
        return {arm.name: self.run(arm) for arm in arms}

    def plot(self, name: str, draw) -> None:
        """Make one figure with draw(plt), save it as out/name, remember it for results.md."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = draw(plt)
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=110)
        plt.close(fig)
        self.plots.append(name)


def run_train(argv: list[str], run_dir: Path) -> tuple[dict, list[dict]]:
    """train.main(argv) writing into run_dir, its log into run_dir/train.log; returns (summary, the logged
    training rows of metrics.jsonl: step, loss, ce, mtp, balance, lr, tok_per_s, mfu, max_vio, elapsed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    with open(run_dir / "train.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        try:
            summary = train.main([*argv, f"--out_dir={run_dir}"])
        finally:                          # train.py switches deterministic algorithms on for CPU runs
            torch.use_deterministic_algorithms(deterministic)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "loss" in r]


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run each fn once to warm up, then `repeats` rounds in turn; returns ({name: best seconds},
    {name: result of the last call}). Interleaving spreads slow spells of the machine over all of them."""
    for fn in fns.values():
        fn()
    best, results = {}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best, results


def verdict(ratio: float, better: str, worse: str, same: str = "no clear difference") -> str:
    """`better` if ratio > 1 + NOISE, `worse` if < 1 - NOISE, else `same`."""
    return better if ratio > 1 + NOISE else worse if ratio < 1 - NOISE else same


def row(rid: str, comparison: str, measured: str, ratio: str, reading: str, **numbers) -> dict:
    """One line of the results table; `numbers` go to results.json only."""
    return {"id": rid, "comparison": comparison, "measured": measured, "ratio": ratio, "reading": reading,
            "numbers": numbers}


# ----------------------------------------------------------------------------------------------------
# 4. The comparisons, one function each
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def timed_decode(model: Transformer, prompt: list[int], n_new: int) -> tuple[list[int], float, float]:
    """Greedy decoding with the KV cache, prefill timed apart from the one-token steps.

    Returns (new tokens, prefill seconds, decode tokens/s). decode_steps yields once after the prefill and
    then after every one-token step, which is where the clock is read."""
    t0 = time.perf_counter()
    steps = decode_steps(model, [prompt], n_new, temperature=0.0)
    out = [next(steps)]
    t1 = time.perf_counter()
    out += list(steps)
    t2 = time.perf_counter()
    return torch.cat(out).tolist(), t1 - t0, (len(out) - 1) / (t2 - t1)


def compare_mla(bench: Bench) -> list[dict]:
    """MLA vs MHA: KV-cache bytes per token, decode speed at ~1k context (absorbed vs naive)."""
    b, confs = bench.budget, decode_configs(bench.cfg)
    torch.manual_seed(bench.cfg.seed)
    models = {"absorb": Transformer(confs["absorb"]).to(bench.device).eval()}
    models["naive"] = Transformer(confs["naive"]).to(bench.device).eval()
    models["naive"].load_state_dict(models["absorb"].state_dict())          # same weights, other cache
    a = confs["absorb"]
    L = a.max_seq_len
    caches = {k: m.new_cache(1, L) for k, m in models.items()}
    per = {k: c.bytes_per_token_per_layer() for k, c in caches.items()}
    total = {k: c.total_bytes() for k, c in caches.items()}
    elem = caches["absorb"].layers[0]["kv"].element_size()
    numbers = kv_cache_numbers_per_token(a)
    mha = numbers["mha"] * elem
    v3 = kv_cache_numbers_per_token(ModelArgs.preset("671B"))
    rows = [row(
        "1a", "MLA vs MHA: KV-cache bytes per token and layer (measured from the cache tensors)",
        f"latent {per['absorb']} B vs naive {per['naive']} B (per-head keys and values, what an MHA with the same "
        f"heads caches; V2 formula 2·n_h·d_h: {mha} B); a {L}-token cache of all {a.n_layers + a.mtp_depth} "
        f"layers: {total['absorb'] / 2**20:.2f} vs {total['naive'] / 2**20:.2f} MiB",
        f"{per['absorb'] / per['naive']:.3f}x",
        f"the latent cache is {per['naive'] / per['absorb']:.1f}x smaller than the MHA-size one "
        f"({per['absorb'] / mha:.1%} of the V2 formula); for V3's own shape the formula gives {v3['mla']} vs "
        f"{v3['mha']} numbers ({v3['mla'] / v3['mha']:.1%})",
        bytes_absorb=per["absorb"], bytes_naive=per["naive"], bytes_mha_formula=mha,
        total_absorb=total["absorb"], total_naive=total["naive"])]

    prompt = torch.randint(a.vocab_size, (b.decode_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {k: functools.partial(timed_decode, m, prompt, b.decode_new) for k, m in models.items()}
    for run in runs.values():
        run()                                                              # warm-up
    tps, prefill, tokens = {}, {}, {}
    for _ in range(b.repeats):                                             # interleaved, best counts
        for k, run in runs.items():
            tokens[k], p, t = run()
            tps[k], prefill[k] = max(t, tps.get(k, 0.0)), min(p, prefill.get(k, float("inf")))
    ratio = tps["absorb"] / tps["naive"]
    same = tokens["absorb"] == tokens["naive"]
    rows.append(row(
        "1b", f"MLA absorbed vs naive (MHA-size cache): greedy decode tokens/s after a {b.decode_prompt}-token "
              "prompt, batch 1",
        f"{tps['absorb']:.1f} vs {tps['naive']:.1f} tok/s over {b.decode_new} new tokens (prefill "
        f"{prefill['absorb']:.2f} vs {prefill['naive']:.2f} s); same tokens: {'yes' if same else 'no'}",
        f"{ratio:.2f}x",
        verdict(ratio, f"absorption decodes {ratio:.2f}x as fast: each step reads the small latent cache instead "
                       "of per-head keys and values",
                f"absorption decodes slower here ({ratio:.2f}x); what it buys at this size is memory (row 1a)",
                "no clear speed difference at this size; what absorption buys here is memory (row 1a)"),
        tok_s_absorb=tps["absorb"], tok_s_naive=tps["naive"], prefill_s_absorb=prefill["absorb"],
        prefill_s_naive=prefill["naive"], same_tokens=same))
    return rows


def compare_moe_dense(bench: Bench) -> list[dict]:
    """MoE vs a dense SwiGLU model with the same activated parameters, same wall-clock."""
    arms = bench.arms["moe_vs_dense"]
    res = bench.run_all(arms)
    moe, dense = res["moe"], res["dense"]
    loss_ratio, speed_ratio = moe["val_loss"] / dense["val_loss"], moe["tok_per_s"] / dense["tok_per_s"]
    pm, pd = moe["params"], dense["params"]

    def draw(plt):
        """MoE and dense train CE against seconds, each arm's final val CE as a dot."""
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for arm in arms:
            r = res[arm.name]
            line, = ax.plot([x["elapsed"] for x in r["log"]], [x["ce"] for x in r["log"]], label=f"{arm.label}: train CE")
            ax.plot([r["seconds"]], [r["val_loss"]], "o", color=line.get_color(), label=f"{arm.label}: final val CE")
        ax.set(xlabel="wall-clock seconds of training", ylabel="cross-entropy (nats/token)",
               title=f"MoE vs dense at {pm['activated'] / 1e6:.2f}M activated parameters, equal seconds")
        ax.legend()
        return fig
    bench.plot("moe_vs_dense.png", draw)
    reading = verdict(1 / loss_ratio, "the MoE reaches the lower val loss in the same seconds",
                      "the dense model reaches the lower val loss in the same seconds",
                      "both reach about the same val loss in the same seconds")
    reading += "; " + verdict(speed_ratio, f"the MoE also processes {speed_ratio:.2f}x the tokens/s",
                              f"the MoE processes only {speed_ratio:.2f}x the dense model's tokens/s (it routes, then "
                              "runs one small matmul per expert where the dense model runs one wide one)",
                              "at about the same tokens/s")
    return [row(
        "2", "MoE vs dense at equal activated parameters and equal wall-clock (tiny)",
        f"val loss {moe['val_loss']:.4f} vs {dense['val_loss']:.4f} after {moe['seconds']:.0f} s "
        f"({moe['steps']} vs {dense['steps']} steps); {moe['tok_per_s']:,.0f} vs {dense['tok_per_s']:,.0f} tok/s; "
        f"{pm['activated'] / 1e6:.3f}M vs {pd['activated'] / 1e6:.3f}M activated, {pm['total'] / 1e6:.2f}M vs "
        f"{pd['total'] / 1e6:.2f}M total",
        f"loss {loss_ratio:.3f}x, tok/s {speed_ratio:.2f}x", reading,
        val_loss_moe=moe["val_loss"], val_loss_dense=dense["val_loss"], tok_s_moe=moe["tok_per_s"],
        tok_s_dense=dense["tok_per_s"], steps_moe=moe["steps"], steps_dense=dense["steps"],
        activated_moe=pm["activated"], activated_dense=pd["activated"], dense_inter_dim=dense["args"].inter_dim)]


def compare_balancing(bench: Bench) -> list[dict]:
    """Aux-loss-free bias vs auxiliary loss vs no balancing: MaxVio and val loss at equal steps."""
    arms = bench.arms["balancing"]
    res = bench.run_all(arms)
    free, aux, none = res["base"], res["aux_loss"], res["no_balance"]

    def draw(plt):
        """MaxVio over steps, one line per balancing arm."""
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for arm in arms:
            r = res[arm.name]
            ax.plot([x["step"] for x in r["log"]], [x["max_vio"] for x in r["log"]], label=arm.label)
        ax.set(xlabel="optimizer step", ylabel="MaxVio = max load / mean load - 1 (mean over MoE layers)",
               title="Expert-load imbalance during training")
        ax.legend()
        return fig
    bench.plot("balancing.png", draw)
    vio_gain = none["max_vio_end"] / max(free["max_vio_end"], 1e-9)
    loss_vs_aux = aux["val_loss"] / free["val_loss"]
    aux_gain = none["max_vio_end"] / max(aux["max_vio_end"], 1e-9)
    reading = verdict(vio_gain, f"the bias cuts MaxVio {vio_gain:.1f}x against no balancing",
                      "the bias leaves the load more imbalanced than no balancing at this budget",
                      "the bias barely changes MaxVio at this budget")
    reading += f" (the auxiliary loss: {aux_gain:.1f}x); " + verdict(
        loss_vs_aux, "its val loss is lower than with the auxiliary loss", "its val loss is higher than with the "
        "auxiliary loss", "its val loss is about that of the auxiliary loss")
    return [row(
        "3", "Load balancing at equal steps: aux-loss-free bias vs auxiliary loss vs none",
        f"MaxVio at the end (last quarter of the run) {free['max_vio_end']:.2f} / {aux['max_vio_end']:.2f} / "
        f"{none['max_vio_end']:.2f}; val loss {free['val_loss']:.4f} / {aux['val_loss']:.4f} / "
        f"{none['val_loss']:.4f} ({free['steps']} steps each)",
        f"MaxVio none/bias {vio_gain:.2f}x; loss aux/bias {loss_vs_aux:.3f}x", reading,
        max_vio={k: r["max_vio_end"] for k, r in res.items()}, val_loss={k: r["val_loss"] for k, r in res.items()},
        aux_alpha=AUX_LOSS_ALPHA)]


def compare_mtp(bench: Bench) -> list[dict]:
    """MTP: main-head val loss with and without, equal steps; speculative decoding with the MTP draft."""
    arms = bench.arms["mtp"]
    res = bench.run_all(arms)
    base, no = res["base"], res["no_mtp"]

    def draw(plt):
        """Main-head train CE over steps with and without MTP, final val CE as dots."""
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for arm in arms:
            r = res[arm.name]
            line, = ax.plot([x["step"] for x in r["log"]], [x["ce"] for x in r["log"]], label=f"{arm.label}: train CE")
            ax.plot([r["steps"]], [r["val_loss"]], "o", color=line.get_color(), label=f"{arm.label}: final val CE")
        ax.set(xlabel="optimizer step", ylabel="next-token cross-entropy (nats/token)",
               title="Main next-token head, trained with and without MTP")
        ax.legend()
        return fig
    bench.plot("mtp.png", draw)
    ratio, cost = base["val_loss"] / no["val_loss"], no["tok_per_s"] / base["tok_per_s"]
    rows = [row(
        "4a", "MTP: main-head val loss with vs without an MTP module, equal steps",
        f"val loss {base['val_loss']:.4f} vs {no['val_loss']:.4f} after {base['steps']} steps; a step costs "
        f"{cost:.2f}x with MTP",
        f"{ratio:.3f}x",
        verdict(1 / ratio, "the MTP objective helps the main head at equal steps",
                "the MTP objective hurts the main head at equal steps",
                "no clear effect of MTP on the main head at this scale") + f", at {cost:.2f}x the step time",
        val_loss_mtp=base["val_loss"], val_loss_no_mtp=no["val_loss"], step_cost=cost)]

    # ---- speculative decoding with the trained MTP module as the draft ----
    b = bench.budget
    model, tok, _ = load_model(base["ckpt"], bench.device)
    problems = tasks.heldout_problems(train.corpus_task(base["train"]), b.spec_prompts, seed=0)
    prompts = [prompt_tokens(tok, p.question) for p in problems]
    stats = []

    def plain():
        """Plain greedy decoding of every prompt, one at a time, latent cache."""
        return [generate_batch(model, [p], b.new_tokens, 0.0, eos_id=tok.eos_id, attn_impl="absorb")[0][0]
                for p in prompts]

    def speculative():
        """Speculative greedy decoding of every prompt; fills `stats` with one SpecStats each."""
        stats.clear()
        with attention_path(model, "absorb"):
            outs = []
            for p in prompts:
                out, s = speculative_generate(model, p, b.new_tokens, 0.0, eos_id=tok.eos_id)
                outs.append(out)
                stats.append(s)
        return outs

    best, outs = best_times({"plain": plain, "speculative": speculative}, b.repeats)
    drafts, accepted = sum(s.drafts for s in stats), sum(s.accepted for s in stats)
    forwards, n_tokens = sum(s.forwards for s in stats), sum(s.tokens for s in stats)
    acceptance, speedup = accepted / max(drafts, 1), best["plain"] / best["speculative"]
    same = outs["plain"] == outs["speculative"]
    rows.append(row(
        "4b", "MTP as a draft model: self-speculative greedy decoding vs plain (absorbed cache, batch 1)",
        f"{acceptance:.1%} of {drafts} drafts accepted, {n_tokens / max(forwards, 1):.2f} tokens per main-model "
        f"call; {n_tokens} tokens on {len(prompts)} held-out questions in {best['speculative']:.2f} vs "
        f"{best['plain']:.2f} s; same text: {'yes' if same else 'no'}",
        f"{speedup:.2f}x",
        f"V3 reports 85-90% acceptance and 1.8x tokens/s; here {acceptance:.0%} and {speedup:.2f}x: "
        + verdict(speedup, "drafting pays off", "drafting costs more than it saves (each round adds an MTP block "
                  "call to a 2-token verify call)", "drafting breaks even"),
        acceptance=acceptance, speedup=speedup, drafts=drafts, tokens=n_tokens, same_text=same))
    return rows


def compare_fp8(bench: Bench) -> list[dict]:
    """FP8 simulation vs fp32: relative val-loss gap and step-time overhead at equal steps."""
    arms = bench.arms["fp8"]
    res = bench.run_all(arms)
    base, fp8 = res["base"], res["fp8"]
    gap = (fp8["val_loss"] - base["val_loss"]) / base["val_loss"]
    overhead = base["tok_per_s"] / fp8["tok_per_s"]

    def draw(plt):
        """Train CE of both arms over steps, and their relative gap."""
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for arm in arms:
            r = res[arm.name]
            a1.plot([x["step"] for x in r["log"]], [x["ce"] for x in r["log"]], label=arm.label)
        a1.set(xlabel="optimizer step", ylabel="train cross-entropy (nats/token)", title="FP8 simulation vs fp32")
        a1.legend()
        steps = [x["step"] for x in base["log"]]
        rel = [100 * (f["ce"] - b["ce"]) / b["ce"] for b, f in zip(base["log"], fp8["log"])]
        a2.plot(steps, rel)
        a2.axhline(0.25, color="gray", ls=":", label="V3's reported bound at scale (+-0.25%)")
        a2.axhline(-0.25, color="gray", ls=":")
        a2.set(xlabel="optimizer step", ylabel="(FP8 - fp32) / fp32 train CE (%)", title="Relative loss gap")
        a2.legend()
        return fig
    bench.plot("fp8.png", draw)
    within = abs(gap) < 0.0025
    return [row(
        "5", "FP8 simulation (E4M3, fine-grained scales) vs fp32, equal steps",
        f"val loss {fp8['val_loss']:.4f} vs {base['val_loss']:.4f} after {base['steps']} steps; "
        f"{fp8['tok_per_s']:,.0f} vs {base['tok_per_s']:,.0f} tok/s",
        f"gap {100 * gap:+.2f}%, step time {overhead:.2f}x",
        ("within" if within else "outside") + f" V3's < 0.25% (reported against BF16 at scale, where "
        f"run-to-run noise is smaller than ours); a step takes {overhead:.2f}x as long: the simulation reproduces "
        "FP8's rounding in software, not its speed",
        rel_gap=gap, val_loss_fp8=fp8["val_loss"], val_loss_fp32=base["val_loss"], step_time_ratio=overhead)]


def gpu_efficiency(bench: Bench, device: str = "cuda", preset: str = "small", steps: "int | None" = None,
                   batch_size: int = 16, block_size: int = 1024, compile_model: "bool | None" = None,
                   n_examples: int = 60000) -> dict:
    """Train `preset` for a few hundred steps on `device` (bf16 autocast on CUDA, as train.py does there) and
    return tokens/s, MFU against the GPU's spec peak, and peak memory. Arguments other than `bench` exist so
    the same path can be tried on a CPU with a small preset."""
    steps = steps or bench.budget.gpu_steps
    compile_model = bench.cfg.compile if compile_model is None else compile_model
    argv = [f"--preset={preset}", f"--device={device}", f"--compile={compile_model}", f"--max_iters={steps}",
            "--max_seconds=0", f"--batch_size={batch_size}", f"--block_size={block_size}", "--n_eval=0",
            "--eval_interval=1000000000", "--eval_iters=5", f"--log_interval={max(1, steps // 12)}",
            f"--n_examples={n_examples}", f"--seed={bench.cfg.seed}"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    print(f"  training '{preset}' on {device} for {steps} steps ...", flush=True)
    summary, log_rows = run_train(argv, bench.out / "runs" / f"gpu_{preset}")
    steady = log_rows[len(log_rows) // 4:] or log_rows                  # skip compilation and warm-up
    return {"device": device, "name": torch.cuda.get_device_name(device) if cuda else device,
            "peak_desc": train.peak_flops(device)[1], "steps": summary["step"], "seconds": summary["seconds"],
            "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady),
            "peak_mem": torch.cuda.max_memory_allocated(device) if cuda else None,
            "tokens_per_step": batch_size * block_size, "compile": compile_model, "val_loss": summary["val_loss"]}


def compare_efficiency(bench: Bench) -> list[dict]:
    """Training throughput and MFU: tiny on this run's device; small on a CUDA GPU when there is one."""
    base = bench.run(bench.base_arm())
    t = base["train"]
    fpt = train.flops_per_token(base["args"], t.block_size)
    steady = [r for r in base["log"] if r["step"] > 1] or base["log"]
    mid = sorted(steady, key=lambda r: r["tok_per_s"])[len(steady) // 2]
    peak = mid["tok_per_s"] * fpt / mid["mfu"] if mid["mfu"] else float("nan")   # the peak train.py measured
    rows = [row(
        "6a", f"Training efficiency of tiny on {bench.device} (batch {t.batch_size} x {t.block_size} tokens)",
        f"{base['tok_per_s']:,.0f} tok/s, {fpt / 1e6:.1f} MFLOP per token, MFU {100 * base['mfu']:.2f}% of "
        f"{peak / 1e9:.1f} GFLOP/s" + (" (fp32 1024x1024 matmul measured on this CPU)" if bench.device == "cpu"
                                      else ""),
        f"MFU {100 * base['mfu']:.2f}%",
        f"training runs at {base['mfu']:.1%} of the rate a 1024x1024 matmul reaches on this machine; tiny's "
        f"matrices are {base['args'].dim} wide",
        tok_s=base["tok_per_s"], mfu=base["mfu"], peak_flops=peak, flops_per_token=fpt)]
    cmd = "python -m extras.bench --only=6 --device=cuda"
    if not torch.cuda.is_available():
        rows.append(row("6b", "Training efficiency of small on a CUDA GPU (bf16 autocast, torch.compile)",
                        "not measured yet: no CUDA GPU on this machine", "-",
                        f"run `{cmd}` on a machine with a GPU", gpu_measured=False))
        return rows
    device = bench.device if bench.device.startswith("cuda") else "cuda"
    g = gpu_efficiency(bench, device)
    bench.details["gpu"] = g
    rows.append(row(
        "6b", f"Training efficiency of small on {g['name']} (bf16 autocast{', torch.compile' if g['compile'] else ''}, "
              f"batch {g['tokens_per_step']:,} tokens)",
        f"{g['tok_per_s']:,.0f} tok/s, MFU {100 * g['mfu']:.1f}% ({g['peak_desc']}); peak memory "
        f"{g['peak_mem'] / 2**30:.2f} GiB; {g['steps']} steps in {g['seconds']:.0f} s",
        f"MFU {100 * g['mfu']:.1f}%",
        "measured on this GPU with `" + cmd + "`; the MoE dispatch loops over experts in Python, which a GPU "
        "feels more than a CPU", gpu_measured=True, **{k: v for k, v in g.items() if isinstance(v, (int, float))}))
    return rows


def compare_grpo(bench: Bench) -> list[dict]:
    """GRPO: seconds per RL step, split into sampling and update, for G = 4, 8, 16."""
    base = bench.run(bench.base_arm())
    confs = grpo_configs(bench.cfg, str(base["ckpt"]))
    per_g = {}
    for g, gcfg in confs.items():
        model, tok, _ = load_model(gcfg.init_from, bench.device)               # the same start for every G
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = grpo.make_rl_optimizer(model, gcfg)
        task, rng = grpo.make_task(gcfg), random.Random(gcfg.seed)           # the same questions for every G
        generator = torch.Generator(device=bench.device).manual_seed(gcfg.seed)
        reward_fn = functools.partial(tasks.reward, w_acc=gcfg.w_acc, w_fmt=gcfg.w_fmt)

        def draw_problems(n, task=task, rng=rng):
            """n questions from the task's train split, from this G's own copy of the seeded stream."""
            return [task.sample(rng, split="train") for _ in range(n)]
        steps = [grpo.grpo_step(model, ref, optimizer, tok, draw_problems, reward_fn, gcfg, generator=generator,
                                lr=grpo.rl_lr_at(s, gcfg)) for s in range(gcfg.max_iters)]
        timed = steps[1:] or steps                                            # the first step warms up
        per_g[g] = {k: statistics.mean(s[k] for s in timed) for k in ("sample_s", "update_s", "length", "accuracy")}
        print(f"  G={g}: sampling {per_g[g]['sample_s']:.2f} s + update {per_g[g]['update_s']:.2f} s per step",
              flush=True)
    bench.details["grpo"] = per_g

    def draw(plt):
        """Stacked bars: sampling and update seconds per step for each G."""
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = [f"G={g}" for g in per_g]
        sample = [v["sample_s"] for v in per_g.values()]
        ax.bar(names, sample, label="sampling (KV-cache generation)")
        ax.bar(names, [v["update_s"] for v in per_g.values()], bottom=sample, label="update (forward + backward)")
        ax.set(xlabel="group size G (completions per question)", ylabel="seconds per GRPO step",
               title=f"GRPO step time, {bench.budget.grpo_prompts} questions per step")
        ax.legend()
        return fig
    bench.plot("grpo_time.png", draw)
    total = {g: v["sample_s"] + v["update_s"] for g, v in per_g.items()}
    scale = total[16] / total[4]
    share = {g: per_g[g]["sample_s"] / total[g] for g in per_g}
    p = bench.budget.grpo_prompts
    return [row(
        "7", f"GRPO seconds per step, sampling + update ({p} questions x G completions, up to "
             f"{bench.budget.new_tokens} tokens)",
        "; ".join(f"G={g}: {v['sample_s']:.2f} + {v['update_s']:.2f} s" for g, v in per_g.items()),
        f"G=16 / G=4: {scale:.2f}x",
        f"4x the completions cost {scale:.2f}x the time ("
        + ("batching makes each completion cheaper" if scale < 4 * (1 - NOISE) else "no batching gain")
        + f"); sampling takes {min(share.values()):.0%}-{max(share.values()):.0%} of a step",
        per_g={str(g): v for g, v in per_g.items()}, scale_16_over_4=scale)]


def profile_ops(fn, path: Path) -> tuple[dict[str, tuple[float, int]], float]:
    """Profile one call of fn with torch.profiler and write its operator table to path.

    Returns ({operator: (self CPU milliseconds, calls)}, wall-clock milliseconds of the call)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = 1e3 * (time.perf_counter() - t0)
    avg = prof.key_averages()
    path.write_text(avg.table(sort_by="self_cpu_time_total", row_limit=30))
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in avg}, wall


def where_time_goes(ours: tuple, theirs: tuple, k: int = 4) -> str:
    """Two profile_ops results side by side: wall time, time inside operators, calls, then the k operators
    with the most extra time in ours. Wall time not spent in operators is Python and dispatch overhead."""
    (o, o_wall), (t, t_wall) = ours, theirs

    def ms(ops, op):
        """Self CPU milliseconds of op in a profile (0 if absent)."""
        return ops.get(op, (0.0, 0))[0]

    def calls(ops, op):
        """Calls of op in a profile (0 if absent)."""
        return ops.get(op, (0.0, 0))[1]
    extra = [op for op in sorted(set(o) | set(t), key=lambda op: ms(t, op) - ms(o, op))[:k] if ms(o, op) > ms(t, op)]
    op_ms = [sum(v[0] for v in ops.values()) for ops in (o, t)]
    n = [sum(v[1] for v in ops.values()) for ops in (o, t)]
    text = (f"profiled call {o_wall:.0f} vs {t_wall:.0f} ms wall, of which {op_ms[0]:.0f} vs {op_ms[1]:.0f} ms inside "
            f"{n[0]:,} vs {n[1]:,} operator calls; ")
    if not extra:
        return text + "no operator takes longer in tinyseek"
    return text + "most extra operator time in " + ", ".join(
        f"{op} {ms(o, op):.1f} vs {ms(t, op):.1f} ms ({calls(o, op)} vs {calls(t, op)} calls)" for op in extra)


def compare_transformers(bench: Bench) -> list[dict]:
    """tinyseek vs transformers' DeepseekV3ForCausalLM, same weights: training step and greedy decoding."""
    comparison = "tinyseek vs transformers' DeepseekV3ForCausalLM (same weights)"
    try:
        import transformers

        from extras import hf
    except ImportError as e:
        return [row("8", comparison, f"skipped: {e}", "-", "pip install transformers safetensors to compare")]
    base = bench.run(bench.base_arm())
    b, device = bench.budget, bench.device
    ours, tok, ckpt = load_model(base["ckpt"], device)
    export_dir = bench.out / "runs" / "hf_export"
    try:
        hf.export_hf(ckpt, export_dir)                                       # needs safetensors too
    except hf.HFConversionError as e:
        return [row("8", comparison, f"skipped: {e}", "-", "the export to the Hugging Face format failed")]
    log = transformers.utils.logging
    level, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()        # the load report lists the MTP layers, which DeepseekV3ForCausalLM skips
    log.disable_progress_bar()
    try:
        # from_pretrained's defaults, as a user would call it (it picks the attention and experts kernels)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).to(device)
        theirs.eval()
        kernels = (f"attention '{theirs.config._attn_implementation}', experts "
                   f"'{getattr(theirs.config, '_experts_implementation', 'eager')}'")
        _, _, val, _ = train.load_data(base["train"])
        x, y = train.get_batch(val, base["train"], torch.Generator().manual_seed(0), device)
        diff = hf.max_logit_diff(ours.eval(), theirs, x)

        # ---- training step: forward, cross-entropy, backward; the same batch; no optimizer ----
        def train_ours():
            """tinyseek: logits -> cross-entropy -> backward."""
            ours.train()
            ours.zero_grad(set_to_none=True)
            logits, _ = ours(x)                                              # (B, T, V); no MTP without targets
            F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()

        def train_theirs():
            """transformers: the same, without its KV cache."""
            theirs.train()
            theirs.zero_grad(set_to_none=True)
            logits = theirs(input_ids=x, use_cache=False).logits             # (B, T, V)
            F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()

        train_fns = {"ours": train_ours, "theirs": train_theirs}
        t_train, _ = best_times(train_fns, 2 * b.repeats)                     # cheap calls: more repeats

        # ---- greedy decoding with each one's KV cache ----
        ours.eval()
        theirs.eval()
        prompt = x[0, :32].tolist()
        n = b.hf_decode

        def decode_ours():
            """tinyseek's greedy decoding with the latent KV cache."""
            return generate_batch(ours, [prompt], n, 0.0)[0][0]

        @torch.no_grad()
        def decode_theirs():
            """transformers' greedy generate() with its own cache, forced to produce n tokens."""
            out = theirs.generate(torch.tensor([prompt], device=device), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=tok.eos_id)
            return out[0, len(prompt):].tolist()
        t_dec, outs = best_times({"ours": decode_ours, "theirs": decode_theirs}, b.repeats)
        same = outs["ours"] == outs["theirs"]

        # ---- where the time goes, when tinyseek is the slower one ----
        notes = []
        for what, fns, t in (("train", train_fns, t_train),
                             ("decode", {"ours": decode_ours, "theirs": decode_theirs}, t_dec)):
            if t["ours"] > t["theirs"] * (1 + NOISE):
                ops = {side: profile_ops(fn, bench.out / f"profile_{what}_{side}.txt") for side, fn in fns.items()}
                notes.append(f"Row 8 ({what}): tinyseek is slower. torch.profiler, tinyseek vs transformers: "
                             f"{where_time_goes(ops['ours'], ops['theirs'])}. Tables: profile_{what}_*.txt.")
    finally:
        log.set_verbosity(level)
        if bar:
            log.enable_progress_bar()
    bench.notes += notes
    speed_train, speed_dec = t_train["theirs"] / t_train["ours"], t_dec["theirs"] / t_dec["ours"]
    t = base["train"]
    tokens = t.batch_size * t.block_size

    def reading(speed):
        """The reading for a speed ratio (transformers' time / ours)."""
        return verdict(speed, f"tinyseek is {speed:.2f}x as fast", f"tinyseek is slower, {speed:.2f}x: where the "
                       "time goes is in the notes below", "about the same speed")
    bench.details["transformers"] = {"version": transformers.__version__, "kernels": kernels}
    return [
        row("8a", f"{comparison}: training step, forward + backward of {t.batch_size} x {t.block_size} tokens "
                  f"(transformers {transformers.__version__}: {kernels})",
            f"{tokens / t_train['ours']:,.0f} vs {tokens / t_train['theirs']:,.0f} tok/s; max |logit difference| "
            f"{diff:.1e}", f"{speed_train:.2f}x", reading(speed_train),
            tok_s_ours=tokens / t_train["ours"], tok_s_theirs=tokens / t_train["theirs"], max_logit_diff=diff),
        row("8b", f"{comparison}: greedy decoding of {n} tokens after {len(prompt)}, batch 1, KV caches",
            f"{n / t_dec['ours']:.1f} vs {n / t_dec['theirs']:.1f} tok/s; same tokens: {'yes' if same else 'no'}",
            f"{speed_dec:.2f}x", reading(speed_dec),
            tok_s_ours=n / t_dec["ours"], tok_s_theirs=n / t_dec["theirs"], same_tokens=same)]


COMPARISONS = {1: compare_mla, 2: compare_moe_dense, 3: compare_balancing, 4: compare_mtp, 5: compare_fp8,
               6: compare_efficiency, 7: compare_grpo, 8: compare_transformers}


# ----------------------------------------------------------------------------------------------------
# 5. Report: results.md, results.json
# ----------------------------------------------------------------------------------------------------

def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cell(text) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], meta: dict, notes: list[str], plots: list[str]) -> str:
    """The results table with its date, machine and command, the notes and the plots."""
    m = meta["machine"]
    lines = [
        "# tinyseek benchmark: DeepSeek-V3's ideas measured at toy scale", "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if m["gpu"] else "") + f"; torch {m['torch']}, Python {m['python']}, {m['os']}",
        f"- command: `{meta['command']}`",
        f"- mode: {meta['mode']}; total time {meta['seconds'] / 60:.1f} min", "",
        "| # | comparison | measured | ratio | reading |", "|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {cell(r['comparison'])} | {cell(r['measured'])} | {cell(r['ratio'])} | "
              f"{cell(r['reading'])} |" for r in rows]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "Plots:", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def standard_notes(cfg: BenchConfig) -> list[str]:
    """What every reader of the table should know."""
    notes = [
        ("Each comparison runs its arms in one process, on the same data and seed, differing only in the thing "
         "compared (bench.check_arms). Times are best-of interleaved repeats where the arms can be interleaved; "
         "training arms run one after the other, so a busy machine can penalise one arm only (row 2 most). "
         f"Ratios within {NOISE:.0%} of 1 are read as no clear difference."),
        ("Row 2: the MTP module is the same MoE block in both arms (model.py builds MTP blocks as MoE blocks); "
         "count_params leaves it out of the activated parameters of both."),
        (f"Row 3: the auxiliary-loss arm uses V3's sequence-wise balance loss (eq. 17-20) at alpha={AUX_LOSS_ALPHA} "
         "without the bias; MaxVio is the mean over MoE layers of one step's max load / mean load - 1, averaged "
         "over the last quarter of the logged steps."),
        "Rows 4b, 7, 8 use the checkpoint of the shared `tiny` run of rows 3-5 (runs/base).",
    ]
    if cfg.quick:
        notes.insert(0, "QUICK MODE: tiny budgets that only prove every row runs; these numbers are not results.")
    return notes


def main(argv: "list[str] | None" = None) -> dict:
    """Parse flags, run the selected comparisons, write results.md, results.json and the plots."""
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n\n")[0])
    print_config(cfg, "bench config")
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(cfg, device, out)
    t0 = time.perf_counter()
    rows = []
    for number in cfg.selected():
        fn = COMPARISONS[number]
        print(f"==== {number}. {fn.__doc__.splitlines()[0]}", flush=True)
        t = time.perf_counter()
        new = fn(bench)
        for r in new:
            print(f"  {r['id']}: {r['measured']}  ->  {r['ratio']}", flush=True)
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
        rows += new
    args = sys.argv[1:] if argv is None else argv
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": " ".join(["python -m extras.bench", *args]), "mode": "quick" if cfg.quick else "full",
            "seconds": time.perf_counter() - t0, "budget": budget(cfg).__dict__}
    notes = standard_notes(cfg) + bench.notes
    text = markdown(rows, meta, notes, bench.plots)
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "notes": notes, "plots": bench.plots,
                                                  "details": bench.details}, indent=2, default=str) + "\n")
    print("\n" + text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(bench.plots)} plots in {out} "
          f"({meta['seconds'] / 60:.1f} min)")
    return {"rows": rows, "meta": meta}


if __name__ == "__main__":
    main()
