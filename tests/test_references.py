"""Tests against independent references: numbers worked out by hand or from the papers, not the code
checked against itself.

  1. FP8 (V3 §3.3): scales are max|x| / 448 per tile, values are a torch.float8_e4m3fn cast of x / scale.
  2. The router (V3 eq. 13-16, V2 §2.2): sigmoid scores, group top-2 sums, group mask, top-K, normalisation
     and route_scale for a fixed input worked out by hand; V2's softmax routing (the 16B preset).
  3. The learning-rate schedules: train.lr_at and grpo.rl_lr_at at named steps, values by hand.
  4. sample.evaluate on scripted completions whose correctness is known.
  5. Sampled speculative decoding: the token frequencies of many draws match the main model's own
     distribution (enumerated exactly) within a chi-square bound with a stated false-alarm rate.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_references.py -q
"""

import itertools
import math

import pytest
import torch

import sample
import tasks
from extras.fp8 import fp8_dequantize, fp8_quantize
from grpo import GRPOConfig, rl_lr_at
from model import FP8LinearFunction, Gate, ModelArgs, Transformer, fp8_quant_dequant
from sample import SpecStats, sampling_probs, speculative_stream
from tokenizer import get_tokenizer
from train import TrainConfig, lr_at

# ---------------------------------------------------------------------------------------------- 1. FP8

E4M3_MAX = 448.0      # largest finite float8_e4m3fn value: 1.75 * 2^8 (OCP FP8 spec; V3 §3.3)


def test_e4m3_max_is_the_largest_finite_float8_value():
    assert torch.finfo(torch.float8_e4m3fn).max == E4M3_MAX == 1.75 * 2 ** 8


def spread(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values with one outlier of magnitude 100 per row, so tile maxima differ tile by tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows)[:, None]
    x[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] = 100.0
    return x


def test_activation_tile_scales_are_amax_over_448_and_values_an_e4m3_cast():
    x = spread(6, 256)                                                     # two 1 x 128 tiles per row
    q, scale = fp8_quantize(x, (1, 128))
    amax = x.view(6, 2, 128).abs().amax(-1)                                # (6, 2) by hand
    assert torch.equal(scale, amax / 448.0)
    ref = (x.view(6, 2, 128) / scale[..., None]).to(torch.float8_e4m3fn).view(6, 256)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))        # bit for bit
    # every tile's largest magnitude lands exactly on the top of the E4M3 range
    assert torch.equal(q.float().view(6, 2, 128).abs().amax(-1), torch.full((6, 2), 448.0))
    back = fp8_dequantize(q, scale, (1, 128))
    assert torch.equal(back, ref.float().view(6, 2, 128).mul(scale[..., None]).view(6, 256))
    assert torch.equal(fp8_quant_dequant(x, (1, 128)), back)


