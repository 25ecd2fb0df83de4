"""Tests for model.py: equivalences (naive vs absorbed attention, cached vs full forward, vectorised vs
loop MoE), the router's rules, MTP, FP8 simulation, parameter counts and config validation.

Run: python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from extras.fp8 import fp8_quant_error, fp8_quantize
from model import (
    MLA,
    KVCache,
    ModelArgs,
    MoE,
    RMSNorm,
    Transformer,
    apply_rope,
    fp8_quant_dequant,
    kv_cache_numbers_per_token,
    latent_attention,
    max_violation,
    precompute_rope,
)
from sample import generate_batch
from train import count_params


def tiny(**kw) -> ModelArgs:
    """A very small config with every feature on, for fast tests."""
    base = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 16, "n_layers": 3, "n_dense_layers": 1,
                "n_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2, "n_expert_groups": 4,
                "n_limited_groups": 2, "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                "v_head_dim": 8, "max_seq_len": 64, "original_seq_len": 64, "mtp_depth": 1, "init_std": 0.1, "fp8_block": 8}
    base.update(kw)
    return ModelArgs(**base)


def make(args, seed=0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(args).eval()
    for layer in m.moe_layers():                     # a non-zero bias makes routing tests meaningful
        layer.gate.bias.uniform_(-0.05, 0.05)
    return m


# ---------------------------------------------------------------------------------------------- MLA

@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_naive_and_absorbed_attention_agree(q_lora_rank):
    args = tiny(q_lora_rank=q_lora_rank)
    naive, absorb = make(args), make(args)
    absorb.load_state_dict(naive.state_dict())
    for layer in absorb.layers:
        layer.attn.train_attn_impl = "absorb"                      # the path of a forward without a cache
    for layer in naive.layers:
        layer.attn.train_attn_impl = "naive"
    idx = torch.randint(0, args.vocab_size, (3, 20))
    a, _ = naive(idx)
    b, _ = absorb(idx)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_naive_and_absorbed_training_gradients_agree():
    """Training runs the absorbed path as multi-query attention (latent_attention): its loss and every
    weight's gradient equal the naive path's."""
    args = tiny()
    naive, absorb = make(args), make(args)
    absorb.load_state_dict(naive.state_dict())
    for model, impl in ((naive, "naive"), (absorb, "absorb")):
        for layer in list(model.layers) + [m.block for m in model.mtp]:
            layer.attn.train_attn_impl = impl
    idx, targets = torch.randint(0, args.vocab_size, (3, 20)), torch.randint(0, args.vocab_size, (3, 20))
    losses = [model(idx, targets)[1] for model in (naive, absorb)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(naive.named_parameters(), absorb.parameters()):
        if p.grad is not None or q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_auto_trains_absorbed_only_where_absorption_adds_no_arithmetic():
    """Without a cache (training) 'auto' absorbs where the latent is no wider than a head's key (d_c <= d_h: tiny,
    nano) and runs naive where absorbing would multiply the attention's arithmetic (small 256 vs 64, V3 512 vs
    128); an explicit choice wins; decoding keeps attn_impl either way."""
    assert {p: ModelArgs.preset(p).full_attn_impl() for p in ("tiny", "nano", "small", "16B", "671B")} == {
        "tiny": "absorb", "nano": "absorb", "small": "naive", "16B": "naive", "671B": "naive"}
    assert ModelArgs.preset("small", train_attn_impl="absorb").full_attn_impl() == "absorb"
    assert ModelArgs.preset("tiny", train_attn_impl="naive").full_attn_impl() == "naive"
    assert ModelArgs.preset("small").attn_impl == "absorb"                  # the latent cache for decoding


def test_forward_without_cache_runs_the_training_path_and_decoding_the_cache_path(monkeypatch):
    """train_attn_impl='naive' with attn_impl='absorb': the full forward never touches the latent attention,
    the cached forward does and caches the latent; both give the same logits."""
    import model as model_module
    calls = []
    real = model_module.latent_attention
    monkeypatch.setattr(model_module, "latent_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = make(tiny(attn_impl="absorb", train_attn_impl="naive"))
    idx = torch.randint(0, 64, (2, 10))
    full, _ = m(idx)
    assert calls == []
    cache = m.new_cache(2, 10)
    with torch.no_grad():                                               # as decoding runs
        cached, _ = m(idx, cache=cache)
    assert len(calls) > 0 and cache.attn_impl == "absorb"
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-4)


def expanded_latent_attention(q, latent, r, mask, scale):
    """Absorbed attention the plain way: the one latent key/value head copied to every query head, per-head
    causal SDPA (mask None only). q (B, T, H, r + rope), latent (B, S, r + rope) -> (B, T, H, r)."""
    kh = latent.unsqueeze(1).expand(-1, q.shape[2], -1, -1)             # (B, H, S, r + rope)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kh, kh, is_causal=True, scale=scale)
    return o[..., :r].transpose(1, 2)


def test_latent_attention_gradients_equal_expanded():
    """Causal self-attention of a training batch: the multi-query form's gradients (queries and latent, which is
    key and value at once) equal those of the latent copied to every head."""
    torch.manual_seed(0)
    B, T, H, r, rope = 3, 11, 4, 8, 4
    q, latent = torch.randn(B, T, H, r + rope), torch.randn(B, T, r + rope)
    g = torch.randn(B, T, H, r)
    grads = []
    for fn in (latent_attention, expanded_latent_attention):
        qq, ll = q.clone().requires_grad_(), latent.clone().requires_grad_()
        out = fn(qq, ll, r, None, 0.3)
        out.backward(g)
        grads.append((out.detach(), qq.grad, ll.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 7, 32), (5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_plain_formula_values_and_gradients(shape, dtype):
    """RMSNorm (F.rms_norm in float32) == x * rsqrt(mean(x^2) + eps) * w written out, values and gradients for
    the input and the weight, in float32 and for a bfloat16 input (computed in float32)."""
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape).to(dtype)
    g = torch.randn(shape)
    xa = x.clone().requires_grad_()
    out = norm(xa)
    out.float().backward(g)
    xb, w = x.clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    xf = xb.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * w).to(dtype)
    ref.float().backward(g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.allclose(xa.grad.float(), xb.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(norm.weight.grad, w.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():                                           # and without gradients
        assert torch.allclose(norm(x).float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 3, 4], [7, 1, 1, 3]])
def test_cached_decoding_reproduces_full_forward(impl, chunks):
    args = tiny(attn_impl=impl, train_attn_impl=impl)
    m = make(args)
    idx = torch.randint(0, args.vocab_size, (2, sum(chunks)))
    full, _ = m(idx)
    cache = m.new_cache(2, idx.shape[1])
    outs, p = [], 0
    for c in chunks:
        logits, _ = m(idx[:, p:p + c], cache=cache)
        outs.append(logits)
        p += c
    assert cache.pos == idx.shape[1]
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("extra", [0, 3])
def test_cached_forward_with_gradients_equals_the_full_forward(impl, extra):
    """A forward through a cache with autograd on (extra = 0: the prompt fills the whole cache, which once failed
    inside torch with "a leaf Variable that requires grad is being used in an in-place operation" when the
    latent was written as two views) gives the full forward's logits and the same weight gradients."""
    args = tiny(attn_impl=impl, train_attn_impl=impl)
    m = make(args)
    idx = torch.randint(0, args.vocab_size, (2, 10))
    full, _ = m(idx)
    (g_full,) = torch.autograd.grad(full.square().sum(), [m.layers[0].attn.wkv_a.weight])
    cached, _ = m(idx, cache=m.new_cache(2, 10 + extra))
    (g_cached,) = torch.autograd.grad(cached.square().sum(), [m.layers[0].attn.wkv_a.weight])
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-4)
    assert torch.allclose(g_cached, g_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_causality(impl):
    m = make(tiny(attn_impl=impl, train_attn_impl=impl))
    idx = torch.randint(0, 64, (1, 16))
    a, _ = m(idx)
    idx2 = idx.clone()
    idx2[0, 9] = (idx2[0, 9] + 1) % 64
    b, _ = m(idx2)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_left_padding_with_key_mask_matches_unpadded(impl):
    """A short prompt left-padded in a batch gives the same logits for its real tokens as alone."""
    m = make(tiny(attn_impl=impl, train_attn_impl=impl))
    short = torch.randint(0, 64, (1, 6))
    pad = 4
    batch = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)
    cache = m.new_cache(1, 11)
    cache.key_mask[0, :pad] = False
    padded, _ = m(batch, cache=cache)
    step, _ = m(torch.tensor([[3]]), cache=cache)                   # one more decoding step
    alone, _ = m(torch.cat([short, torch.tensor([[3]])], 1))
    assert torch.allclose(padded[:, pad:], alone[:, :6], atol=1e-5, rtol=1e-4)
    assert torch.allclose(step[:, 0], alone[:, 6], atol=1e-5, rtol=1e-4)


