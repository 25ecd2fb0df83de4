"""
tinyseek/model.py -- the whole DeepSeek-V3 architecture in one file.

Read it beside the reports:
  [V2]  DeepSeek-V2, arXiv 2405.04434  (Multi-head Latent Attention, DeepSeekMoE, YaRN)
  [V3]  DeepSeek-V3, arXiv 2412.19437  (sigmoid routing, aux-loss-free balancing, MTP, FP8)
  [ALF] Auxiliary-loss-free load balancing, arXiv 2408.15664
Names follow the official DeepSeek-V3 `inference/model.py`, so the two can be read side by side.

Map of the file (top to bottom):
  1. ModelArgs ............ every knob, the presets tiny / nano / small / 16B / 671B, and validation
  2. FP8 simulation ....... fp8_quant_dequant, FP8LinearFunction, Linear (Fprop, Dgrad, Wgrad in E4M3 with
                            fine-grained scales, V3 §3.3)
  3. RMSNorm, RoPE/YaRN ... precompute_rope, apply_rope (rotary on the decoupled dims only)
  4. MLA .................. Multi-head Latent Attention, `naive` and `absorb` paths (V2 §2.1, eq. 9-19)
  5. KVCache .............. the decoding cache; absorb stores only kv_lora_rank + qk_rope_head_dim per token
  6. MLP, Gate, MoE ....... DeepSeekMoE: shared + routed experts, group-limited sigmoid routing (V3 eq. 12-16),
                            aux-loss-free bias (V3 eq. 16, [ALF]), sequence-wise balance loss (V3 eq. 17-20)
  7. Block, MTP ........... a transformer block; Multi-Token Prediction modules (V3 eq. 21-25)
  8. Transformer .......... embedding -> blocks -> norm -> head; losses; decoding's forward; bias update
  9. Two measures ......... kv_cache_numbers_per_token (V2 Table 1), max_violation (MaxVio, [ALF])

What lives elsewhere: the training-only parts (BF16 AdamW moments, parameter and FLOP counts, the MTP and
bias schedules) in train.py, sampling and decoding loops in sample.py, FP8 analysis tools (storage-format
quantisation, quantisation error, limited-precision accumulation) in extras/fp8.py.

Shapes in comments: B batch, T new tokens in this call, S = tokens visible to attention (cache + new),
H = n_heads, D = dim, E = n_routed_experts, K = n_activated_experts, N = B*T flattened tokens.
"""

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------------

