"""
tinyseek/extras/fp8.py -- tools to look at FP8 numbers: the storage format, the quantisation error, and the
limited-precision accumulation of FP8 tensor cores (DeepSeek-V3 §3.3, arXiv 2412.19437).

model.py simulates FP8 training itself (fp8_quant_dequant, FP8LinearFunction, Linear); it only needs each
tile rounded to the E4M3 grid and back. The functions here show the pieces that simulation folds together,
for notebooks/05_fp8.ipynb, the tests and extras/bench.py:

    fp8_quantize / fp8_dequantize   E4M3 values and one float32 scale per block, as an FP8 checkpoint stores them
    fp8_quant_error                 how much block quantisation changes a tensor
    matmul_limited_acc              a GEMM whose running sum keeps ~14 mantissa bits, with V3's FP32 promotion
"""

import torch

from model import fp8_quant_dequant, fp8_tiles


def fp8_quantize(x: torch.Tensor, block: tuple[int, int], scale_fmt: "str | None" = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D tensor to E4M3 with one float32 scale per (br x bc) block, scales computed online.

    Args:
        x: (R, C) float tensor.
        block: (br, bc): (1, 128) for activation tiles, (128, 128) for weight blocks, (128, 1) for the
            token-wise tiles of Wgrad.
        scale_fmt: None (scale = max|x| / 448) or "ue8m0" (that scale rounded up to a power of two).
    Returns:
        q: (R, C) torch.float8_e4m3fn values x / scale, each block's max |x| mapped onto (at most) 448.
        scale: (ceil(R/br), ceil(C/bc)) float32, one per block (edge blocks may be partial, zero padded).
    """
    R, C = x.shape
    q, scale = fp8_tiles(x, block, scale_fmt)
    return q.view(q.shape[0] * q.shape[1], -1)[:R, :C], scale[:, 0, :, 0]


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Inverse of fp8_quantize: (R, C) E4M3 values times their block's scale -> (R, C) float32."""
    br, bc = block
    s = scale.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)  # (R', C') one scale per element
    return q.float() * s[:q.shape[0], :q.shape[1]]


def fp8_quant_error(x: torch.Tensor, block: tuple[int, int] = (1, 128)) -> dict:
    """Report how much E4M3 block quantisation changes a tensor (for notebooks and tests).

    Returns a dict with `rel_err` (||q(x) - x|| / ||x||), `max_abs_err` and `zero_frac` (fraction of
    non-zero entries flushed to zero)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    q = fp8_quant_dequant(x2, block).double()
    x2 = x2.double()                                   # float64 so norms of huge values do not overflow
    err = q - x2
    nonzero = x2 != 0
    return {"rel_err": (err.norm() / x2.norm().clamp(min=1e-30)).item(),
            "max_abs_err": err.abs().max().item(),
            "zero_frac": ((q == 0) & nonzero).float().sum().item() / max(1, int(nonzero.sum()))}


# Accumulation precision (V3 §3.3.2). An FP8 GEMM on H800 tensor cores keeps only about 14 bits of its
# running sum: each product is aligned to the accumulator's exponent and the bits below its last place are
# dropped. Over a long inner dimension these small losses add up; the report measured a maximum relative
# error of nearly 2% at K = 4096. V3's fix: after every N_C = 128 products (4 WGMMAs) copy the partial sum
# to an FP32 register on the CUDA cores, add it there (and apply the scales), and restart the tensor-core sum.

def round_mantissa(x: torch.Tensor, bits: int, rounding: str = "truncate") -> torch.Tensor:
    """x rounded to `bits` explicit mantissa bits (float32 has 23, E4M3 3) at its own exponent.

    rounding="truncate" drops the lower bits (round toward zero, what an aligning adder does);
    "nearest" rounds to the nearest representable value. Computed in float64; returns float64."""
    m, e = torch.frexp(x.double())                      # x = m * 2^e, 0.5 <= |m| < 1
    step = 2.0 ** (bits + 1)                            # bits + 1 significant bits including the leading 1
    m = torch.trunc(m * step) if rounding == "truncate" else torch.round(m * step)
    return torch.ldexp(m / step, e)


def matmul_limited_acc(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 14, n_c: "int | None" = 128,
                       rounding: str = "truncate") -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) float32, accumulated the way an FP8 tensor core does.

    Products are exact (two E4M3 mantissas need 8 bits); after each of the K additions the running sum is
    rounded to `mantissa_bits` (round_mantissa). With n_c, every n_c products the partial sum is promoted:
    added into an FP32 accumulator, and the reduced-precision sum restarts from zero (V3's fix). n_c=None
    accumulates all K products in reduced precision (the H800 default the report warns about). Loops over
    K in Python: for experiments on small matrices, not for training."""
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding={rounding!r} is invalid: use 'truncate' or 'nearest'")
    a64, b64 = a.double(), b.double()
    M, K = a64.shape
    partial = torch.zeros(M, b64.shape[1], dtype=torch.float64)       # (M, N) tensor-core accumulator
    total = torch.zeros(M, b64.shape[1], dtype=torch.float32)         # (M, N) FP32 registers
    for k in range(K):
        partial = round_mantissa(partial + a64[:, k, None] * b64[None, k, :], mantissa_bits, rounding)
        if n_c is not None and (k + 1) % n_c == 0:
            total = total + partial.float()                            # promotion: one FP32 add per n_c
            partial = torch.zeros_like(partial)
    return total + partial.float()
