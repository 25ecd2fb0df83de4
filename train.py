"""
tinyseek/train.py -- pretrain the DeepSeek-V3-style model from model.py.

    python train.py                                   # tiny preset, built-in arithmetic corpus, ~2 minutes on 2 CPU cores
    python train.py --data=shakespeare.txt --tokenizer=char
    python train.py --preset=small --device=cuda --compile
    torchrun --standalone --nproc_per_node=2 train.py # several processes (gloo on CPU, nccl on GPUs)
    python train.py --sft=pairs.jsonl --init_from=out/ckpt.pt --out_dir=out_sft --lr=3e-4 --max_iters=200
                                                      # supervised fine-tuning (loss on completions only)

What happens, top to bottom:
  1. Config: one dataclass; every field is a `--key=value` flag; the effective config is printed and saved.
  2. Data: the built-in corpus (worked arithmetic in the R1-Zero format, see tasks.py) or any UTF-8 text
     file; a byte-level BPE trained on it (cached); one long token stream split 90/10 into train/val.
  3. Model and optimizer: Muon for the hidden weight matrices and AdamW (beta 0.9/0.95) for the rest, weight
     decay 0.1 on matrices only, warmup + cosine; `--optimizer=adamw` is V3's AdamW for everything (with
     BF16 moments on request, AdamWBF16). V3's MTP-weight and bias-speed schedules, and the parameter and
     FLOP counts behind MFU.
  4. Evaluation (loss estimates, held-out accuracy) and plots.
  5. Setting up a run (`setup`): fresh, from --init_from, or continued with --resume.
  6. The loop (`train_loop`, one screen): each `train_step` is forward (CE + MTP + balance loss), backward,
     clip, optimizer step, then the auxiliary-loss-free router-bias update from the step's expert loads
     (V3 §2.1.2). Log lines show progress and ETA, loss parts, lr, tokens/s, MFU and the expert-load
     imbalance MaxVio. `finish` writes the checkpoint (atomically), metrics.jsonl and the plots; Ctrl-C or
     SIGTERM end the current step, checkpoint, and say how to --resume.

The learning-rate schedule is fitted to whichever budget ends first, --max_iters or --max_seconds, so
"train for three minutes" (--max_seconds=180) gives a complete warmup-and-decay run. The default is a step
budget (500 steps), so a slower machine takes longer but trains the same model.

Supervised fine-tuning (SFT) is the same loop with other batches. `--sft=FILE` reads prompt -> completion
pairs (JSON lines {"prompt": ..., "completion": ...}); each batch holds whole examples, right-padded, and
the targets of prompt and padding positions are -1, which the model's cross-entropy ignores: the model is
taught to write completions, not to predict the questions it will be asked. `--init_from` starts from a
checkpoint's weights and tokenizer (the architecture is then the checkpoint's). This is how R1's "cold
start" data, its rejection-sampled data and the distilled students are trained (see extras/r1.py).

What is left out on purpose: dropout (V3 uses none), pipeline/expert parallelism, real FP8 kernels.
"""

