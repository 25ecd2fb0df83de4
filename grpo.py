"""
tinyseek/grpo.py -- R1-Zero-style reasoning RL: GRPO with rule-based rewards only.

Run `python train.py` first, then `python grpo.py`: the pretrained checkpoint is improved by
Group Relative Policy Optimization, with no critic, no reward model and no human labels, and the
held-out accuracy is evaluated before, during and after training.

References:
  [DSM] DeepSeekMath, arXiv 2402.03300, §4.1 (GRPO, eq. 3-4)
  [R1]  DeepSeek-R1, arXiv 2501.12948, §2.2 (R1-Zero: template + rule-based rewards)
  [DR]  "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO), arXiv 2503.20783
  [DAPO] "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476

From PPO to GRPO
----------------
A language model is a policy: the prompt is the state, each token an action. Policy-gradient methods
raise the log-probability of actions in proportion to their *advantage*, how much better they turned
out than expected. PPO estimates "expected" with a learned value function, a critic as large as the
policy itself, and keeps each update close to the policy that sampled the data by clipping the
importance ratio rho = pi_theta / pi_old to [1 - eps, 1 + eps].

GRPO [DSM §4.1] removes the critic. For each question q it samples a *group* of G outputs
o_1..o_G from pi_old, scores them r_1..r_G, and uses the group itself as the baseline: with outcome
rewards every token of o_i gets the same advantage

    A_i = (r_i - mean(r)) / std(r)                                  [DSM §4.1.2, outcome supervision]

so an output is pushed up exactly when it beat its siblings. The objective [DSM eq. 3] is

    J = E[ 1/G sum_i 1/|o_i| sum_t { min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta KL_it } ]

with a per-token KL to a frozen reference model (the starting checkpoint), estimated by
[DSM eq. 4]  KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, which is unbiased and never negative.
The KL sits in the loss, not in the reward, so it does not disturb the advantages. We minimise -J.

R1-Zero [R1 §2.2] applied exactly this to a base model with a template that asks for reasoning
inside <think> </think> and the answer inside <answer> </answer>, and two rule-based rewards:
accuracy (a program verifies the answer) and format (the tags are present and well-formed). A neural
reward model was deliberately avoided because a policy learns to exploit it (reward hacking). The
verifiers and the template live in tasks.py; here they are only called.

Where GRPO gets its signal -- and where tiny models fail
--------------------------------------------------------
If all G outputs of a question are equally right (all right or all wrong), the question says nothing
about correctness: without the format bonus every advantage is zero, and with it the advantages only
rank the formats (the std division even blows a small format difference up to full-size advantages).
The fraction of such "zero-variance" groups, judged on accuracy as DAPO does, is logged every step:
when the pretrained model almost never (or always) solves a question, most groups are flat and
learning stalls. tasks.py plants a systematic mistake in the pretraining corpus (a dropped carry) so
that samples of the pretrained model are right often enough to give signal (see its docstring).

Variants implemented (flags)
----------------------------
  --scale_rewards=group|none   divide by the group std [DSM] or not [DR]: the std division gives
                               questions that are almost always solved (tiny std) huge advantages.
  --loss_type=grpo             1/G sum over the group of each sequence's token mean (DSM eq. 3), over
                               ALL completions: a masked (truncated) one adds 0 but still counts in G.
              dr_grpo          sum of token terms / (N * max_new_tokens): a constant normaliser, so a
                               long wrong answer is not penalised less per token than a short one [DR].
              dapo             sum of token terms / number of completion tokens in the batch: every
                               token weighs the same [DAPO "token-level policy gradient loss"].
  --eps_high > --eps           clip-higher [DAPO]: a larger upper clip lets unlikely good tokens grow.
  --dynamic_sampling           replace groups whose G answers are all right or all wrong with fresh
                               questions [DAPO §3.2: keep 0 < #correct < G]; decided on accuracy, not
                               on the total reward, which the format bonus would keep varying.
  --mask_truncated             completions cut off at max_new_tokens get no loss [DAPO "overlong
                               filtering"]: their reward reflects the cut, not the reasoning.
  --beta=0                     no KL term; the reference model is then not even built (saves memory).

What is simplified, honestly
----------------------------
- One update per batch by default (mu=1), as DeepSeekMath did ("a single update following each
  exploration stage"). Then pi_old is the current policy, rho = 1 exactly, nothing is clipped, and
  each token's term is -A_i + beta KL_it. The advantages of a group sum to zero, so the loss value is
  0 (up to rounding) exactly when loss_type=grpo (every sequence weighs 1/G), no row is masked
  (--mask_truncated drops rows, and the rest no longer sum to zero) and beta=0 (else it is beta times
  the mean KL). With dapo or dr_grpo a sequence weighs by its length, so the value is -sum_i w_i A_i,
  not 0. In every case the *gradient* is the policy gradient and the value says nothing about progress:
  watch reward and held-out accuracy, never the loss. Clipping only acts with --mu > 1.
- The old log-probs are recomputed by the training forward pass, not stored by the sampler; with the
  same fp32 weights both are the same numbers up to rounding (inference engines in bf16 are not, which
  is why large systems need importance corrections we do not).
- FP8 (a checkpoint with fp8 on): MLA's two paths round differently. The absorbed one (decoding's default)
  quantises only wkv_b's weight and keeps the latent c^KV in high precision; the naive one also quantises
  c^KV, the input of wkv_b's GEMM, to E4M3. Sampled on one and scored on the other, the policies would
  differ by more than rounding, and with mu=1 there is no ratio to correct it. setup() therefore decodes on
  the learner's path (args.full_attn_impl()) when fp8 is on: both then apply the same FP8 roundings and
  agree up to float rounding (tested); the checkpoint keeps the decoding path it came with.
- Log-probabilities use logits / temperature, i.e. the distribution the samples were drawn from.
- The reference model is the starting checkpoint forever; DeepSeekMath's iterative GRPO also refreshed
  it and retrained a reward model. Process rewards (a score per reasoning step) are not implemented.
- At this scale "reasoning" improves by unlearning a systematic habit (tasks.py's dropped carry);
  nothing like R1-Zero's growing chains of thought or "aha moments" should be expected.
- Under torchrun each rank normalises its own share of the batch and DDP averages the gradients; for
  the dapo/dr_grpo normalisers this weighs ranks equally rather than tokens.
- No sequence-wise balance loss and no MTP loss during RL: only the policy objective is optimised.
- Router bias during RL (a decision): the aux-loss-free bias step (V3 §2.1.2) runs after every optimizer
  step at the preset's constant speed, args.bias_update_speed, also where pretraining's V3 schedule
  (train.py --v3_schedules) had brought the speed to 0 for its last part. RL trains on a new distribution,
  the policy's own completions of one task, without any balance loss, and the bias step is what keeps the
  experts' load balanced there. --update_router_bias=false freezes the biases, as V3's last pretraining
  phase did.

Map of this file
----------------
  1. GRPOConfig ....................... every flag
  2. Pure pieces ...................... group_advantages, kl_unbiased, grpo_loss, token_logprobs
  3. Rollout .......................... prompts, sampling G completions per question, rewards,
                                        dynamic sampling
  4. Update ........................... collate, policy_update (mu passes of AdamW), grpo_step
  5. Logging .......................... log line, plots
  6. The run .......................... setup (load, reference, optimizer, --resume), train_loop, finish,
                                        eval_only, main
  (Held-out evaluation is sample.evaluate, shared with train.py, so both report the same measure.)

Outputs in --out_dir: metrics.jsonl (one JSON object per step; held-out results on the steps where
evaluation ran), eval_step{N}.jsonl (one line per held-out problem after N steps; N=0 is the starting
checkpoint), grpo_rewards.png, grpo_heldout.png, grpo_length.png, and ckpt.pt (loadable by sample.py,
and holding what --resume needs). `--eval_only` writes eval.jsonl. Ctrl-C or SIGTERM finish the current
step, write the checkpoint and say how to resume.
"""

