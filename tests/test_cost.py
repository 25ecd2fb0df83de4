"""Tests for extras/cost.py: FLOPs per token against a hand computation, the 671B count against the 6N rule, the
cost/MFU round trip, DeepSeek-V3's implied MFU, bad input, the GPU table and the command line.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_cost.py -q
"""

import pytest

from extras import cost
from model import ModelArgs
from train import count_params


def hand_flops_tiny(seq_len: int, causal: bool = False) -> tuple[float, float]:
    """(matmul, attention) training FLOPs per token of `tiny` (vocab 512), written out from its fields.

    The sizes are the preset's (model.py): d=128, 4 heads, q_lora 64, kv_lora 32, nope 32, rope 16, v 32,
    dense FFN 384, experts of 64, 8 routed (2 active) + 1 shared, 4 layers (1 dense), 1 MTP module."""
    d, heads, vocab = 128, 4, 512
    qk, v = 32 + 16, 32
    attn = (d * 64 + 64 + 64 * heads * qk            # wq_a, q_norm, wq_b
            + d * (32 + 16) + 32                      # wkv_a (latent + shared rope key), kv_norm
            + 32 * heads * (32 + v)                   # wkv_b: keys without rope, values
            + heads * v * d)                          # wo
    expert = 3 * d * 64                               # SwiGLU: w1, w2, w3
    dense_block = 2 * d + attn + 3 * d * 384          # two RMSNorms, attention, dense FFN
    moe_block_active = 2 * d + attn + 8 * d + (1 + 2) * expert        # gate, shared + 2 routed experts
    head = vocab * d + d                              # output head and final norm (embedding: a lookup, out)
    mtp = 3 * d + 2 * d * d + moe_block_active        # norms, projection of [h; emb], one MoE block (2 routed)
    params = dense_block + 3 * moe_block_active + head + mtp + vocab * d   # MTP calls the shared head again
    attention = 6 * (4 + 1) * heads * (qk + v) * seq_len
    return 6 * params, attention / (2 if causal else 1)


def test_flops_tokens_hours_and_dollars_match_a_hand_computation():
    args = ModelArgs.preset("tiny", vocab_size=512)
    matmul, attention = hand_flops_tiny(256)
    parts = cost.flops_breakdown(args, 256)
    assert parts["matmul"] == pytest.approx(matmul)
    assert parts["attention"] == pytest.approx(attention)
    assert parts["total"] == pytest.approx(matmul + attention) == cost.flops_per_token(args, 256)
    assert cost.flops_breakdown(args, 256, causal=True)["attention"] == pytest.approx(attention / 2)

    tokens, mfu, price = 3e9, 0.25, 1.5
    est = cost.estimate_training_cost(args, tokens, gpu="A100", mfu=mfu, price_per_gpu_hour=price, seq_len=256)
    total = (matmul + attention) * tokens
    hours = total / (312e12 * mfu) / 3600
    assert est["total_flops"] == pytest.approx(total)
    assert est["peak_flops"] == 312e12
    assert est["gpu_hours"] == pytest.approx(hours)
    assert est["cost_usd"] == pytest.approx(hours * price)
    assert (est["tokens"], est["gpu"], est["mfu"], est["seq_len"]) == (tokens, "A100", mfu, 256)


def test_671b_flops_per_token_is_close_to_the_6n_rule_plus_attention():
    args = ModelArgs.preset("671B")
    seq = 4096
    reference = (6 * count_params(args)["activated"]
                 + 6 * args.n_layers * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq)
    got = cost.flops_per_token(args, seq)
    assert got == pytest.approx(reference, rel=0.05)
    assert 2.5e11 < got < 3.2e11                       # ~285 GFLOPs per token


def test_implied_mfu_inverts_the_estimate():
    args = ModelArgs.preset("small")
    for gpu, precision, causal in (("H800", "bf16", False), ("H100", "fp8", True), ("RTX 3090", "bf16", True)):
        est = cost.estimate_training_cost(args, 5e10, gpu=gpu, mfu=0.37, seq_len=1024, precision=precision,
                                          causal=causal)
        back = cost.implied_mfu(args, 5e10, est["gpu_hours"], gpu=gpu, seq_len=1024, precision=precision,
                                causal=causal)
        assert back == pytest.approx(0.37)