import contextlib
import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import tasks
from checkpoint import (
    CheckpointError,
    model_from_checkpoint,
    rank_rng_states,
    read_checkpoint,
    save_checkpoint,
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
from model import ModelArgs, Transformer, max_violation
from sample import evaluate
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent      # the repository: the tokenizer cache lives in ROOT/data/cache


# ----------------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------------

def _flag(default, help_text: str):
    """A dataclass field whose help text (and default) shows up in `python train.py --help`."""
    return field(default=default, metadata={"help": help_text})


PRESET_NAMES = ("tiny", "nano", "small", "16B", "671B")
TOKENIZERS = ("bpe", "char", "gpt2", "cl100k_base", "o200k_base")


# The peak learning rate each optimizer gets unless --lr is given: AdamW's tuned on held-out accuracy, Muon's
# by a sweep on val CE at the default 500 steps that keeps a margin from where AdamW broke (docs/optimizer.md).
DEFAULT_LR = {"muon": 4.5e-3, "adamw": 3e-3}


@dataclass
class TrainConfig:
    """Every setting of a pretraining run; each field is a `--name=value` flag (cli.parse_config)."""
    # ---- model ----
    preset: str = _flag("tiny", "model preset: " + " | ".join(PRESET_NAMES))
    model: str = _flag("", "ModelArgs overrides, e.g. 'fp8=true,mtp_depth=0'")
    init_from: str = _flag("", "start from this checkpoint's weights and tokenizer (fine-tuning); its architecture "
                               "replaces --preset/--model")
    # ---- data ----
    data: str = _flag("", "a UTF-8 text file; empty = built-in arithmetic corpus")
    sft: str = _flag("", "JSON lines of {prompt, completion}: supervised fine-tuning with the loss on completion "
                         "tokens only")
    tokenizer: str = _flag("bpe", " | ".join(TOKENIZERS) + " (bpe and char are trained on the data)")
    vocab_size: int = _flag(512, "BPE vocabulary size (bpe only)")
    n_examples: int = _flag(60000, "documents in the built-in corpus")
    ops: str = _flag("+-", "built-in corpus: operators of the arithmetic task, a subset of '+-*'")
    max_digits: int = _flag(2, "built-in corpus: operands have 1..max_digits digits")
    flaw_rate: float = _flag(0.6, "built-in corpus: share of flawed worked solutions in the planted-misconception "
                                  "situation (tasks.py)")
    # ---- batch and budget ----
    batch_size: int = _flag(16, "sequences per micro-batch (per rank)")
    block_size: int = _flag(128, "tokens per training sequence")
    grad_accum: int = _flag(1, "micro-batches per optimizer step")
    max_iters: int = _flag(500, "optimizer steps (the default budget: the same model on any machine, ~2 minutes "
                                "on 2 CPU cores)")
    max_seconds: float = _flag(0.0, "wall-clock budget besides max_iters (whichever ends first); 0 = none")
    # ---- optimizer (AdamW, V3 §4.2; or Muon for the matrices) and schedule ----
    optimizer: str = _flag("muon", "adamw (V3 §4.2) | muon (Muon for the hidden matrices, AdamW for the rest)")
    lr: float = _flag(0.0, "peak learning rate; 0 = the optimizer's default, DEFAULT_LR: 4.5e-3 with muon, 3e-3 "
                           "with adamw (each chosen by a sweep on tiny's val loss)")
    min_lr_ratio: float = _flag(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_iters: int = _flag(50, "linear warmup steps")
    weight_decay: float = _flag(0.1, "weight decay on matrices, Muon's and AdamW's (not on norms, biases, the embedding)")
    beta1: float = _flag(0.9, "AdamW beta1")
    beta2: float = _flag(0.95, "AdamW beta2")
    grad_clip: float = _flag(1.0, "clip the gradient norm to this (0: off)")
    bf16_moments: bool = _flag(False, "keep AdamW's moments in BF16 (V3 §3.3.3); weights and Muon's momentum stay FP32")
    v3_schedules: bool = _flag(True, "V3 §4.2 schedules over the budget: MTP lambda to a third after 67.6%, "
                                     "bias update speed to 0 after 96.6%")
    # ---- evaluation and logging ----
    eval_interval: int = _flag(200, "estimate train/val loss and write a checkpoint every this many steps")
    eval_iters: int = _flag(20, "batches per loss estimate")
    log_interval: int = _flag(25, "print a log line every this many steps")
    n_eval: int = _flag(500, "held-out problems for the final greedy accuracy (built-in corpus; 0: none)")
    log_to: str = _flag("jsonl", "metrics go to out_dir/metrics.jsonl; also to: tensorboard | wandb")
    # ---- system ----
    out_dir: str = _flag("out", "where ckpt.pt, metrics and plots go")
    resume: bool = _flag(False, "continue from out_dir/ckpt.pt (same flags)")
    device: str = _flag("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _flag("auto", "auto (bfloat16 autocast on a GPU that supports it, else float32) | float32 | "
                               "bfloat16 (autocast, also on CPU)")
    compile: bool = _flag(False, "torch.compile the model")
    seed: int = _flag(1337, "random seed (data order, initialisation)")

    def __post_init__(self):
        """Check every setting right after parsing, before any data is built (argparse turns the ValueError
        into one line naming the flag, its value and the rule)."""
        bad = functools.partial(invalid_flag, self)     # bad(name, rule) raises the one-line error
        for name in ("batch_size", "block_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
                     "log_interval", "vocab_size", "n_examples", "max_digits"):
            if getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("warmup_iters", "n_eval", "max_seconds", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if not self.lr >= 0:
            bad("lr", "must be > 0, or 0 for the optimizer's default")
        for name in ("min_lr_ratio", "flaw_rate"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be between 0 and 1")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        choices = {"preset": PRESET_NAMES, "tokenizer": TOKENIZERS, "log_to": LOG_TO, "optimizer": ("adamw", "muon"),
                   "dtype": ("auto", "float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, "choose one of " + ", ".join(allowed))
        if self.lr == 0:
            self.lr = DEFAULT_LR[self.optimizer]         # the effective value is printed and saved
        if not self.ops or set(self.ops) - set("+-*"):
            bad("ops", "must be a non-empty subset of '+-*'")
        if self.data and self.sft:
            bad("sft", "--data and --sft are two kinds of training data; give one")
        if not self.init_from:
            model_args_from(self, self.vocab_size)        # a bad --model override is reported now, not later


def model_args_from(cfg: TrainConfig, vocab_size: int) -> ModelArgs:
    """ModelArgs for the preset, with the tokenizer's vocabulary, the block size and --model overrides."""
    types = {f.name: f.type for f in fields(ModelArgs)}
    overrides = {}
    for item in filter(None, (s.strip() for s in cfg.model.split(","))):
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"--model: unknown ModelArgs field '{key}'; valid: {', '.join(types)}")
        kind = types[key] if isinstance(types[key], type) else type(getattr(ModelArgs, key))
        try:
            overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--model: {key}={value!r} is not a valid {kind.__name__}") from None
    base = ModelArgs.preset(cfg.preset)
    seq = max(cfg.block_size, base.max_seq_len)
    defaults = {"vocab_size": vocab_size, "max_seq_len": seq, "original_seq_len": max(seq, base.original_seq_len)}
    try:
        return ModelArgs.preset(cfg.preset, **{**defaults, **overrides})
    except ValueError as e:
        raise ValueError(f"--model/--preset: {e}") from None


# ----------------------------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------------------------

def load_data(cfg: TrainConfig, tok=None, max_len: "int | None" = None):
    """Return (tokenizer, train, val, description).

    Pretraining: train and val are 1-D int64 token streams.
      Built-in: `n_examples` worked arithmetic problems (tasks.build_corpus), each framed BOS ... EOS.
      --data=FILE: the file's text, first 90% train, last 10% val (as nanoGPT does).
    SFT (--sft=FILE): train and val are lists of (ids, n_prompt) examples (encode_sft).
    A tokenizer passed in (from --init_from) is used as is; otherwise one is trained on the data."""
    cache = ROOT / "data" / "cache"
    if cfg.sft:
        if tok is None:
            rows = read_sft_jsonl(cfg.sft)
            tok = _tokenizer(cfg, "\n\n".join(r["prompt"] + r["completion"] for r in rows[:20000]), cache)
        train, val, desc = load_sft(cfg, tok, max_len or cfg.block_size)
        return tok, train, val, desc
    if cfg.data:
        path = Path(cfg.data).expanduser()
        if not path.is_file():
            raise SystemExit(f"--data={cfg.data}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise SystemExit(f"--data={cfg.data}: the file is empty")
        tok = tok or _tokenizer(cfg, text[:2_000_000], cache)
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        desc = f"{path.name}: {len(text):,} characters"
    else:
        docs = tasks.build_corpus(cfg.n_examples, seed=cfg.seed, task=corpus_task(cfg), flaw_rate=cfg.flaw_rate)
        tok = tok or _tokenizer(cfg, tasks.corpus_text(docs[:20000]), cache)
        stream = []
        for d in docs:
            stream.extend(tok.encode(d, bos=True, eos=True))
        ids = torch.tensor(stream, dtype=torch.long)
        desc = f"built-in arithmetic corpus: {len(docs):,} worked problems (flaw_rate={cfg.flaw_rate})"
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    if len(val) <= cfg.block_size + 1:
        raise SystemExit(f"not enough data: {len(ids)} tokens, need > {10 * (cfg.block_size + 2)} "
                         "(10% is held out for validation); use a bigger file or a smaller --block_size")
    return tok, train, val, desc


def read_sft_jsonl(path) -> list[dict]:
    """Read an SFT file: one JSON object per line with string fields "prompt" and "completion" (other fields
    are kept but unused). Blank lines are skipped. Raises SystemExit naming the first bad line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SystemExit(f"--sft={path}: no such file (make one with `python -m extras.r1 coldstart` or "
                         "`python -m extras.r1 reject`)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); each line "
                                 'must be one object like {"prompt": "...", "completion": "..."}') from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "completion")):
                raise SystemExit(f'{path}, line {n}: needs string fields "prompt" and "completion", got '
                                 f"{line.strip()[:80]!r}")
            if not row["completion"]:
                raise SystemExit(f"{path}, line {n}: the completion is empty; there would be nothing to learn")
            rows.append(row)
    if not rows:
        raise SystemExit(f"--sft={path}: the file holds no examples")
    return rows


def encode_sft(rows: list[dict], tok, max_len: int, path="") -> list[tuple[torch.Tensor, int]]:
    """Tokenize SFT pairs as (ids, n_prompt): ids = [BOS] prompt completion [EOS] as one int64 tensor, and
    n_prompt = how many leading ids belong to the prompt (BOS included). Prompt and completion are encoded
    separately, exactly as at generation time, where the prompt is encoded and the completion sampled."""
    out = []
    for n, row in enumerate(rows, start=1):
        prompt = tok.encode(row["prompt"], bos=True)
        ids = prompt + tok.encode(row["completion"], eos=True)
        if len(ids) > max_len + 1:
            raise SystemExit(f"{path}, example {n}: prompt + completion are {len(ids)} tokens but at most "
                             f"{max_len + 1} fit (--block_size / the model's max_seq_len); shorten it or raise "
                             "--block_size")
        out.append((torch.tensor(ids, dtype=torch.long), len(prompt)))
    return out


def load_sft(cfg: "TrainConfig", tok, max_len: int):
    """SFT examples split 90/10 into train/val (at least one of each): (train, val, description)."""
    rows = read_sft_jsonl(cfg.sft)
    if len(rows) < 2:
        raise SystemExit(f"--sft={cfg.sft}: one example is not enough (one is held out for validation)")
    examples = encode_sft(rows, tok, max_len, cfg.sft)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = max(1, len(examples) // 10)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    completion_tokens = sum(len(ids) - n_prompt for ids, n_prompt in train)
    desc = (f"SFT pairs from {cfg.sft}: {len(train):,} train / {len(val):,} val examples, "
            f"{completion_tokens:,} completion tokens (the only ones with a loss)")
    return train, val, desc


def corpus_task(cfg) -> tasks.ArithmeticTask:
    """The arithmetic task of the built-in corpus (grpo.py reads the same fields from the checkpoint)."""
    return tasks.ArithmeticTask(digits=(1, cfg.max_digits), n_operands=2, ops=cfg.ops)


def _tokenizer(cfg: TrainConfig, text: str, cache: Path):
    """get_tokenizer with its errors (unknown name, named encoding unavailable offline) as clean exits."""
    try:
        return get_tokenizer(cfg.tokenizer, text=text, cache_dir=cache, vocab_size=cfg.vocab_size)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--tokenizer={cfg.tokenizer}: {e}") from None


def get_batch(data, cfg: TrainConfig, gen: torch.Generator, device: str):
    """A random batch: x (B, T) inputs and y (B, T) next-token targets, -1 where no loss is taken.

    Pretraining (data is one token stream): windows of block_size tokens, y = x shifted by one.
    SFT (data is a list of (ids, n_prompt) examples): whole examples right-padded to the longest in the
    batch; the targets of prompt tokens and of padding are -1 (ignored by the cross-entropy), so only the
    completion is learned."""
    if isinstance(data, list):
        return sft_batch(data, cfg.batch_size, gen, device)
    ix = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
    x = torch.stack([data[i:i + cfg.block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1:i + 1 + cfg.block_size] for i in ix.tolist()])
    return x.to(device), y.to(device)


def sft_batch(examples: list, batch_size: int, gen: torch.Generator, device: str, pad_id: int = 0):
    """batch_size random SFT examples -> x, y (B, T) with T = longest example - 1.

    Position i predicts token i+1, which is a completion token exactly when i+1 >= n_prompt; every other
    target is -1. Padding goes on the right, where causal attention keeps it from touching real tokens."""
    ix = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
    T = max(len(examples[i][0]) for i in ix) - 1
    x = torch.full((batch_size, T), pad_id, dtype=torch.long)
    y = torch.full((batch_size, T), -1, dtype=torch.long)
    for row, i in enumerate(ix):
        ids, n_prompt = examples[i]
        n = len(ids) - 1
        x[row, :n] = ids[:-1]
        y[row, n_prompt - 1:n] = ids[n_prompt:]                 # targets of completion tokens only
    return x.to(device), y.to(device)


def sft_token_mask(y: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True for the real tokens of an sft_batch: everything up to a row's last target (the
    padding after it is routed through the MoE layers but must count in no expert load or balance loss)."""
    return (y != -1).flip(1).cummax(1).values.flip(1)


# ----------------------------------------------------------------------------------------------------
# 3. Optimizer, schedule, FLOPs
# ----------------------------------------------------------------------------------------------------

def newton_schulz_dtype(device: "str | torch.device") -> torch.dtype:
    """The precision of Muon's Newton-Schulz products: bfloat16 on a GPU, as torch.optim.Muon and Jordan's
    reference compute it, and float32 on a CPU. The rule reads the device type only, never the CPU model, so a
    seed gives the same run on every CPU: bfloat16 products are native on some CPUs and emulated through
    float32 (and slower) on others, and the two precisions give slightly different updates."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Newton-Schulz iteration of Muon: G = U S V^T -> about U V^T, for a batch of same-shape matrices.

    G: (n, A, B). Each matrix is scaled to spectral norm <= 1 (by its Frobenius norm), then the quintic
    X <- a X + (b X X^T + c (X X^T)^2) X is applied `steps` times; its coefficients (3.4445, -4.775, 2.0315,
    Jordan's, as in torch.optim.Muon) push every singular value towards 1 fast, ending near (not at) 1,
    somewhere in about [0.7, 1.2]. Each step is three batched products in `dtype` (newton_schulz_dtype), the
    scalings and the sums folded into them as baddbmm's beta and alpha, as torch.optim.Muon does with addmm
    (fewer passes over the matrices than the multiplication by a and the sum written out; the same values up
    to rounding, tested). The bfloat16 factor differs from the float32 one by up to 2.5% on tiny's matrices. torch.optim.Muon runs each matrix alone; see Muon below.
    """
    a, b, c = 3.4445, -4.775, 2.0315
    X = G.float()
    wide = X.size(-2) <= X.size(-1)
    if not wide:
        X = X.mT                                                       # (n, B, A): X X^T is the smaller Gram
    X = (X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)).to(dtype)
    for _ in range(steps):
        gram = X @ X.mT                                                # A = X X^T: (n, m, m), m = min(A, B)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)        # b A + c A A
        X = torch.baddbmm(X, poly, X, beta=a)                          # a X + (b A + c A A) X
    return X if wide else X.mT


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; scaled up by Moonshot's Moonlight,
    Liu et al. 2025, "Muon is scalable for LLM training") for 2-D weight matrices.

    Per matrix W with gradient G: B <- momentum * B + (1 - momentum) * G (torch.optim.Muon's form of the
    momentum), Nesterov U = lerp(G, B, momentum), O = NewtonSchulz(U) ~ the orthogonal factor of U (every
    singular value ~1), then W <- (1 - lr * wd) W - lr * 0.2 * sqrt(max(A, B)) * O. The factor
    0.2 sqrt(max(A, B)) is Moonlight's: it gives O the RMS of a typical AdamW update, so Muon takes AdamW's
    learning rate and weight decay as they are (torch.optim.Muon's adjust_lr_fn="match_rms_adamw").
    Orthogonalising the update gives every direction of the matrix the same step, where Adam's step is
    dominated by a few large singular directions.

    The update is torch.optim.Muon's; what differs is how it is computed: matrices of one shape (a layer's
    experts, the same projection in every layer) are orthogonalised together by batched matmuls
    (zeropower_via_newtonschulz), in bfloat16 on a GPU and float32 on a CPU (newton_schulz_dtype); tests
    check that it gives torch.optim.Muon's update to bfloat16's precision. The batching, not the precision,
    is what makes it cheaper than torch.optim.Muon's one matrix at a time (docs/results_history.md has the
    measurements). Only for matrices: embeddings, the output head, norms and the
    router go to AdamW (`make_optimizer`).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "ns_steps": ns_steps})
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only; give the other parameters to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step for every matrix that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            by_shape = {}                                              # shape -> [params]
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for (A, B), ps in by_shape.items():
                grads = [p.grad for p in ps]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                upd = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
                O = zeropower_via_newtonschulz(torch.stack(upd), group["ns_steps"],
                                               dtype=newton_schulz_dtype(ps[0].device))   # (n, A, B)
                torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(ps, list(O.to(ps[0].dtype).unbind(0)),
                                    alpha=-group["lr"] * 0.2 * math.sqrt(max(A, B)))
        return loss


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped together: what train_step needs of an
    optimizer (param_groups for the schedule, step, zero_grad, state_dict for checkpoints and --resume)."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        """Both optimizers' groups, the live dicts (load_state_dict replaces them): setting lr sets both."""
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        """Step both optimizers."""
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        """Clear both optimizers' gradients."""
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """Both states, under their names."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore both states (a checkpoint of an AdamW-only run does not fit: clear error)."""
        if set(state) != {"muon", "adamw"}:
            raise CheckpointError("cannot resume: the checkpoint's optimizer state is not Muon + AdamW; resume "
                                  "with the --optimizer it was trained with")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, same update as torch.optim.AdamW) that keeps
    exp_avg and exp_avg_sq in `moment_dtype` (BF16 by default, V3 §3.3.3: no observable degradation, half
    the optimizer memory). The update is computed in FP32 and applied to the FP32 master weights."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t, g = state["step"], p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)                 # beta1 m + (1 - beta1) g
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)                                        # stored rounded to BF16
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - group["lr"] * group["weight_decay"])                  # decoupled weight decay
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
        return loss

    def load_state_dict(self, state_dict) -> None:
        """As torch's, then the moments back to moment_dtype (torch casts loaded state to the parameters' dtype)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)


def make_optimizer(model: Transformer, cfg: TrainConfig, device: str):
    """AdamW (V3 §4.2), or Muon for the hidden matrices and AdamW for the rest (--optimizer=muon).
    Weight decay only on matrices: not on norms, biases or the embedding table."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.startswith("embed."):
            no_decay.append(p)
        elif cfg.optimizer == "muon" and p.dim() == 2 and name != "head.weight" and not name.endswith("gate.weight"):
            muon.append(p)                   # attention, expert and MTP projections (not the head or the router)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.bf16_moments:
        adamw = AdamWBF16(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    else:
        # fused: one kernel updates every parameter (CUDA and CPU), instead of a few operations per tensor for
        # each of tiny's ~100 parameter tensors
        adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.startswith(("cuda", "cpu")))
    if cfg.optimizer == "adamw":
        return adamw
    return MuonWithAdamW(Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay), adamw)


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_iters steps, then cosine from lr to lr*min_lr_ratio over progress in [0, 1]."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