import contextlib
import copy
import dataclasses
import functools
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import tasks
from checkpoint import (
    CheckpointError,
    check_state_dict,
    model_from_checkpoint,
    rank_rng_states,
    read_checkpoint,
    save_checkpoint,
    weights_sha256,
    write_jsonl,
)
from cli import (
    LOG_TO,
    Dist,
    GracefulStop,
    MetricsLog,
    all_ranks,
    autocast_context,
    cleanup_distributed,
    format_seconds,
    from_rank0,
    invalid_flag,
    parse_config,
    pick_device,
    print_config,
    progress,
    setup_distributed,
)
from sample import completion_text, evaluate, generate_batch, prompt_tokens

LOSS_NOTE = ("note: with mu=1 the ratio is 1, so the loss value is 0 (up to rounding) only for loss_type=grpo "
             "with no masked rows and beta=0, and otherwise a weighted sum of advantages plus beta*KL; "
             "its gradient is what trains: watch reward and held-out accuracy, not the loss")

# ----------------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------------


def _flag(default, help_text: str):
    """A dataclass field whose help text shows up in `python grpo.py --help`."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class GRPOConfig:
    """Every knob of a GRPO run; each field is a `--name=value` flag (cli.parse_config)."""

    # ---- input / output ----
    init_from: str = _flag("out/ckpt.pt", "checkpoint to improve (made by `python train.py`)")
    out_dir: str = _flag("out_grpo", "metrics, evaluations, plots and the final ckpt.pt go here")
    resume: bool = _flag(False, "continue an interrupted run from out_dir/ckpt.pt (same flags)")
    # ---- task (tasks.py) ----
    task: str = _flag("arithmetic", "arithmetic (the default) or countdown (needs search, not recall)")
    digits_min: int = _flag(1, "arithmetic: fewest digits per operand")
    digits_max: int = _flag(2, "arithmetic: most digits per operand (train.py --max_digits)")
    n_operands: int = _flag(2, "arithmetic: operands per question")
    ops: str = _flag("+-", "arithmetic: operators to draw from, a subset of '+-*'")
    n_numbers: int = _flag(3, "countdown: numbers per question")
    # ---- rollout ----
    group_size: int = _flag(8, "G, completions sampled per question (>= 2)")
    prompts_per_step: int = _flag(16, "questions per step, summed over all ranks")
    max_new_tokens: int = _flag(64, "completion length limit (sampling and evaluation)")
    temperature: float = _flag(1.0, "sampling temperature of the rollouts (> 0)")
    dynamic_sampling: bool = _flag(False, "DAPO: replace zero-variance groups by fresh questions")
    dynamic_max_tries: int = _flag(3, "dynamic sampling: extra sampling rounds per step at most")
    mask_truncated: bool = _flag(True, "no loss on completions cut off at max_new_tokens (DAPO)")
    # ---- rewards (R1 §2.2) ----
    w_acc: float = _flag(1.0, "weight of the accuracy reward")
    w_fmt: float = _flag(0.1, "weight of the format reward (keep small: a large bonus can dominate the advantage)")
    lab_verifier: str = _flag("strict", "strict (the real verifier) | lenient (a substring check) | last_digit (only "
                                        "the last digit is compared): deliberately exploitable verifiers for the "
                                        "reward-hacking lab (extras/rl_lab.py); evaluation stays strict")
    # ---- objective ----
    loss_type: str = _flag("grpo", "grpo | dr_grpo | dapo: how token terms are normalised")
    scale_rewards: str = _flag("group", "group: divide advantages by the group std; none: Dr. GRPO")
    eps: float = _flag(0.2, "lower clip range: rho >= 1 - eps")
    eps_high: float = _flag(0.2, "upper clip range: rho <= 1 + eps_high (clip-higher when > eps)")
    beta: float = _flag(0.04, "KL coefficient; 0 drops the reference model")
    mu: int = _flag(1, "optimisation passes per sampled batch")
    # ---- optimisation ----
    lr: float = _flag(1e-4, "peak learning rate (AdamW)")
    warmup_iters: int = _flag(5, "linear warmup steps")
    lr_decay: bool = _flag(True, "cosine decay to min_lr_ratio * lr at max_iters")
    min_lr_ratio: float = _flag(0.1, "final lr as a fraction of lr when lr_decay")
    weight_decay: float = _flag(0.0, "AdamW weight decay")
    grad_clip: float = _flag(1.0, "clip the gradient norm to this (0: off)")
    update_router_bias: bool = _flag(True, "aux-loss-free bias update after each optimizer step, at the preset's "
                                           "constant speed (false: biases frozen)")
    max_iters: int = _flag(60, "training steps (the default budget: the same run on any machine)")
    max_seconds: float = _flag(0.0, "also stop starting new steps after this many seconds of training (0: no limit)")
    # ---- evaluation ----
    eval_interval: int = _flag(10, "evaluate and write a checkpoint every this many steps (0: only before and "
                                   "after training)")
    n_eval: int = _flag(500, "held-out problems per evaluation (0: no evaluation)")
    eval_batch_size: int = _flag(250, "problems per greedy generation batch")
    eval_seed: int = _flag(0, "which held-out problems (the same set at every evaluation)")
    eval_only: bool = _flag(False, "only evaluate init_from, write eval.jsonl and print the accuracy")
    # ---- system ----
    seed: int = _flag(1337, "seed for questions, sampling and initialisation")
    device: str = _flag("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _flag("auto", "auto (bfloat16 autocast on a GPU that supports it, else float32) | float32 | "
                               "bfloat16 (autocast, also on CPU)")
    compile: bool = _flag(False, "torch.compile the policy's training forward pass (sampling stays eager)")
    log_to: str = _flag("jsonl", "metrics go to out_dir/metrics.jsonl; also to: tensorboard | wandb")

    def __post_init__(self):
        """Reject impossible settings before anything is loaded (argparse turns the ValueError into one line
        naming the flag, its value and the rule)."""
        bad = functools.partial(invalid_flag, self)     # bad(name, rule) raises the one-line error
        if self.group_size < 2:
            bad("group_size", "GRPO needs G >= 2 completions per question; the advantage compares each "
                "completion with the others of its group")
        choices = {"task": ("arithmetic", "countdown"), "loss_type": ("grpo", "dr_grpo", "dapo"),
                   "scale_rewards": ("group", "none"), "dtype": ("auto", "float32", "bfloat16"), "log_to": LOG_TO}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, "choose one of " + ", ".join(allowed))
        for name in ("prompts_per_step", "max_new_tokens", "mu", "eval_batch_size", "max_iters", "digits_min",
                     "digits_max", "n_operands", "n_numbers"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if not self.temperature > 0:
            bad("temperature", "must be > 0: greedy groups are identical and carry no signal")
        if not 0 < self.eps < 1:
            bad("eps", "must be in (0, 1)")
        if not self.eps_high > 0:
            bad("eps_high", "must be > 0")
        for name in ("beta", "weight_decay", "grad_clip", "max_seconds", "n_eval", "eval_interval",
                     "warmup_iters", "dynamic_max_tries", "min_lr_ratio", "w_acc", "w_fmt"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.digits_min > self.digits_max:
            bad("digits_min", f"exceeds --digits_max={self.digits_max}")
        if not self.ops or set(self.ops) - set("+-*"):
            bad("ops", "must be a non-empty subset of '+-*'")
        if self.lab_verifier not in tasks.LAB_VERIFIERS:
            bad("lab_verifier", "choose strict, lenient or last_digit (the last two only for the reward-hacking lab)")
        if self.lab_verifier != "strict" and self.task != "arithmetic":
            bad("lab_verifier", f"{self.lab_verifier} exists for the arithmetic task only")


def make_task(cfg: GRPOConfig) -> tasks.Task:
    """The task selected by --task and its knobs."""
    if cfg.task == "countdown":
        return tasks.CountdownTask(n_numbers=cfg.n_numbers)
    return tasks.ArithmeticTask(digits=(cfg.digits_min, cfg.digits_max), n_operands=cfg.n_operands, ops=cfg.ops)


# ----------------------------------------------------------------------------------------------------
# 2. The pure pieces: advantages, KL, the clipped objective, token log-probabilities
# ----------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (DSM §4.1.2, outcome supervision): (P, G) rewards -> (P, G).

    A_i = r_i - mean(r) over the group (row), divided by (std(r) + eps) when scale="group" [DSM] and
    left unscaled when scale="none" [DR]. std is the population std (unbiased=False), so a group's
    advantages have mean 0 and root-mean-square just under 1. A group whose rewards are all equal
    gets exactly 0 (no signal, and no 0/0).
    """
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    flat = rewards.amax(dim=1) == rewards.amin(dim=1)                  # (P,) zero-variance groups
    return adv.masked_fill(flat[:, None], 0.0)


