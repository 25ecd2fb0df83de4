"""Tests for sample.py: cached decoding equals recomputing everything, batched prompts equal each alone,
speculative decoding equals plain decoding under greedy (and keeps the sampling distribution), the
cache sizes, bad inputs, and smoke runs of the command line. About half a minute on one CPU thread:

    OMP_NUM_THREADS=1 python -m pytest tests/test_sample.py -q
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from checkpoint import save_checkpoint
from model import ModelArgs, Transformer
from sample import (
    SampleConfig,
    SpecStats,
    cache_sizes,
    completion_text,
    encode_prompt,
    fit_prompt,
    generate_batch,
    generate_uncached,
    print_stream,
    read_prompt,
    speculative_generate,
    verify_draft,
)
from tasks import format_prompt
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOK = get_tokenizer("char")


def small_args(**kw) -> ModelArgs:
    """The tiny preset shrunk further (fewer layers and experts, short context) so tests run fast."""
    base = {"vocab_size": TOK.n_vocab, "dim": 64, "inter_dim": 128, "moe_inter_dim": 32, "n_layers": 3,
            "n_routed_experts": 4, "n_expert_groups": 2, "n_limited_groups": 1, "q_lora_rank": 32,
            "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "max_seq_len": 96, "original_seq_len": 96, "init_std": 0.1}
    return ModelArgs.preset("tiny", **{**base, **kw})


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_args()).eval()


def write_checkpoint(path: Path, model: Transformer) -> Path:
    """model saved at path in the format train.py writes (with the char tokenizer); returns path."""
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model.args.to_dict(),
                           "tokenizer": TOK.to_dict(), "config": {}, "kind": "pretrain"})
    return path


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory, model) -> Path:
    """A checkpoint in the format train.py writes, holding the random test model."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", model)


PROMPTS = [TOK.encode(format_prompt(q), bos=True) for q in ("37+48", "5*6", "123-45")]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cached_equals_uncached_greedy(model, impl):
    for p in PROMPTS[:2]:
        ref = generate_uncached(model, p, 40)
        got, finished = generate_batch(model, [p], 40, temperature=0, attn_impl=impl)
        assert got[0] == ref and finished == [False]


def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    prompts = [PROMPTS[0], PROMPTS[1][:9], PROMPTS[2][3:]]
    assert len({len(p) for p in prompts}) == 3
    batch, _ = generate_batch(model, prompts, 24, temperature=0)
    for p, row in zip(prompts, batch):
        assert row == generate_batch(model, [p], 24, temperature=0)[0][0]


def test_eos_ends_a_row_and_switching_attention_path_is_temporary(model):
    ref = generate_uncached(model, PROMPTS[0], 20)
    eos = ref[5]                                       # pretend this token is EOS
    got, finished = generate_batch(model, [PROMPTS[0]], 20, temperature=0, eos_id=eos, attn_impl="naive")
    assert got[0] == ref[:ref.index(eos) + 1] and finished == [True]
    assert generate_uncached(model, PROMPTS[0], 20, eos_id=eos) == got[0]
    assert sample.current_attn_impl(model) == "absorb"


# ---------------------------------------------------------------------------------------------- speculative

def test_speculative_greedy_equals_plain_greedy(model):
    for p in PROMPTS:
        ref = generate_batch(model, [p], 48, temperature=0)[0][0]
        out, stats = speculative_generate(model, p, 48, temperature=0)
        assert out == ref
        assert 0.0 <= stats.acceptance <= 1.0 and 0 <= stats.accepted <= stats.drafts
        assert stats.drafts == stats.forwards - 1                     # one draft per verifying call
        assert stats.tokens == len(out) <= stats.forwards + stats.accepted
        assert 1.0 <= stats.tokens_per_forward <= 2.0


