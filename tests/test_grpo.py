"""Tests for grpo.py: advantages, the KL estimator and the three loss normalisations against hand
computations, token log-probabilities, rewards on adversarial completions, a short GRPO run that must
raise the reward of a toy task, and the command line (errors, --eval_only, a short end-to-end run).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_grpo.py -q      (add -m 'not slow' to skip torchrun)
"""

import builtins
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import grpo
import tasks
from checkpoint import load_model, save_checkpoint
from grpo import (
    Group,
    GRPOConfig,
    collate,
    group_advantages,
    grpo_loss,
    grpo_step,
    kl_unbiased,
    main,
    make_rl_optimizer,
    sample_groups,
    token_logprobs,
)
from model import ModelArgs, Transformer
from sample import completion_text, prompt_tokens
from tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
LN2 = math.log(2)


def tiny_args(vocab_size: int, **kw) -> ModelArgs:
    """A very small model with every feature on (MLA, MoE with groups, MTP), for fast tests."""
    base = {"vocab_size": vocab_size, "dim": 32, "inter_dim": 64, "moe_inter_dim": 16, "n_layers": 2,
            "n_dense_layers": 1, "n_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1,
            "n_activated_experts": 2, "n_expert_groups": 2, "n_limited_groups": 1, "q_lora_rank": 16,
            "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "max_seq_len": 96, "original_seq_len": 96, "mtp_depth": 1, "init_std": 0.02,
            "bias_update_speed": 0.01}
    base.update(kw)
    return ModelArgs(**base)


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny model with a BPE tokenizer, saved in the checkpoint format train.py writes."""
    tok = get_tokenizer("bpe", text=tasks.corpus_text(tasks.build_corpus(300)), vocab_size=300)
    torch.manual_seed(seed)
    args = tiny_args(tok.n_vocab, max_seq_len=128, original_seq_len=128)
    model = Transformer(args)
    save_checkpoint(path, {"model": model.state_dict(), "model_args": args.to_dict(), "tokenizer": tok.to_dict(),
                           "config": {}, "kind": "pretrain"})
    return path


def run_script(*flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run grpo.py in a fresh interpreter, one thread, from the repo folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "grpo.py"), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# ---- advantages -------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                            [0.5, 0.5, 0.5, 0.5]])           # second group: all equal
    # group 1: mean 0.5, population std 0.5 -> (r - 0.5) / (0.5 + 1e-4)
    a = 0.5 / 0.5001
    torch.testing.assert_close(group_advantages(rewards, "group"),
                               torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(group_advantages(rewards, "none"),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))


def test_equal_rewards_give_exact_zero_without_nan():
    for value in (0.0, 0.1, 1.1, 1e-8):
        rewards = torch.full((3, 8), value)
        for scale in ("group", "none"):
            adv = group_advantages(rewards, scale, eps=0.0)   # even without eps: no 0/0
            assert torch.equal(adv, torch.zeros(3, 8))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(1, 2), "batch")


# ---- KL estimator -----------------------------------------------------------------------------------

def test_kl_estimator_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g) * 10
    ref = -torch.rand(1000, generator=g) * 10
    kl = kl_unbiased(logp, ref)
    assert bool((kl >= 0).all())
    assert torch.equal(kl_unbiased(logp, logp), torch.zeros(1000))
    # x - log x - 1 with x = pi_ref / pi_theta = 2
    assert kl_unbiased(torch.tensor(0.0), torch.tensor(LN2)).item() == pytest.approx(1 - LN2)


# ---- loss -------------------------------------------------------------------------------------------

def hand_batch():
    """N=2 sequences, T=3 slots. old_logp = 0, so rho = exp(logp).

    seq 0: A=+1, rho = [1.0, 1.5, 0.9], all three tokens count
    seq 1: A=-2, rho = [0.5, 1.1, 3.0], the last slot is padding
    """
    rho = torch.tensor([[1.0, 1.5, 0.9], [0.5, 1.1, 3.0]])
    logp = rho.log()
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    ref = logp + torch.tensor([[0.0, LN2, 0.0], [-LN2, 0.0, 5.0]])   # log(pi_ref / pi_theta) per token
    return logp, old, ref, adv, mask


# Per-token terms -min(rho A, clip(rho, 0.8, 1.2) A), by hand:
#   seq 0 (A=+1): 1.0 -> -1.0;  1.5 -> min(1.5, 1.2) = 1.2 (clipped) -> -1.2;  0.9 -> -0.9
#   seq 1 (A=-2): 0.5 -> min(-1.0, -1.6) = -1.6 (clipped) -> 1.6;  1.1 -> min(-2.2, -2.2) -> 2.2
# KL per token (x - ln x - 1, x = pi_ref/pi_theta): seq 0 [0, 1 - ln2, 0], seq 1 [ln2 - 1/2, 0, -]
TERMS = [[-1.0, -1.2, -0.9], [1.6, 2.2]]
KL = [[0.0, 1 - LN2, 0.0], [LN2 - 0.5, 0.0]]


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_by_hand(loss_type, beta):
    logp, old, ref, adv, mask = hand_batch()
    terms = [[t + beta * k for t, k in zip(ts, ks)] for ts, ks in zip(TERMS, KL)]
    if loss_type == "grpo":      # mean over sequences of each sequence's token mean
        expected = (sum(terms[0]) / 3 + sum(terms[1]) / 2) / 2
    elif loss_type == "dr_grpo":  # sum / (N * max_new_tokens), max_new_tokens = 4
        expected = (sum(terms[0]) + sum(terms[1])) / (2 * 4)
    else:                        # sum / number of tokens
        expected = (sum(terms[0]) + sum(terms[1])) / 5
    loss, stats = grpo_loss(logp, old, ref if beta else None, adv, mask, 0.2, 0.2, beta, loss_type, 4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["kl"] == pytest.approx((sum(KL[0]) + sum(KL[1])) / 5 if beta else 0.0, abs=1e-6)


def test_loss_values_match_hand_numbers():
    """The same numbers written out, so a reader can check the arithmetic above."""
    logp, old, ref, adv, mask = hand_batch()

    def loss(loss_type):
        return grpo_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.0, loss_type, 4)[0].item()

    assert loss("grpo") == pytest.approx((-3.1 / 3 + 3.8 / 2) / 2)    # 0.43333
    assert loss("dr_grpo") == pytest.approx(0.7 / 8)                  # 0.0875
    assert loss("dapo") == pytest.approx(0.7 / 5)                     # 0.14


def test_clip_higher_and_mu1_ratio():
    logp, old, _, adv, mask = hand_batch()
    # eps_high = 0.6: rho = 1.5 with A > 0 is no longer clipped; only the low clip (0.5 -> 0.8) remains
    loss, stats = grpo_loss(logp, old, None, adv, mask, 0.2, 0.6, 0.0, "dapo", 4)
    assert loss.item() == pytest.approx((-1.0 - 1.5 - 0.9 + 1.6 + 2.2) / 5)
    assert stats["clip_frac"] == pytest.approx(1 / 5)
    # mu = 1: old = logp.detach(), rho = 1, nothing clipped, and grpo's loss is -mean(A) = 0.5 here
    logp.requires_grad_(True)
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.2, 0.0, "grpo", 4)
    assert stats["clip_frac"] == 0.0 and stats["ratio"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    loss.backward()
    # d loss / d logp = -A / (|o_i| N) on counted tokens, 0 on padding
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]]))


def test_masked_slots_never_produce_nan():
    logp, old, ref, adv, mask = hand_batch()
    logp = logp.clone()
    logp[1, 2] = -1e4                          # a padding slot with an absurd value: exp would overflow
    logp.requires_grad_(True)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.1, "grpo", 4)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logp.grad).all()) and logp.grad[1, 2] == 0


def test_all_masked_batch_is_zero():
    logp, old, ref, adv, _ = hand_batch()
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        loss, stats = grpo_loss(logp, old, ref, adv, torch.zeros(2, 3, dtype=torch.bool), 0.2, 0.2, 0.1,
                                loss_type, 4)
        assert loss.item() == 0.0 and stats["clip_frac"] == 0.0


# ---- token log-probabilities ------------------------------------------------------------------------

def test_token_logprobs_matches_manual_gather():
    torch.manual_seed(0)
    model = Transformer(tiny_args(50)).eval()
    idx = torch.randint(0, 50, (3, 12))
    start = torch.tensor([4, 7, 5])
    n_new = 5
    logp, ent = token_logprobs(model, idx, start, n_new, with_entropy=True)
    logits = model(idx)[0]
    for i in range(3):
        for j in range(n_new):
            pos = int(start[i]) + j - 1                # logits at position t predict token t + 1
            row = F.log_softmax(logits[i, pos], dim=-1)
            assert logp[i, j].item() == pytest.approx(row[idx[i, pos + 1]].item(), abs=1e-5)
            assert ent[i, j].item() == pytest.approx(-(row.exp() * row).sum().item(), abs=1e-5)
    # temperature divides the logits before the softmax
    logp_t, _ = token_logprobs(model, idx, start, n_new, temperature=2.0)
    row = F.log_softmax(logits[0, 3] / 2.0, dim=-1)
    assert logp_t[0, 0].item() == pytest.approx(row[idx[0, 4]].item(), abs=1e-5)
    with pytest.raises(ValueError):
        token_logprobs(model, idx, start, 6)          # 7 + 6 > 12 columns


def test_collate_and_logprobs_agree_with_unpadded_forward():
    """Right-padding does not change what a row computes (causal attention)."""
    torch.manual_seed(0)
    tok = get_tokenizer("char")
    model = Transformer(tiny_args(tok.n_vocab)).eval()
    prompts = [prompt_tokens(tok, "1+2"), prompt_tokens(tok, "123+45")]
    group = Group(tasks.arithmetic_problem("1+2"), prompts[0], [[51, 52, tok.eos_id], [53]], [True, False],
                  ["34", "5"], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    group2 = Group(tasks.arithmetic_problem("123+45"), prompts[1], [[54, 55], [56, 57, 58, 59]],
                   [False, False], ["", ""], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    idx, start, mask = collate([group, group2], tok.eos_id)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    logp, _ = token_logprobs(model, idx, start, mask.shape[1])
    row = torch.tensor([prompts[1] + [56, 57, 58, 59]])             # the last row alone, unpadded
    alone = F.log_softmax(model(row)[0][0], dim=-1)
    L = len(prompts[1])
    expected = torch.stack([alone[L - 1 + j, t] for j, t in enumerate([56, 57, 58, 59])])
    torch.testing.assert_close(logp[3], expected, atol=1e-5, rtol=1e-5)


# ---- rewards on adversarial completions -------------------------------------------------------------

ADVERSARIAL = [
    "",                                            # only EOS was sampled
    "7+8+0=15 3+4+1=0",                            # cut off at the length limit (no </answer>)
    "</think>" * 50,
    "9" * 10_000,
    "<answer>9**9**9</answer>",
    "__import__('os')",
    "<answer>" * 20 + "85" + "</answer>" * 20,
    "</think><answer>85</answer><answer>85</answer>",
    "</think><answer>85</answer>" * 500,           # 13k characters of tags
]
COUNTDOWN = tasks.Problem("3 7 25 -> 46", "25+3*7", "countdown", {"numbers": [3, 7, 25], "target": 46})


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_completions_get_zero_reward(text, monkeypatch):
    """Zero reward, and no adversarial text ever reaches arithmetic: the cost bound is an operation count
    (calls of the exact evaluator tasks._value), not a wall-clock threshold."""
    evaluated = []
    value = tasks._value
    monkeypatch.setattr(tasks, "_value", lambda node: evaluated.append(node) or value(node))
    tok = get_tokenizer("char")
    ids = tok.encode(text)
    for finished in (True, False):                 # with EOS, or truncated at the length limit
        completion = ids + [tok.eos_id] if finished else ids
        decoded, ended = completion_text(tok, completion)
        assert decoded == text and ended == finished                    # the EOS is never part of the scored text
        for problem in (tasks.arithmetic_problem("37+48"), COUNTDOWN):
            r = tasks.reward(decoded, problem, 1.0, 0.1)
            assert r == {"accuracy": 0.0, "format": 0.0, "total": 0.0}
    assert evaluated == []
    assert tasks.reward("</think><answer>25+3*7</answer>", COUNTDOWN)["accuracy"] == 1.0 and evaluated  # the probe works


@pytest.mark.parametrize("answer", ["9**9**9", "__import__('os')", "\u0668\u0665", "85.0", "0x55", "8_5"])
def test_well_formed_but_invalid_answers_get_no_accuracy(answer):
    text = f"</think><answer>{answer}</answer>"
    for problem in (tasks.arithmetic_problem("37+48"), COUNTDOWN):
        r = tasks.reward(text, problem, 1.0, 0.1)
        assert r["accuracy"] == 0.0 and r["total"] == pytest.approx(0.1 * r["format"])
    assert tasks.reward("</think><answer>85</answer>", tasks.arithmetic_problem("37+48"))["total"] == 1.1


def test_verifier_never_evaluates_code(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the verifier must never run model output as code")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    countdown = COUNTDOWN
    for answer in ("__import__('os').system('echo pwned')", "open('/etc/passwd').read()", "9**9**9",
                   "(lambda: 46)()", "46"):
        text = f"</think><answer>{answer}</answer>"
        assert tasks.reward(text, countdown)["accuracy"] == 0.0
        assert tasks.reward(text, tasks.arithmetic_problem("40+6"))["accuracy"] == (1.0 if answer == "46" else 0.0)
    assert tasks.reward("</think><answer>25+3*7</answer>", countdown)["accuracy"] == 1.0


# ---- a short GRPO run must learn a trivially learnable reward ---------------------------------------

def first_char_is_ascii(text: str, problem) -> dict:
    """Toy reward: 1 when the completion starts with an ASCII character. A random model over 258 byte
    tokens hits it about half the time, so groups have variance and GRPO has signal from step one."""
    ok = float(bool(text) and text[0].isascii())
    return {"accuracy": ok, "format": 0.0, "total": ok}


def toy_setup(**cfg_overrides):
    """Tiny random model with the byte tokenizer, a one-question toy task, and its config.

    Completions are cut at max_new_tokens (almost never an EOS), so they must stay in the loss:
    mask_truncated=False here (with it, nearly every sequence would be dropped and nothing learned)."""
    torch.manual_seed(0)
    tok = get_tokenizer("char")
    model = Transformer(tiny_args(tok.n_vocab))
    cfg = GRPOConfig(**{"group_size": 8, "prompts_per_step": 8, "max_new_tokens": 2, "lr": 1e-2, "beta": 0.0,
                        "warmup_iters": 0, "lr_decay": False, "mask_truncated": False, **cfg_overrides})

    def problems(n):
        return [tasks.Problem("hi", "", "toy") for _ in range(n)]

    return model, tok, cfg, problems


def test_short_grpo_run_increases_reward():
    model, tok, cfg, problems = toy_setup()
    opt = make_rl_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    rewards = []
    for _ in range(30):
        stats = grpo_step(model, None, opt, tok, problems, first_char_is_ascii, cfg, generator=gen)
        rewards.append(stats["reward"])
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.75 and last > 0.9 and last > first + 0.25, rewards


def test_step_with_kl_mu_dynamic_sampling_and_router_bias(monkeypatch):
    model, tok, cfg, problems = toy_setup(beta=0.04, mu=2, dynamic_sampling=True, eps_high=0.28,
                                          loss_type="dapo", scale_rewards="none", max_new_tokens=3)
    ref = Transformer(model.args)
    ref.load_state_dict(model.state_dict())
    ref.eval().requires_grad_(False)
    loads = []                                                 # record every router bias update
    update_bias = model.update_bias

    def recording_update_bias(load=None, speed=None):
        loads.append(load.clone())
        return update_bias(load, speed)

    model.update_bias = recording_update_bias
    passes = []                                                # (k3 by hand, reported kl) of every loss pass
    loss_fn = grpo.grpo_loss

    def recording_loss(logp, old_logp, ref_logp, adv, mask, *args):
        loss, st = loss_fn(logp, old_logp, ref_logp, adv, mask, *args)
        x = torch.exp(ref_logp - logp.detach())[mask.bool()]                   # pi_ref / pi_theta per token
        passes.append(((x - torch.log(x) - 1).mean().item(), st["kl"]))
        return loss, st

    monkeypatch.setattr(grpo, "grpo_loss", recording_loss)
    opt = make_rl_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        stats = grpo_step(model, ref, opt, tok, problems, first_char_is_ascii, cfg, generator=gen)
    for key in ("reward", "kl", "clip_frac", "entropy", "loss", "zero_var_frac", "trunc_frac", "length",
                "sample_s", "update_s", "sample_tok_s", "train_tok_s"):
        assert math.isfinite(stats[key]), key
    # the first pass scores the reference itself: KL exactly 0; after each optimizer step the policy has moved
    # away from the reference, and the reported KL is the masked k3 mean, then the mean over the mu passes
    assert len(passes) == 2 * cfg.mu and passes[0] == (0.0, 0.0)
    for by_hand, reported in passes:
        assert reported == pytest.approx(by_hand, rel=1e-5, abs=1e-9)
    assert all(kl > 1e-6 for kl, _ in passes[1:])
    assert stats["kl"] == pytest.approx(sum(kl for _, kl in passes[cfg.mu:]) / cfg.mu, rel=1e-6)
    assert stats["ratio"] != pytest.approx(1.0, abs=1e-6)      # the second pass sees rho != 1
    assert len(loads) == 2 * cfg.mu and all(float(load.sum()) > 0 for load in loads)  # once per optimizer step
    assert float(model.expert_load().sum()) == 0               # load counters were reset after the update


def test_sample_groups_scores_every_completion():
    model, tok, _, _ = toy_setup()
    problem = tasks.arithmetic_problem("37+48")
    groups = sample_groups(model, tok, [problem, problem], 4, 5, 1.0,
                           lambda t, p: tasks.reward(t, p), torch.Generator().manual_seed(0))
    assert len(groups) == 2 and all(len(g.completions) == 4 and len(g.rewards) == 4 for g in groups)
    for g in groups:
        assert g.prompt == prompt_tokens(tok, "37+48") and g.prompt[0] == tok.bos_id
        for c, f in zip(g.completions, g.finished):
            assert len(c) <= 5 and f == (c[-1:] == [tok.eos_id])


# ---- command line -----------------------------------------------------------------------------------

def test_group_size_below_two_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="G >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(SystemExit) as e:   # before any checkpoint is looked at
        main([f"--init_from={tmp_path / 'nothing.pt'}", "--group_size=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "G >= 2" in err and "no checkpoint" not in err


def test_bad_choices_are_errors():
    for kw in ({"loss_type": "ppo"}, {"scale_rewards": "batch"}, {"task": "chess"}, {"temperature": 0.0},
               {"mu": 0}, {"beta": -1.0}):
        with pytest.raises(ValueError):
            GRPOConfig(**kw)


def test_missing_checkpoint_names_train_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([f"--init_from={tmp_path / 'missing' / 'ckpt.pt'}", f"--out_dir={tmp_path}", "--device=cpu"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "python train.py" in err and "Traceback" not in err


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    save_tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"].pop("norm.weight")
    save_checkpoint(path, ckpt)                    # a consistent file (its checksum is of these weights)
    with pytest.raises(SystemExit) as e:
        main([f"--init_from={path}", f"--out_dir={tmp_path}", "--device=cpu", "--eval_only"])
    assert e.value.code == 1 and "norm.weight" in capsys.readouterr().err


def test_too_long_generation_is_a_clear_error(tmp_path, capsys):
    path = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        main([f"--init_from={path}", f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=500"])
    assert e.value.code == 1 and "max_seq_len" in capsys.readouterr().err


def test_eval_only_writes_spec_jsonl(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "eval_out"
    proc = run_script("--eval_only", f"--init_from={ckpt}", f"--out_dir={out}", "--n_eval=6",
                      "--max_new_tokens=8", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy" in proc.stdout
    lines = (out / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 6
    seen = set()
    for line in lines:
        rec = json.loads(line)
        assert {"question", "completion", "answer", "correct"} <= set(rec)
        assert tasks.is_heldout(rec["question"])
        problem = tasks.arithmetic_problem(rec["question"])       # the verifier, applied again to the text
        assert rec["answer"] == problem.answer
        assert rec["correct"] is (tasks.accuracy_reward(rec["completion"], problem) == 1.0)
        assert rec["format"] is (tasks.format_reward(rec["completion"]) == 1.0)
        seen.add(rec["question"])
    assert len(seen) == 6
    accuracy = sum(json.loads(line)["correct"] for line in lines) / 6
    assert f"held-out accuracy {100 * accuracy:.1f}%" in proc.stdout


def test_short_training_run_end_to_end(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "run"
    proc = run_script(f"--init_from={ckpt}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=1",
                      "--n_eval=4", "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=6",
                      "--device=cpu", "--beta=0.04", "--mu=2")
    assert proc.returncode == 0, proc.stderr
    assert "loss value is 0 (up to rounding) only for loss_type=grpo" in proc.stdout and "next: python sample.py" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all("heldout_acc" in r for r in records)
    for key in ("reward", "accuracy", "format", "zero_var_frac", "trunc_frac", "length", "kl", "clip_frac",
                "entropy", "sample_tok_s", "train_tok_s"):
        assert key in records[-1]
    for name in ("grpo_rewards.png", "grpo_heldout.png", "grpo_length.png", "eval_step0.jsonl",
                 "eval_step2.jsonl"):
        assert (out / name).stat().st_size > 0
    _, _, saved = load_model(out / "ckpt.pt")
    assert saved["kind"] == "grpo" and saved["grpo_config"]["mu"] == 2 and saved["step"] == 2


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(REPO / "grpo.py"), f"--init_from={ckpt}", f"--out_dir={out}", "--max_iters=2",
                           "--n_eval=4", "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=6",
                           "--device=cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "ckpt.pt").exists()