def test_cache_bytes_match_formula():
    args = tiny()
    nums = kv_cache_numbers_per_token(args)
    absorb = KVCache(args, 2, 16, attn_impl="absorb")
    naive = KVCache(args, 2, 16, attn_impl="naive")
    assert absorb.bytes_per_token_per_layer() == 4 * (args.kv_lora_rank + args.qk_rope_head_dim) == 4 * nums["mla"]
    assert naive.bytes_per_token_per_layer() == 4 * nums["naive"]
    assert nums["mha"] == 2 * args.n_heads * args.qk_nope_head_dim
    assert absorb.bytes_per_token_per_layer() < naive.bytes_per_token_per_layer()
    big = ModelArgs.preset("671B")
    assert kv_cache_numbers_per_token(big)["mla"] == 576                         # 4.5 d_h (V2 Table 1)


def test_cache_rejects_overlong():
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(tiny(), 1, 65)


def test_rope_rotates_adjacent_pairs_like_complex_multiplication():
    args = tiny()
    cos, sin = precompute_rope(args)
    x = torch.randn(1, 5, 2, args.qk_rope_head_dim)
    got = apply_rope(x, cos[:5], sin[:5])
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    rot = torch.polar(torch.ones_like(cos[:5]), torch.atan2(sin[:5], cos[:5]))[None, :, None]
    want = torch.view_as_real(xc * rot).flatten(-2)
    assert torch.allclose(got, want, atol=1e-6)