def test_weight_block_scales_with_partial_edge_blocks():
    w = spread(200, 300, seed=1)                                           # 2 x 3 blocks, the last ones partial
    q, scale = fp8_quantize(w, (128, 128))
    assert scale.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        block = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
        assert scale[i, j] == block.abs().max() / 448.0
        ref = (block / scale[i, j]).to(torch.float8_e4m3fn)
        got = q[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def test_ue8m0_scale_is_amax_over_448_rounded_up_to_a_power_of_two():
    x = torch.tensor([[3.0, -1.0, 0.5, 0.25], [448.0, 1.0, 2.0, 0.0], [-1000.0, 7.0, 0.0, 1.0]])
    _, scale = fp8_quantize(x, (1, 4), "ue8m0")
    # 3 / 448 = 0.0067 -> 2^-7 = 0.0078; 448 / 448 = 1 -> 1; 1000 / 448 = 2.23 -> 4
    assert scale.flatten().tolist() == [2.0 ** -7, 1.0, 4.0]


def test_zero_tile_stays_zero():
    x = torch.zeros(2, 128)
    x[1, 5] = 3.0
    assert torch.equal(fp8_quant_dequant(x, (1, 128)), x)                  # 3 = 448 * (3/448) exactly


def test_fp8_linear_forward_is_the_product_of_the_two_hand_quantised_operands():
    x, w = spread(4, 256, seed=2), spread(256, 256, seed=3) / 100
    sx = x.view(4, 2, 128).abs().amax(-1, keepdim=True) / 448.0                           # (4, 2, 1)
    xq = ((x.view(4, 2, 128) / sx).to(torch.float8_e4m3fn).float() * sx).view(4, 256)
    sw = w.view(2, 128, 2, 128).abs().amax(dim=(1, 3), keepdim=True) / 448.0              # (2, 1, 2, 1)
    wq = ((w.view(2, 128, 2, 128) / sw).to(torch.float8_e4m3fn).float() * sw).view(256, 256)
    y = FP8LinearFunction.apply(x, w, 128, None, None)
    torch.testing.assert_close(y, xq @ wq.T, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y, x @ w.T, rtol=1e-3, atol=0)               # the rounding is really there


# ---------------------------------------------------------------------------------------------- 2. router

def gate_with_identity_centroids(n_experts: int, **kw) -> Gate:
    """A Gate whose centroid matrix is the identity, so the logits u . e_i are the input's coordinates."""
    args = ModelArgs(dim=n_experts, kv_lora_rank=4, n_routed_experts=n_experts, **kw)
    gate = Gate(args)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(n_experts))
    return gate


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# Twelve experts in three groups of four. By hand, sigmoid scores (4 digits):
#   group 0: logits  3.0 -3.0 -3.0 -3.0 -> 0.9526 0.0474 0.0474 0.0474   max 0.9526, top-2 sum 1.0000
#   group 1: logits  1.0  0.8 -3.0 -3.0 -> 0.7311 0.6900 0.0474 0.0474   max 0.7311, top-2 sum 1.4211
#   group 2: logits  0.6  0.5  0.4 -3.0 -> 0.6457 0.6225 0.5987 0.0474   max 0.6457, top-2 sum 1.2682
# Keeping M = 2 groups by their top-2 sums keeps groups 1 and 2 (by their max it would keep 0 and 1), so the
# single best expert, 0, is masked out; the top K = 3 of the rest are 4, 5, 8.
ROUTER_LOGITS = [3.0, -3.0, -3.0, -3.0, 1.0, 0.8, -3.0, -3.0, 0.6, 0.5, 0.4, -3.0]


def test_sigmoid_router_by_hand():
    gate = gate_with_identity_centroids(12, n_activated_experts=3, n_expert_groups=3, n_limited_groups=2,
                                        route_scale=2.5)
    gates, idx, scores = gate(torch.tensor([ROUTER_LOGITS]))
    assert torch.allclose(scores[0], torch.tensor([sigmoid(v) for v in ROUTER_LOGITS]), atol=1e-6)
    assert sorted(idx[0].tolist()) == [4, 5, 8]
    s4, s5, s8 = sigmoid(1.0), sigmoid(0.8), sigmoid(0.6)
    expect = {4: 2.5 * s4 / (s4 + s5 + s8), 5: 2.5 * s5 / (s4 + s5 + s8), 8: 2.5 * s8 / (s4 + s5 + s8)}
    assert expect[4] == pytest.approx(0.8843, abs=1e-4)                    # 2.5 * 0.7311 / 2.0668
    for k, e in enumerate(idx[0].tolist()):
        assert gates[0, k].item() == pytest.approx(expect[e], abs=1e-6)