# The MTP and router-bias schedules (V3 §4.2), scaled to the run's budget.
# V3 trains on 14.8T tokens. It weights the MTP loss with lambda = 0.3 for the first 10T tokens and 0.1 for
# the remaining 4.8T, and moves the balancing bias with gamma = 0.001 for the first 14.3T tokens and 0 for
# the last 500B. A run of any length follows the same proportions of its own budget. (V3 raises its batch
# size over the first 469B tokens, so its token fraction and step fraction differ slightly; with a
# constant batch the two are the same.)

V3_TRAIN_TOKENS = 14.8e12
MTP_LAMBDA_SWITCH = 10.0e12 / V3_TRAIN_TOKENS         # 0.676: lambda drops from 0.3 to 0.1 here
BIAS_FREEZE_SWITCH = 14.3e12 / V3_TRAIN_TOKENS        # 0.966: gamma drops to 0 here


def mtp_lambda_at(progress: float, mtp_lambda: float = 0.3) -> float:
    """MTP loss weight at `progress` (fraction of the training budget done, 0..1): mtp_lambda before
    MTP_LAMBDA_SWITCH, then a third of it (V3: 0.3, then 0.1)."""
    return mtp_lambda if progress < MTP_LAMBDA_SWITCH else mtp_lambda * (0.1 / 0.3)


