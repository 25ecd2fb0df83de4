"""
tinyseek/extras/cost.py -- what does training a model cost? Check DeepSeek-V3's "$5.576M" from first principles.

    python -m extras.cost                                   # V3 (671B) on 14.8T tokens, H800s at 40% MFU, $2/GPU-hour
    python -m extras.cost --mfu=0.3 --gpu=H100 --price=2.5
    python -m extras.cost --gpu_hours=2.664e6               # the MFU a budget of GPU-hours implies
    python -m extras.cost --preset=small --tokens=2e9 --gpu="RTX 4090" --seq_len=1024

The estimate, step by step:
  1. FLOPs per token. Training costs about 6 FLOPs per token for every weight the token passes through: 2 in
     the forward matmul (one multiply, one add) and 4 in the backward (the gradient for the input and the
     gradient for the weight). An MoE token only passes through its shared and K routed experts, so the
     *activated* parameters count, not the total. The embedding is a table lookup, not a matmul: left out.
     Attention adds matmuls without weights, the scores Q K^T and the weighted sum of the values:
     6 x layers x heads x (qk_head_dim + v_head_dim) x seq_len per token.
  2. Total FLOPs = FLOPs per token x training tokens.
  3. GPU-hours = total FLOPs / (peak FLOP/s of one GPU x MFU) / 3600. MFU, model FLOPs utilisation, is the
     share of the chip's peak that the model's own FLOPs reach: communication, memory-bound kernels,
     pipeline bubbles and recomputation keep it well below 1 (large BF16 runs report roughly 30-50%).
  4. Cost = GPU-hours x rental price per GPU-hour.

What DeepSeek published (DeepSeek-V3 technical report, arXiv 2412.19437, §1 and Table 1): 2.788M H800
GPU-hours in all = 2664K pre-training + 119K context extension + 5K post-training; at an assumed rental
price of $2 per GPU-hour that is $5.576M. Pre-training covered 14.8T tokens at "180K H800 GPU hours" per
trillion tokens (180K x 14.8 = 2664K), i.e. 3.7 days per trillion tokens on their cluster of 2048 H800s.
V3 trained in FP8 (most matmuls; attention, embedding, output head and a few others stay in higher
precision), so the fair peak lies between the BF16 and the FP8 figure; this script prints both.

What such an estimate leaves out -- the very point argued about. The report itself says these costs
"include only the official training of DeepSeek-V3, excluding the costs associated with prior research and
ablation experiments on architectures, algorithms, or data". Not in it:
  - research and ablation runs, and any failed or restarted runs before the final one;
  - data work: collecting, filtering and deduplicating 14.8T tokens, and building the post-training data;
  - staff;
  - buying and running the cluster (2048 H800s, network, storage, power): $2/GPU-hour is a rental
    assumption, not what owning the hardware cost;
  - DeepSeek-R1: its reinforcement learning on top of V3-Base is a separate bill;
  - inference: serving the model once it is trained.
So $5.576M is the price of the final training run at rental rates, not the cost of building DeepSeek-V3.
"""

import math
from dataclasses import dataclass, field

from cli import parse_config, print_config
from model import PRESETS, ModelArgs
from train import GPU_PEAK_BF16, GPUS, count_params, flops_breakdown, flops_per_token  # noqa: F401  (GPU_PEAK_BF16: re-exported for readers of this file)

PRECISIONS = ("bf16", "fp8")