def test_yarn_only_beyond_original_context_and_keeps_high_frequencies():
    plain = tiny(max_seq_len=64, original_seq_len=64, qk_rope_head_dim=16)
    ext = tiny(max_seq_len=256, original_seq_len=64, qk_rope_head_dim=16, rope_factor=4.0)
    c0, s0 = precompute_rope(plain)
    c1, s1 = precompute_rope(ext)
    f0 = torch.atan2(s0[1], c0[1])                        # angle at position 1 = frequency per pair
    f1 = torch.atan2(s1[1], c1[1])
    theta_freqs = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    assert torch.allclose(f0, theta_freqs, atol=1e-6)      # no YaRN without extension
    assert torch.allclose(f1[0], f0[0])                     # fastest pair kept
    assert torch.allclose(f1[-1], f0[-1] / 4.0)             # slowest pair interpolated by the factor
    assert MLA(plain).softmax_scale == pytest.approx(plain.qk_head_dim ** -0.5)
    m = 0.1 * ext.mscale * math.log(4.0) + 1
    assert MLA(ext).softmax_scale == pytest.approx(ext.qk_head_dim ** -0.5 * m * m)


# ---------------------------------------------------------------------------------------------- MoE

def test_router_rules():
    args = tiny(n_routed_experts=16, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2,
                route_scale=2.5)
    torch.manual_seed(0)
    moe = MoE(args)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(200, args.dim)
    gates, idx, scores = moe.gate(x)
    assert idx.shape == (200, 3) and gates.shape == (200, 3)
    assert all(len(set(row.tolist())) == 3 for row in idx)                        # K distinct experts
    groups = idx // (16 // 4)
    assert all(len(set(row.tolist())) <= 2 for row in groups)                     # within M groups
    assert torch.allclose(gates.sum(-1), torch.full((200,), 2.5), atol=1e-5)      # sigmoid: sum = scale
    # the bias changes selection but gate values stay the unbiased, normalised affinities
    moe.gate.bias.copy_(torch.linspace(-1, 1, 16))
    gates_b, idx_b, scores_b = moe.gate(x)
    assert torch.equal(scores, scores_b)
    assert not torch.equal(idx, idx_b)
    expect = scores.gather(1, idx_b)
    assert torch.allclose(gates_b, 2.5 * expect / expect.sum(-1, keepdim=True), atol=1e-6)