def bias_update_speed_at(progress: float, bias_update_speed: float = 0.001) -> float:
    """Aux-loss-free bias update speed gamma at `progress` (0..1): bias_update_speed before
    BIAS_FREEZE_SWITCH, then 0, so routing settles for the end of training (V3: 0.001, then 0)."""
    return bias_update_speed if progress < BIAS_FREEZE_SWITCH else 0.0



# Parameter and FLOP counts, by arithmetic on ModelArgs: the log line's MFU and extras/cost.py use them.

def count_params(args: ModelArgs) -> dict:
    """Total and activated parameters, by arithmetic (no weights allocated; a test checks it against a built
    model's named_parameters()).

    Convention: `total` and `activated` exclude the MTP modules (reported separately as `mtp`), as the V3
    report does; MTP shares the embedding and head, so `mtp` excludes them too (the released checkpoint
    stores copies of both, which is why it quotes ~14B). `activated` counts everything one token touches:
    embedding, head, attention, norms, dense FFNs, gates, shared experts and K of the N_r routed experts
    of each MoE layer. For 671B this plain count gives 37.55B: embedding and head 0.93B each, attention
    61 x 187.1M = 11.41B, FFNs 61 x 396.4M = 24.18B (3 dense of 18,432 = 9 x 2,048 wide; 58 MoE layers with
    8 routed + 1 shared expert), gates 0.11B. That does not round to the report's "37B", and it is 0.85B
    above the 36.7B of the official README_WEIGHTS.md ("including 0.9B for Embedding and 0.9B for the
    output Head"), which gives no breakdown; no single part explains the gap (leaving out the embedding
    lookup would give 36.63B, but the card says it is included). Total: 671.03B, as reported.
    """
    a = args
    d, H = a.dim, a.n_heads
    if a.q_lora_rank:
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * a.qk_head_dim   # wq_a, q_norm, wq_b
    else:
        q = d * H * a.qk_head_dim                                                     # wq
    attn = (q + d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank            # wkv_a, kv_norm
            + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * d)  # wkv_b, wo
    expert = 3 * d * a.moe_inter_dim
    moe_fixed = a.n_routed_experts * d + a.n_shared_experts * expert                  # gate + shared
    dense_block = 2 * d + attn + 3 * d * a.inter_dim
    moe_total = 2 * d + attn + moe_fixed + a.n_routed_experts * expert
    moe_active = 2 * d + attn + moe_fixed + a.n_activated_experts * expert
    n_moe = a.n_layers - a.n_dense_layers
    outer = 2 * a.vocab_size * d + d                                                  # embed, head, norm
    return {"total": outer + a.n_dense_layers * dense_block + n_moe * moe_total,
            "activated": outer + a.n_dense_layers * dense_block + n_moe * moe_active,
            "mtp": a.mtp_depth * (3 * d + 2 * d * d + moe_total)}   # MTP blocks are MoE blocks


