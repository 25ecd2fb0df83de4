"""Tests for the fast decoding paths: each one agrees with the plain version it sits next to.

RoPE vs the official code's complex product, absorbed attention with the heads folded into the query length
(multi-query) vs per-head attention written out, logits for the last position vs the full forward, dropping finished rows
from a batch vs computing them to the end, greedy speculative decoding vs plain greedy decoding, and the
cache bytes read per generated token. Also: decoding runs under bf16 autocast on CPU, and the per-step path compiles without graph breaks (the compiled run itself is
marked slow: about 40 s of compiling). About half a minute without it:

    OMP_NUM_THREADS=1 python -m pytest tests/test_decode_fast.py -q
"""

import pytest
import torch
from test_model import tiny

from model import (
    ModelArgs,
    Transformer,
    apply_rope,
    causal_mask,
    latent_attention,
)
from sample import (
    attention_path,
    compile_decoding,
    decode_steps,
    generate_batch,
    generate_uncached,
    speculative_generate,
)


def small_args(**kw) -> ModelArgs:
    """test_model's tiny config (every feature on: MoE, MTP, q compression; short context) with 3 heads and
    4 routed experts in 2 groups."""
    return tiny(**{"n_heads": 3, "n_routed_experts": 4, "n_expert_groups": 2, "n_limited_groups": 1, **kw})


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_args()).eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of different lengths (3..10 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("offset", [0, 1, 3])
def test_rope_equals_the_official_complex_product_also_on_strided_slices(offset):
    """apply_rope (real pairs) == the official code's (x_2j + i x_2j+1) e^{i angle}, including on a slice at an
    odd offset (q_pe is a slice of q)."""
    T, d = 5, 8
    big = torch.randn(2, T, 3, offset + d + 2)
    x = big[..., offset:offset + d]                                   # (2, T, 3, d) non-contiguous view
    angles = torch.randn(T, d // 2)
    got = apply_rope(x, angles.cos(), angles.sin())
    z = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2)))  # (2, T, 3, d/2)
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    assert got.shape == x.shape
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, x, atol=1e-3)                     # it really rotated something


# ---------------------------------------------------------------------------------------------- MLA