def test_v3_published_budget_implies_a_plausible_mfu():
    mfus = cost.v3_implied_mfus()
    print({k: round(v, 3) for k, v in mfus.items()})
    assert 0.2 < mfus["pretraining", "bf16"] < 0.6
    assert 0.2 < mfus["total", "bf16"] < mfus["pretraining", "bf16"]
    assert mfus["pretraining", "fp8"] == pytest.approx(mfus["pretraining", "bf16"] / 2, rel=1e-3)  # FP8 peak ~2x
    assert cost.V3_COST == pytest.approx(5.576e6)
    parts = cost.V3_GPU_HOURS
    assert parts["pretraining"] + parts["context_extension"] + parts["post_training"] == pytest.approx(parts["total"])
    assert parts["pretraining"] == pytest.approx(180e3 * 14.8)      # "180K H800 GPU hours per trillion tokens"


def test_bad_input_raises_clear_errors():
    args = ModelArgs.preset("tiny")
    with pytest.raises(ValueError, match="unknown gpu 'B9000'.*H800.*RTX 3090"):
        cost.estimate_training_cost(args, 1e9, gpu="B9000")
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mfu=.*\(0, 1\]"):
            cost.estimate_training_cost(args, 1e9, mfu=bad)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="tokens="):
            cost.estimate_training_cost(args, bad)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        cost.estimate_training_cost(args, 1e9, precision="fp16")
    with pytest.raises(ValueError, match="A100 has no FP8"):
        cost.estimate_training_cost(args, 1e9, gpu="A100", precision="fp8")
    with pytest.raises(ValueError, match="gpu_hours="):
        cost.implied_mfu(args, 1e9, 0)
    with pytest.raises(ValueError, match="seq_len="):
        cost.flops_per_token(args, 0)


def test_gpu_table():
    assert list(cost.GPU_PEAK_BF16) == ["H200", "H100", "H800", "A100", "A800", "L40S", "L4", "A10",
                                        "RTX 4090", "RTX 3090"]      # order matters for substring lookup
    assert cost.GPU_PEAK_BF16["H800"] == cost.GPU_PEAK_BF16["H100"] == pytest.approx(989.4e12)
    for name, spec in cost.GPUS.items():
        assert spec["source"], name
        assert cost.GPU_PEAK_BF16[name] == spec["bf16"] * 1e12
        assert spec["fp8"] is None or spec["fp8"] == pytest.approx(2 * spec["bf16"], rel=0.02)


def test_cli_prints_the_estimate_and_implied_mfu(capsys):
    out = cost.main(["--gpu_hours=2.664e6"])
    text = capsys.readouterr().out
    assert "implied MFU for 2.66M GPU-hours" in text
    assert "$5.576M" in text and "leaves out" in text
    assert out["implied_mfu"] == pytest.approx(cost.v3_implied_mfus()["pretraining", "bf16"])
    assert out["estimate"]["cost_usd"] == pytest.approx(out["estimate"]["gpu_hours"] * 2.0)

    out = cost.main(["--preset=tiny", "--tokens=1e9", "--gpu=RTX 4090", "--seq_len=128", "--causal"])
    assert out["implied_mfu"] is None
    assert out["flops"]["attention"] == pytest.approx(hand_flops_tiny(128, causal=True)[1])


@pytest.mark.parametrize("flag, message", [("--mfu=1.5", "--mfu=1.5 is invalid"), ("--gpu=B9000", "--gpu='B9000'"),
                                           ("--tokens=0", "--tokens=0.0"), ("--preset=huge", "--preset='huge'"),
                                           ("--mfu=abc", None), ("--nope=1", None)])
def test_cli_bad_input_exits_with_a_message(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        cost.main([flag])
    assert e.value.code == 2                          # a usage error, before anything is printed or computed
    out, err = capsys.readouterr()
    assert out == ""
    if message:                                       # our checks: the last line names flag, value and rule
        assert message in err.strip().splitlines()[-1]