def flops_breakdown(args: ModelArgs, seq_len: int, causal: bool = False) -> dict:
    """Training FLOPs per token, in parts: {"matmul", "attention", "total"} (FLOPs, forward + backward).

    matmul: 6 x activated parameters, less the embedding lookup (the output head is a matmul and stays in).
    The MTP modules are in too: each is a full Transformer block whose token runs through all of its
    attention but only the shared and K_r routed experts, plus its projection of [h; emb], and it calls the
    shared output head once more (count_params does not count shared weights, a token still multiplies by them).
    attention: 6 x (n_layers + mtp_depth) x n_heads x (qk_head_dim + v_head_dim) x seq_len, the full score
    matrix (nanoGPT's and PaLM's convention). With causal=True it is halved: under a causal mask a token only
    attends to the tokens before it, so only about half the score matrix is needed, and flash-attention
    kernels skip the masked blocks (FlashAttention's benchmarks count FLOPs this way). MFU figures quoted
    by different people differ by this convention; the defaults here count the full matrix.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive number of tokens per sequence (V3 used 4096)")
    c = count_params(args)
    # Parameters one token multiplies by: activated minus the embedding table (a lookup), plus per MTP module
    # its weights without the routed experts it skips, plus the shared output head it calls again.
    skipped = (args.n_routed_experts - args.n_activated_experts) * 3 * args.dim * args.moe_inter_dim
    mtp = c["mtp"] - args.mtp_depth * skipped + args.mtp_depth * args.vocab_size * args.dim
    params = c["activated"] - args.vocab_size * args.dim + mtp
    matmul = 6 * params
    # Per token, layer and head: Q K^T is 2 x qk_head_dim x seq_len FLOPs forward, weights x V is
    # 2 x v_head_dim x seq_len; backward doubles each, hence 6 in all.
    attention = 6 * (args.n_layers + args.mtp_depth) * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
    if causal:
        attention /= 2
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


def flops_per_token(args: ModelArgs, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token (forward + backward): 6 x activated matmul parameters plus attention scores
    and weighted values, as nanoGPT counts them (no causal halving unless causal=True). Embedding lookups
    are not matmuls and are left out; MTP blocks are in. See flops_breakdown for the parts."""
    return flops_breakdown(args, seq_len, causal)["total"]


# GPUs: dense peak tensor-core throughput, TFLOP/s (10^12 FLOP/s), the denominator of MFU on a GPU.
# Datasheets print the "with sparsity" figure first (2:4 structured sparsity, twice the dense rate); a
# normal training run gets the dense one, which is what this table holds. fp8=None: no FP8 tensor cores.
# The key order matters: peak_flops finds a GPU by substring of torch.cuda.get_device_name(), so "A100"
# must come before "A10" and "L40S" before "L4".
GPUS = {
    "H200": {"bf16": 989.4, "fp8": 1978.9,
             "source": "NVIDIA H200 datasheet: the H100 SXM's compute (3,958 FP8 / 1,979 BF16 TFLOPS with "
                       "sparsity) with more and faster memory (141 GB HBM3e, 4.8 TB/s)"},
    "H100": {"bf16": 989.4, "fp8": 1978.9,
             "source": "NVIDIA H100 datasheet and Hopper whitepaper, SXM5 dense (PCIe: 756 BF16 / 1,513 FP8)"},
    "H800": {"bf16": 989.4, "fp8": 1978.9,
             "source": "NVIDIA H800 SXM datasheet: the H100 SXM's tensor-core compute; an export variant with "
                       "NVLink cut to 400 GB/s (H100: 900 GB/s). V3's cluster (report §3.1)"},
    "A100": {"bf16": 312.0, "fp8": None,
             "source": "NVIDIA A100 datasheet: 312 BF16 dense (624 with sparsity); Ampere has no FP8"},
    "A800": {"bf16": 312.0, "fp8": None,
             "source": "NVIDIA A800 datasheet: the A100's compute, NVLink cut to 400 GB/s (A100: 600 GB/s)"},
    "L40S": {"bf16": 362.05, "fp8": 733.0,
             "source": "NVIDIA L40S datasheet: 362.05 BF16 / 733 FP8 dense (733 / 1,466 with sparsity)"},
    "L4": {"bf16": 121.0, "fp8": 242.5,
           "source": "NVIDIA L4 datasheet: 242 BF16 / 485 FP8 with sparsity, halved"},
    "A10": {"bf16": 125.0, "fp8": None,
            "source": "NVIDIA A10 datasheet: 125 BF16 dense (250 with sparsity); Ampere has no FP8"},
    # GeForce cards run FP16/BF16 tensor math with FP32 accumulation at half the rate of FP16 accumulation.
    # BF16 always accumulates in FP32 (so do PyTorch's matmuls), so these are the FP32-accumulate figures;
    # the headline numbers (330 for the 4090, 142 for the 3090) are the FP16-accumulate ones.
    "RTX 4090": {"bf16": 165.2, "fp8": 330.3,
                 "source": "NVIDIA Ada Lovelace whitepaper, RTX 4090 dense, FP32 accumulate "
                           "(FP16 accumulate: 330.3 BF16-class / 660.6 FP8)"},
    "RTX 3090": {"bf16": 71.0, "fp8": None,
                 "source": "NVIDIA Ampere GA102 whitepaper, RTX 3090 dense BF16 with FP32 accumulate "
                           "(FP16 with FP16 accumulate: 142); Ampere has no FP8"},
}

# Dense BF16 peaks in FLOP/s, the denominator of peak_flops on a GPU (same keys, same order).
GPU_PEAK_BF16 = {name: spec["bf16"] * 1e12 for name, spec in GPUS.items()}


