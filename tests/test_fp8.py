"""Tests for the FP8 training simulation (model.py §2, V3 §3.3): the operands of all three GEMMs of a linear
layer (Fprop, Dgrad, Wgrad) land on the scaled E4M3 grid with the tile orientation along each GEMM's inner
dimension; power-of-two scales; the edge cases; the accumulation-precision model; BF16 AdamW moments; and
the V3 §4.2 schedules.

Run: python -m pytest tests/test_fp8.py -q
"""

import pytest
import torch
from test_model import tiny

from extras.fp8 import fp8_quantize, matmul_limited_acc, round_mantissa
from model import (
    MLA,
    Linear,
    ModelArgs,
    Transformer,
    fp8_quant_dequant,
    precompute_rope,
)
from train import (
    BIAS_FREEZE_SWITCH,
    MTP_LAMBDA_SWITCH,
    AdamWBF16,
    bias_update_speed_at,
    mtp_lambda_at,
)


def on_e4m3_grid(d: torch.Tensor, block, scale_fmt=None) -> bool:
    """True if d (R, C) is, block by block, a scale times exact E4M3 values, with the scale that
    fp8_quantize derives from d itself (re-quantising a quantised tensor must change nothing)."""
    return torch.equal(fp8_quant_dequant(d, block, scale_fmt), d)