def with_oracle_drafts(model, monkeypatch, full: list[int], wrong_every: int = 0) -> list[tuple[int, torch.Tensor]]:
    """Replace the MTP's guesses by the right answer (or a wrong one every `wrong_every`-th draft) so that both
    the accept and the reject branch run; the real MTP still runs and its logits are recorded by position."""
    real, seen = model.mtp_draft, []

    def draft(h_prev, next_tokens, cache):
        logits = real(h_prev, next_tokens, cache)                     # (1, T, V), advances cache.mtp_pos
        m = cache.mtp_pos - 1                                         # the last position drafted from
        seen.append((m, logits[0, -1].clone()))
        target = full[m + 2] if m + 2 < len(full) else 0             # the token two steps after position m
        if wrong_every and len(seen) % wrong_every == 0:
            target = (target + 1) % logits.shape[-1]
        forced = torch.full_like(logits, -1e4)
        forced[:, -1, target] = 0.0
        return forced

    monkeypatch.setattr(model, "mtp_draft", draft)
    # the fused greedy path drafts inside sample.prefill_and_draft and verify_and_draft: the same oracle there
    real_prefill, real_round, rounds = sample.prefill_and_draft, sample.verify_and_draft, []

    def prefill_and_draft(model, idx, layer_caches, mtp_cache, mask):
        nxt, q = real_prefill(model, idx, layer_caches, mtp_cache, mask)      # q (1, V) from the last prompt position
        m = idx.shape[1] - 1
        seen.append((m, q[0].clone()))
        rounds.append(m)
        target = full[m + 2] if m + 2 < len(full) else 0
        if wrong_every and len(rounds) % wrong_every == 0:
            target = (target + 1) % q.shape[-1]
        forced = torch.full_like(q, -1e4)
        forced[:, target] = 0.0
        return nxt, forced

    def verify_and_draft(model, pair, layer_caches, mtp_cache, start, mask):
        picks, q = real_round(model, pair, layer_caches, mtp_cache, start, mask)   # q (1, 2, V) at positions m, m+1
        m, forced = start, torch.full_like(q, -1e4)
        accepted = int(picks[0, 0]) == int(pair[0, 1])
        rounds.append(m)
        for j in (0, 1):                                              # q[:, j] drafts the token at m + j + 2
            if (j == 0 or accepted) and m + j + 2 < len(full):        # position m+1's input is final only then
                seen.append((m + j, q[0, j].clone()))
            target = full[m + j + 2] if m + j + 2 < len(full) else 0
            if wrong_every and len(rounds) % wrong_every == 0 and j == accepted:   # the draft the next round uses
                target = (target + 1) % q.shape[-1]
            forced[:, j, target] = 0.0
        return picks, forced

    monkeypatch.setattr(sample, "prefill_and_draft", prefill_and_draft)
    monkeypatch.setattr(sample, "verify_and_draft", verify_and_draft)
    return seen


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("wrong_every", [0, 2, 3])
def test_speculative_accept_and_reject_paths_keep_both_caches_right(model, monkeypatch, wrong_every, fused):
    """Oracle drafts (always right, or wrong every 2nd / 3rd) through both greedy paths, the fused round and
    the plain draft + verify calls: the text is plain greedy decoding's, and the MTP cache has only ever held
    final inputs."""
    p, n = PROMPTS[0], 41
    ref = generate_batch(model, [p], n, temperature=0)[0][0]
    full = p + ref
    seen = with_oracle_drafts(model, monkeypatch, full, wrong_every)
    out, stats = speculative_generate(model, p, n, temperature=0, fused=fused)
    monkeypatch.undo()
    assert out == ref
    if wrong_every == 0:
        assert stats.acceptance == 1.0 and stats.forwards == 1 + (n - 1 + 1) // 2
    else:
        assert 0.0 < stats.acceptance < 1.0
    # The MTP cache must only ever have seen accepted tokens: its incremental logits equal MTP logits
    # computed in one go over the final sequence (position i uses h_i and token i+1).
    with torch.no_grad():
        idx = torch.tensor([full[:-1]])
        h = model.trunk(idx)                                          # (1, T, D)
        T = idx.shape[1]
        mod = model.mtp[0]
        h1 = mod(h[:, :T - 1], model.embed(idx[:, 1:]), model.rope_cos[:T - 1], model.rope_sin[:T - 1])
        whole = model.head(mod.norm(h1)).float()[0]                   # (T-1, V)
    for m, logits in seen:
        assert torch.allclose(logits, whole[m], atol=1e-4, rtol=1e-4), f"MTP logits differ at position {m}"


def test_speculative_stops_at_eos_like_plain(model):
    ref = generate_uncached(model, PROMPTS[1], 30)
    eos = ref[7]
    out, _ = speculative_generate(model, PROMPTS[1], 30, temperature=0, eos_id=eos)
    assert out == ref[:ref.index(eos) + 1]