def test_groups_masked_with_minus_inf_not_zero():
    """With strongly negative biases an allowed expert still beats every expert of a dropped group."""
    args = tiny(n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1)
    moe = MoE(args)
    moe.gate.bias.fill_(-5.0)
    _, idx, _ = moe.gate(torch.randn(50, args.dim))
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()


def test_bias_update_reduces_imbalance_on_skewed_stream():
    args = tiny(n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
    torch.manual_seed(0)
    moe = MoE(args).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    skew = torch.randn(args.dim)                         # every token leans the same way
    g = torch.Generator().manual_seed(1)

    def step_vio(speed):
        with torch.no_grad():
            moe.reset_load()
            moe(torch.randn(1, 512, args.dim, generator=g) + skew)
            moe.gate.update_bias(moe.load, speed)
            return max_violation(moe.load[None])[0].item()

    frozen = [step_vio(0.0) for _ in range(20)]         # gamma = 0: the bias never moves
    for _ in range(250):
        step_vio(0.003)
    balanced = [step_vio(0.003) for _ in range(20)]
    assert sum(frozen) / 20 > 1.0
    assert sum(balanced) / 20 < 0.3 * sum(frozen) / 20


def test_vectorised_moe_equals_per_token_loop():
    args = tiny()
    torch.manual_seed(1)
    moe = MoE(args).eval()
    moe.gate.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 7, args.dim)
    got = moe(x)
    flat = x.view(-1, args.dim)
    want = torch.zeros_like(flat)
    gates, idx, _ = moe.gate(flat)
    for t in range(flat.shape[0]):                     # slow reference: one token, one expert at a time
        y = moe.shared_experts(flat[t])
        for k in range(args.n_activated_experts):
            y = y + gates[t, k] * moe.experts[int(idx[t, k])](flat[t])
        want[t] = y
    assert torch.allclose(got.view(-1, args.dim), want, atol=1e-5)


def test_sequence_balance_loss_hand_computed():
    args = tiny(seq_aux_alpha=0.5)
    moe = MoE(args).train()
    x = torch.randn(2, 5, args.dim)
    moe(x)
    _, idx, scores = moe.gate(x.view(-1, args.dim))
    E, K, T = args.n_routed_experts, args.n_activated_experts, 5
    total = 0.0
    for b in range(2):
        rows = range(b * T, (b + 1) * T)
        f = [E / (K * T) * sum(int(e in idx[t].tolist()) for t in rows) for e in range(E)]
        p = [sum((scores[t, e] / scores[t].sum()).item() for t in rows) / T for e in range(E)]
        total += 0.5 * sum(fi * pi for fi, pi in zip(f, p))
    assert moe.balance_loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_update_bias_uses_accumulated_load_and_resets():
    m = make(tiny())
    m.train()
    idx = torch.randint(0, 64, (2, 16))
    m(idx, idx)
    load = m.expert_load()
    assert load.shape == (len(m.moe_layers()), 8)
    assert load.sum(-1).tolist() == [2 * 16 * 2] * 2 + [2 * 15 * 2]            # main layers, then MTP (T-1)
    before = [layer.gate.bias.clone() for layer in m.moe_layers()]
    m.update_bias()
    assert all(not torch.equal(b, layer.gate.bias) for b, layer in zip(before, m.moe_layers()))
    assert m.expert_load().sum() == 0


# ---------------------------------------------------------------------------------------------- MTP

def test_mtp_loss_matches_hand_computation():
    args = tiny(mtp_depth=2, mtp_lambda=0.3, seq_aux_alpha=0.0)
    m = make(args)
    idx = torch.randint(0, 64, (2, 10))
    tgt = torch.randint(0, 64, (2, 10))
    logits, loss = m(idx, tgt)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    h = m.trunk(idx)
    cos, sin = m.rope_cos, m.rope_sin
    ces = []
    for k in (1, 2):                                   # V3 eq. 21-24, written out
        mod = m.mtp[k - 1]
        T = 10 - k
        hk = mod.eh_proj(torch.cat([mod.enorm(m.embed(idx[:, k:])), mod.hnorm(h[:, :T])], -1))
        hk = mod.block(hk, cos[:T], sin[:T])
        ces.append(F.cross_entropy(m.head(mod.norm(hk)).flatten(0, 1), tgt[:, k:].flatten()))
        h = hk
    want_mtp = 0.3 / 2 * (ces[0] + ces[1])
    assert m.loss_parts["mtp"] == pytest.approx(want_mtp.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + want_mtp).item(), rel=1e-5)