@dataclass
class ModelArgs:
    """Every knob of the model. Architecture fields carry the official inference code's names (the official inference/model.py);
    the training knobs after them are ours. Build one with `ModelArgs.preset(name, **overrides)`."""
    # --- architecture (official names) ---
    max_seq_len: int = 256            # longest sequence the RoPE tables and caches are built for
    vocab_size: int = 512
    dim: int = 128                    # hidden size d
    inter_dim: int = 384              # hidden size of the dense SwiGLU FFN (first n_dense_layers layers)
    moe_inter_dim: int = 64           # hidden size of ONE expert (fine-grained: much smaller than inter_dim)
    n_layers: int = 4
    n_dense_layers: int = 1           # leading layers that use a dense FFN instead of MoE
    n_heads: int = 4                  # n_h
    n_routed_experts: int = 8         # N_r
    n_shared_experts: int = 1         # N_s
    n_activated_experts: int = 2      # K_r, routed experts per token
    n_expert_groups: int = 2          # experts are split into this many groups (node-limited routing)
    n_limited_groups: int = 1         # M: a token may only use experts from this many groups
    score_func: str = "sigmoid"       # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0          # gates are multiplied by this (V3's 2.5 is from config_671B.json, not the report)
    q_lora_rank: int = 64             # d_c' (0: queries are a plain projection `wq`)
    kv_lora_rank: int = 32            # d_c, the compressed KV latent that is cached
    qk_nope_head_dim: int = 32        # d_h, per-head query/key dims without rotary
    qk_rope_head_dim: int = 16        # d_h^R, decoupled rotary dims (one key shared by all heads)
    v_head_dim: int = 32
    original_seq_len: int = 256       # YaRN: context the rotary frequencies were trained for
    rope_theta: float = 10000.0
    rope_factor: float = 40.0         # YaRN: context extension factor
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0               # YaRN softmax scale (0.1 mscale ln s + 1)^2, NOT the rotary amplitude
    # --- training knobs (ours) ---
    mtp_depth: int = 1                # D, number of Multi-Token Prediction modules (0: none built)
    mtp_lambda: float = 0.3           # lambda, weight of the MTP loss (V3 eq. 25)
    bias_update_speed: float = 0.001  # gamma, aux-loss-free bias step (V3 §2.1.2)
    seq_aux_alpha: float = 0.0001     # alpha, sequence-wise balance loss weight (V3 eq. 17)
    fp8: bool = False                 # simulate FP8 (E4M3) matmuls in the blocks' Linear layers
    fp8_block: int = 128              # tile/block size of the fine-grained FP8 scales
    fp8_scale_fmt: str = "ue8m0"      # "ue8m0" power-of-two scales (V3 §3.3, the default) or "" FP32 scales
    attn_impl: str = "absorb"         # "naive" or "absorb" (same weights, same outputs; see MLA): decoding
    train_attn_impl: str = "auto"     # the same choice for forwards without a cache (training); auto: see MLA
    init_std: float = 0.006           # std of the normal init of every weight matrix (V3 §4.2)

    def __post_init__(self):
        """Reject impossible configurations with a message naming the field, its value and the rule."""
        def bad(field, rule):
            """Raise the ValueError for `field` breaking `rule`."""
            raise ValueError(f"ModelArgs.{field}={getattr(self, field)!r} is invalid: {rule}")

        for f in ("max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                  "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len",
                  "fp8_block"):
            if getattr(self, f) <= 0:
                bad(f, "must be a positive integer")
        for f in ("n_dense_layers", "n_shared_experts", "q_lora_rank", "mtp_depth"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        for f in ("mtp_lambda", "bias_update_speed", "seq_aux_alpha", "route_scale", "init_std",
                  "rope_theta", "rope_factor"):
            if not getattr(self, f) >= 0:
                bad(f, "must be a non-negative number")
        if self.n_dense_layers > self.n_layers:
            bad("n_dense_layers", f"cannot exceed n_layers={self.n_layers}")
        if self.n_activated_experts > self.n_routed_experts:
            bad("n_activated_experts", f"cannot exceed n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            bad("n_expert_groups", f"must divide n_routed_experts={self.n_routed_experts} into equal groups")
        if self.n_limited_groups > self.n_expert_groups:
            bad("n_limited_groups", f"cannot exceed n_expert_groups={self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_activated_experts > self.n_limited_groups * per_group:
            bad("n_activated_experts", f"the {self.n_limited_groups} allowed group(s) hold only "
                f"{self.n_limited_groups * per_group} experts")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs of channels)")
        if self.score_func not in ("sigmoid", "softmax"):
            bad("score_func", "must be 'sigmoid' (V3) or 'softmax' (V2)")
        if self.kv_lora_rank >= self.dim:
            bad("kv_lora_rank", f"must be smaller than dim={self.dim}: the cached latent c^KV is a compression "
                "of the hidden state (V2 §2.1.2); at kv_lora_rank >= dim nothing is compressed")
        if self.fp8_scale_fmt not in ("", "ue8m0"):
            bad("fp8_scale_fmt", "must be '' (FP32 scales) or 'ue8m0' (power-of-two scales)")
        if self.attn_impl not in ("naive", "absorb"):
            bad("attn_impl", "must be 'naive' or 'absorb'")
        if self.train_attn_impl not in ("auto", "naive", "absorb"):
            bad("train_attn_impl", "must be 'auto', 'naive' or 'absorb'")
        if self.original_seq_len < self.max_seq_len and self.rope_factor < 1:
            bad("rope_factor", "must be >= 1 when max_seq_len exceeds original_seq_len (YaRN extends context)")
        if self.fp8:
            # The 1 x block activation tiles and block x block weight blocks run along each Linear's input
            # dimension, so the block must divide every input size. Output sizes may end in a partial block,
            # as in the official FP8 checkpoint (its scale grids are ceil-divided).
            ins = {"dim": self.dim, "kv_lora_rank": self.kv_lora_rank, "inter_dim": self.inter_dim,
                   "moe_inter_dim": self.moe_inter_dim, "n_heads*v_head_dim": self.n_heads * self.v_head_dim}
            if self.q_lora_rank:
                ins["q_lora_rank"] = self.q_lora_rank
            for name, size in ins.items():
                if size % self.fp8_block:
                    bad("fp8_block", f"must divide {name}={size} (FP8 tiles run along each Linear's input)")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size: non-rotary part plus the decoupled rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        """A named configuration ('tiny', 'small', '16B', '671B') with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s) {unknown}; valid fields: {sorted(known)}")
        return replace(PRESETS[name], **overrides)

    def full_attn_impl(self) -> str:
        """The attention path of a forward without a cache: train_attn_impl, with 'auto' resolved to 'absorb'
        where absorption adds no arithmetic per key (kv_lora_rank <= qk_nope_head_dim: tiny, nano) and to
        'naive' where it would (small, 16B, 671B). See MLA."""
        if self.train_attn_impl != "auto":
            return self.train_attn_impl
        return "absorb" if self.kv_lora_rank <= self.qk_nope_head_dim else "naive"

    def to_dict(self) -> dict:
        """Plain dict (stored in checkpoints)."""
        return asdict(self)


PRESETS = {
    # Laptop default: every feature on (q compression, 2 expert groups with 1 allowed, shared expert, one
    # dense layer, MTP depth 1) at a size that trains usefully on 2 CPU cores. kv_lora_rank (32) is a
    # quarter of dim (128), so the cache really is compressed. Init std 0.02 instead of V3's 0.006: with
    # dim=128 the fan-in is 56x smaller than V3's 7168, and 0.006 would start the network nearly silent.
    # The bias update speed is raised 10x because a laptop run has ~500 steps, not V3's ~235k (14.8T tokens at
    # its final batch of 15,360 sequences x 4,096 tokens; fewer tokens per step during the batch ramp-up).
    "tiny": ModelArgs(init_std=0.02, bias_update_speed=0.01),
    # A smaller student for distillation experiments (extras/r1.py): half the layers of tiny, half its routed experts
    # and a narrower width, still with every V3 feature on (MLA with q compression, shared + routed experts,
    # group-limited routing, one dense layer, MTP).
    "nano": ModelArgs(dim=96, inter_dim=256, moe_inter_dim=48, n_layers=2, n_heads=4, n_routed_experts=4,
                      n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, q_lora_rank=48,
                      kv_lora_rank=24, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=24, init_std=0.02,
                      bias_update_speed=0.01),
    # One GPU: ~240M total / ~60M activated parameters with a small vocabulary.
    "small": ModelArgs(max_seq_len=1024, original_seq_len=1024, dim=768, inter_dim=2048, moe_inter_dim=256,
                       n_layers=12, n_dense_layers=1, n_heads=12, n_routed_experts=32, n_shared_experts=1,
                       n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, q_lora_rank=384,
                       kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                       init_std=0.02, bias_update_speed=0.001, fp8_block=128),
    # The official configs (config_16B.json is DeepSeek-V2-Lite's shape; config_671B.json is V3). Two values come
    # from these files, not from the reports' text: route_scale 2.5 (671B) and mscale 0.707 (16B), which makes
    # YaRN's sqrt(t) = 0.0707 ln s + 1 of V2 §3.1.4; V3 §4.3 gives sqrt(t) = 0.1 ln s + 1, i.e. mscale 1.0.
    "16B": ModelArgs(max_seq_len=16384, vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
                     n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
                     n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
                     route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096, mscale=0.707, mtp_depth=0),
    "671B": ModelArgs(max_seq_len=16384, vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
                      n_layers=61, n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
                      n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
                      route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096, mscale=1.0, mtp_depth=1),
}


# ----------------------------------------------------------------------------------------------------
# 2. FP8 simulation (V3 §3.3)
# ----------------------------------------------------------------------------------------------------
# E4M3 has 4 exponent and 3 mantissa bits: 8 values per power of two, largest finite value 448. So few
# bits only work if every small tile of numbers gets its own scale: one outlier then only coarsens its own
# tile instead of flushing the whole tensor to zero. V3 (§3.3.2) scales activations per 1x128 tile (one
# token, 128 channels) and weights per 128x128 block, from the tile's max |x| computed online, always along
# the inner dimension K of the GEMM that consumes them. All three GEMMs of a linear layer take E4M3 inputs
# (§3.3, Figure 6): Fprop y = x W^T, Dgrad dx = dy W and Wgrad dW = dy^T x. We *simulate* this:
# quantise -> dequantise (the rounding is exactly the E4M3 grid, via torch.float8_e4m3fn), then an ordinary
# matmul, so the numerical effect is real while the speed-up of FP8 tensor cores is not. Master weights,
# weight gradients and optimizer states stay FP32 (AdamW's moments may be BF16: train.py's AdamWBF16).
# The GEMM itself accumulates in the matmul's precision (FP32); extras/fp8.py's `matmul_limited_acc`
# simulates the ~14-bit tensor-core accumulator and V3's promotion to FP32 every N_C = 128 products.
#
# Scales: max|x| / 448 in FP32, or with scale_fmt="ue8m0" that scale rounded up to a power of two, so
# scale * E4M3 value has at most 4 significant bits and is exact in BF16 too: under BF16 autocast the
# dequantised operands are then not rounded a second time. ModelArgs defaults to "ue8m0", the power-of-two
# scaling factors V3 §3.3 uses (and its official inference code's option); "" keeps FP32 scales.
# Edge cases (tested): an all-zero tile stays zero; a tile of tiny values keeps E4M3's relative precision
# (the scale only has to stay a normal float32, i.e. max|x| >= 448 * 1.2e-38 ~ 5e-36; below that values
# drift into E4M3's subnormals and then to zero); huge finite values are fine (the scale absorbs them); a
# tile that contains inf or nan comes back as all-nan, so the non-finite value is reported by the loss
# instead of being silently turned into a finite number.

FP8_E4M3_MAX = 448.0
FP32_TINY = torch.finfo(torch.float32).tiny        # smallest normal float32, the floor of every scale


def fp8_tiles(x: torch.Tensor, block: tuple[int, int], scale_fmt: "str | None"):
    """x (R, C) -> E4M3 tiles (R'/br, br, C'/bc, bc) and their scales (R'/br, 1, C'/bc, 1), R' and C' padded
    up to whole blocks with zeros (zeros never raise a block's max)."""
    R, C = x.shape
    br, bc = block
    pr, pc = (-R) % br, (-C) % bc
    xf = F.pad(x.float(), (0, pc, 0, pr))
    tiles = xf.view((R + pr) // br, br, (C + pc) // bc, bc)              # (R'/br, br, C'/bc, bc)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)                     # (R'/br, 1, C'/bc, 1)
    scale = (amax / FP8_E4M3_MAX).clamp(min=FP32_TINY)                   # zero tile: 0 / tiny = 0
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))                # power of two, >= max|x| / 448
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt={scale_fmt!r} is invalid: use None or 'ue8m0'")
    return (tiles / scale).to(torch.float8_e4m3fn), scale                 # round to the E4M3 grid


def fp8_quant_dequant(x: torch.Tensor, block: tuple[int, int], scale_fmt: "str | None" = None) -> torch.Tensor:
    """Round x (R, C) to scaled E4M3 and back, in x's dtype: what an FP8 GEMM would actually multiply."""
    R, C = x.shape
    q, scale = fp8_tiles(x, block, scale_fmt)
    d = q.float() * scale                                                 # (R'/br, br, C'/bc, bc)
    return d.view(d.shape[0] * d.shape[1], -1)[:R, :C].to(x.dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with all three GEMMs on E4M3 operands, each scaled along its own inner dimension (V3 §3.3).

        Fprop  y  = x  W^T   inner dim in_features:  x in 1 x b tiles (per token), W in b x b blocks
        Dgrad  dx = dy W     inner dim out_features: dy in 1 x b tiles (per token), W in b x b blocks (a
                             square block serves W and W^T alike, so Fprop's quantised W is reused)
        Wgrad  dW = dy^T x   inner dim tokens:       dy and x in b x 1 tiles (b tokens of one channel)
    For Wgrad, x is Fprop's quantised x re-quantised into b x 1 tiles: V3 caches the layer input in FP8
    for the backward pass and must dequantise, transpose and re-quantise it (report §3.5.2). Products
    accumulate in the matmul's own precision; dW is returned in FP32 for the FP32 master weight.
    `record`, when a dict, receives the dequantised operands of each GEMM (for tests and notebooks).
    """

    @staticmethod
    def forward(ctx, x, weight, block, scale_fmt, record):
        """x (N, in), weight (out, in) -> y (N, out)."""
        xq = fp8_quant_dequant(x, (1, block), scale_fmt)                 # (N, in) per-token tiles along in
        wq = fp8_quant_dequant(weight, (block, block), scale_fmt)        # (out, in) square blocks
        ctx.save_for_backward(xq, wq)
        ctx.block, ctx.scale_fmt, ctx.record, ctx.x_dtype = block, scale_fmt, record, x.dtype
        if record is not None:
            record["fprop"] = (xq, wq)
        return xq @ wq.to(xq.dtype).T                                    # (N, out)

    @staticmethod
    def backward(ctx, dy):
        """dy (N, out) -> dx (N, in), dW (out, in); no gradient for the three settings."""
        xq, wq = ctx.saved_tensors
        b, fmt = ctx.block, ctx.scale_fmt
        dy_d = fp8_quant_dequant(dy, (1, b), fmt)                         # (N, out) tiles along out
        dx = (dy_d @ wq.to(dy_d.dtype)).to(ctx.x_dtype)                   # (N, in)  Dgrad
        dy_w = fp8_quant_dequant(dy.T, (1, b), fmt)                       # (out, N) tiles along tokens
        x_w = fp8_quant_dequant(xq.T, (1, b), fmt)                        # (in, N)  tiles along tokens
        dw = dy_w.float() @ x_w.float().T                                 # (out, in) Wgrad, FP32
        if ctx.record is not None:
            ctx.record["dgrad"] = (dy_d, wq)
            ctx.record["wgrad"] = (dy_w.T, x_w.T)                         # as (N, out), (N, in)
        return dx, dw, None, None, None


class Linear(nn.Linear):
    """A bias-free Linear layer that optionally simulates V3's FP8 training GEMMs.

    y = x W^T. With fp8=True the forward and both backward GEMMs run on E4M3 operands with fine-grained
    scales (FP8LinearFunction); the FP32 weight is the master copy the optimizer updates. Set
    `layer.record = {}` to capture the dequantised operands of the last forward and backward.
    """

    def __init__(self, in_features: int, out_features: int, fp8: bool = False, fp8_block: int = 128,
                 fp8_scale_fmt: "str | None" = None):
        super().__init__(in_features, out_features, bias=False)
        self.fp8, self.fp8_block, self.fp8_scale_fmt = fp8, fp8_block, fp8_scale_fmt
        self.record: dict | None = None

    def effective_weight(self) -> torch.Tensor:
        """The weight as an FP8 GEMM sees it: W itself, or its block-quantised copy. Used where W enters an
        einsum instead of this layer's forward (MLA's absorbed path); the gradient passes straight
        through the rounding there, as in the official inference code's weight_dequant + einsum."""
        w = self.weight
        if not self.fp8:
            return w
        wq = fp8_quant_dequant(w.detach(), (self.fp8_block, self.fp8_block), self.fp8_scale_fmt)
        return w + (wq - w).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        if not self.fp8:
            return F.linear(x, self.weight)
        x2 = x.reshape(-1, x.shape[-1])                                    # (N, in) one row per token
        y = FP8LinearFunction.apply(x2, self.weight, self.fp8_block, self.fp8_scale_fmt, self.record)
        return y.view(*x.shape[:-1], -1)                                   # (..., out)


# ----------------------------------------------------------------------------------------------------
# 3. RMSNorm and rotary embeddings with YaRN
# ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square layer norm: x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def precompute_rope(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings on the qk_rope_head_dim channels, with YaRN.

    Plain RoPE rotates channel pair j at frequency theta^(-2j/d). YaRN (Peng et al., arXiv 2309.00071; used
    to extend the context in V2 §3.1.4 and V3 §4.3, with s = 40, alpha = 1, beta = 32) only changes the
    frequencies when max_seq_len > original_seq_len: pairs that rotate many times within the original
    context (high frequency, j below `low`) are kept; pairs that rotate less than once (low frequency,
    j above `high`) are slowed down by rope_factor (interpolation); a linear ramp blends the two in between.
    Returns cos, sin of shape (max_seq_len, qk_rope_head_dim // 2).
    """
    d, theta = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)            # (d/2,)
    if args.max_seq_len > args.original_seq_len:
        def pair_index(n_rot):
            """Channel-pair index whose wavelength fits n_rot times into original_seq_len."""
            return d * math.log(args.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(pair_index(args.beta_fast)), 0)
        high = min(math.ceil(pair_index(args.beta_slow)), d - 1)        # clamped as the official code does
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)                 # ramp=1 -> interpolate
    t = torch.arange(args.max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, freqs)                                                    # (max_seq_len, d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of x by position-dependent angles: (x0, x1) ->
    (x0 cos - x1 sin, x0 sin + x1 cos). The official code writes the same rotation as a complex product,
    (x0 + i x1) e^{i angle}.
    Args: x (B, T, n, d_rope) with n heads (1 for the shared key); cos, sin (T, d_rope/2).
    """
    xf = x.float().unflatten(-1, (-1, 2))                    # (B, T, n, d/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]                          # (B, T, n, d/2) each
    c, s = cos[None, :, None, :], sin[None, :, None, :]      # (1, T, 1, d/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)                       # (B, T, n, d_rope)


# ----------------------------------------------------------------------------------------------------
# 4. Multi-head Latent Attention (V2 §2.1)
# ----------------------------------------------------------------------------------------------------

class MLA(nn.Module):
    """Multi-head Latent Attention (V2 §2.1.2-2.1.3, eq. 9-19).

    Keys and values are not projected per head from h. Instead h is compressed to a small latent
    c^KV = W^DKV h (d_c = kv_lora_rank numbers, eq. 9), and per-head keys/values are up-projections of it:
    k^C = W^UK c^KV, v^C = W^UV c^KV (eq. 10-11). RoPE cannot pass through that factorisation, so position
    goes into a separate small key k^R = RoPE(W^KR h) shared by all heads (eq. 15, "decoupled RoPE"), and
    each query head gets its own rotary part q^R = RoPE(W^QR c^Q) (eq. 14); q = [q^C; q^R] and
    k = [k^C; k^R] (eq. 16-17). Queries are compressed the same way (c^Q = W^DQ h, q^C = W^UQ c^Q,
    eq. 12-13) to save activation memory in training. In the official weight layout
    wkv_a = [W^DKV; W^KR], wkv_b = [W^UK; W^UV] interleaved per head, wq_a = W^DQ, wq_b = [W^UQ; W^QR].

    Two implementations, same weights, same outputs:
      naive:  materialise k = [k^C; k^R] and v for every head (what a plain MHA would cache).
      absorb: q^T k^C = q^T W^UK c = (W^UK^T q)^T c, so fold W^UK into the query and attend over the
              latent c directly; likewise apply W^UV after the attention-weighted sum of latents. The cache
              then holds only c^KV and k^R: kv_lora_rank + qk_rope_head_dim numbers per token and layer.
              Seen this way, absorbed MLA is multi-query attention whose single key/value head is the latent,
              and that is how it is computed (latent_attention: the latent is read once, not once per head).
    Decoding (a forward with a cache) runs the path args.attn_impl names; a forward without one (training,
    loss estimates, GRPO's scoring) the path args.full_attn_impl() names. They differ because absorption is an
    inference trick (V2 §2.1.3): it saves reading a long cache for a few new queries, but per head and key it
    scores d_c + d_h^R numbers instead of d_h + d_h^R, and when there are as many queries as keys (training)
    that arithmetic is the cost: 3x at V3's shape (576 against 192 numbers) and at `small`'s (288 against 96).
    At `tiny`'s shape (d_c = d_h = 32) both do the same arithmetic, so 'auto' trains tiny absorbed: one path
    for training and decoding.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        a = args
        self.n_heads, self.kv_lora_rank = a.n_heads, a.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = a.qk_nope_head_dim, a.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = a.qk_head_dim, a.v_head_dim
        self.attn_impl = a.attn_impl                      # with a cache: decoding and its prefill
        self.train_attn_impl = a.full_attn_impl()          # without a cache: training ('auto' resolved)
        lin = lambda i, o: Linear(i, o, a.fp8, a.fp8_block, a.fp8_scale_fmt or None)
        if a.q_lora_rank == 0:
            self.wq = lin(a.dim, a.n_heads * a.qk_head_dim)
        else:
            self.wq_a = lin(a.dim, a.q_lora_rank)                                   # W^DQ
            self.q_norm = RMSNorm(a.q_lora_rank)
            self.wq_b = lin(a.q_lora_rank, a.n_heads * a.qk_head_dim)                # W^UQ and W^QR
        self.wkv_a = lin(a.dim, a.kv_lora_rank + a.qk_rope_head_dim)                # W^DKV and W^KR
        self.kv_norm = RMSNorm(a.kv_lora_rank)
        self.wkv_b = lin(a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim))  # W^UK and W^UV
        self.wo = lin(a.n_heads * a.v_head_dim, a.dim)                              # W^O
        # Softmax scale 1/sqrt(d_h + d_h^R); YaRN multiplies it by mscale^2 when the context is extended.
        self.softmax_scale = a.qk_head_dim ** -0.5
        if a.max_seq_len > a.original_seq_len:
            m = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0
            self.softmax_scale *= m * m

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: "dict | None" = None, start_pos: int = 0, mask: "torch.Tensor | None" = None):
        """Attention over the new tokens x (and, with a cache, everything cached before them).

        Args:
            x: (B, T, D) hidden states of the new tokens.
            cos, sin: (T, qk_rope_head_dim/2) rotary tables for positions start_pos .. start_pos+T-1.
            cache: this layer's cache tensors (see KVCache) or None for a plain causal forward.
            start_pos: number of tokens already in the cache.
            mask: (B, 1, T, S) bool, True = may attend; None means plain causal (or "all" when T == 1).
        Returns: (B, T, D).
        """
        B, T, _ = x.shape
        H = self.n_heads
        # ---- queries (eq. 12-14) ----
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, H*qk_head_dim)
        q = q.view(B, T, H, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)                          # (B, T, H, qk_rope_head_dim)
        # ---- compressed latent and shared rotary key (eq. 9, 15) ----
        kv = self.wkv_a(x)                                         # (B, T, kv_lora_rank + qk_rope_head_dim)
        kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)                                      # (B, T, kv_lora_rank) = c^KV
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)             # (B, T, 1, qk_rope_head_dim) = k^R
        end = start_pos + T
        is_causal = cache is None and mask is None

        if (self.attn_impl if cache is not None else self.train_attn_impl) == "naive":
            # ---- up-project the latent to per-head keys and values (eq. 10-11, 16-17) ----
            kv_up = self.wkv_b(kv).view(B, T, H, -1)               # (B, T, H, nope + v), FP8 GEMM if on
            k_nope, v = kv_up.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)  # (B, T, H, qk_head_dim)
            if cache is not None:
                cache["k"][:B, start_pos:end] = k
                cache["v"][:B, start_pos:end] = v
                k, v = cache["k"][:B, :end], cache["v"][:B, :end]  # (B, S, H, ...)
                if mask is None and T > 1:                         # None means causal here too; SDPA's is_causal
                    mask = causal_mask(T, end, x.device)           # would anchor its triangle at key 0, not start_pos
            qh = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)      # (B, H, T, qk_head_dim)
            o = attention(qh, k.transpose(1, 2), v.transpose(1, 2), mask, is_causal and T > 1,
                          self.softmax_scale).transpose(1, 2)      # (B, T, H, v_head_dim)
        else:
            # ---- absorb W^UK into the query: q_nope^T W^UK c = (W^UK^T q_nope)^T c ----
            # wkv_b's weight enters two einsums here, never a GEMM with c^KV as input: c^KV becomes the
            # key/value of the attention operator itself, which V3 keeps in high precision. With fp8 the
            # weight is its block-quantised copy (as the official code's weight_dequant + einsum), q_nope
            # and o_lat are not quantised, and W's gradient passes straight through the rounding.
            wkv_b = self.wkv_b.effective_weight().view(H, -1, self.kv_lora_rank)  # (H, nope + v, kv_lora_rank)
            w_uk = wkv_b[:, :self.qk_nope_head_dim]                # (H, nope, kv_lora_rank)
            w_uv = wkv_b[:, self.qk_nope_head_dim:]                # (H, v, kv_lora_rank)
            q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)   # (B, T, H, kv_lora_rank) = W^UK^T q^C
            q_abs = torch.cat([q_lat, q_pe], dim=-1)               # (B, T, H, kv_lora_rank + rope)
            # One shared key "head" [c^KV; k^R] (B, S, kv_lora_rank + rope); its first d_c channels are the value.
            latent = torch.cat([kv, k_pe.squeeze(2)], dim=-1)      # (B, T, kv_lora_rank + rope) new positions
            if cache is not None:
                cache["latent"][:B, start_pos:end] = latent        # one write ("kv" and "pe" are views of it)
                latent = cache["latent"][:B, :end]                 # (B, S, kv_lora_rank + rope)
            o_lat = latent_attention(q_abs, latent, self.kv_lora_rank, mask, self.softmax_scale)  # (B, T, H, r)
            o = torch.einsum("bthc,hdc->bthd", o_lat, w_uv)       # (B, T, H, v_head_dim): W^UV applied late
        return self.wo(o.reshape(B, T, H * self.v_head_dim))      # (B, T, D), eq. 19


def attention(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q, k (B, H, T|S, d_qk) and v (B, H, S, d_v) -> (B, H, T, d_v).

    MLA's value width differs from its query/key width (d_v vs d_h + d_h^R, or d_c vs d_c + d_h^R when
    absorbed), and fused attention kernels want one width. For plain causal attention we therefore pad
    the values with zeros to the query width and drop the padded output channels again: the zeros add
    nothing to the weighted sum, and the fused kernel is faster than the reference path."""
    dq, dv = q.shape[-1], v.shape[-1]
    if mask is None and dv < dq:
        v = F.pad(v, (0, dq - dv))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)[..., :dv]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(1, 1, T, S) bool: the last T of S positions as queries, each seeing itself and every earlier position
    (what a mask of None means for a forward over new tokens, cached or not)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


def latent_attention(q, latent, r: int, mask, scale: float) -> torch.Tensor:
    """Absorbed MLA attention as multi-query attention: every query head attends to the one latent head.

    q (B, T, H, r + rope) are the absorbed queries [W^UK^T q^C; q^R]; latent (B, S, r + rope) = [c^KV; k^R]
    of every visible position, whose first r channels are the value c^KV; mask (B or 1, 1, T, S) bool or
    None (causal). All H heads share the key, so the H heads of T queries are H*T queries of one head and
    the latent is read once, not once per head: q (B, 1, T*H, r + rope) against k (B, 1, S, r + rope). The
    key doubles as the value; the output's last rope channels (attention-weighted k^R) are dropped.
    Returns the attention-weighted latents (B, T, H, r)."""
    B, T, H, c = q.shape
    if mask is None and T > 1:
        mask = causal_mask(T, latent.shape[1], q.device)            # (1, 1, T, S)
    if mask is not None:
        mask = mask.repeat_interleave(H, dim=-2)                    # (B|1, 1, T*H, S): row t*H + h is query t
    k = latent.unsqueeze(1)                                         # (B, 1, S, r + rope)
    o = F.scaled_dot_product_attention(q.reshape(B, 1, T * H, c), k, k, attn_mask=mask, scale=scale)
    return o[..., :r].view(B, T, H, r)                              # (B, T, H, r)


# ----------------------------------------------------------------------------------------------------
# 5. The decoding cache
# ----------------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer key/value cache for incremental decoding, covering the main blocks and the MTP blocks.

    absorb: each layer stores c^KV (B, L, kv_lora_rank) and k^R (B, L, qk_rope_head_dim) -- the latent.
    naive:  each layer stores full per-head keys (B, L, H, qk_head_dim) and values (B, L, H, v_head_dim).
    `pos` counts tokens written to the main layers, `mtp_pos` those written to the MTP blocks; setting them
    back rolls the cache back (speculative decoding does this for rejected drafts). `key_mask` (B, L) marks
    real tokens; left-padding slots of shorter prompts are set False so no real token attends to them.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 attn_impl: "str | None" = None):
        if max_len > args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={args.max_seq_len}; "
                             "shorten the prompt or max_new_tokens")
        self.attn_impl = attn_impl or args.attn_impl
        self.max_len, self.pos, self.mtp_pos = max_len, 0, 0
        self.kv_lora_rank = args.kv_lora_rank
        H = args.n_heads

        def layer():
            """Zeroed cache tensors for one layer."""
            if self.attn_impl == "absorb":
                return self._latent_layer(torch.zeros(batch_size, max_len, args.kv_lora_rank + args.qk_rope_head_dim,
                                                      device=device, dtype=dtype))
            return {"k": torch.zeros(batch_size, max_len, H, args.qk_head_dim, device=device, dtype=dtype),
                    "v": torch.zeros(batch_size, max_len, H, args.v_head_dim, device=device, dtype=dtype)}

        self.layers = [layer() for _ in range(args.n_layers)]
        self.mtp_layers = [layer() for _ in range(args.mtp_depth)]
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)

    def _latent_layer(self, latent: torch.Tensor) -> dict:
        """One absorb layer from its (B, L, kv_lora_rank + rope) tensor. c^KV and k^R sit side by side in one
        tensor because [c^KV; k^R] is the key of absorbed attention, read in place; "kv" and "pe" are views
        of it, for writing each part."""
        return {"kv": latent[..., :self.kv_lora_rank], "pe": latent[..., self.kv_lora_rank:], "latent": latent}

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (1-D int64, in the new order) of every layer and of key_mask.

        Batched sampling calls this when sequences finish, so the remaining steps compute only the rows
        still running (the kept rows' values are copied, nothing is recomputed)."""
        def pick(layer):
            """The layer's tensors restricted to `rows`."""
            if self.attn_impl == "absorb":
                return self._latent_layer(layer["latent"].index_select(0, rows))
            return {k: t.index_select(0, rows) for k, t in layer.items()}
        self.layers = [pick(layer) for layer in self.layers]
        self.mtp_layers = [pick(layer) for layer in self.mtp_layers]
        self.key_mask = self.key_mask.index_select(0, rows)

    def stored(self, layer: dict) -> list[torch.Tensor]:
        """The tensors that hold one layer's cache: c^KV and k^R (views of one allocation), or k and v."""
        return [layer[k] for k in (("kv", "pe") if self.attn_impl == "absorb" else ("k", "v"))]

    def bytes_per_token_per_layer(self) -> int:
        """Bytes one token occupies in one layer's cache, measured from the allocated tensors."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.stored(self.layers[0]))

    def total_bytes(self) -> int:
        """Bytes allocated by all cache tensors (main and MTP layers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers + self.mtp_layers
                   for t in self.stored(layer))

    def bytes_read_per_token(self, context: int) -> int:
        """Cache bytes one decoding step reads per generated token with `context` tokens cached, over all
        main layers: every row's whole cache is read once, shared by all heads (absorb) or per head (naive)."""
        return self.bytes_per_token_per_layer() * context * len(self.layers)

    def attn_mask(self, start_pos: int, T: int) -> "torch.Tensor | None":
        """(B, 1, T, S) bool mask for T new queries at start_pos: causal, no padding keys; (1, 1, T, S) when no
        row is padded, None if trivial (one query, no padding)."""
        S = start_pos + T
        valid = self.key_mask[:, :S]                                   # (B, S)
        if bool(valid.all()):                                          # no padding: plain causal
            if T == 1:
                return None                                            # one query may see everything
            return causal_mask(T, S, valid.device)                     # (1, 1, T, S)
        q_pos = torch.arange(start_pos, S, device=valid.device)[:, None]   # (T, 1)
        k_pos = torch.arange(S, device=valid.device)[None, :]              # (1, S)
        # causal & not padding; a query always sees itself so padding rows never become all -inf (NaN)
        allowed = (k_pos <= q_pos) & (valid[:, None, :] | (k_pos == q_pos))  # (B, T, S)
        return allowed.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------
# 6. Feed-forward: dense MLP and DeepSeekMoE
# ----------------------------------------------------------------------------------------------------

class Float32Buffers(nn.Module):
    """A module whose buffers named in `fp32_buffers` stay float32 whatever dtype the model is cast to.

    `model.to(torch.bfloat16)` (and .half(), .bfloat16()) casts every floating buffer. Three of ours must
    not follow: the router bias moves by steps of ~0.001, which bf16 cannot add to 0.5 (8 mantissa bits);
    the expert-load counters count tokens, which bf16 stops counting exactly at 256; the RoPE tables hold
    angles up to max_seq_len radians. The official code likewise keeps the gate bias in float32. Here the
    cast is applied as usual and those buffers are then put back: the float32 values, moved to the
    device the cast chose. Device moves (.to("cuda")) therefore still apply to them."""
    fp32_buffers: tuple = ()

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (what .to(), .half(), .cuda() call), keeping fp32_buffers float32."""
        before = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:                     # cast by fn: keep the exact old values
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for the dense layers, each expert and the shared
    experts (which the official code fuses into one MLP of width n_shared_experts * moe_inter_dim)."""

    def __init__(self, dim: int, inter_dim: int, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, args.fp8, args.fp8_block, args.fp8_scale_fmt or None)   # gate projection
        self.w2 = Linear(inter_dim, dim, args.fp8, args.fp8_block, args.fp8_scale_fmt or None)   # down projection
        self.w3 = Linear(dim, inter_dim, args.fp8, args.fp8_block, args.fp8_scale_fmt or None)   # up projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# A grouped matmul multiplies consecutive row slices of one matrix by different matrices: rows
# offs[e-1]:offs[e] of the expert-sorted tokens by expert e's weight, every expert in one call and without
# reading the counts on the host, so torch.compile can trace it. F.grouped_mm computes it, but its shape
# function for torch.compile accepts bf16 only, so it is wrapped as an operator of our own whose output shape
# and gradient are written out; the compiler then keeps it as one opaque call in the graph, in any dtype.

def _fused_grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes these operands: any dtype on CPU (bf16 elsewhere), and every stride
    but the unit one a multiple of 16 bytes (so a width like 33 takes the per-group fallback)."""
    t0 = tensors[0]
    return ((t0.device.type == "cpu" or t0.dtype == torch.bfloat16)
            and all(s == 1 or s * t.element_size() % 16 == 0 for t in tensors for s in t.stride()))


@torch.library.custom_op("tinyseek::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e] for x (M, K), w (E, K, N) and offs (E,) int32,
    the cumulative row counts (offs[-1] = M) -> out (M, N). Empty groups are allowed."""
    if _fused_grouped_mm_ok(x, w):
        return F.grouped_mm(x, w, offs=offs)
    ends = offs.tolist()                                          # elsewhere: one matmul per group
    return torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip([0] + ends[:-1], ends))])