def test_sigmoid_router_bias_steers_selection_but_not_the_gates():
    gate = gate_with_identity_centroids(12, n_activated_experts=3, n_expert_groups=3, n_limited_groups=2,
                                        route_scale=2.5)
    # b_0 = +0.5: group 0's biased top-2 sum becomes 0.9526 + 0.5 + 0.0474 = 1.5 > 1.4211 > 1.2682, so groups
    # 0 and 1 are kept; biased scores there: 1.4526 (0), 0.7311 (4), 0.6900 (5) -> experts 0, 4, 5.
    with torch.no_grad():
        gate.bias[0] = 0.5
    gates, idx, _ = gate(torch.tensor([ROUTER_LOGITS]))
    assert sorted(idx[0].tolist()) == [0, 4, 5]
    s0, s4, s5 = sigmoid(3.0), sigmoid(1.0), sigmoid(0.8)                   # unbiased scores in the gates
    expect = {0: s0, 4: s4, 5: s5}
    for k, e in enumerate(idx[0].tolist()):
        assert gates[0, k].item() == pytest.approx(2.5 * expect[e] / (s0 + s4 + s5), abs=1e-6)
    # b_8 = +1 instead: expert 8 (0.6457 + 1) is now the best, and its group (sum 1.6457 + 0.6225) is kept
    with torch.no_grad():
        gate.bias.zero_()
        gate.bias[8] = 1.0
    _, idx, _ = gate(torch.tensor([ROUTER_LOGITS]))
    assert idx[0, 0].item() == 8 and sorted(idx[0].tolist()) == [4, 5, 8]


def test_softmax_router_by_hand():
    """V2's routing (the 16B preset): softmax over all experts, top K, gates the softmax values themselves,
    not renormalised over the chosen ones (V2 eq. 20-21), times route_scale."""
    logits = [0.1, 2.0, -1.0, 0.7, 1.5, 0.0, -0.3, 1.0]
    gate = gate_with_identity_centroids(8, n_activated_experts=3, n_expert_groups=1, n_limited_groups=1,
                                        score_func="softmax", route_scale=1.0)
    gates, idx, scores = gate(torch.tensor([logits]))
    z = sum(math.exp(v) for v in logits)
    probs = [math.exp(v) / z for v in logits]
    assert torch.allclose(scores[0], torch.tensor(probs), atol=1e-6)
    assert idx[0].tolist() == [1, 4, 7]                                    # logits 2.0, 1.5, 1.0, in order
    assert gates[0].tolist() == pytest.approx([probs[1], probs[4], probs[7]], abs=1e-6)
    assert sum(probs[i] for i in (1, 4, 7)) == pytest.approx(0.7362, abs=1e-4)   # not 1: no renormalisation


def test_16b_preset_routes_with_softmax_like_a_loop_over_experts():
    args = ModelArgs.preset("16B")
    assert args.score_func == "softmax" and args.n_expert_groups == 1 and args.n_activated_experts == 6
    torch.manual_seed(0)
    gate = Gate(args)
    with torch.no_grad():
        gate.weight.normal_(std=0.05)
    x = torch.randn(3, args.dim)
    gates, idx, _ = gate(x)
    for t in range(3):
        u = [sum(float(a) * float(b) for a, b in zip(x[t].tolist(), row)) for row in gate.weight.tolist()]
        z = sum(math.exp(v) for v in u)
        ranked = sorted(range(args.n_routed_experts), key=lambda e: -u[e])[:6]
        assert idx[t].tolist() == ranked
        assert gates[t].tolist() == pytest.approx([math.exp(u[e]) / z for e in ranked], rel=1e-4)


# ---------------------------------------------------------------------------------------------- 3. schedules