def test_mtp_depth_zero_has_no_mtp_parameters():
    m = Transformer(tiny(mtp_depth=0))
    assert not any(k.startswith("mtp.") for k in m.state_dict())
    assert count_params(tiny(mtp_depth=0))["mtp"] == 0


# ---------------------------------------------------------------------------------------------- FP8

def test_fp8_round_trip_error_and_scale_shapes():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    q, s = fp8_quantize(x, (1, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 2)
    w = torch.randn(300, 200)
    _, sw = fp8_quantize(w, (128, 128))
    assert sw.shape == (3, 2)                                    # ceil-divided, partial edge blocks
    assert fp8_quant_error(x, (1, 128))["rel_err"] < 0.04        # 3 mantissa bits: ~2-3% for Gaussians
    rel = (fp8_quant_dequant(x, (1, 128)) - x).abs() / x.abs()
    assert rel[x.abs() > 1e-2].max() < 2 ** -4 + 1e-6             # within half a step of 1/8 relative
    assert fp8_quant_dequant(x, (1, 128)).abs().max() <= x.abs().max() * (1 + 2 ** -4)


def test_fp8_outlier_confined_to_its_block_and_zeros():
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    base = fp8_quant_dequant(x, (1, 128))
    x2 = x.clone()
    x2[0, 3] = 1e6                                               # beyond E4M3 dynamic range (~2^17)
    out = fp8_quant_dequant(x2, (1, 128))
    assert torch.equal(out[1:], base[1:]) and torch.equal(out[0, 128:], base[0, 128:])  # other tiles untouched
    assert (out[0, :128] == 0).float().mean() > 0.5              # its own tile loses its small values
    per_tensor = fp8_quant_dequant(x2, (4, 256))                  # one scale for everything: much worse
    assert fp8_quant_error(x2, (1, 128))["rel_err"] <= fp8_quant_error(x2, (4, 256))["rel_err"]
    assert (per_tensor[1:] == 0).float().mean() > 0.5
    z = torch.zeros(3, 128)
    assert torch.equal(fp8_quant_dequant(z, (1, 128)), z)
    huge = torch.randn(2, 128) * 1e30
    assert fp8_quant_error(huge, (1, 128))["rel_err"] < 0.04


def test_fp8_non_finite_input_poisons_only_its_tile():
    x = torch.randn(2, 256)
    x[0, 0] = float("inf")
    x[1, 200] = float("nan")
    out = fp8_quant_dequant(x, (1, 128))
    assert out[0, :128].isnan().all() and out[1, 128:].isnan().all()
    assert out[0, 128:].isfinite().all() and out[1, :128].isfinite().all()


def test_fp8_model_loss_close_to_fp32_and_gradients_flow():
    args = tiny(fp8=False)
    ref = make(args)
    fp8 = make(tiny(fp8=True))
    fp8.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 64, (4, 32))
    _, l_ref = ref(idx, idx)
    _, l_fp8 = fp8(idx, idx)
    assert l_fp8.item() != l_ref.item()                           # the simulation really changes numbers
    assert abs(l_fp8.item() - l_ref.item()) / l_ref.item() < 0.02
    l_fp8.backward()
    assert fp8.layers[1].attn.wkv_a.weight.grad.abs().sum() > 0
    assert fp8.layers[1].attn.wkv_a.weight.dtype == torch.float32   # master weights stay fp32


# ---------------------------------------------------------------------------------------------- config