def varied(*shape, seed=0) -> torch.Tensor:
    """Gaussian values whose magnitude differs per row and per column by orders of magnitude, so quantising
    along the wrong dimension gives different numbers than along the right one."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-3, 3, shape[0])[:, None]
    cols = torch.logspace(2, -2, shape[1])[None, :][:, torch.randperm(shape[1], generator=g)]
    return torch.randn(*shape, generator=g) * rows * cols


# ------------------------------------------------------------------------------------- the three GEMMs

@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_linear_fprop_dgrad_wgrad_operands_are_e4m3_along_their_inner_dimension(scale_fmt):
    b, n_in, n_out, N = 16, 64, 40, 150             # out ends in a partial block; 150 tokens end in a partial tile
    lin = Linear(n_in, n_out, fp8=True, fp8_block=b, fp8_scale_fmt=scale_fmt)
    with torch.no_grad():
        lin.weight.copy_(varied(n_out, n_in, seed=1))
    lin.record = {}
    x = varied(N, n_in, seed=2).reshape(3, N // 3, n_in).requires_grad_()
    dy = varied(N, n_out, seed=3)
    y = lin(x)
    y.backward(dy.view(3, N // 3, n_out))
    x2, W = x.detach().reshape(N, n_in), lin.weight.detach()
    q = lambda t, blk: fp8_quant_dequant(t, blk, scale_fmt)

    # Fprop y = x W^T, inner dim in_features: x per token in 1 x b tiles, W in b x b blocks
    xq, wq = lin.record["fprop"]
    assert torch.equal(xq, q(x2, (1, b))) and torch.equal(wq, q(W, (b, b)))
    assert torch.allclose(y.detach().reshape(N, n_out), xq @ wq.T, rtol=1e-5, atol=1e-5)
    # Dgrad dx = dy W, inner dim out_features: dy per token in 1 x b tiles along out; W's square blocks
    # are the same whether W or W^T is tiled
    dyq, wq2 = lin.record["dgrad"]
    assert torch.equal(dyq, q(dy, (1, b))) and torch.equal(wq2, q(W.T, (b, b)).T)
    assert torch.allclose(x.grad.reshape(N, n_in), dyq @ wq2, rtol=1e-5, atol=1e-5)
    # Wgrad dW = dy^T x, inner dim tokens: dy and x in b x 1 tiles (b tokens of one channel); x is Fprop's
    # FP8 copy re-quantised (dequantise, transpose, re-quantise, as V3 §3.5.2 describes)
    dyw, xw = lin.record["wgrad"]
    assert torch.equal(dyw, q(dy.T, (1, b)).T) and torch.equal(dyw, q(dy, (b, 1)))
    assert torch.equal(xw, q(xq, (b, 1)))
    assert torch.allclose(lin.weight.grad, dyw.T @ xw, rtol=1e-5, atol=1e-4)
    assert lin.weight.grad.dtype == torch.float32

    # every operand sits on the scaled E4M3 grid of its own tiling ...
    for t, blk in ((xq, (1, b)), (wq, (b, b)), (dyq, (1, b)), (dyw, (b, 1)), (xw, (b, 1))):
        assert on_e4m3_grid(t, blk, scale_fmt)
    # ... and the test data tell the orientations apart: along the other dimension the numbers differ
    assert not torch.equal(q(dy, (1, b)), q(dy, (b, 1))) and not torch.equal(q(x2, (1, b)), q(x2, (b, 1)))
    # the backward is no longer the straight-through identity of the old forward-only simulation
    assert not torch.allclose(lin.weight.grad, dy.T @ xq, rtol=1e-4, atol=0)


def test_fp8_linear_gradients_close_to_exact_ones():
    torch.manual_seed(0)
    ref, lin = Linear(256, 128), Linear(256, 128, fp8=True, fp8_block=128)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(200, 256)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(200, 128)
    ref(xr).backward(dy)
    lin(xf).backward(dy)
    for a, b in ((xr.grad, xf.grad), (ref.weight.grad, lin.weight.grad)):
        rel = ((a - b).norm() / a.norm()).item()
        assert 1e-3 < rel < 0.06                                    # two E4M3 roundings: a few percent


def test_every_linear_of_the_blocks_runs_fp8_in_all_three_gemms_on_the_naive_path():
    torch.manual_seed(0)
    model = Transformer(tiny(fp8=True, attn_impl="naive", train_attn_impl="naive"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    for m in linears.values():
        m.record = {}
    idx = torch.randint(0, 64, (2, 24))
    _, loss = model(idx, idx)
    loss.backward()
    missing = [n for n, m in linears.items() if ".experts." not in n and set(m.record) != {"fprop", "dgrad", "wgrad"}]
    assert not missing                                              # wkv_b, eh_proj and shared experts included
    used_experts = [m for n, m in linears.items() if ".experts." in n and m.record]
    assert used_experts and all(set(m.record) == {"fprop", "dgrad", "wgrad"} for m in used_experts)
    attn = model.layers[0].attn
    kv = attn.kv_norm(attn.wkv_a(model.layers[0].attn_norm(model.embed(idx))).split([8, 4], -1)[0])
    assert torch.equal(attn.wkv_b.record["fprop"][0], fp8_quant_dequant(kv.detach().reshape(-1, 8), (1, 8),
                                                                      attn.wkv_b.fp8_scale_fmt))
    assert isinstance(model.head, torch.nn.Linear) and not isinstance(model.head, Linear)  # head stays high precision


def test_absorbed_path_uses_the_quantised_wkv_b_weight_and_agrees_with_naive():
    torch.manual_seed(0)
    naive, absorb, exact = (MLA(tiny(fp8=fp8, attn_impl=impl, train_attn_impl=impl)) for fp8, impl in
                            ((True, "naive"), (True, "absorb"), (False, "naive")))
    absorb.load_state_dict(naive.state_dict())
    exact.load_state_dict(naive.state_dict())
    cos, sin = precompute_rope(tiny())
    x = torch.randn(2, 16, 32)
    absorb.wkv_b.record = {}
    yn, ya, ye = (m(x, cos[:16], sin[:16]) for m in (naive, absorb, exact))
    assert absorb.wkv_b.record == {}             # absorbed: wkv_b's weight enters einsums, no Linear call
    rel = lambda u, v: ((u - v).norm() / v.norm()).item()
    # same quantised weights; naive also rounds c^KV as wkv_b's input, absorbed keeps it in high precision
    # as the attention operand: the two differ by less than FP8 differs from the exact layer
    assert 0 < rel(ya, yn) < rel(yn, ye)


# ------------------------------------------------------------------------------------- scales and edge cases

def test_ue8m0_scales_are_powers_of_two_and_exact_in_bf16():
    x = varied(64, 256, seed=4)
    _, s = fp8_quantize(x, (1, 128), "ue8m0")
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    _, s_fp32 = fp8_quantize(x, (1, 128))
    assert (s >= s_fp32).all() and (s < 2 * s_fp32).all()           # rounded up: max|x| / s <= 448
    d = fp8_quant_dequant(x, (1, 128), "ue8m0")
    assert torch.equal(d.bfloat16().float(), d)                      # no second rounding under BF16
    d32 = fp8_quant_dequant(x, (1, 128))
    assert not torch.equal(d32.bfloat16().float(), d32)              # with FP32 scales there is one
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8_quantize(x, (1, 128), "e5m2")
    with pytest.raises(ValueError, match="fp8_scale_fmt"):
        ModelArgs(fp8_scale_fmt="ue4m3")


@pytest.mark.parametrize("magnitude", [1.0, 1e-13, 1e-30])
def test_tiny_tiles_keep_their_relative_precision_and_zero_tiles_stay_zero(magnitude):
    torch.manual_seed(0)
    x = torch.randn(4, 128) * magnitude
    rel = ((fp8_quant_dequant(x, (1, 128)).double() - x.double()).norm() / x.double().norm()).item()
    assert 1e-3 < rel < 0.04                                        # the usual E4M3 rounding, no flush to zero
    z = torch.zeros(2, 128)
    assert torch.equal(fp8_quant_dequant(z, (1, 128)), z)
    assert torch.equal(fp8_quant_dequant(z, (1, 128), "ue8m0"), z)


# ------------------------------------------------------------------------------------- accumulation precision

def test_round_mantissa_truncates_or_rounds_at_the_given_width():
    x = torch.tensor([1 + 2 ** -15, 1 + 2 ** -14 + 2 ** -15, -(1 + 3 * 2 ** -16)], dtype=torch.float64)
    assert round_mantissa(x, 14, "truncate").tolist() == [1.0, 1 + 2 ** -14, -1.0]
    assert round_mantissa(x, 14, "nearest").tolist() == [1.0, 1 + 2 ** -13, -(1 + 2 ** -14)]
    assert torch.equal(round_mantissa(x, 52), x)


def test_limited_accumulation_error_grows_with_k_and_promotion_removes_it():
    gen = torch.Generator().manual_seed(0)
    errs = {}
    for K in (256, 1024, 4096):
        a = torch.rand(8, K, generator=gen).to(torch.float8_e4m3fn).float()
        b = torch.rand(K, 8, generator=gen).to(torch.float8_e4m3fn).float()
        ref = a.double() @ b.double()
        def rel(c, ref=ref):
            return ((c.double() - ref).norm() / ref.norm()).item()
        errs[K] = rel(matmul_limited_acc(a, b, 14, None)), rel(matmul_limited_acc(a, b, 14, 128))
        assert rel(matmul_limited_acc(a, b, 52, None)) < 1e-7              # a wide accumulator is exact (FP32 out)
    assert errs[256][0] < errs[1024][0] < errs[4096][0]                   # without promotion: grows with K
    assert 0.005 < errs[4096][0] < 0.1                                     # percent level at K = 4096
    assert errs[4096][1] < errs[4096][0] / 20 and errs[4096][1] < 1e-3     # promotion every 128: ~0.02%
    with pytest.raises(ValueError, match="rounding"):
        matmul_limited_acc(a, b, 14, 128, "stochastic")


# ------------------------------------------------------------------------------------- BF16 AdamW moments

def test_adamw_bf16_matches_torch_adamw_and_stores_bf16_moments():
    torch.manual_seed(0)
    w0 = torch.randn(16, 8)
    ps = [torch.nn.Parameter(w0.clone()) for _ in range(3)]
    ref = torch.optim.AdamW([ps[0]], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ours32 = AdamWBF16([ps[1]], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, moment_dtype=torch.float32)
    ours16 = AdamWBF16([ps[2]], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(16, 8)
        for p, opt in zip(ps, (ref, ours32, ours16)):
            p.grad = g.clone()
            opt.step()
    assert torch.allclose(ps[1], ps[0], rtol=0, atol=1e-6)
    state = ours16.state[ps[2]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and ps[2].dtype == torch.float32
    assert not torch.equal(ps[2], ps[0]) and torch.allclose(ps[2], ps[0], rtol=0, atol=1e-3)
    again = AdamWBF16([torch.nn.Parameter(ps[2].detach().clone())], lr=1e-2)
    again.load_state_dict(ours16.state_dict())                      # resume keeps the moments in BF16
    assert all(again.state[p]["exp_avg"].dtype == torch.bfloat16 for p in again.state)


# ------------------------------------------------------------------------------------- V3 §4.2 schedules

def test_schedules_follow_v3_token_proportions():
    assert MTP_LAMBDA_SWITCH == pytest.approx(10 / 14.8) and BIAS_FREEZE_SWITCH == pytest.approx(14.3 / 14.8)
    assert mtp_lambda_at(0.0) == 0.3 and mtp_lambda_at(0.67) == 0.3
    assert mtp_lambda_at(0.68) == pytest.approx(0.1) and mtp_lambda_at(1.0) == pytest.approx(0.1)
    assert mtp_lambda_at(0.9, 0.6) == pytest.approx(0.2)
    assert bias_update_speed_at(0.96, 0.01) == 0.01 and bias_update_speed_at(0.97, 0.01) == 0.0


def test_model_follows_scheduled_lambda_and_bias_speed():
    torch.manual_seed(0)
    model = Transformer(tiny(seq_aux_alpha=0.0)).train()
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)
    mtp_full = model.loss_parts["mtp"]
    model.mtp_lambda = mtp_lambda_at(0.9, model.args.mtp_lambda)
    model(idx, idx)
    assert model.loss_parts["mtp"] == pytest.approx(mtp_full / 3, rel=1e-5)
    bias = [m.gate.bias.clone() for m in model.moe_layers()]
    model.update_bias(speed=bias_update_speed_at(0.99))
    assert all(torch.equal(m.gate.bias, b) for m, b in zip(model.moe_layers(), bias))
    model.bias_update_speed = bias_update_speed_at(0.99, model.args.bias_update_speed)
    model(idx, idx)
    model.update_bias()
    assert all(torch.equal(m.gate.bias, b) for m, b in zip(model.moe_layers(), bias))
    model.bias_update_speed = bias_update_speed_at(0.5, model.args.bias_update_speed)
    model(idx, idx)
    model.update_bias()
    assert any(not torch.equal(m.gate.bias, b) for m, b in zip(model.moe_layers(), bias))


def test_kv_lora_rank_must_compress_the_hidden_state():
    with pytest.raises(ValueError, match="kv_lora_rank=32 is invalid: must be smaller than dim=32"):
        tiny(kv_lora_rank=32)
    assert tiny(kv_lora_rank=31).kv_lora_rank == 31


SMALL_RUN = ["--n_examples=2000", "--batch_size=4", "--block_size=32", "--max_seconds=0", "--eval_interval=1000",
             "--eval_iters=1", "--n_eval=0", "--log_interval=5", "--device=cpu", "--max_iters=8", "--warmup_iters=2",
             "--model=dim=48,inter_dim=96,moe_inter_dim=24,n_layers=2,kv_lora_rank=16,q_lora_rank=32"]


@pytest.mark.parametrize("on", [True, False])
def test_train_follows_the_v3_schedules_unless_switched_off(tmp_path, monkeypatch, on):
    import train
    seen = []
    real = train.mtp_lambda_at
    monkeypatch.setattr(train, "mtp_lambda_at", lambda p, lam: seen.append(p) or real(p, lam))
    train.main([*SMALL_RUN, f"--out_dir={tmp_path}", f"--v3_schedules={str(on).lower()}"])
    assert seen == ([s / 8 for s in range(8)] if on else [])


def test_train_with_bf16_moments_keeps_them_in_bf16(tmp_path):
    import train
    train.main([*SMALL_RUN, f"--out_dir={tmp_path}", "--bf16_moments=true", "--max_iters=3", "--optimizer=adamw"])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())
    # with Muon (the default) the AdamW half keeps its moments in BF16 too
    train.main([*SMALL_RUN, f"--out_dir={tmp_path / 'muon'}", "--bf16_moments=true", "--max_iters=3"])
    state = torch.load(tmp_path / "muon" / "ckpt.pt", weights_only=True)["optimizer"]["adamw"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())