def peak_flops(device: str) -> tuple[float, str]:
    """Peak FLOP/s to divide by for MFU: a measured fp32 matmul rate on CPU, the dense bf16 spec on a GPU
    (GPUS, with sources). FLOPs per token come from flops_per_token above."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} dense bf16 spec {value / 1e12:.0f} TFLOP/s"
        return 0.0, f"{name}: peak unknown (add it to train.GPUS), MFU not shown"
    if device == "cpu":
        threads = torch.get_num_threads()
        rate = cpu_matmul_rate(threads)
        return rate, f"measured fp32 1024x1024 matmul on this CPU: {rate / 1e9:.1f} GFLOP/s ({threads} threads)"
    return 0.0, f"{device}: peak unknown, MFU not shown"


@functools.lru_cache
def cpu_matmul_rate(threads: int) -> float:
    """FLOP/s of an fp32 1024x1024 matmul on this CPU with `threads` threads, timed for half a second once per
    process and thread count (a notebook that trains ten runs measures it once)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ b
        n += 1
    return n * 2 * 1024 ** 3 / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# 4. Evaluation
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, train, val, cfg, device, ctx) -> dict:
    """Mean next-token CE on eval_iters fixed batches of each split (fixed seed, so curves are comparable)."""
    model.eval()
    out = {}
    for split, data in (("train", train), ("val", val)):
        gen = torch.Generator().manual_seed(1234)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data, cfg, gen, device)
            with ctx:
                logits, _ = model(x)                         # (B, T, V); no targets: the MTP modules stay idle
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def heldout_accuracy(model, tok, task, n: int, path: Path) -> float:
    """Greedy accuracy on n held-out problems (never in the corpus), with sample.evaluate, the evaluation
    grpo.py uses too, so pretraining and RL figures are measured identically; one JSON line per problem."""
    records, summary = evaluate(model, tok, tasks.heldout_problems(task, n, seed=0), max_new_tokens=64)
    write_jsonl(path, records)
    return summary["accuracy"]


# ----------------------------------------------------------------------------------------------------
# 5. Plots
# ----------------------------------------------------------------------------------------------------

def plot_run(metrics: list[dict], load_history: list, out_dir: Path) -> list[Path]:
    """loss.png (train/val CE, MTP and balance losses) and expert_load.png (per-layer load share heatmap at
    the end, and MaxVio over steps: aux-loss-free balancing at work)."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend switch, safe inside notebooks
    )

    paths = []
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot([m["step"] for m in train], [m["ce"] for m in train], label="train CE (next token)", alpha=0.8)
    ax.plot([m["step"] for m in train], [m["mtp"] for m in train], label="MTP loss (lambda/D sum CE_k)", alpha=0.8)
    if evals:
        ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="val CE")
    ax2 = ax.twinx()
    ax2.plot([m["step"] for m in train], [m["balance"] for m in train], color="gray", ls=":", label="balance loss")
    ax2.set_ylabel("sequence-wise balance loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="tinyseek pretraining loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=110)

    if load_history:
        steps = [s for s, _ in load_history]
        loads = torch.stack([ld for _, ld in load_history])                 # (n_logs, layers, E)
        share = loads[-1] / loads[-1].sum(-1, keepdim=True)               # (layers, E) at the end
        vio = max_violation(loads.flatten(0, 1)).view(loads.shape[:2])     # (n_logs, layers)
        fig = Figure(figsize=(12, 4.5))
        a1, a2 = fig.subplots(1, 2)
        im = a1.imshow(share.numpy(), aspect="auto", cmap="viridis")
        a1.set(xlabel="routed expert", ylabel="MoE layer (MTP last)", title="share of tokens per expert (last window)")
        fig.colorbar(im, ax=a1, label="fraction of routed tokens")
        for layer in range(vio.shape[1]):
            a2.plot(steps, vio[:, layer].numpy(), label=f"MoE layer {layer}")
        a2.set(xlabel="optimizer step", ylabel="MaxVio = max load / mean load - 1",
               title="expert-load imbalance (aux-loss-free bias)")
        a2.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "expert_load.png")
        fig.savefig(paths[-1], dpi=110)
    return paths


# ----------------------------------------------------------------------------------------------------
# 5. Setting up a run: data, model (fresh, --init_from or --resume), optimizer
# ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the training loop touches, built by setup() and written to the checkpoint by save()."""
    cfg: TrainConfig
    ddp: Dist                       # this process's place in a torchrun job (rank 0 of 1 when run alone)
    device: str
    out_dir: Path
    tok: object                     # tokenizer.Tokenizer
    args: ModelArgs
    raw: Transformer                # the model itself: checkpoints, evaluation, bias updates
    model: torch.nn.Module          # what the loop calls: raw, or raw wrapped by torch.compile and/or DDP
    optimizer: torch.optim.Optimizer
    train_data: object              # a token stream (pretraining) or a list of examples (SFT)
    val_data: object
    gen: torch.Generator            # draws the batches
    ctx: object                     # autocast context (bf16) or a disabled one
    kind: str                       # "pretrain" or "sft"
    log: MetricsLog
    step: int = 0
    elapsed: float = 0.0            # training seconds, summed over resumed runs
    metrics: list = field(default_factory=list)        # every logged record (plots; kept across --resume)
    load_history: list = field(default_factory=list)   # (step, expert load) for the load plot
    # filled in by the loop: the MFU denominator and FLOPs per token, the last step's expert load and MaxVio,
    # and the tokens and clock since the last log line (tokens/s)
    peak: float = 0.0
    fpt: float = 0.0
    last_load: "torch.Tensor | None" = None
    last_vio: "torch.Tensor | None" = None
    tokens_since_log: int = 0
    t_log: float = 0.0


def build_model(cfg: TrainConfig, device: str):
    """Data and model: fresh from --preset/--model, or the weights, architecture and tokenizer of --init_from.
    Returns (tok, train_data, val_data, description, args, model)."""
    if cfg.init_from:
        model, tok = model_from_checkpoint(read_checkpoint(cfg.init_from, hint="python train.py"), device)
        if cfg.block_size > model.args.max_seq_len:
            raise SystemExit(f"--block_size={cfg.block_size} exceeds the max_seq_len={model.args.max_seq_len} of "
                             f"{cfg.init_from}; use --block_size={model.args.max_seq_len} or less")
        tok, train_data, val_data, desc = load_data(cfg, tok, max_len=cfg.block_size)
        return tok, train_data, val_data, desc, model.args, model
    tok, train_data, val_data, desc = load_data(cfg)
    args = model_args_from(cfg, tok.n_vocab)
    return tok, train_data, val_data, desc, args, Transformer(args).to(device)