def peak_flops_of(gpu: str, precision: str = "bf16") -> float:
    """Dense peak FLOP/s of one `gpu` (a key of GPUS) in `precision` ('bf16' or 'fp8')."""
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; known GPUs: {', '.join(GPUS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use 'bf16' or 'fp8'")
    tflops = GPUS[gpu][precision]
    if tflops is None:
        raise ValueError(f"{gpu} has no FP8 tensor cores (no fp8 peak); use precision='bf16' or another GPU")
    return tflops * 1e12


# ----------------------------------------------------------------------------------------------------
# 3. FLOPs -> GPU-hours -> dollars, and back
# ----------------------------------------------------------------------------------------------------
# DeepSeek-V3's published budget (arXiv 2412.19437, Table 1), in H800 GPU-hours.
V3_TOKENS = 14.8e12                 # pre-training tokens
V3_SEQ_LEN = 4096                   # pre-training sequence length (report §4.2: 4K; extended to 128K later)
V3_GPU_HOURS = {"pretraining": 2.664e6, "context_extension": 0.119e6, "post_training": 0.005e6,
                "total": 2.788e6}
V3_PRICE = 2.0                      # $ per H800 GPU-hour, the report's rental assumption
V3_COST = V3_GPU_HOURS["total"] * V3_PRICE   # $5.576M
V3_CLUSTER_GPUS = 2048


def estimate_training_cost(args: ModelArgs, tokens: float, gpu: str = "H800", mfu: float = 0.4,
                           price_per_gpu_hour: float = 2.0, seq_len: int = 4096, precision: str = "bf16",
                           causal: bool = False) -> dict:
    """GPU-hours and dollars to train `args` on `tokens` tokens on `gpu`s reaching `mfu` of their `precision`
    peak, at `price_per_gpu_hour` dollars. Returns the inputs plus flops_per_token, total_flops (FLOPs),
    peak_flops (FLOP/s of one GPU), gpu_hours and cost_usd."""
    if not tokens > 0:
        raise ValueError(f"tokens={tokens} must be a positive number of training tokens (V3: 14.8e12)")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} is outside (0, 1]; give the achieved share of peak, e.g. 0.4 for 40%")
    if not price_per_gpu_hour >= 0:
        raise ValueError(f"price_per_gpu_hour={price_per_gpu_hour} must be >= 0 dollars (V3 assumed 2.0)")
    peak = peak_flops_of(gpu, precision)
    fpt = flops_per_token(args, seq_len, causal)
    total = fpt * tokens
    gpu_hours = total / (peak * mfu) / 3600          # FLOPs / (FLOP/s) = GPU-seconds; / 3600 = GPU-hours
    return {"tokens": tokens, "gpu": gpu, "mfu": mfu, "price_per_gpu_hour": price_per_gpu_hour,
            "seq_len": seq_len, "precision": precision, "causal": causal,
            "flops_per_token": fpt, "total_flops": total, "peak_flops": peak,
            "gpu_hours": gpu_hours, "cost_usd": gpu_hours * price_per_gpu_hour}


def implied_mfu(args: ModelArgs, tokens: float, gpu_hours: float, gpu: str = "H800", seq_len: int = 4096,
                precision: str = "bf16", causal: bool = False) -> float:
    """The MFU a run must have reached to train `args` on `tokens` tokens in `gpu_hours` GPU-hours:
    total FLOPs / (gpu_hours x 3600 s x peak FLOP/s). Above 1 means the budget is impossible at that peak."""
    if not tokens > 0:
        raise ValueError(f"tokens={tokens} must be a positive number of training tokens (V3: 14.8e12)")
    if not gpu_hours > 0:
        raise ValueError(f"gpu_hours={gpu_hours} must be positive (V3 pre-training: 2.664e6)")
    peak = peak_flops_of(gpu, precision)
    return flops_per_token(args, seq_len, causal) * tokens / (gpu_hours * 3600 * peak)


# ----------------------------------------------------------------------------------------------------
# 4. Command line
# ----------------------------------------------------------------------------------------------------

@dataclass
class CostConfig:
    """Every input of the estimate (each is a --flag)."""
    preset: str = field(default="671B", metadata={"help": "model preset: tiny | nano | small | 16B | 671B"})
    tokens: float = field(default=V3_TOKENS, metadata={"help": "training tokens"})
    gpu: str = field(default="H800", metadata={"help": "one of: " + ", ".join(GPUS)})
    mfu: float = field(default=0.4, metadata={"help": "achieved share of the peak, in (0, 1]"})
    price: float = field(default=V3_PRICE, metadata={"help": "dollars per GPU-hour"})
    seq_len: int = field(default=V3_SEQ_LEN, metadata={"help": "tokens per training sequence"})
    precision: str = field(default="bf16", metadata={"help": "peak to divide by: bf16 | fp8"})
    causal: bool = field(default=False, metadata={"help": "count half the attention score matrix"})
    gpu_hours: float = field(default=0.0, metadata={"help": "if > 0: print the MFU this budget implies"})

    def __post_init__(self):
        """Check every input right after parsing, before anything is computed (argparse turns the ValueError
        into one line naming the flag, its value and the rule)."""
        def bad(name, rule):
            """Raise the ValueError for --name breaking `rule`."""
            raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: {rule}")

        if self.preset not in PRESETS:
            bad("preset", "choose one of " + ", ".join(PRESETS))
        if self.gpu not in GPUS:
            bad("gpu", "choose one of " + ", ".join(GPUS))
        if self.precision not in PRECISIONS:
            bad("precision", "choose one of " + ", ".join(PRECISIONS))
        if not (math.isfinite(self.tokens) and self.tokens > 0):
            bad("tokens", "must be a positive number of training tokens (V3: 14.8e12)")
        if not 0 < self.mfu <= 1:
            bad("mfu", "must be in (0, 1]: the achieved share of the peak, e.g. 0.4 for 40%")
        if not (math.isfinite(self.price) and self.price >= 0):
            bad("price", "must be >= 0 dollars per GPU-hour (V3 assumed 2.0)")
        if self.seq_len < 1:
            bad("seq_len", "must be >= 1 token")
        if not (math.isfinite(self.gpu_hours) and self.gpu_hours >= 0):
            bad("gpu_hours", "must be >= 0 (0: do not compute an implied MFU)")
        if GPUS[self.gpu][self.precision] is None:
            bad("precision", f"the {self.gpu} has no FP8 tensor cores; use --precision=bf16 or another --gpu")


def _human(x: float) -> str:
    """1.23e9 -> '1.23B' (K, M, B, T), for parameter, token and GPU-hour counts."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.2f}"


def v3_implied_mfus(causal: bool = False) -> dict:
    """Implied MFU of DeepSeek-V3's published H800 budget on its 14.8T tokens at 4K sequences, for the
    pre-training GPU-hours and for the total, against the BF16 and the FP8 peak. The total also paid for
    context extension and post-training, whose tokens are not in the 14.8T, so its MFU reads low."""
    args = ModelArgs.preset("671B")
    return {(stage, prec): implied_mfu(args, V3_TOKENS, V3_GPU_HOURS[stage], "H800", V3_SEQ_LEN, prec, causal)
            for stage in ("pretraining", "total") for prec in PRECISIONS}


def main(argv: "list[str] | None" = None) -> dict:
    """Parse flags, print the estimate and V3's published budget beside it, and return the numbers."""
    cfg = parse_config(CostConfig, argv, description=__doc__.split("\n\n")[0])
    print_config(cfg, "cost")
    try:
        args = ModelArgs.preset(cfg.preset)
        est = estimate_training_cost(args, cfg.tokens, cfg.gpu, cfg.mfu, cfg.price, cfg.seq_len, cfg.precision,
                                     cfg.causal)
        mfu_for_budget = (implied_mfu(args, cfg.tokens, cfg.gpu_hours, cfg.gpu, cfg.seq_len, cfg.precision,
                                      cfg.causal) if cfg.gpu_hours > 0 else None)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    params = count_params(args)
    parts = flops_breakdown(args, cfg.seq_len, cfg.causal)
    convention = "causal, half the score matrix" if cfg.causal else "full score matrix"

    print(f"model {cfg.preset}: {_human(params['total'])} parameters, {_human(params['activated'])} activated "
          f"per token (+{_human(params['mtp'])} in MTP)")
    print(f"FLOPs per token: {parts['total']:.3e} = {parts['matmul']:.3e} matmuls (6 x activated, no embedding) "
          f"+ {parts['attention']:.3e} attention at seq_len {cfg.seq_len} ({convention})")
    print(f"total FLOPs for {_human(cfg.tokens)} tokens: {est['total_flops']:.3e}")
    print(f"{cfg.gpu} {cfg.precision} peak {est['peak_flops'] / 1e12:.1f} TFLOP/s at MFU {cfg.mfu:.0%}: "
          f"{_human(est['gpu_hours'])} GPU-hours -> ${_human(est['cost_usd'])} at ${cfg.price:g}/GPU-hour")
    print(f"  = {_human(est['gpu_hours'] / cfg.tokens * 1e12)} GPU-hours per trillion tokens (V3 reports 180K), "
          f"{est['gpu_hours'] / V3_CLUSTER_GPUS / 24:.1f} days on {V3_CLUSTER_GPUS} GPUs")
    if mfu_for_budget is not None:
        print(f"implied MFU for {_human(cfg.gpu_hours)} GPU-hours: {mfu_for_budget:.1%} of the {cfg.gpu} "
              f"{cfg.precision} peak")

    v3 = v3_implied_mfus(cfg.causal)
    print(f"DeepSeek-V3's published budget (arXiv 2412.19437, Table 1): 671B on 14.8T tokens at 4K, H800s, "
          f"{convention}")
    for stage, label in (("pretraining", "pre-training"), ("total", "all training")):
        print(f"  {label:<12} {V3_GPU_HOURS[stage] / 1e6:.3f}M GPU-hours -> implied MFU {v3[stage, 'bf16']:.1%} "
              f"of the BF16 peak, {v3[stage, 'fp8']:.1%} of the FP8 peak")
    print(f"  published cost: {V3_GPU_HOURS['total'] / 1e6:.3f}M GPU-hours x ${V3_PRICE:g} = ${V3_COST / 1e6:.3f}M "
          "(the total also pays for context extension")
    print("  and post-training, whose tokens are not in the 14.8T, so the second MFU reads low)")
    print("What this leaves out: research and ablation runs, failed runs, data work, staff, buying and running")
    print("  the cluster, R1's RL, inference. It is the rental price of one final run (see extras/cost.py's docstring).")
    return {"config": cfg, "params": params, "flops": parts, "estimate": est, "implied_mfu": mfu_for_budget,
            "v3_implied_mfu": v3}


if __name__ == "__main__":
    main()