def test_pretraining_lr_at_named_steps():
    cfg = TrainConfig(lr=1e-3, warmup_iters=10, min_lr_ratio=0.1)
    # warmup: lr * (step + 1) / warmup_iters
    assert lr_at(0.0, 0, cfg) == pytest.approx(1e-4)
    assert lr_at(0.0, 4, cfg) == pytest.approx(5e-4)
    assert lr_at(0.0, 9, cfg) == pytest.approx(1e-3)
    # then lr * (0.1 + 0.9 * (1 + cos(pi * progress)) / 2)
    assert lr_at(0.0, 10, cfg) == pytest.approx(1e-3)
    assert lr_at(0.25, 50, cfg) == pytest.approx(8.6820e-4, abs=1e-8)     # cos(pi/4) = 0.7071 -> 0.8536
    assert lr_at(0.5, 50, cfg) == pytest.approx(5.5e-4)
    assert lr_at(0.75, 50, cfg) == pytest.approx(2.3180e-4, abs=1e-8)     # cos(3pi/4) = -0.7071 -> 0.1464
    assert lr_at(1.0, 50, cfg) == pytest.approx(1e-4)
    assert lr_at(1.7, 50, cfg) == pytest.approx(1e-4)                     # past the budget: stays at the floor


def test_rl_lr_at_named_steps():
    cfg = GRPOConfig(lr=2e-5, warmup_iters=4, max_iters=24, min_lr_ratio=0.1, lr_decay=True)
    assert [rl_lr_at(s, cfg) for s in range(4)] == pytest.approx([5e-6, 1e-5, 1.5e-5, 2e-5])
    # cosine over the 20 steps after warmup: progress (step - 4) / 20
    assert rl_lr_at(4, cfg) == pytest.approx(2e-5)
    assert rl_lr_at(9, cfg) == pytest.approx(1.7364e-5, abs=1e-9)         # progress 0.25
    assert rl_lr_at(14, cfg) == pytest.approx(1.1e-5)                     # progress 0.5
    assert rl_lr_at(19, cfg) == pytest.approx(4.636e-6, abs=1e-9)         # progress 0.75
    assert rl_lr_at(24, cfg) == pytest.approx(2e-6)
    assert rl_lr_at(40, cfg) == pytest.approx(2e-6)
    flat = GRPOConfig(lr=2e-5, warmup_iters=4, max_iters=24, lr_decay=False)
    assert rl_lr_at(1, flat) == pytest.approx(1e-5) and rl_lr_at(20, flat) == pytest.approx(2e-5)


# ---------------------------------------------------------------------------------------------- 4. evaluate

def test_evaluate_counts_exactly_the_scripted_correct_completions(monkeypatch):
    """evaluate() on seven held-out problems whose greedy completions are scripted: two right and well formed,
    two right but badly formed (accuracy only needs a single answer tag pair), one well formed but wrong,
    one truncated before its answer, one with two answers: 4/7 correct, 3/7 well formed."""
    tok = get_tokenizer("char")
    problems = tasks.heldout_problems(tasks.default_task(), 7, seed=0)
    a = [int(p.answer) for p in problems]
    texts = [f"ok</think><answer>{a[0]}</answer>",                     # right, well formed
             f"</think><answer> {a[1]} </answer>",                      # right, well formed (spaces are fine)
             f"no closing think tag <answer>{a[2]}</answer>",           # right answer, bad format
             f"</think><answer>{a[3] + 1}</answer>",                    # well formed, wrong
             "still thinking about it",                                 # truncated: no answer
             f"</think><answer>{a[5]}</answer><answer>{a[5]}</answer>",  # two answers: neither
             f"</think><answer>{a[6]}</answer> and more"]                # right, text after the answer
    correct = [True, True, True, False, False, False, True]
    well_formed = [True, True, False, True, False, False, False]
    finished = [True, True, True, True, False, True, True]
    script = {tuple(sample.prompt_tokens(tok, p.question)): tok.encode(t) + ([tok.eos_id] if f else [])
              for p, t, f in zip(problems, texts, finished)}
    calls = []

    def scripted(model, prompts, max_new_tokens, temperature=1.0, eos_id=None, **kw):
        calls.append((len(prompts), temperature, eos_id))
        comps = [script[tuple(p)] for p in prompts]
        return comps, [bool(c) and c[-1] == eos_id for c in comps]

    monkeypatch.setattr(sample, "generate_batch", scripted)
    model = torch.nn.Linear(1, 1)                         # evaluate only switches it to eval mode
    records, summary = sample.evaluate(model, tok, problems, max_new_tokens=64, batch_size=4, step=7)
    assert calls == [(4, 0.0, tok.eos_id), (3, 0.0, tok.eos_id)]          # greedy, in batches of 4
    assert [r["question"] for r in records] == [p.question for p in problems]
    assert [r["correct"] for r in records] == correct
    assert [r["format"] for r in records] == well_formed
    assert [r["finished"] for r in records] == finished and all(r["step"] == 7 for r in records)
    assert [r["completion"] for r in records] == texts                   # the EOS is not part of the text
    assert records[0]["predicted"] == str(a[0]) and records[4]["predicted"] is None
    assert summary["accuracy"] == pytest.approx(4 / 7) and summary["format"] == pytest.approx(3 / 7)
    assert summary["n"] == 7
    assert summary["length"] == pytest.approx(sum(len(script[k]) for k in script) / 7)