@torch.library.custom_op("tinyseek::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The weight gradient of grouped_mm: out[e] = x[offs[e-1]:offs[e]]^T g[offs[e-1]:offs[e]] for x (M, K),
    g (M, N) -> (E, K, N); a group with no rows gets zeros."""
    if _fused_grouped_mm_ok(x.t(), g):
        return F.grouped_mm(x.t(), g, offs=offs)
    ends = offs.tolist()
    return torch.stack([x[a:b].t() @ g[a:b] for a, b in zip([0] + ends[:-1], ends)])


@grouped_mm.register_fake
def _grouped_mm_shape(x, w, offs):
    """Output shape and dtype for tracing (torch.compile): (M, N)."""
    return x.new_empty(x.shape[0], w.shape[-1])


@grouped_mm_wgrad.register_fake
def _grouped_mm_wgrad_shape(x, g, offs):
    """Output shape and dtype for tracing: (E, K, N)."""
    return x.new_empty(offs.shape[0], x.shape[1], g.shape[1])


def _grouped_mm_backward(ctx, grad):
    """d out / d x = grad @ w[e]^T per group; d out / d w[e] = x_e^T grad_e; offs has no gradient."""
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    return grouped_mm(grad, w.transpose(1, 2), offs), grouped_mm_wgrad(x, grad, offs), None


grouped_mm.register_autograd(_grouped_mm_backward,
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


# How many of a group's highest biased scores make its group score: the official code's hard-coded 2. V3's
# rule is K_r / M (n_activated_experts / n_limited_groups); tests/test_model.py checks that every preset has
# K_r / M == GROUP_SCORE_TOPK, so for them the two rules agree.
GROUP_SCORE_TOPK = 2


class Gate(Float32Buffers):
    """The router: which K experts each token uses and with what weight (V3 eq. 13-16).

    s_i = sigmoid(u . e_i) (V3) or softmax_i(u . e) (V2) are the token-to-expert affinities. Selection
    uses the *biased* scores s_i + b_i: first the n_limited_groups best groups (a group's score is the sum
    of its two highest biased scores; node-limited routing), then the top K experts inside them. V3
    §2.1.2 sums the highest K_r/M scores per group (8/4 = 2 for V3, also 2 for tiny, nano and small);
    the official code hard-codes 2 when a bias exists and uses the group max without one (V2). The 2 here
    is that hard-coded value: for configs with K_r/M != 2 it differs from the report's rule. Gates
    use the *unbiased* s_i of the chosen experts, normalised to sum to one (sigmoid only) and times
    route_scale. The bias b (`gate.bias`, a float32 buffer, no gradient) only steers selection; it is moved
    after each optimizer step by `update_bias` (aux-loss-free balancing, [ALF] / V3 §2.1.2).
    Runs in float32 even under autocast or in a bf16 model: routing decisions are sensitive to rounding.
    """
    fp32_buffers = ("bias",)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale = args.score_func, args.route_scale
        self.weight = nn.Parameter(torch.randn(args.n_routed_experts, args.dim) * args.init_std)  # centroids e_i
        self.register_buffer("bias", torch.zeros(args.n_routed_experts))        # b_i, selection only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route N tokens.

        Args: x (N, D).
        Returns: gates (N, K) float32, indices (N, K) int64, scores (N, E) float32 unbiased affinities.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):        # float32 even under autocast
            logits = F.linear(x.float(), self.weight.float())                 # (N, E)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores + self.bias                                            # (N, E) selection scores
        if self.n_groups > 1:
            N = x.shape[0]
            grouped = biased.view(N, self.n_groups, -1)                        # (N, G, E/G)
            group_scores = grouped.topk(min(GROUP_SCORE_TOPK, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices         # (N, M)
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # (N, G)
            # -inf, not 0: a biased score can be negative, and 0 could then beat an allowed expert
            biased = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)  # (N, E)
        indices = biased.topk(self.topk, dim=-1).indices                       # (N, K)
        gates = scores.gather(1, indices)                                      # (N, K) unbiased s_i
        if self.score_func == "sigmoid":
            gates = gates / gates.sum(dim=-1, keepdim=True)                    # eq. 13: normalise over chosen
        return gates * self.route_scale, indices, scores

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float) -> None:
        """Aux-loss-free balancing (V3 §2.1.2): b_i <- b_i + speed * sign(mean load - load_i).

        Overloaded experts become less attractive to the *selection*, underloaded ones more; the gate
        values and the gradient are untouched. `load` (E,) counts tokens routed to each expert."""
        load = load.to(self.bias.device, torch.float32)
        self.bias += speed * torch.sign(load.mean() - load)


class MoE(Float32Buffers):
    """DeepSeekMoE layer (V3 eq. 12): h' = u + sum_shared FFN_s(u) + sum_routed g_i FFN_i(u).

    The residual add happens in Block. Routed experts are fine-grained SwiGLU MLPs of width
    moe_inter_dim; every expert runs only on the tokens routed to it. Two implementations, same weights,
    same outputs (a test compares values and gradients):
      loop:    tokens sorted by expert, one small MLP call per expert on its contiguous slice, as the
               official code does (the plain reference; also the FP8 path, whose per-expert Linear layers
               simulate FP8 matmuls). It reads each expert's weights in place, so decoding uses it.
      grouped: the same sorted slices, but all experts in one grouped matmul per projection over the
               experts' weights stacked to (E, ...), gate and up projection fused into one. No Python loop
               over experts and no host sync, so a compiled graph has fixed shapes and a GPU gets two
               launches instead of 3E. Used when a backward follows (training) or under torch.compile;
               stacking copies ~E*3*D*I numbers per call, which only the backward's gradients need.
    The weights are the per-expert MLPs either way (`experts.{i}.w1.weight`, the official names).
    The layer keeps two statistics for training: `load` (E,), tokens per expert accumulated across
    forward passes in training mode until `reset_load()` (the bias update and MaxVio use it), and
    `balance_loss`, the sequence-wise auxiliary loss of V3 eq. 17-20 for this forward (None when the
    layer did not run in training mode since Transformer.forward began). Only real tokens count in both:
    `token_mask` marks them, so padding is routed (it needs some output) but never counted.
    """
    fp32_buffers = ("load",)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_routed_experts, self.n_activated_experts = args.n_routed_experts, args.n_activated_experts
        self.seq_aux_alpha = args.seq_aux_alpha
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim, args) for _ in range(args.n_routed_experts))
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, args)
                               if args.n_shared_experts > 0 else None)
        self.register_buffer("load", torch.zeros(args.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None
        self.impl = "loop" if args.fp8 else "grouped"   # FP8 keeps the loop: its Linear layers simulate FP8

    def reset_load(self) -> None:
        """Zero the accumulated per-expert token counts."""
        self.load.zero_()

    def forward(self, x: torch.Tensor, token_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D). token_mask (B, T) bool marks real tokens (None: all are real)."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)                                        # (N, D)
        gates, indices, scores = self.gate(flat)                       # (N, K), (N, K), (N, E)
        if self.training:
            real = None if token_mask is None else token_mask.reshape(-1, 1).to(scores.dtype)  # (N, 1)
            chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0)   # (N, E) one-hot of the K picks
            counted = chosen if real is None else chosen * real           # padding counts nowhere
            self.load += counted.sum(0).detach()
            self.balance_loss = self._sequence_balance_loss(counted, scores, real, B, T)
        order = indices.flatten().argsort(stable=True)                 # (N*K,) assignments sorted by expert
        grouped = self.impl == "grouped" and (torch.is_grad_enabled() or torch.compiler.is_compiling())
        y = (self._grouped if grouped else self._loop)(flat, gates, indices, order)   # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)                          # shared experts see every token
        return y.view(B, T, D)

    def _loop(self, flat, gates, indices, order) -> torch.Tensor:
        """Routed experts, the plain way: each expert runs on its slice of the sorted assignments, results
        are scattered back weighted by their gates. (N, D) -> (N, D)."""
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)  # (E,)
        token_of = order // self.n_activated_experts                   # which token each slot came from
        gate_of = gates.flatten()[order]                               # (N*K,)
        y = torch.zeros_like(flat, dtype=torch.float32)                # accumulate in fp32
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            tok = token_of[start:start + n]                            # (n,) token ids for expert e
            out = self.experts[e](flat.index_select(0, tok)) * gate_of[start:start + n, None]   # (n, D)
            y.index_add_(0, tok, out.float())
            start += n
        return y.to(flat.dtype)

    def _grouped(self, flat, gates, indices, order) -> torch.Tensor:
        """Routed experts as two grouped matmuls over the sorted assignments. (N, D) -> (N, D).

        offs[e] is where expert e's slice ends in the sorted order; grouped_mm multiplies rows
        offs[e-1]:offs[e] by expert e's matrix, all experts in one call."""
        K, E = self.n_activated_experts, self.n_routed_experts
        dtype = self._matmul_dtype(flat)
        counts = torch.zeros(E, dtype=torch.int32, device=flat.device).index_add_(
            0, indices.flatten(), torch.ones_like(indices.flatten(), dtype=torch.int32))  # (E,) fixed shape
        offs = counts.cumsum(0, dtype=torch.int32)                     # (E,) slice ends
        w13, w2 = self._stacked_weights(dtype)                         # (E, 2I, D), (E, D, I)
        token_of = order // K                                          # (N*K,) token of each sorted slot
        # index_select, not flat[token_of]: same rows, but its backward is an index_add_ where indexing's is
        # an accumulating index_put_, the slower of the two on a CPU
        xs = flat.index_select(0, token_of).to(dtype)                  # (N*K, D)
        h = grouped_mm(xs, w13.transpose(1, 2), offs)                  # (N*K, 2I)
        h1, h3 = h.chunk(2, dim=-1)                                    # (N*K, I) each
        out = grouped_mm(F.silu(h1) * h3, w2.transpose(1, 2), offs)    # (N*K, D)
        out = out.float() * gates.flatten().index_select(0, order)[:, None]   # (N*K, D) weighted by the gates
        return torch.zeros_like(flat, dtype=torch.float32).index_add_(0, token_of, out).to(flat.dtype)  # (N, D)

    @staticmethod
    def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype the experts' matmuls run in: autocast's, when it is on, else x's."""
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def _stacked_weights(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' weights stacked for the grouped matmul, in dtype: one stack of [w1_0, w3_0, w1_1, ...]
        viewed as (E, 2I, D), each expert's [w1; w3] fused, and w2 (E, D, I). A copy, made at every call, so
        that each expert's own weight gets its gradient through the stack."""
        E, D = self.n_routed_experts, self.experts[0].w1.weight.shape[1]
        w13 = torch.stack([w for e in self.experts for w in (e.w1.weight, e.w3.weight)]).view(E, -1, D)
        w2 = torch.stack([e.w2.weight for e in self.experts])        # (E, D, I)
        return w13.to(dtype), w2.to(dtype)

    def _sequence_balance_loss(self, chosen, scores, real, B, T) -> torch.Tensor:
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch.

        f_i = E / (K T) * #tokens of the sequence routed to i; P_i = mean over the sequence's tokens of the
        normalised affinity s_i / sum_j s_j. Minimised when load and affinity mass are spread evenly.
        f_i counts the experts actually selected (biased, group-limited), whereas eq. 18 writes TopK of
        the unbiased s_{j,t}: the loss balances the load the experts really receive.
        chosen (N, E) one-hot picks of real tokens; real (N, 1) 1 for real tokens or None (all real): T is
        then each sequence's number of real tokens, and sequences with none are left out of the mean."""
        if self.seq_aux_alpha == 0:
            return torch.zeros((), device=scores.device)
        E, K = self.n_routed_experts, self.n_activated_experts
        p = scores / scores.sum(-1, keepdim=True)                      # (N, E) normalised affinities
        if real is None:
            f = chosen.view(B, T, E).sum(1) * E / (K * T)              # (B, E), no gradient (counts)
            return self.seq_aux_alpha * (f * p.view(B, T, E).mean(1)).sum(-1).mean()
        n_real = real.view(B, T).sum(1, keepdim=True)                  # (B, 1) real tokens per sequence
        f = chosen.view(B, T, E).sum(1) * E / (K * n_real.clamp(min=1))          # (B, E)
        p = (p * real).view(B, T, E).sum(1) / n_real.clamp(min=1)      # (B, E) mean over real tokens
        per_seq = (f * p).sum(-1)                                      # (B,)
        has = (n_real.squeeze(1) > 0).to(per_seq.dtype)
        return self.seq_aux_alpha * (per_seq * has).sum() / has.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# 7. Transformer block and Multi-Token Prediction
# ----------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is a dense MLP for the
    first n_dense_layers layers and DeepSeekMoE after (MTP blocks are MoE blocks too, as in V3)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim)
        self.ffn = MLP(args.dim, args.inter_dim, args) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x, cos, sin, cache=None, start_pos=0, mask=None, token_mask=None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); arguments as in MLA.forward, token_mask (B, T) as in MoE.forward."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, mask)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, token_mask) if isinstance(self.ffn, MoE) else self.ffn(h))