def resume_state(run: Run, ckpt_path: Path) -> None:
    """Load model, optimizer, step, this rank's RNG states and metrics from out_dir/ckpt.pt: the run continues
    exactly as if it had never stopped (tested bit for bit, on one process and on two ranks)."""
    ckpt = read_checkpoint(ckpt_path, hint="python train.py")
    if ckpt["model_args"] != run.args.to_dict():
        diff = {k: (ckpt["model_args"].get(k), v) for k, v in run.args.to_dict().items()
                if ckpt["model_args"].get(k) != v}
        raise CheckpointError(f"cannot resume: model arguments differ (checkpoint, now): {diff}")
    run.raw.load_state_dict(ckpt["model"])
    trained_with = ckpt["config"].get("optimizer", "adamw")      # checkpoints older than --optimizer: AdamW
    if trained_with != run.cfg.optimizer:
        raise CheckpointError(f"cannot resume: {ckpt_path} was trained with --optimizer={trained_with}, this run "
                              f"asks for --optimizer={run.cfg.optimizer}; resume with --optimizer={trained_with}")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.step, run.elapsed, run.metrics = ckpt["step"], ckpt["elapsed"], ckpt.get("metrics", [])
    rng = rank_rng_states(ckpt, run.ddp.rank, run.ddp.world_size, ckpt_path)   # each rank its own batches
    run.gen.set_state(rng["data"])
    torch.set_rng_state(rng["torch"])


def setup(cfg: TrainConfig, ddp: Dist, device: str) -> Run:
    """Seeds, data, model, optimizer, resume; prints what was built. Returns the Run the loop trains."""
    out_dir = Path(cfg.out_dir)
    if ddp.master:
        print_config(cfg, "train config")
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + ddp.rank)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Runs repeat exactly on a CPU at a fixed thread count (tested: resume == unsplit run) without
    # torch.use_deterministic_algorithms, which there would only fill every new tensor with NaN first.
    tok, train_data, val_data, desc, args, raw = build_model(cfg, device)
    model = torch.compile(raw) if cfg.compile else raw
    if ddp.enabled:
        # MoE: an expert that got no token this step has no gradient, so DDP must allow unused parameters.
        # No buffer broadcast: each rank counts its own expert load (summed across ranks before the bias
        # update), and the biases stay identical because every rank applies the same summed update.
        model = DDP(model, device_ids=[ddp.local_rank] if device.startswith("cuda") else None,
                    find_unused_parameters=True, broadcast_buffers=False)
    run = Run(cfg, ddp, device, out_dir, tok, args, raw, model, make_optimizer(raw, cfg, device), train_data,
              val_data, torch.Generator().manual_seed(cfg.seed + ddp.rank),   # each rank draws its own batches
              autocast_context(cfg.dtype, device), "sft" if cfg.sft else "pretrain",
              MetricsLog(out_dir, cfg.log_to, asdict(cfg), append=cfg.resume) if ddp.master else None)
    if cfg.resume:
        resume_state(run, out_dir / "ckpt.pt")
    if ddp.master:
        c = count_params(args)
        sizes = "" if cfg.sft else f"; {len(train_data):,} train / {len(val_data):,} val tokens"
        print(f"data: {desc}; tokenizer {tok.name} ({tok.n_vocab} tokens){sizes}")
        if cfg.init_from:
            print(f"initialised from {cfg.init_from} (its architecture; --preset and --model are not used)")
        name = f"from {cfg.init_from}" if cfg.init_from else cfg.preset
        print(f"model: {name}, {c['total'] / 1e6:.2f}M parameters ({c['activated'] / 1e6:.2f}M activated per "
              f"token) + {c['mtp'] / 1e6:.2f}M MTP; device {device}" + (f" x {ddp.world_size} ranks" if ddp.enabled else ""))
        if cfg.resume:
            print(f"resumed from {out_dir / 'ckpt.pt'} at step {run.step}")
    return run


def save(run: Run, final: "dict | None" = None) -> None:
    """Write out_dir/ckpt.pt atomically with everything --resume needs. Every rank calls it at the same point:
    each rank draws its own batches (generator seeded with seed + rank), so every rank's RNG states are
    gathered and rank 0 writes them all; --resume gives each rank back its own."""
    states = all_ranks({"data": run.gen.get_state(), "torch": torch.get_rng_state()}, run.ddp)
    if not run.ddp.master:
        return
    save_checkpoint(run.out_dir / "ckpt.pt", {
        "model": run.raw.state_dict(), "model_args": run.args.to_dict(), "tokenizer": run.tok.to_dict(),
        "config": asdict(run.cfg), "kind": run.kind, "step": run.step, "elapsed": run.elapsed,
        "optimizer": run.optimizer.state_dict(), "rng": states[0], "rng_ranks": states,
        "metrics": run.metrics, **({"final": final} if final else {})})


# ----------------------------------------------------------------------------------------------------
# 6. The training loop
# ----------------------------------------------------------------------------------------------------

def train_step(run: Run, lr: float) -> tuple[torch.Tensor, float]:
    """One optimizer step: forward/backward over grad_accum micro-batches, clip, Muon/AdamW, then the
    auxiliary-loss-free router-bias update from the step's expert loads (V3 §2.1.2).
    Returns (loss, grad_norm); the step's expert load and MaxVio are left in run.last_load / run.last_vio."""
    cfg, model = run.cfg, run.model
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    for micro in range(cfg.grad_accum):
        x, y = get_batch(run.train_data, cfg, run.gen, run.device)
        run.tokens_since_log += x.numel() * run.ddp.world_size          # SFT batches vary in length
        sync = not run.ddp.enabled or micro == cfg.grad_accum - 1        # DDP: all-reduce on the last only
        with run.ctx, (contextlib.nullcontext() if sync else model.no_sync()):
            _, loss = model(x, y, token_mask=sft_token_mask(y) if cfg.sft else None)
        (loss / cfg.grad_accum).backward()
    if not math.isfinite(loss.item()):
        print(f"step {run.step}: loss is {loss.item()}; stopping. The last good checkpoint "
              f"({run.out_dir / 'ckpt.pt'}) is untouched. Try a lower --lr or --grad_clip.", file=sys.stderr)
        raise SystemExit(2)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # aux-loss-free balancing: every rank must apply the same bias step, so sum the loads first
    run.last_load = run.raw.expert_load()                        # (moe layers, E) tokens this step
    if run.ddp.enabled:
        dist.all_reduce(run.last_load)
    run.last_vio = run.raw.update_bias(run.last_load)            # MaxVio per layer of this step's load
    return loss, float(grad_norm) if grad_norm is not None else float("nan")