def per_head_latent_attention(q, latent, r, mask, scale):
    """The plain reference of latent_attention: every head's scores against the latent written out,
    q (B, T, H, r + rope), latent (B, S, r + rope), mask (B|1, 1, T, S) or None (causal) -> (B, T, H, r)."""
    T, S = q.shape[1], latent.shape[1]
    scores = torch.einsum("bthc,bsc->bhts", q, latent) * scale            # (B, H, T, S)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bsc->bthc", scores.softmax(-1), latent[..., :r])


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True, "shared"])
def test_latent_attention_equals_per_head_attention(T, masked):
    """Multi-query form (heads folded into the query length, one fused call) == every head's attention written
    out, at batch 2 and 1. Masks: none (causal), per row (padding), one for all rows (1, 1, T, S)."""
    torch.manual_seed(0)
    B, H, r, rope = 2, 3, 8, 4
    S = 9 if masked or T == 1 else T             # mask None with T > 1 is plain causal self-attention (S == T)
    q = torch.randn(B, T, H, r + rope)
    latent = torch.randn(B, S, r + rope)
    mask = None
    if masked:                                                       # causal + row 1 left-padded by 3
        k_pos, q_pos = torch.arange(S)[None, :], torch.arange(S - T, S)[:, None]
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[1, :3] = False
        mask = ((k_pos <= q_pos) & valid[:, None, :]).unsqueeze(1)   # (B, 1, T, S)
        if masked == "shared":
            mask = (k_pos <= q_pos)[None, None]                       # (1, 1, T, S) causal, no padding
    got = latent_attention(q, latent, r, mask, 0.3)
    ref = per_head_latent_attention(q, latent, r, mask, 0.3)
    assert got.shape == (B, T, H, r)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    one = None if mask is None else mask[-1:]                        # row 1 (the padded one) alone
    assert torch.allclose(latent_attention(q[1:], latent[1:], r, one, 0.3), ref[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [16, 37])
def test_latent_attention_training_values_and_gradients(T):
    """Training's causal latent attention (mask None, S == T) == every head written out with the causal mask,
    values and both gradients."""
    torch.manual_seed(0)
    B, H, r, rope = 2, 3, 8, 4
    q0, latent0 = torch.randn(B, T, H, r + rope), torch.randn(B, T, r + rope)

    def run(fn):
        q, latent = q0.clone().requires_grad_(), latent0.clone().requires_grad_()
        out = fn(q, latent, r, None, 0.3)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))   # any fixed weights
        return out, q.grad, latent.grad

    for got, want in zip(run(latent_attention), run(per_head_latent_attention)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_next_logits_equals_last_position_of_the_full_forward(model, impl):
    idx = torch.randint(0, 64, (2, 7))
    with attention_path(model, impl), torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, 9, impl)
        first = model.next_logits(idx[:, :5], cache)                 # prefill
        second = model.next_logits(idx[:, 5:6], cache)               # one step
        third = model.next_logits(idx[:, 6:7], cache)
    for got, t in ((first, 4), (second, 5), (third, 6)):
        assert got.shape == (2, 64)
        assert torch.allclose(got, full[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_no_mask_means_causal_for_new_tokens_after_a_cache(model, impl):
    """MLA.forward's contract: mask None is plain causal. After cached positions, a block of new tokens given no
    mask must see what the explicit causal mask shows it (the naive path once let every new token see the
    whole block: SDPA's is_causal cannot be used there, its triangle starts at key 0)."""
    idx = torch.randint(0, 64, (1, 12))
    with attention_path(model, impl), torch.no_grad():
        caches = [model.new_cache(1, 16, impl) for _ in range(2)]
        for c in caches:
            model.run_blocks(idx[:, :8], c.layers, 0, c.attn_mask(0, 8))
        explicit = model.run_blocks(idx[:, 8:], caches[0].layers, 8, caches[0].attn_mask(8, 4))
        implicit = model.run_blocks(idx[:, 8:], caches[1].layers, 8, None)
        full = model.run_blocks(idx, None, 0, None)                  # no cache: a plain causal forward
    assert torch.allclose(implicit, explicit, atol=1e-6)
    assert torch.allclose(implicit, full[:, 8:], atol=1e-5, rtol=1e-4)


def test_bytes_read_per_token_absorbed_vs_naive():
    """The absorbed cache reads (d_c + d_h^R) numbers per token per layer, the naive one H (d_h + d_h^R + d_v)."""
    a = small_args()
    m = Transformer(a)
    absorb, naive = m.new_cache(1, 32, "absorb"), m.new_cache(1, 32, "naive")
    assert absorb.bytes_read_per_token(20) == 4 * (a.kv_lora_rank + a.qk_rope_head_dim) * 20 * a.n_layers
    assert naive.bytes_read_per_token(20) == 4 * a.n_heads * (a.qk_head_dim + a.v_head_dim) * 20 * a.n_layers
    assert absorb.total_bytes() == 4 * 32 * (a.kv_lora_rank + a.qk_rope_head_dim) * (a.n_layers + a.mtp_depth)


# ---------------------------------------------------------------------------------------------- batches

@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_dropping_finished_rows_equals_computing_them_and_each_alone(model, impl):
    """Rows that stop at different steps: dropping them from the batch gives the same greedy tokens as
    computing every row to the end, and as decoding each prompt alone."""
    ps = prompts(5, seed=1)
    alone = [generate_uncached(model, p, 12) for p in ps]
    # choose as EOS a token that some (not all) rows produce at different steps
    firsts = {}
    for row in alone:
        for i, t in enumerate(row):
            firsts.setdefault(t, set()).add(i)
    eos = max(firsts, key=lambda t: (len(firsts[t]) > 1, sum(t in row for row in alone) < len(alone)))
    with attention_path(model, impl):
        fast = torch.stack(list(decode_steps(model, ps, 12, 0.0, eos_id=eos)), 1)
        plain = torch.stack(list(decode_steps(model, ps, 12, 0.0, eos_id=eos, drop_finished=False)), 1)
    assert torch.equal(fast, plain)
    for row, ref in zip(fast.tolist(), alone):
        cut = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert row[:len(cut)] == cut
        assert all(t == eos for t in row[len(cut):])                  # finished rows keep emitting EOS
    comps, finished = generate_batch(model, ps, 12, 0.0, eos_id=eos, attn_impl=impl)
    assert comps == [ref[:ref.index(eos) + 1] if eos in ref else ref for ref in alone]
    assert any(finished) and not all(len(c) == len(comps[0]) for c in comps)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_sharing_repeated_prompts_equals_prefilling_every_row(model, impl):
    """GRPO's batches repeat each prompt G times: prefilling each distinct prompt once and copying its cache
    row (share_prompts) gives the first-step logits and the greedy tokens of prefilling every row, and
    sampled tokens from the same generator (the logits agree, so the draws do)."""
    ps = prompts(3, seed=6)
    batch = [p for p in ps for _ in range(3)] + [ps[0]]                  # groups, and a repeat out of order
    with attention_path(model, impl):
        for temperature in (0.0, 1.0):
            runs = [torch.stack(list(decode_steps(model, batch, 8, temperature, eos_id=5, share_prompts=share,
                                                  generator=torch.Generator().manual_seed(0))), 1)
                    for share in (True, False)]
            assert torch.equal(runs[0], runs[1]), temperature
    assert len({tuple(r) for r in runs[0][:3].tolist()}) > 1            # a group's samples differ


def test_keep_rows_keeps_the_chosen_rows_caches(model):
    idx = torch.randint(0, 64, (3, 6))
    with torch.no_grad():
        cache = model.new_cache(3, 8)
        model.next_logits(idx, cache)
        cache.keep_rows(torch.tensor([2, 0]))
        got = model.next_logits(torch.tensor([[5], [7]]), cache)      # rows 2 and 0, in that order
        full, _ = model(torch.cat([idx[[2, 0]], torch.tensor([[5], [7]])], 1))
    assert torch.allclose(got, full[:, -1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- generate

def test_greedy_speculative_equals_plain_with_eos_and_both_paths(model):
    ps = prompts(3, seed=2)
    for impl in ("absorb", "naive"):
        with attention_path(model, impl):
            for p in ps:
                ref = generate_batch(model, [p], 20, 0.0)[0][0]
                out, stats = speculative_generate(model, p, 20, 0.0)
                assert out == ref and stats.drafts > 0
                eos = ref[7]                                          # stops early, exactly where plain does
                ref_eos = generate_batch(model, [p], 20, 0.0, eos_id=eos)[0][0]
                assert speculative_generate(model, p, 20, 0.0, eos_id=eos)[0] == ref_eos


# ---------------------------------------------------------------------------------------------- bf16, compile

def test_bf16_autocast_decoding_runs_on_cpu(model):
    """Cached decoding, batched and speculative, under bf16 autocast on CPU: runs, stays finite, and its
    next-token logits stay close to float32's."""
    ps = prompts(3, seed=3)
    idx = torch.tensor([ps[0]])
    with torch.no_grad():
        ref = model.next_logits(idx, model.new_cache(1, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        comps, _ = generate_batch(model, ps, 10, 0.0)
        spec, _ = speculative_generate(model, ps[0], 10, 0.0)
        with torch.no_grad():
            low = model.next_logits(idx, model.new_cache(1, 40))
    assert [len(c) for c in comps] == [10, 10, 10] and len(spec) == 10
    assert all(0 <= t < 64 for c in comps + [spec] for t in c)
    assert torch.isfinite(low).all()
    # bf16 keeps 8 significant bits (2^-8 = 0.4% per rounding); the handful of roundings along three layers stays
    # within 2% of the largest logit, while a wrong cache or attention path under autocast would not
    assert (low - ref).abs().max() < 0.02 * ref.abs().max()


def test_per_step_decoding_path_has_no_graph_break():
    """Transformer.run_blocks (what --compile captures) traces into one graph, with dense FFNs and with MoE
    layers (under the compiler the MoE runs through the grouped-matmul operator: no host sync in the graph)."""
    import torch._dynamo
    for kw in ({"n_dense_layers": 3}, {}):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = Transformer(small_args(**kw)).eval()
        with torch.no_grad():
            cache = m.new_cache(1, 16)
            m.next_logits(torch.randint(0, 64, (1, 5)), cache)
            mask = cache.attn_mask(cache.pos, 1)
            ex = torch._dynamo.explain(m.run_blocks)(torch.tensor([[3]]), cache.layers, cache.pos, mask)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, (kw, [b.reason for b in ex.break_reasons])


@pytest.mark.slow
def test_compiled_decoding_step_does_not_recompile_as_the_cache_grows():
    """The compiled decoding step is one graph for every cache length S: nothing in run_blocks may read S on
    the host under torch.compile (a size test would become a guard on S, checked at every step, and a
    recompile where it flips)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    args = small_args(n_layers=2)
    m = compile_decoding(Transformer(args).eval(), backend="aot_eager")
    with torch.no_grad():
        cache = m.new_cache(1, 48)
        m.next_logits(torch.tensor([prompts(1, seed=5)[0]]), cache)        # prefill: <= 10 positions
        m.next_logits(torch.tensor([[3]]), cache)                         # compiles the one-token step
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(30):                                           # S crosses 20 on the way
                m.next_logits(torch.tensor([[3]]), cache)
    assert cache.pos > 30


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens():
    """compile_decoding (sample.py --compile) changes speed, not tokens: plain and speculative greedy decoding
    of a model with MoE layers and an MTP module (aot_eager: the traced graphs run eagerly), speculative
    decoding both as fused rounds and as separate draft and verify calls; the traced decoding step runs its
    MoE layers through the grouped-matmul operator, in one graph."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    args = small_args(n_layers=2)
    eager = Transformer(args).eval()
    compiled = Transformer(args).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_decoding(compiled, backend="aot_eager")
    ps = prompts(2, seed=4)
    assert generate_batch(compiled, ps, 5, 0.0)[0] == generate_batch(eager, ps, 5, 0.0)[0]
    want = speculative_generate(eager, ps[1], 12)
    assert speculative_generate(compiled, ps[1], 12) == want
    assert speculative_generate(compiled, ps[1], 12, fused=False) == want
    with torch.no_grad():
        cache = compiled.new_cache(1, 16)
        compiled.next_logits(torch.tensor([ps[0]]), cache)
        ex = torch._dynamo.explain(eager.run_blocks)(torch.tensor([[3]]), cache.layers, cache.pos,
                                                     cache.attn_mask(cache.pos, 1))
    assert ex.graph_break_count == 0
    traced = [n.meta.get("stack_trace") or "" for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("in _grouped" in t for t in traced) and not any("in _loop" in t for t in traced)