def kl_unbiased(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate of DSM eq. 4 (Schulman's "k3"), same shape as inputs.

    Value: with x = pi_ref / pi_theta = exp(ref_logp - logp), k3 = x - log x - 1. Its expectation over
    tokens y ~ pi_theta is the true KL(pi_theta || pi_ref) (unbiased), and x - log x - 1 >= 0 for every
    x > 0 (equality iff x = 1).

    Gradient (what the loss actually uses): d k3 / d logp = 1 - x, so
        grad_theta k3(y) = (1 - pi_ref(y) / pi_theta(y)) grad_theta log pi_theta(y).
    The tokens are sampled, not differentiated through, so its expectation under pi_theta is
        sum_y pi_theta grad log pi_theta - sum_y pi_ref grad log pi_theta = 0 - E_{y~pi_ref}[grad log pi_theta(y)]
        = grad_theta KL(pi_ref || pi_theta),
    the gradient of the *reverse* KL, not of the KL(pi_theta || pi_ref) whose value k3 estimates. Both
    vanish at pi_theta = pi_ref and agree to first order near it, so as a penalty that keeps the policy
    close it works; it is just not the gradient of the divergence it reports. (With mu > 1 the tokens
    come from pi_old, and the statement holds only while pi_theta is still pi_old.)
    """
    d = ref_logp - logp                                                # log(pi_ref / pi_theta)
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: "torch.Tensor | None", adv: torch.Tensor,
              mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
              loss_type: str = "grpo", max_new_tokens: "int | None" = None) -> tuple[torch.Tensor, dict]:
    """The negative clipped GRPO objective (DSM eq. 3) over completion tokens, and diagnostics.

    Args:
        logp: (N, T) log pi_theta of each completion token (with gradient).
        old_logp: (N, T) log pi_old, the policy that sampled the tokens (no gradient).
        ref_logp: (N, T) log pi_ref of the frozen reference model, or None (then beta must be 0).
        adv: (N,) one advantage per sequence, shared by all its tokens.
        mask: (N, T) 1/True for completion tokens that count; prompt padding and slots after the
            end are 0, and so are whole sequences dropped by --mask_truncated.
        eps_low, eps_high: rho is clipped to [1 - eps_low, 1 + eps_high].
        beta: KL coefficient.
        loss_type: how the per-token terms l_it are reduced to one number:
            grpo:    (1/N) sum_i (1/|o_i|) sum_t l_it over ALL N rows (DSM eq. 3: 1/G per group, and the
                     batch mean over groups): a fully masked row (a truncated completion) adds 0 but still
                     counts in N, as in TRL, so its siblings do not weigh more as truncation rises
            dr_grpo: sum_it l_it / (N * max_new_tokens), a constant [DR]
            dapo:    sum_it l_it / sum_i |o_i|, the token mean over the batch [DAPO]
        max_new_tokens: the constant of dr_grpo (the generation limit).
    Returns:
        loss (scalar) and stats: clip_frac (share of tokens where the clipped term was chosen, i.e.
        rho > 1 + eps_high with A > 0 or rho < 1 - eps_low with A < 0), kl (mean per-token KL, 0
        without a reference), ratio (mean rho).
    """
    m = mask.bool()
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    # Zero the unused slots first, so nothing there can become inf (and inf * 0 = nan in the gradient).
    logp = torch.where(m, logp, 0.0)
    old_logp = torch.where(m, old_logp, 0.0)
    ratio = torch.exp(logp - old_logp)                                 # (N, T) rho
    A = adv.to(logp.dtype)[:, None]                                    # (N, 1), broadcast over tokens
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped_ratio * A)           # (N, T), minus: we minimise
    kl = None
    if ref_logp is not None:
        kl = kl_unbiased(logp, torch.where(m, ref_logp, 0.0))         # (N, T), 0 on unused slots
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, 0.0)
    n_tokens = m.sum(dim=1)                                            # (N,) |o_i| that count
    if loss_type == "grpo":
        seq_mean = per_token.sum(dim=1) / n_tokens.clamp(min=1)        # (N,) per-sequence token mean, 0 if masked
        loss = seq_mean.sum() / logp.shape[0]                          # 1/G per group, mean over the P groups
    elif loss_type == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("loss_type='dr_grpo' needs max_new_tokens")
        loss = per_token.sum() / (logp.shape[0] * max_new_tokens)
    elif loss_type == "dapo":
        loss = per_token.sum() / n_tokens.sum().clamp(min=1)
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo or dapo, got {loss_type!r}")
    with torch.no_grad():
        total = m.sum().clamp(min=1)
        was_clipped = ((ratio > 1 + eps_high) & (A > 0)) | ((ratio < 1 - eps_low) & (A < 0))
        stats = {"clip_frac": ((was_clipped & m).sum() / total).item(),
                 "kl": (kl[m].sum() / total).item() if kl is not None else 0.0,
                 "ratio": (ratio[m].sum() / total).item()}
    return loss, stats


def token_logprobs(model: torch.nn.Module, idx: torch.Tensor, start: torch.Tensor, n_new: int,
                   temperature: float = 1.0, with_entropy: bool = False, token_mask: "torch.Tensor | None" = None
                   ) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """log pi(token) for every completion slot of a right-padded batch, from one forward pass.

    Args:
        model: the Transformer (or its DDP wrapper); `model(idx)` returns (logits, None).
        idx: (N, L) prompt + completion + padding per row, with L >= max(start) + n_new.
        start: (N,) index of each row's first completion token (= its prompt length).
        n_new: T, the completion slots to score.
        temperature: logits are divided by it, as when the completions were sampled.
        with_entropy: also return the entropy (nats) of the predicted distribution in each slot.
        token_mask: (N, L) bool, the real (not padding) tokens; the MoE layers count only those.
    Returns:
        logp (N, T): logp[i, j] = log pi(idx[i, s_i + j] | idx[i, :s_i + j]) with s_i = start[i], read
        from the logits at position s_i + j - 1 (position t predicts token t + 1). Slots past a row's
        completion hold numbers for padding: mask them. entropy (N, T) or None.
    Causal attention means right-padding never changes the positions before it.
    """
    logits, _ = model(idx, token_mask=token_mask)                      # (N, L, V) float32
    N, L, V = logits.shape
    pos = start.to(idx.device)[:, None] - 1 + torch.arange(n_new, device=idx.device)[None]  # (N, T)
    if int(start.max()) + n_new > L:
        raise ValueError(f"idx has {L} columns but max(start) + n_new = {int(start.max()) + n_new}")
    targets = idx.gather(1, pos + 1)                                   # (N, T) the tokens being scored
    picked = logits.gather(1, pos[..., None].expand(N, n_new, V)) / temperature  # (N, T, V)
    logp_all = F.log_softmax(picked, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)         # (N, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)             # (N, T)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------
# 3. Rollout: G completions per question from the current (= old) policy, scored by rules
# ----------------------------------------------------------------------------------------------------

RewardFn = Callable[[str, tasks.Problem], dict]


@dataclass
class Group:
    """One question and the G completions sampled for it, with their rule-based rewards."""

    problem: tasks.Problem
    prompt: list[int]                      # [BOS] + prompt tokens
    completions: list[list[int]]           # G token lists, EOS included when finished
    finished: list[bool]                   # False = cut off at max_new_tokens (truncated)
    texts: list[str]                       # decoded completions, what the verifier saw
    rewards: list[float]                   # total reward per completion
    accuracy: list[float]
    format: list[float]

    @property
    def zero_variance(self) -> bool:
        """All G completions equally right (all correct or all wrong): no accuracy signal. DAPO's filter
        (§3.2) keeps a group only if 0 < #correct < G. Decided on accuracy, not on the total reward:
        with the format bonus the totals of an all-wrong group still differ, and its advantages would
        then only teach the format."""
        return max(self.accuracy) == min(self.accuracy)


def sample_groups(model, tok, problems: list, group_size: int, max_new_tokens: int, temperature: float,
                  reward_fn: RewardFn, generator: "torch.Generator | None" = None) -> list[Group]:
    """Sample `group_size` completions for each problem in one batch (KV cache) and score them."""
    model.eval()                                     # no router load accounting while sampling
    prompts = [prompt_tokens(tok, p.question) for p in problems]
    batch = [p for p in prompts for _ in range(group_size)]            # P*G prompts, group-major
    completions, finished = generate_batch(model, batch, max_new_tokens, temperature=temperature,
                                           eos_id=tok.eos_id, generator=generator)
    groups = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        rows = range(i * group_size, (i + 1) * group_size)
        comps, fins = [completions[r] for r in rows], [finished[r] for r in rows]
        texts = [completion_text(tok, c)[0] for c in comps]
        scores = [reward_fn(t, problem) for t in texts]
        groups.append(Group(problem, prompt, comps, fins, texts, [float(s["total"]) for s in scores],
                            [float(s["accuracy"]) for s in scores], [float(s["format"]) for s in scores]))
    return groups


def collect_rollouts(model, tok, draw_problems: Callable[[int], list], n_prompts: int, cfg: GRPOConfig,
                     reward_fn: RewardFn, generator: "torch.Generator | None" = None) -> tuple[list[Group], dict]:
    """`n_prompts` scored groups for one step, with optional dynamic sampling [DAPO].

    Returns (groups, info); info["zero_var_frac"] is the share of groups whose G answers are all right
    or all wrong (Group.zero_variance: accuracy, not total reward), measured on the first draw, before
    any replacement, because that is the diagnostic (how often the current model gives no signal).
    With dynamic sampling, those groups are replaced by groups of fresh questions for at most
    `dynamic_max_tries` extra rounds; if still short, some zero-variance groups stay in the batch.
    """
    def draw(n):
        """n fresh questions, G scored completions each."""
        return sample_groups(model, tok, draw_problems(n), cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                             reward_fn, generator)

    groups = draw(n_prompts)
    info = {"zero_var_frac": sum(g.zero_variance for g in groups) / len(groups), "resampled": 0}
    if cfg.dynamic_sampling:
        good = [g for g in groups if not g.zero_variance]
        spare = [g for g in groups if g.zero_variance]
        for _ in range(cfg.dynamic_max_tries):
            if len(good) >= n_prompts:
                break
            fresh = draw(n_prompts - len(good))
            info["resampled"] += len(fresh)
            good += [g for g in fresh if not g.zero_variance]
        groups = good[:n_prompts] + spare[:max(0, n_prompts - len(good))]
    return groups, info


# ----------------------------------------------------------------------------------------------------
# 4. Update: the clipped objective, mu passes of AdamW, the router bias
# ----------------------------------------------------------------------------------------------------

def collate(groups: list[Group], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad every prompt + completion of the groups into one batch.

    Returns idx (N, Lp + T) int64, start (N,) prompt lengths, mask (N, T) bool marking real completion
    tokens (EOS included), where N = P*G rows in group-major order, Lp the longest prompt and T the
    longest completion.
    """
    prompts = [g.prompt for g in groups for _ in g.completions]
    comps = [c for g in groups for c in g.completions]
    N, Lp, T = len(comps), max(len(p) for p in prompts), max(len(c) for c in comps)
    idx = torch.full((N, Lp + T), pad_id, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        idx[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, :len(c)] = True
    start = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return idx.to(device), start.to(device), mask.to(device)


def unwrap(policy: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP and/or torch.compile wrapper (sampling and bias updates use it directly)."""
    model = policy.module if isinstance(policy, DDP) else policy
    return getattr(model, "_orig_mod", model)


def _world_size() -> int:
    """Number of processes in the torchrun job (1 for a plain script)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rl_lr_at(step: int, cfg: GRPOConfig) -> float:
    """RL's schedule (train.lr_at is pretraining's): linear warmup over warmup_iters, then constant, or cosine
    decay from the end of warmup to min_lr_ratio * lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if not cfg.lr_decay:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_rl_optimizer(model: torch.nn.Module, cfg: GRPOConfig) -> torch.optim.Optimizer:
    """RL's optimizer (train.make_optimizer is pretraining's): AdamW over every trainable weight (betas as in
    V3 §4.2); parameters without a gradient (the MTP
    modules, which RL does not use) are simply skipped by the optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].device.type in ("cuda", "cpu")               # one kernel for all (see train.make_optimizer)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=fused)


def policy_update(policy, ref_model, optimizer, groups: list[Group], cfg: GRPOConfig, pad_id: int,
                  lr: "float | None" = None, ctx=None) -> dict:
    """Advantages, then `cfg.mu` optimisation passes of the GRPO loss on one sampled batch.

    `policy` is the Transformer or its DDP wrapper; `ref_model` the frozen reference or None (beta=0).
    `ctx` (the run's autocast context, or None) wraps the forward passes only: the backward pass and the
    optimizer step run outside it, as in train.py, so gradients that are computed in float32 on purpose
    (FP8LinearFunction's weight gradient, the router's float32 matmul) are not recast to bf16.
    Returns a dict of floats: loss, kl, clip_frac, ratio (means over the mu passes; with mu=1 nothing
    is clipped and ratio is 1), entropy and grad_norm (first pass), trained_seqs, tokens.
    """
    model = unwrap(policy)
    device = model.embed.weight.device
    rewards = torch.tensor([g.rewards for g in groups])                # (P, G)
    adv = group_advantages(rewards, cfg.scale_rewards).flatten().to(device)  # (N,) group-major like collate
    idx, start, mask = collate(groups, pad_id, device)
    real = torch.arange(idx.shape[1], device=device) < (start + mask.sum(1))[:, None]  # (N, L) not padding
    if cfg.mask_truncated:                                             # DAPO overlong filtering
        finished = torch.tensor([f for g in groups for f in g.finished], device=device)
        mask = mask & finished[:, None]
    T = mask.shape[1]
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        model.eval()
        ref_logp = (token_logprobs(ref_model, idx, start, T, cfg.temperature)[0]
                    if ref_model is not None and cfg.beta > 0 else None)
        # pi_old: the weights that sampled the batch. With mu=1 the first pass *is* pi_old (just detach).
        old_logp = token_logprobs(model, idx, start, T, cfg.temperature)[0] if cfg.mu > 1 else None
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    model.train()
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}   # averaged over the mu passes
    for it in range(cfg.mu):
        with ctx:                                                      # forward only under autocast
            logp, entropy = token_logprobs(policy, idx, start, T, cfg.temperature, with_entropy=(it == 0),
                                           token_mask=real)
            old = logp.detach() if old_logp is None else old_logp
            loss, st = grpo_loss(logp, old, ref_logp, adv, mask, cfg.eps, cfg.eps_high, cfg.beta, cfg.loss_type,
                                 cfg.max_new_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.zeros(()))
        optimizer.step()
        sync_router_bias(model, cfg.update_router_bias)
        for key, value in (("loss", loss.item()), *st.items()):
            stats[key] += value / cfg.mu
        if it == 0:                     # entropy and gradient norm of the sampling policy itself
            stats["entropy"] = entropy[mask].mean().item() if bool(mask.any()) else 0.0
            stats["grad_norm"] = float(grad_norm)
            stats["trained_seqs"] = int(mask.any(dim=1).sum())          # rows left after masking
    stats["tokens"] = cfg.mu * (int(start.sum()) + sum(len(c) for g in groups for c in g.completions))
    return stats


def sync_router_bias(model, enabled: bool = True) -> None:
    """Aux-loss-free bias step (V3 §2.1.2) from the load of this update, averaged over ranks first, at the
    preset's constant speed args.bias_update_speed (the policy in the module docstring: never the schedule's
    end value of pretraining)."""
    if not enabled:
        for m in model.moe_layers():
            m.reset_load()
        return
    load = model.expert_load()                                         # (n_moe_layers, E)
    if _world_size() > 1:
        dist.all_reduce(load)
        load = load / _world_size()
    model.bias_update_speed = model.args.bias_update_speed        # the RL policy: the preset's constant
    model.update_bias(load)


def grpo_step(policy, ref_model, optimizer, tok, draw_problems: Callable[[int], list], reward_fn: RewardFn,
              cfg: GRPOConfig, n_prompts: "int | None" = None, generator: "torch.Generator | None" = None,
              lr: "float | None" = None, ctx=None) -> dict:
    """One GRPO step: sample G completions for each of n_prompts questions, score, update.

    `ctx`, the run's autocast context, wraps sampling and the update's forward passes, never a backward.

    `draw_problems(n)` returns n problems (anything with a `.question`), `reward_fn(text, problem)`
    returns {"accuracy", "format", "total"}; main() passes the task's train split and tasks.reward, a
    test can pass a toy task. Returns the step's statistics (floats) including the time split.
    """
    model = unwrap(policy)
    n_prompts = n_prompts or cfg.prompts_per_step
    t0 = time.perf_counter()
    with ctx if ctx is not None else contextlib.nullcontext():
        groups, info = collect_rollouts(model, tok, draw_problems, n_prompts, cfg, reward_fn, generator)
    t1 = time.perf_counter()
    upd = policy_update(policy, ref_model, optimizer, groups, cfg, tok.eos_id, lr, ctx)
    t2 = time.perf_counter()

    def flat(key):
        """One list of the field `key` over all P*G completions."""
        return [x for g in groups for x in getattr(g, key)]

    lengths = [len(c) for c in flat("completions")]
    n = len(lengths)
    right = [ln for ln, a in zip(lengths, flat("accuracy")) if a > 0]
    wrong = [ln for ln, a in zip(lengths, flat("accuracy")) if a == 0]
    return {
        "reward": sum(flat("rewards")) / n, "accuracy": sum(flat("accuracy")) / n,
        "format": sum(flat("format")) / n, "zero_var_frac": info["zero_var_frac"],
        "resampled": info["resampled"], "trunc_frac": 1 - sum(flat("finished")) / n,
        "length": sum(lengths) / n,
        # mean tokens of the completions the accuracy reward calls right / wrong (None if there are none): the
        # length bias of per-sequence normalisation [DR] shows as growing wrong ones (this rank's share only)
        "length_right": sum(right) / len(right) if right else None,
        "length_wrong": sum(wrong) / len(wrong) if wrong else None, **upd,
        "sample_s": t1 - t0, "update_s": t2 - t1,
        "sample_tok_s": sum(lengths) / max(t1 - t0, 1e-9), "train_tok_s": upd["tokens"] / max(t2 - t1, 1e-9),
        "example": groups[0].texts[0],
    }


# ----------------------------------------------------------------------------------------------------
# 5. Logging: one line per step, plots
# ----------------------------------------------------------------------------------------------------

def format_step(s: dict) -> str:
    """The fixed log line of one step's statistics (the loop puts the step, progress and ETA in front)."""
    line = (f"reward {s['reward']:.3f} acc {s['accuracy']:.3f} fmt {s['format']:.3f} | "
            f"zero-var {s['zero_var_frac']:.2f} trunc {s['trunc_frac']:.2f} len {s['length']:5.1f} | "
            f"kl {s['kl']:.4f} clip {s['clip_frac']:.3f} ent {s['entropy']:.3f} | "
            f"sample {s['sample_s']:.2f}s {s['sample_tok_s']:6.0f} tok/s, update {s['update_s']:.2f}s "
            f"{s['train_tok_s']:6.0f} tok/s")
    if "heldout_acc" in s:
        line += f" | held-out acc {100 * s['heldout_acc']:.1f}%"
    return line


def plot_metrics(history: list[dict], out_dir, n_eval: int = 0, temperature: float = 1.0) -> list[Path]:
    """Write grpo_rewards.png, grpo_heldout.png and grpo_length.png from the metrics records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    train = [h for h in history if "reward" in h]
    evals = [h for h in history if "heldout_acc" in h]
    paths = []

    def save(fig, name):
        """Write one figure to out_dir and close it."""
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in train]
    for key, label in (("reward", "total reward"), ("accuracy", "accuracy reward"), ("format", "format reward")):
        ax.plot(steps, [h[key] for h in train], label=label)
    ax.set(title=f"GRPO rollout rewards (sampled at temperature {temperature:g})", xlabel="step",
           ylabel="mean reward per completion")
    ax.legend()
    save(fig, "grpo_rewards.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in evals], [100 * h["heldout_acc"] for h in evals], marker="o", label="accuracy")
    ax.plot([h["step"] for h in evals], [100 * h["heldout_fmt"] for h in evals], marker=".", ls="--",
            label="well-formed")
    ax.set(title=f"Greedy held-out accuracy ({n_eval} problems never seen in training)", xlabel="step",
           ylabel="% of held-out problems", ylim=(0, 100))
    ax.legend()
    save(fig, "grpo_heldout.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["length"] for h in train], label="sampled (mean)")
    ax.plot([h["step"] for h in evals], [h["heldout_len"] for h in evals], marker="o", label="greedy held-out")
    ax.set(title="Completion length", xlabel="step", ylabel="tokens per completion (EOS included)")
    ax.legend()
    save(fig, "grpo_length.png")
    return paths


# ----------------------------------------------------------------------------------------------------
# 6. The run: set up (or resume), evaluate, train, evaluate, save
# ----------------------------------------------------------------------------------------------------

def check_fits(model, tok, cfg: GRPOConfig, questions: list[str]) -> None:
    """CheckpointError if the tokenizer or the longest prompt + max_new_tokens does not fit the model."""
    args = model.args
    if tok.n_vocab > args.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.n_vocab} ids but the model only {args.vocab_size}; "
                              "the checkpoint is inconsistent, recreate it with `python train.py`")
    longest = max(len(prompt_tokens(tok, q)) for q in questions)
    if longest + cfg.max_new_tokens > args.max_seq_len:
        raise CheckpointError(f"prompts of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceed the "
                              f"model's max_seq_len={args.max_seq_len}; lower --max_new_tokens or pick an "
                              "easier task")


def run_eval(model, tok, problems, cfg: GRPOConfig, path: Path, step: "int | None") -> dict:
    """Evaluate, write the JSON lines to `path`, return the summary (with seconds)."""
    t0 = time.perf_counter()
    records, summary = evaluate(model, tok, problems, cfg.max_new_tokens, cfg.eval_batch_size, step)
    write_jsonl(path, records)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _mean_over_ranks(stats: dict, keys: tuple, device) -> dict:
    """Average the numeric `keys` of `stats` over all ranks (in place for the log of rank 0).

    The vector lives on the run's `device`, the one the process group serves (nccl refuses CPU tensors), in
    float32 (MPS has no float64; these are logged statistics)."""
    if _world_size() == 1:
        return stats
    vec = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float32, device=device)
    dist.all_reduce(vec)
    for k, v in zip(keys, (vec / _world_size()).tolist()):
        stats[k] = v
    return stats


@dataclass
class RLRun:
    """Everything the GRPO loop touches, built by setup() and written to the checkpoint by save()."""
    cfg: GRPOConfig
    ddp: Dist                          # this process's place in a torchrun job (rank 0 of 1 when run alone)
    device: str
    out_dir: Path
    model: torch.nn.Module             # the policy itself (sampling, evaluation, checkpoints)
    policy: torch.nn.Module            # what the update calls: model, or model wrapped by torch.compile / DDP
    ref_model: "torch.nn.Module | None"  # frozen copy of the starting checkpoint (None when beta = 0)
    tok: object                        # tokenizer.Tokenizer
    init_ckpt: dict                    # the starting checkpoint (its tokenizer and pretraining config)
    task: tasks.Task
    eval_problems: list
    optimizer: torch.optim.Optimizer
    generator: torch.Generator         # sampling randomness
    rng: random.Random                 # which training questions are drawn
    ctx: object                        # autocast context (bf16) or a disabled one
    log: "MetricsLog | None"           # rank 0 only
    step: int = 0
    elapsed: float = 0.0               # training seconds, summed over resumed runs
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)          # the latest held-out evaluation
    totals: dict = field(default_factory=lambda: {"sample_s": 0.0, "update_s": 0.0})
    init_sha256: str = ""              # checksum of the starting weights: --resume checks the reference is the same


def setup(cfg: GRPOConfig, ddp: Dist, device: str) -> RLRun:
    """Load the starting checkpoint, check it fits the task, build reference, optimizer and RNGs, resume if
    asked. Raises CheckpointError for a missing or incompatible checkpoint."""
    if cfg.prompts_per_step % ddp.world_size:
        raise SystemExit(f"--prompts_per_step={cfg.prompts_per_step} must be divisible by the "
                         f"{ddp.world_size} ranks")
    torch.manual_seed(cfg.seed + ddp.rank)
    out_dir = Path(cfg.out_dir)
    ckpt = read_checkpoint(cfg.init_from, hint="python train.py")
    model, tok = model_from_checkpoint(ckpt, device)
    if model.args.fp8 and model.args.attn_impl != model.args.full_attn_impl():
        # with FP8 the two MLA paths round differently (module docstring, "FP8"): decode on the learner's path
        model, tok = model_from_checkpoint(ckpt, device, attn_impl=model.args.full_attn_impl())
    model.eval()
    task = make_task(cfg)
    eval_problems = tasks.heldout_problems(task, cfg.n_eval, cfg.eval_seed) if cfg.n_eval else []
    check_fits(model, tok, cfg, [p.question for p in eval_problems] +
               [task.sample(random.Random(i), "train").question for i in range(200)])
    if ddp.master:
        print_config(cfg, "grpo config")
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"loaded {cfg.init_from} (kind={ckpt.get('kind', '?')}) on {device}; task {task}")
    # the reference is the starting checkpoint forever, also after --resume (a frozen copy, only when beta > 0)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    policy = torch.compile(model) if cfg.compile else model
    if ddp.enabled:   # experts a rank did not route to and the MTP modules get no gradient: find them
        policy = DDP(policy, device_ids=[device] if device.startswith("cuda") else None,
                     find_unused_parameters=True, broadcast_buffers=False)
    run = RLRun(cfg, ddp, device, out_dir, model, policy, ref_model, tok, ckpt, task, eval_problems,
                make_rl_optimizer(model, cfg), torch.Generator(device=device).manual_seed(cfg.seed + 1000 * ddp.rank),
                random.Random(cfg.seed * 1000 + ddp.rank),           # questions: different on each rank
                autocast_context(cfg.dtype, device), None,
                init_sha256=ckpt.get("model_sha256") or weights_sha256(ckpt["model"]))
    if cfg.resume:
        resume_state(run)
    if ddp.master and not cfg.eval_only:
        run.log = MetricsLog(out_dir, cfg.log_to, dataclasses.asdict(cfg), "grpo", append=cfg.resume)
    return run


def save(run: RLRun) -> None:
    """Write out_dir/ckpt.pt atomically: loadable by sample.py, and holding everything --resume needs
    (optimizer, step, history, and the RNG states of sampling and question drawing of EVERY rank).

    Called by every rank at the same point: each rank's RNG states are gathered (all_ranks) and rank 0
    writes them all, so that on --resume each rank continues its own streams; with rank 0's alone, every
    rank would sample the same questions and completions and the batch would silently shrink."""
    states = all_ranks({"torch": torch.get_rng_state(), "sample": run.generator.get_state(),
                        "questions": run.rng.getstate()}, run.ddp)
    if not run.ddp.master:
        return
    # the decoding path as the checkpoint had it (setup may switch it for FP8; that is a property of the run)
    model_args = {**run.model.args.to_dict(), "attn_impl": run.init_ckpt["model_args"].get("attn_impl", "absorb")}
    save_checkpoint(run.out_dir / "ckpt.pt", {
        "model": run.model.state_dict(), "model_args": model_args,
        "tokenizer": run.init_ckpt["tokenizer"], "config": run.init_ckpt.get("config", {}), "kind": "grpo",
        "grpo_config": dataclasses.asdict(run.cfg), "step": run.step, "init_from": str(run.cfg.init_from),
        "init_sha256": run.init_sha256, "heldout": run.summary, "optimizer": run.optimizer.state_dict(),
        "elapsed": run.elapsed, "rng": states[0], "rng_ranks": states, "history": run.history,
        "totals": run.totals})


def resume_state(run: RLRun) -> None:
    """Continue from out_dir/ckpt.pt exactly: weights (router biases included), optimizer, this rank's RNGs,
    step. Refused when --init_from names other weights than the run started from: the KL reference is the
    starting checkpoint, and swapping it in the middle of a run would silently change the objective."""
    path = run.out_dir / "ckpt.pt"
    ckpt = read_checkpoint(path, hint="python grpo.py")
    if ckpt.get("kind") != "grpo" or "optimizer" not in ckpt:
        raise CheckpointError(f"{path} is not a GRPO checkpoint with training state (kind={ckpt.get('kind')!r}); "
                              "--resume continues a run of grpo.py in the same --out_dir")
    started = ckpt.get("init_from", "?")
    same = (ckpt["init_sha256"] == run.init_sha256 if "init_sha256" in ckpt     # older runs: compare the path
            else started == str(run.cfg.init_from))
    if not same:
        raise CheckpointError(f"cannot resume: {path} started from --init_from={started}, whose weights (the KL "
                              f"reference) differ from --init_from={run.cfg.init_from}; resume with "
                              f"--init_from={started}")
    check_state_dict(run.model, ckpt["model"])
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    rng = rank_rng_states(ckpt, run.ddp.rank, run.ddp.world_size, path)
    torch.set_rng_state(rng["torch"])
    run.generator.set_state(rng["sample"])
    version, state, gauss = rng["questions"]
    run.rng.setstate((version, tuple(state), gauss))
    run.step, run.elapsed, run.history, run.summary = ckpt["step"], ckpt["elapsed"], ckpt["history"], ckpt["heldout"]
    run.totals = ckpt["totals"]
    if run.ddp.master:
        print(f"resumed from {path} at step {run.step}")


def heldout(run: RLRun, record: dict) -> dict:
    """Evaluate on the held-out problems, write eval_step{step}.jsonl, add the results to record."""
    with run.ctx:
        s = run_eval(run.model, run.tok, run.eval_problems, run.cfg, run.out_dir / f"eval_step{record['step']}.jsonl",
                     record["step"])
    record.update(heldout_acc=s["accuracy"], heldout_fmt=s["format"], heldout_len=s["length"], eval_s=s["seconds"])
    run.summary = s
    return s


def log(run: RLRun, record: dict) -> None:
    """Keep one step's record and append it to metrics.jsonl (and the tracker)."""
    run.history.append(record)
    run.log.log(record)


def should_stop(run: RLRun, stop: GracefulStop, t_start: float, elapsed_before: float) -> bool:
    """A signal arrived or the seconds budget is spent; under torchrun rank 0 decides for every rank."""
    run.elapsed = elapsed_before + time.perf_counter() - t_start
    halt = stop.requested or (run.cfg.max_seconds > 0 and run.elapsed >= run.cfg.max_seconds)
    return bool(from_rank0([float(halt)], run.ddp, run.device)[0])


STEP_KEYS = ("reward", "accuracy", "format", "zero_var_frac", "trunc_frac", "length", "kl", "clip_frac",
             "entropy", "loss")


def train_loop(run: RLRun, stop: GracefulStop) -> None:
    """GRPO steps until max_iters (or max_seconds, or a signal): sample, score, update; evaluate and checkpoint
    every eval_interval steps."""
    cfg, master = run.cfg, run.ddp.master
    draw_problems = functools.partial(draw_train_problems, run.task, run.rng)
    reward_fn = functools.partial(tasks.reward, w_acc=cfg.w_acc, w_fmt=cfg.w_fmt)  # R1-Zero's rule-based reward
    if cfg.lab_verifier != "strict":    # the lab's exploitable verifiers (tasks.lenient_reward); held-out stays strict
        reward_fn = functools.partial(tasks.lenient_reward, w_acc=cfg.w_acc, w_fmt=cfg.w_fmt, verifier=cfg.lab_verifier)
    t_start, elapsed_before = time.perf_counter(), run.elapsed
    while run.step < cfg.max_iters and not should_stop(run, stop, t_start, elapsed_before):
        lr = rl_lr_at(run.step, cfg)
        stats = grpo_step(run.policy, run.ref_model, run.optimizer, run.tok, draw_problems, reward_fn, cfg,
                          cfg.prompts_per_step // run.ddp.world_size, run.generator, lr, ctx=run.ctx)
        stats = _mean_over_ranks(stats, STEP_KEYS, run.device)
        run.step += 1
        run.totals["sample_s"] += stats["sample_s"]
        run.totals["update_s"] += stats["update_s"]
        run.elapsed = elapsed_before + time.perf_counter() - t_start
        evaluating = bool(cfg.eval_interval and run.step % cfg.eval_interval == 0)
        if master:
            rec = {"step": run.step, "lr": lr, **stats}
            if run.eval_problems and (evaluating or run.step == cfg.max_iters):
                heldout(run, rec)
            log(run, rec)
            print(f"{progress(run.step, cfg.max_iters, run.elapsed)} | {format_step(rec)}", flush=True)
        if evaluating:
            save(run)                  # every rank: its RNG states are gathered, rank 0 writes the file


def draw_train_problems(task: tasks.Task, rng: random.Random, n: int) -> list:
    """n questions from the task's train split (never a held-out one)."""
    return [task.sample(rng, split="train") for _ in range(n)]


def finish(run: RLRun, stop: GracefulStop) -> dict:
    """Final held-out evaluation (if the last step had none and the run was not interrupted), checkpoint, plots,
    and a summary. Every rank calls it (the checkpoint gathers every rank's RNG states); ranks > 0 return {}."""
    cfg = run.cfg
    if not run.ddp.master:
        save(run)
        return {}
    if run.eval_problems and run.history and "heldout_acc" not in run.history[-1] and not stop.requested:
        rec = {"step": run.step}
        heldout(run, rec)
        log(run, rec)
        print(f"step {run.step:4d} | held-out acc {100 * run.summary['accuracy']:.1f}%")
    save(run)
    run.log.close()
    plot_metrics(run.history, run.out_dir, len(run.eval_problems), cfg.temperature)
    first = next((h for h in run.history if "heldout_acc" in h), None)
    n = max(run.step, 1)
    eval_s = sum(h.get("eval_s", 0.0) for h in run.history)
    print(f"done: {run.step} steps, {format_seconds(run.elapsed)} of training: sampling "
          f"{run.totals['sample_s']:.0f}s, updates {run.totals['update_s']:.0f}s, evaluation {eval_s:.0f}s; per step "
          f"{run.totals['sample_s'] / n:.2f}s sampling + {run.totals['update_s'] / n:.2f}s update "
          f"(G={cfg.group_size}, mu={cfg.mu})")
    if first and run.summary:
        print(f"held-out accuracy {100 * first['heldout_acc']:.1f}% -> {100 * run.summary['accuracy']:.1f}% "
              f"({run.summary['n']} problems, greedy)")
    print(LOSS_NOTE)
    print(f"wrote {run.out_dir}/ckpt.pt, metrics.jsonl, eval_step*.jsonl, grpo_rewards.png, grpo_heldout.png, "
          "grpo_length.png")
    if stop.requested:
        print(f"interrupted at step {run.step}/{cfg.max_iters}: resume with the same command plus --resume, e.g. "
              f"`python grpo.py --out_dir={cfg.out_dir} --resume` (and your other flags)")
    else:
        print(f"next: python sample.py --out_dir={run.out_dir}\n"
              f"      python grpo.py --eval_only --init_from={run.out_dir}/ckpt.pt --out_dir={run.out_dir}")
    return {**run.summary, "step": run.step, "interrupted": stop.requested}


def eval_only(run: RLRun) -> dict:
    """--eval_only: greedy held-out accuracy of init_from, one JSON line per problem in out_dir/eval.jsonl."""
    if not run.ddp.master:
        return {}
    path = run.out_dir / "eval.jsonl"
    with run.ctx:
        summary = run_eval(run.model, run.tok, run.eval_problems, run.cfg, path, run.init_ckpt.get("step"))
    print(f"held-out accuracy {100 * summary['accuracy']:.1f}% (format {100 * summary['format']:.1f}%) "
          f"on {summary['n']} problems in {summary['seconds']:.1f}s; one line per problem in {path}")
    return summary


def run_grpo(cfg: GRPOConfig, ddp: Dist, device: str) -> dict:
    """Set up, evaluate the start, train, finish; or only evaluate with --eval_only."""
    run = setup(cfg, ddp, device)
    if cfg.eval_only:
        return eval_only(run)
    if run.ddp.master and run.eval_problems and not cfg.resume:
        rec = {"step": 0}
        s = heldout(run, rec)
        log(run, rec)
        print(f"step    0 | held-out acc {100 * s['accuracy']:.1f}% format {100 * s['format']:.1f}% "
              f"len {s['length']:.1f} ({s['n']} problems, greedy, {s['seconds']:.1f}s)")
    if run.ddp.master:
        print(LOSS_NOTE)
    with GracefulStop() as stop:          # Ctrl-C / SIGTERM: finish the step, checkpoint, exit
        train_loop(run, stop)
    return finish(run, stop)


def main(argv=None) -> dict:
    """`python grpo.py [--flag=value ...]`; see GRPOConfig or `--help` for the flags. Returns the last
    held-out summary (accuracy, format, length, n) with the step count."""
    cfg = parse_config(GRPOConfig, argv, description="GRPO reinforcement learning with rule-based rewards "
                                                      "(DeepSeek-R1-Zero recipe) on a pretrained checkpoint")
    ddp, device = setup_distributed(pick_device(cfg.device))
    finished = False
    try:
        summary = run_grpo(cfg, ddp, device)
        finished = True
        return summary
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        cleanup_distributed(ddp, wait=finished)


if __name__ == "__main__":
    main()