def log_step(run: Run, loss: torch.Tensor, grad_norm: float, lr: float, progress_frac: float) -> None:
    """The log line of a step: loss parts, lr, tokens/s, MFU, MaxVio, progress and ETA."""
    dt = time.perf_counter() - run.t_log
    tps = run.tokens_since_log / dt
    mfu = tps * run.fpt / (run.peak * run.ddp.world_size) if run.peak else float("nan")
    parts = run.raw.loss_parts
    row = {"step": run.step, "loss": loss.item(), "ce": parts["ce"], "mtp": parts["mtp"], "balance": parts["balance"],
           "mtp_lambda": run.raw.mtp_lambda, "lr": lr, "grad_norm": grad_norm, "tok_per_s": tps, "mfu": mfu,
           "max_vio": run.last_vio.mean().item(), "elapsed": run.elapsed}
    run.metrics.append(row)
    run.log.log(row)
    run.load_history.append((run.step, run.last_load.cpu()))
    print(f"{progress(run.step, run.cfg.max_iters, run.elapsed, progress_frac)} | loss {row['loss']:.4f} "
          f"(ce {parts['ce']:.4f} mtp {parts['mtp']:.4f} bal {parts['balance']:.2e}) | lr {lr:.2e} | "
          f"{tps:,.0f} tok/s | MFU {100 * mfu:.2f}% | MaxVio {row['max_vio']:.2f}", flush=True)
    run.t_log, run.tokens_since_log = time.perf_counter(), 0


def evaluate_and_save(run: Run) -> None:
    """Estimate train/val loss, log it and write a checkpoint (every eval_interval steps)."""
    losses = estimate_loss(run.raw, run.train_data, run.val_data, run.cfg, run.device, run.ctx)
    if run.ddp.master:
        row = {"step": run.step, "train_loss": losses["train"], "val_loss": losses["val"]}
        run.metrics.append(row)
        run.log.log(row)
        print(f"step {run.step:5d} | eval: train CE {losses['train']:.4f}, val CE {losses['val']:.4f}")
    save(run)                                 # every rank: the RNG states are gathered, rank 0 writes


def train_loop(run: Run, stop: GracefulStop) -> None:
    """Train until the step (or seconds) budget is spent or a signal arrives; the schedule, warmup then cosine,
    is fitted to whichever budget ends first."""
    cfg = run.cfg
    run.peak, peak_desc = peak_flops(run.device)
    run.fpt = flops_per_token(run.args, cfg.block_size)
    if run.ddp.master:
        print(f"MFU peak: {peak_desc}; {run.fpt / 1e6:.1f} MFLOPs per token")
    t_start, elapsed_before = time.perf_counter(), run.elapsed
    run.t_log, run.tokens_since_log = time.perf_counter(), 0
    run.model.train()
    while True:
        run.elapsed = elapsed_before + time.perf_counter() - t_start
        budget_used = max(run.step / cfg.max_iters, run.elapsed / cfg.max_seconds if cfg.max_seconds else 0.0)
        # under torchrun rank 0's clock and signals decide for all: ranks that stopped at different steps, or
        # followed schedules from different clocks, would deadlock or drift apart
        halt, budget_used = from_rank0([float(budget_used >= 1.0 or stop.requested), budget_used], run.ddp,
                                       run.device)
        if halt:
            break
        lr = lr_at(budget_used, run.step, cfg)
        if cfg.v3_schedules:                 # V3 §4.2 proportions of this run's budget
            run.raw.mtp_lambda = mtp_lambda_at(budget_used, run.args.mtp_lambda)
            run.raw.bias_update_speed = bias_update_speed_at(budget_used, run.args.bias_update_speed)
        loss, grad_norm = train_step(run, lr)
        run.step += 1
        if run.ddp.master and (run.step % cfg.log_interval == 0 or run.step == 1):
            run.elapsed = elapsed_before + time.perf_counter() - t_start
            log_step(run, loss, grad_norm, lr, max(run.step / cfg.max_iters,
                                                  run.elapsed / cfg.max_seconds if cfg.max_seconds else 0.0))
        if run.step % cfg.eval_interval == 0:
            evaluate_and_save(run)


def finish(run: Run, stop: GracefulStop) -> dict:
    """Final loss estimate, held-out accuracy (built-in corpus), checkpoint, metrics and plots."""
    cfg = run.cfg
    losses = estimate_loss(run.raw, run.train_data, run.val_data, cfg, run.device, run.ctx)
    summary = {"step": run.step, "seconds": round(run.elapsed, 1), "train_loss": losses["train"],
               "val_loss": losses["val"], "interrupted": stop.requested}
    if not run.ddp.master:
        save(run)                              # joins rank 0's gather of the RNG states
        return summary
    row = {"step": run.step, "train_loss": losses["train"], "val_loss": losses["val"]}
    run.metrics.append(row)
    run.log.log(row)
    print(f"done: {run.step} steps in {format_seconds(run.elapsed)}; train CE {losses['train']:.4f}, "
          f"val CE {losses['val']:.4f}")
    if not cfg.data and not stop.requested and cfg.n_eval > 0:
        eval_path = run.out_dir / f"eval_{run.kind}.jsonl"
        with run.ctx:
            summary["heldout_accuracy"] = heldout_accuracy(run.raw, run.tok, corpus_task(cfg), cfg.n_eval, eval_path)
        print(f"greedy accuracy on {cfg.n_eval} held-out problems: {100 * summary['heldout_accuracy']:.1f}% "
              f"(records in {eval_path})")
    save(run, summary)
    run.log.close()
    plots = plot_run(run.metrics, run.load_history, run.out_dir)
    print(f"wrote {run.out_dir / 'ckpt.pt'}, {run.log.path}, " + ", ".join(str(p) for p in plots))
    if stop.requested:
        print(f"interrupted at step {run.step}/{cfg.max_iters}: resume with the same command plus --resume, e.g. "
              f"`python train.py --out_dir={cfg.out_dir} --resume` (and your other flags)")
    else:
        print(f"next: python grpo.py --init_from={run.out_dir / 'ckpt.pt'}   |   "
              f"python sample.py --out_dir={run.out_dir}")
    return summary


def main(argv=None) -> dict:
    """`python train.py [--flag=value ...]`: pretraining (or SFT) as configured; returns a summary dict."""
    cfg = parse_config(TrainConfig, argv, description="Pretrain a DeepSeek-V3-style model (tinyseek).")
    ddp, device = setup_distributed(pick_device(cfg.device))
    if device.startswith("cuda"):
        # any float32 matmul (Muon on a float32 run, ops autocast keeps in float32) on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    finished, run = False, None
    try:
        run = setup(cfg, ddp, device)
        with GracefulStop() as stop:          # Ctrl-C / SIGTERM: finish the step, checkpoint, exit
            train_loop(run, stop)
        summary = finish(run, stop)
        finished = True
        return summary
    finally:
        run = None                            # drop the DDP wrapper before the process group (cleanup_distributed)
        cleanup_distributed(ddp, wait=finished)


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