def test_count_params_official_presets():
    c = count_params(ModelArgs.preset("671B"))
    assert c["total"] == pytest.approx(671e9, rel=0.01)
    assert c["activated"] == pytest.approx(37e9, rel=0.02)
    assert 10e9 < c["mtp"] < 15e9
    c16 = count_params(ModelArgs.preset("16B"))
    assert c16["total"] == pytest.approx(15.7e9, rel=0.02)        # DeepSeek-V2-Lite: 15.7B total
    assert c16["mtp"] == 0


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_count_params_matches_built_model(preset):
    args = ModelArgs.preset(preset)
    with torch.device("meta"):
        m = Transformer(args)
    named = dict(m.named_parameters())
    c = count_params(args)
    assert c["total"] == sum(p.numel() for k, p in named.items() if not k.startswith("mtp."))
    assert c["mtp"] == sum(p.numel() for k, p in named.items() if k.startswith("mtp."))
    assert 100e6 <= count_params(ModelArgs.preset("small"))["total"] <= 300e6


def test_state_dict_keys_follow_official_names():
    keys = set(Transformer(tiny()).state_dict())
    for k in ["embed.weight", "layers.0.attn_norm.weight", "layers.0.attn.wq_a.weight",
              "layers.0.attn.q_norm.weight", "layers.0.attn.wq_b.weight", "layers.0.attn.wkv_a.weight",
              "layers.0.attn.kv_norm.weight", "layers.0.attn.wkv_b.weight", "layers.0.attn.wo.weight",
              "layers.0.ffn_norm.weight", "layers.0.ffn.w1.weight", "layers.0.ffn.w2.weight",
              "layers.1.ffn.gate.weight", "layers.1.ffn.gate.bias", "layers.1.ffn.experts.7.w3.weight",
              "layers.1.ffn.shared_experts.w2.weight", "norm.weight", "head.weight", "mtp.0.eh_proj.weight"]:
        assert k in keys, k
    assert "layers.0.attn.wq.weight" in Transformer(tiny(q_lora_rank=0)).state_dict()
    assert not any(k.endswith(".bias") and "gate" not in k for k in keys)       # no Linear biases


@pytest.mark.parametrize("kw,field", [
    ({"n_activated_experts": 9}, "n_activated_experts"),
    ({"n_expert_groups": 3}, "n_expert_groups"),
    ({"n_limited_groups": 5}, "n_limited_groups"),
    ({"dim": 0}, "dim"),
    ({"n_heads": -1}, "n_heads"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
    ({"score_func": "relu"}, "score_func"),
    ({"attn_impl": "flash"}, "attn_impl"),
    ({"train_attn_impl": "flash"}, "train_attn_impl"),
    ({"fp8": True, "fp8_block": 12}, "fp8_block"),
    ({"n_dense_layers": 4}, "n_dense_layers"),
    ({"mtp_depth": -1}, "mtp_depth"),
    ({"n_limited_groups": 1, "n_activated_experts": 3}, "n_activated_experts"),
])
def test_validation_names_field_value_and_rule(kw, field):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}=.* is invalid: .+"):
        tiny(**kw)


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelArgs.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelArgs field"):
        ModelArgs.preset("tiny", nope=1)
    assert ModelArgs.preset("tiny", dim=64).dim == 64


# ---------------------------------------------------------------------------------------------- training

def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    args = ModelArgs.preset("tiny", vocab_size=64, max_seq_len=32, original_seq_len=32)
    m = Transformer(args)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    idx = torch.randint(0, 64, (4, 32))
    _, first = m(idx[:, :-1], idx[:, 1:])
    for _ in range(150):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_bias()
    assert loss.item() < first.item() / 10


def test_cached_greedy_decoding_equals_argmax_of_full_forward():
    m = make(tiny())
    idx = torch.randint(0, 64, (2, 5))
    new, _ = generate_batch(m, idx.tolist(), 8, temperature=0)         # sample.py's cached decoding
    out = torch.cat([idx, torch.tensor(new)], dim=1)
    assert out.shape == (2, 13)
    for t in range(5, 13):
        logits, _ = m(out[:, :t])
        assert torch.equal(logits[:, -1].argmax(-1), out[:, t])


def test_group_score_rule_matches_v3_for_every_preset():
    """Gate scores a group by its GROUP_SCORE_TOPK highest biased scores (the official code's 2); V3 §2.1.2 sums
    the top K_r / M. Every preset with groups must have K_r / M equal to it, so the two rules agree."""
    from model import GROUP_SCORE_TOPK, PRESETS
    for name, a in PRESETS.items():
        if a.n_expert_groups > 1:
            assert a.n_activated_experts / a.n_limited_groups == GROUP_SCORE_TOPK, name