class MTPModule(nn.Module):
    """One Multi-Token Prediction module (V3 §2.2, eq. 21-24).

    At position i the main model predicts t_{i+1}; module k predicts t_{i+k+1}, k tokens further, keeping
    the causal chain: it combines the previous depth's representation h^{k-1}_i with the embedding of
    token t_{i+k} (which the earlier depths have just "predicted"), eq. 21:
        h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]      M_k = eh_proj, (D x 2D)
        h^k    = TRM_k(h'^k)                                          eq. 22, one transformer block
        P^k    = OutHead(norm(h^k))                                   eq. 23 (the paper: OutHead(h^k))
    The head is shared with the main model. Three choices the report leaves open or writes otherwise:
    the embedding comes first in the concatenation (eq. 21 writes h^{k-1} first); the module applies
    its own RMSNorm before the shared head (eq. 23 has none; the released checkpoint has one, listed as
    `shared_head` in the official README_WEIGHTS.md, and vLLM's DeepSeekMultiTokenPredictorLayer.forward
    in vllm/model_executor/models/deepseek_mtp.py concatenates [enorm(emb); hnorm(h)] and norms before the
    head); and h^0 is the main model's last block output *before* its final norm (the report does not say
    which; eq. 21's own RMSNorm makes the choice matter little).
    """

    def __init__(self, depth: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim)
        self.hnorm = RMSNorm(args.dim)
        self.eh_proj = Linear(2 * args.dim, args.dim, args.fp8, args.fp8_block, args.fp8_scale_fmt or None)
        self.block = Block(args.n_layers + depth, args)
        self.norm = RMSNorm(args.dim)

    def forward(self, h_prev, emb, cos, sin, cache=None, start_pos=0, mask=None, token_mask=None) -> torch.Tensor:
        """h_prev (B, T, D) = h^{k-1}; emb (B, T, D) = Emb(t_{i+k}) -> h^k (B, T, D), before self.norm."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))   # (B, T, D)
        return self.block(h, cos, sin, cache, start_pos, mask, token_mask)


# ----------------------------------------------------------------------------------------------------
# 8. The model
# ----------------------------------------------------------------------------------------------------

class Transformer(Float32Buffers):
    """DeepSeek-V3: embedding -> n_layers Blocks (MLA + dense/MoE) -> RMSNorm -> head, plus MTP modules.

    `logits, loss = model(idx, targets)`; loss = CE + (lambda/D) sum_k CE_k (MTP, V3 eq. 25) + balance loss
    (V3 eq. 17), and `model.loss_parts` holds the three parts (floats) of the last forward for logging.
    With `cache=` the call runs incrementally on the new tokens only (see KVCache). The RoPE tables, like
    the router bias and load counters, stay float32 in a model cast to bf16 (see Float32Buffers).
    """
    fp32_buffers = ("rope_cos", "rope_sin", "mtp_lambda_t")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)   # high precision even with fp8
        self.mtp = nn.ModuleList(MTPModule(k, args) for k in range(args.mtp_depth))
        cos, sin = precompute_rope(args)
        self.register_buffer("rope_cos", cos, persistent=False)          # (max_seq_len, rope_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._loss_parts: dict = {}
        # The current MTP weight, a schedule may lower it (train.py's mtp_lambda_at). A 0-dim tensor, not a float: a
        # compiled forward reads a tensor as an input, whereas it bakes a Python float in as a constant with
        # a guard on its value, so the schedule's switch would recompile the whole training graph.
        self.register_buffer("mtp_lambda_t", torch.tensor(float(args.mtp_lambda)), persistent=False)
        self._mtp_lambda = float(args.mtp_lambda)     # the same value as a Python float, for reading
        self.bias_update_speed = args.bias_update_speed   # current gamma; train.py's schedule may zero it
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) for every weight matrix and embedding (V3 §4.2); norms start at one."""
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)) and not module.weight.is_meta:
            nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)   # meta: nothing to fill

    def moe_layers(self) -> list[MoE]:
        """All MoE layers, main blocks first, then the MTP blocks. (An explicit walk, not self.modules():
        torch.compile cannot walk modules whose attributes this forward has set, such as balance_loss.)"""
        blocks = [*self.layers, *(module.block for module in self.mtp)]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    # ---- forward ----
    def trunk(self, idx: torch.Tensor, cache: "KVCache | None" = None,
              token_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """Embedding and all blocks: idx (B, T) -> h (B, T, D), the last block's output before the final
        norm (h^0 for MTP). With a cache, idx are the tokens at positions cache.pos.. and pos advances.
        token_mask (B, T) bool: real tokens, the only ones the MoE layers count (see forward)."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        mask = cache.attn_mask(start, T) if cache is not None else None
        h = self.run_blocks(idx, cache.layers if cache is not None else None, start, mask, token_mask)
        if cache is not None:
            cache.pos += T
        return h

    def run_blocks(self, idx: torch.Tensor, layer_caches: "list | None", start: int,
                   mask: "torch.Tensor | None", token_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """The per-step work of trunk, with its Python-side decisions (position, mask) made by the caller:
        idx (B, T) at positions start.. -> h (B, T, D). This is what `torch.compile` should capture for
        decoding (sample.py --compile), so nothing in it reads a tensor's value on the host."""
        T = idx.shape[1]
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        h = self.embed(idx)                                                # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, layer_caches[i] if layer_caches is not None else None, start, mask, token_mask)
        return h

    def forward(self, idx: torch.Tensor, targets: "torch.Tensor | None" = None,
                cache: "KVCache | None" = None, token_mask: "torch.Tensor | None" = None
                ) -> tuple[torch.Tensor, "torch.Tensor | None"]:
        """idx (B, T) int64 -> logits (B, T, vocab_size) float32, loss (scalar or None).

        targets (B, T) int64 are the next tokens (-1 = ignore); with them the loss includes MTP and the
        sequence-wise balance loss. MTP module k predicts targets[:, i+k] from position i, so it trains on
        the first T-k positions. token_mask (B, T) bool marks the real tokens of a padded batch (None: all
        real): padding is computed like any token but counts in no expert load (hence no bias update) and
        no balance loss. Every call computes its own losses: the MoE layers' balance losses are cleared
        first, so a layer that does not run this time (an MTP block when T <= mtp_depth) adds nothing."""
        for m in self.moe_layers():
            m.balance_loss = None
        h = self.trunk(idx, cache, token_mask)
        logits = self.head(self.norm(h)).float()                             # (B, T, V)
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        mtp = self._mtp_loss(h, idx, targets, token_mask)
        balance = sum((m.balance_loss for m in self.moe_layers() if m.balance_loss is not None),
                      torch.zeros((), device=h.device))
        loss = ce + mtp + balance
        # Kept as tensors: turning them into floats here would wait for the device (and break a compiled graph)
        self._loss_parts = {"ce": ce.detach(), "mtp": mtp.detach(), "balance": balance.detach()}
        return logits, loss

    @property
    def mtp_lambda(self) -> float:
        """lambda of V3 eq. 25 as the next forward uses it; `model.mtp_lambda = x` sets it (kept in mtp_lambda_t)."""
        return self._mtp_lambda

    @mtp_lambda.setter
    def mtp_lambda(self, value: float) -> None:
        """Set lambda (V3 eq. 25) for the next forwards, in place in mtp_lambda_t."""
        self._mtp_lambda = float(value)
        self.mtp_lambda_t.fill_(self._mtp_lambda)         # in place: a compiled graph sees the new value

    @property
    def loss_parts(self) -> dict:
        """The last forward's loss parts as floats: {"ce", "mtp", "balance"} (empty before any loss)."""
        return {k: v.item() for k, v in self._loss_parts.items()}

    def _mtp_loss(self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                  token_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """L_MTP = (lambda / D) sum_k CE_k (V3 eq. 24-25). h (B, T, D) is h^0 from the trunk."""
        T = idx.shape[1]
        total = torch.zeros((), device=h.device)
        if not self.mtp or T <= len(self.mtp):
            return total
        for k, module in enumerate(self.mtp, start=1):
            h_prev = h[:, :T - k]                                              # (B, T-k, D) h^{k-1}_i
            emb = self.embed(idx[:, k:])                                       # (B, T-k, D) Emb(t_{i+k})
            # position i is real when both its own token and t_{i+k} are
            real = None if token_mask is None else token_mask[:, :T - k] & token_mask[:, k:]   # (B, T-k)
            h = module(h_prev, emb, self.rope_cos[:T - k], self.rope_sin[:T - k],
                       token_mask=real)                                        # (B, T-k, D) h^k
            logits = self.head(module.norm(h)).float()                         # (B, T-k, V) shared head
            total = total + F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten(), ignore_index=-1)
        return total * self.mtp_lambda_t / len(self.mtp)

    def mtp_draft(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the first MTP module incrementally to draft one token ahead (self-speculative decoding).

        h_prev (B, T, D): the trunk's h^0 at positions cache.mtp_pos.. ; next_tokens (B, T): the token one
        step after each of those positions. Writes the MTP block's cache and advances cache.mtp_pos.
        Returns logits (B, T, V) for the token two steps after each position."""
        start, T = cache.mtp_pos, h_prev.shape[1]
        logits = self.run_mtp(h_prev, next_tokens, cache.mtp_layers[0], start, cache.attn_mask(start, T))
        cache.mtp_pos = start + T
        return logits

    def run_mtp(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, layer_cache: dict, start: int,
                mask: "torch.Tensor | None") -> torch.Tensor:
        """The work of mtp_draft without its host-side bookkeeping (sample.py's fused speculative round calls it
        too, inside its compiled graph): MTP module 1 on h_prev (B, T, D) and Emb(next_tokens) (B, T) at positions start..
        -> logits (B, T, V)."""
        T = h_prev.shape[1]
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        module = self.mtp[0]
        h = module(h_prev, self.embed(next_tokens), cos, sin, layer_cache, start, mask)   # (B, T, D) h^1
        return self.head(module.norm(h)).float()

    # ---- balancing ----
    def expert_load(self) -> torch.Tensor:
        """(n_moe_layers, E) tokens per expert accumulated since the last update_bias (main then MTP)."""
        return torch.stack([m.load.clone() for m in self.moe_layers()])

    @torch.no_grad()
    def update_bias(self, load: "torch.Tensor | None" = None, speed: "float | None" = None) -> torch.Tensor:
        """Aux-loss-free bias step for every MoE layer from `load` (default: the accumulated counts, which
        train.py all-reduces across ranks first), then reset the counters. Call after each optimizer step.
        The step is `speed`, default self.bias_update_speed (args.bias_update_speed unless a schedule,
        train.py's bias_update_speed_at, changed it). Returns the per-layer MaxVio of the load used."""
        load = self.expert_load() if load is None else load
        speed = self.bias_update_speed if speed is None else speed
        for m, row in zip(self.moe_layers(), load):
            m.gate.update_bias(row, speed)
            m.reset_load()
        return max_violation(load)

    # ---- generation ----
    def new_cache(self, batch_size: int, max_len: int, attn_impl: "str | None" = None) -> KVCache:
        """An empty KVCache on this model's device and dtype."""
        p = self.embed.weight
        return KVCache(self.args, batch_size, max_len, device=p.device, dtype=p.dtype, attn_impl=attn_impl)

    def next_logits(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Decoding's forward: idx (B, T) new tokens -> (B, V) float32 logits for the token after the last.

        Like forward(idx, cache=cache)[0][:, -1], but the final norm and the head run on the last position
        only: the other T-1 rows of a prefill would be computed and thrown away."""
        h = self.trunk(idx, cache)                                         # (B, T, D)
        return self.head(self.norm(h[:, -1])).float()                      # (B, V)


# ----------------------------------------------------------------------------------------------------
# 9. Two measures: cache size per token and load imbalance
# ----------------------------------------------------------------------------------------------------

def kv_cache_numbers_per_token(args: ModelArgs) -> dict:
    """Numbers cached per token per layer (V2 Table 1): MLA's latent (d_c + d_h^R), our naive path's full
    per-head keys and values, and a standard MHA with the same heads (2 n_h d_h)."""
    return {"mla": args.kv_lora_rank + args.qk_rope_head_dim,
            "naive": args.n_heads * (args.qk_head_dim + args.v_head_dim),
            "mha": 2 * args.n_heads * args.qk_nope_head_dim}


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load - 1 per row of (layers, E) counts (0 = perfectly balanced)."""
    load = load.float()
    return load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-9) - 1