# ---------------------------------------------------------------------------------------------- 5. speculative

V = 8                 # vocabulary small enough to enumerate every continuation of three tokens (8^3 = 512)
DRAWS = 3000
FALSE_ALARM = 1e-4    # probability that a correct sampler fails this test (chi-square p-value threshold)


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's chi-square of observed counts against expected counts; cells expected below 5 times are
    pooled into one cell so the chi-square approximation holds. Returns (statistic, dof, p-value), the
    p-value from the regularised upper incomplete gamma function Q(dof/2, stat/2)."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return stat, dof, float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                                    torch.tensor(stat / 2, dtype=torch.float64)))


def test_sampled_speculative_decoding_draws_from_the_main_models_distribution():
    """Speculative sampling must leave the text distributed exactly as plain sampling from the main model
    (Leviathan et al. 2023): the draft's accept/reject step, the residual distribution and the bonus token
    together. A seeded model with sharp, context-dependent logits (init_std 0.5) and a random MTP draft
    (acceptance well inside (0, 1)) draws 3000 three-token continuations; their joint frequencies over the
    512 outcomes must pass a chi-square test against p(x1) p(x2 | x1) p(x3 | x1, x2), computed from the
    uncached forward. A correct sampler fails with probability 1e-4; a bonus token drawn from the wrong
    position, an inverted acceptance ratio or a wrong residual gives p-values below 1e-10."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=V, dim=16, inter_dim=32, moe_inter_dim=8, n_layers=1, n_dense_layers=1,
                     n_heads=2, n_routed_experts=2, n_activated_experts=1, n_expert_groups=1, n_limited_groups=1,
                     q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                     max_seq_len=16, original_seq_len=16, mtp_depth=1, init_std=0.5)
    model = Transformer(args).eval()
    prompt, temperature = [1, 2], 1.0
    with torch.no_grad():
        idx = torch.tensor([prompt + list(s) for s in itertools.product(range(V), repeat=2)])   # (64, 4)
        probs = sampling_probs(model(idx)[0].reshape(-1, V), temperature).view(V, V, 4, V)     # [x1, x2, pos]
    joint = (probs[0, 0, 1][:, None, None] * probs[:, 0, 2][:, :, None] * probs[:, :, 3])   # (V, V, V)
    assert joint.sum().item() == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    stats = SpecStats()
    draws = torch.tensor([list(speculative_stream(model, prompt, 3, temperature=temperature, generator=g,
                                                  stats=stats)) for _ in range(DRAWS)])         # (DRAWS, 3)
    assert 0.1 < stats.acceptance < 0.9 and stats.tokens == 3 * DRAWS      # both branches exercised
    counts = torch.bincount(draws[:, 0] * V * V + draws[:, 1] * V + draws[:, 2], minlength=V ** 3).double()
    stat, dof, p = chi_square_p_value(counts, joint.flatten().double() * DRAWS)
    assert p > FALSE_ALARM, f"chi-square {stat:.1f} on {dof} dof, p = {p:.2e}"