def test_speculative_sampling_runs_and_is_reproducible(model):
    def run():
        g = torch.Generator().manual_seed(7)
        return speculative_generate(model, PROMPTS[2], 30, temperature=0.9, top_k=50, top_p=0.95, generator=g)
    (a, stats), (b, _) = run(), run()
    assert a == b and len(a) == 30
    assert all(isinstance(t, int) and 0 <= t < model.args.vocab_size for t in a)
    assert 0.0 <= stats.acceptance <= 1.0


def test_sample_next_draws_from_sampling_probs_and_never_a_zero_probability_token():
    """sample_next's draw against the distribution it samples: frequencies within 1% of
    sampling_probs (temperature, top_k and top_p applied), tokens of probability 0 never drawn, and the
    same generator seed gives the same tokens."""
    from sample import sample_next, sampling_probs
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -30.0, 0.0]]).expand(40_000, -1)   # (N, V) one row, N times
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 3}, {"temperature": 1.3, "top_p": 0.8}):
        p = sampling_probs(logits[:1], **kw)[0]                                      # (V,)
        draws = sample_next(logits, generator=torch.Generator().manual_seed(1), **kw)   # (N,)
        freq = torch.bincount(draws, minlength=6).float() / len(draws)
        assert torch.allclose(freq, p, atol=0.01), kw
        assert (freq[p == 0] == 0).all(), kw
        again = sample_next(logits, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(draws, again)


def test_verify_draft_gives_the_main_models_distribution():
    """Draw d ~ q, keep or replace it: the result must be distributed as p, whatever q is."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    counts = torch.zeros(4)
    n_accepted = 0
    for d in drafts:
        t, accepted = verify_draft(p, q, d, g)
        counts[t] += 1
        n_accepted += accepted
    assert torch.allclose(counts / n, p, atol=0.015)
    assert abs(n_accepted / n - torch.minimum(p, q).sum().item()) < 0.015   # acceptance = sum min(p, q)


def test_speculative_needs_an_mtp_module():
    m = Transformer(small_args(mtp_depth=0)).eval()
    with pytest.raises(ValueError, match="mtp_depth=0"):
        speculative_generate(m, PROMPTS[0], 4)


# ---------------------------------------------------------------------------------------------- cache sizes

def test_cache_bytes_match_formula(model):
    a = model.args
    c = cache_sizes(model, 64)
    per = c["per_token_per_layer"]
    assert per["absorb"] == (a.kv_lora_rank + a.qk_rope_head_dim) * 4                  # fp32 latent + rope key
    assert per["naive"] == a.n_heads * (a.qk_head_dim + a.v_head_dim) * 4
    assert per["mha_computed"] == 2 * a.n_heads * a.qk_nope_head_dim * 4
    assert c["per_token_per_layer_from_total"] == {"absorb": per["absorb"], "naive": per["naive"]}
    assert c["total"]["absorb"] == per["absorb"] * 64 * (a.n_layers + a.mtp_depth)


# ---------------------------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("kw, message", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": 0}, "top_k"), ({"attn_impl": "flash"}, "attn_impl"),
])
def test_bad_settings_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(**kw)


def test_bad_flag_exits_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--top_p=1.5"])
    assert e.value.code == 2 and "--top_p=1.5 must be in (0, 1]" in capsys.readouterr().err


def test_missing_checkpoint_names_the_command_that_makes_one(tmp_path, capsys):
    assert sample.main([f"--init_from={tmp_path / 'none.pt'}"]) == 1
    err = capsys.readouterr().err
    assert "python train.py" in err and "Traceback" not in err


def test_prompt_file(tmp_path, ckpt_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        read_prompt(f"FILE:{tmp_path / 'missing.txt'}")
    with pytest.raises(SystemExit) as e:                  # checked with the other flags, before loading
        sample.main([f"--init_from={ckpt_path}", f"--prompt=FILE:{tmp_path / 'missing.txt'}"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    f = tmp_path / "q.txt"
    f.write_text("User: 1+2\n", encoding="utf-8")
    assert read_prompt(f"FILE:{f}") == "User: 1+2\n"


def test_overlong_prompt_keeps_its_last_tokens_with_a_warning(capsys):
    ids = list(range(100))
    kept = fit_prompt(ids, max_seq_len=96, max_new_tokens=16)
    assert kept == ids[-80:]
    assert "keeping its last 80 tokens" in capsys.readouterr().err
    assert fit_prompt(ids[:10], 96, 16) == ids[:10]
    with pytest.raises(ValueError, match="max_new_tokens"):
        fit_prompt(ids, 96, 96)


def test_empty_and_unusual_prompts():
    assert encode_prompt(TOK, "", bos=False) == [TOK.bos_id]
    assert encode_prompt(TOK, "", bos=True) == [TOK.bos_id]
    text = "héllo, 世界 🙂"
    assert TOK.decode(encode_prompt(TOK, text, bos=False)) == text          # byte fallback, lossless
    assert TOK.decode(encode_prompt(TOK, "a\ud800b", bos=False)) == "a\ufffdb"   # no UTF-8 form: U+FFFD


def test_stop_string_and_streaming(capsys):
    ids = TOK.encode("7+8=15</think><answer>15</answer>junk")
    assert completion_text(TOK, ids, "</answer>") == ("7+8=15</think><answer>15</answer>", True)
    assert completion_text(TOK, [*TOK.encode("ab"), TOK.eos_id]) == ("ab", True)
    assert completion_text(TOK, TOK.encode("ab")) == ("ab", False)
    used = print_stream(iter(ids), TOK, "</answer>")
    assert capsys.readouterr().out == "7+8=15</think><answer>15</answer>\n"
    assert len(used) == len(TOK.encode("7+8=15</think><answer>15</answer>"))
    print_stream(iter(TOK.encode("é€")), TOK, "")                   # multi-byte characters arrive byte by byte
    assert capsys.readouterr().out == "é€\n"


def test_main_streams_plain_and_speculative(ckpt_path, capsys):
    base = [f"--init_from={ckpt_path}", "--max_new_tokens=10", "--temperature=0", "--stop=", "--device=cpu"]
    assert sample.main(base) == 0
    plain = capsys.readouterr().out
    assert sample.main([*base, "--speculative"]) == 0
    spec = capsys.readouterr().out
    assert "User: 37+48" in plain and "MTP drafts accepted" in spec
    def completion(out):
        return out.split("\nAssistant: <think>")[1].split("\n----")[0]
    assert completion(plain) == completion(spec)
    assert sample.main([*base, "--num_samples=3", "--temperature=1.0"]) == 0
    out = capsys.readouterr().out
    assert "---- sample 3 ----" in out and "---- sample 4" not in out


@pytest.mark.slow
def test_main_with_compile_compiles_before_the_timed_run_and_prints_the_same(tmp_path, capsys, monkeypatch):
    """--compile: the decoding step is compiled by a warm-up of the same shapes (reported with its time), and the
    timed run prints the eager run's text, plain and speculative. The plain run compiles with inductor, as a user
    gets it (~30 s of C++ compiling on 2 cores, the first time on a machine); the speculative run takes the same
    command-line path with the aot_eager backend (the traced graphs run eagerly: its inductor build would
    double the cost, and test_decode_fast checks its traced rounds give the same tokens). The model has a dense
    and an MoE layer and the MTP block, every kind of block, and no more: compiling takes time per kernel."""
    import functools

    import torch._dynamo
    torch.manual_seed(0)
    ckpt_path = write_checkpoint(tmp_path / "ckpt.pt", Transformer(small_args(n_layers=2)).eval())
    base = [f"--init_from={ckpt_path}", "--max_new_tokens=10", "--temperature=0", "--stop=", "--device=cpu"]
    original = sample.compile_decoding
    for extra, backend in (([], "inductor"), (["--speculative"], "aot_eager")):
        torch._dynamo.reset()
        monkeypatch.setattr(sample, "compile_decoding", functools.partial(original, backend=backend))
        assert sample.main([*base, *extra]) == 0
        eager = capsys.readouterr().out
        assert sample.main([*base, *extra, "--compile"]) == 0
        compiled = capsys.readouterr().out
        assert "compiled the decoding step in" in compiled and "compiled the decoding step" not in eager
        def completion(out):
            return out.split("\nAssistant: <think>")[1].split("\n----")[0]
        assert completion(compiled) == completion(eager)


# ---------------------------------------------------------------------------------------------- command line

def test_cli_smoke(ckpt_path):
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={ckpt_path}", "--max_new_tokens=8",
                        "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                       env=env(), timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "User: 37+48" in r.stdout and "tokens/s" in r.stdout


@pytest.mark.slow
def test_spec_stats_properties():
    s = SpecStats(drafts=4, accepted=3, forwards=5, tokens=8)
    assert s.acceptance == 0.75 and s.tokens_per_forward == 1.6
    assert SpecStats().acceptance == 0.0
