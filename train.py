"""
tinyseek/train.py -- pretrain the DeepSeek-V3-style model from model.py.

    python train.py                                   # tiny preset, built-in arithmetic corpus, ~4 minutes on 2 CPU cores
    python train.py --data=shakespeare.txt --tokenizer=char
    python train.py --preset=small --device=cuda --compile
    torchrun --standalone --nproc_per_node=2 train.py # several processes (gloo on CPU, nccl on GPUs)
    python train.py --sft=pairs.jsonl --init_from=out/ckpt.pt --out_dir=out_sft --lr=3e-4 --max_iters=200
                                                      # supervised fine-tuning (loss on completions only)

What happens, top to bottom:
  1. Config: one dataclass; every field is a `--key=value` flag; the effective config is printed and saved.
  2. Data: the built-in corpus (worked arithmetic in the R1-Zero format, see tasks.py) or any UTF-8 text
     file; a byte-level BPE trained on it (cached); one long token stream split 90/10 into train/val.
  3. Model and optimizer: AdamW (beta 0.9/0.95, weight decay 0.1 on matrices only), warmup + cosine.
  4. The loop: forward (CE + MTP + balance loss), backward, clip, step, then the auxiliary-loss-free
     router-bias update from the step's expert loads (V3 §2.1.2). Log lines show loss parts, lr, tokens/s,
     MFU and the expert-load imbalance MaxVio.
  5. Checkpoints (atomic), metrics.jsonl, plots, and for the built-in task a greedy held-out accuracy.

The learning-rate schedule is fitted to whichever budget ends first, --max_iters or --max_seconds, so
"train for three minutes" (--max_seconds=180) gives a complete warmup-and-decay run. The default is a step
budget (750 steps), so a slower machine takes longer but trains the same model.

Supervised fine-tuning (SFT) is the same loop with other batches. `--sft=FILE` reads prompt -> completion
pairs (JSON lines {"prompt": ..., "completion": ...}); each batch holds whole examples, right-padded, and
the targets of prompt and padding positions are -1, which the model's cross-entropy ignores: the model is
taught to write completions, not to predict the questions it will be asked. `--init_from` starts from a
checkpoint's weights and tokenizer (the architecture is then the checkpoint's). This is how R1's "cold
start" data, its rejection-sampled data and the distilled students are trained (see r1.py).

What is left out on purpose: dropout (V3 uses none), pipeline/expert parallelism, real FP8 kernels.
"""

import contextlib
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import grpo
import tasks
from checkpoint import (
    CheckpointError,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from cli import (
    cleanup_distributed,
    parse_config,
    pick_device,
    print_config,
    setup_distributed,
)
from cost import GPU_PEAK_BF16, flops_per_token
from model import ModelArgs, Transformer, count_params, max_violation
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a pretraining run (each is a --flag)."""
    preset: str = field(default="tiny", metadata={"help": "model preset: tiny | nano | small | 16B | 671B"})
    model: str = field(default="", metadata={"help": "ModelArgs overrides, e.g. 'fp8=true,mtp_depth=0'"})
    out_dir: str = field(default="out", metadata={"help": "where ckpt.pt, metrics and plots go"})
    data: str = field(default="", metadata={"help": "a UTF-8 text file; empty = built-in arithmetic corpus"})
    tokenizer: str = field(default="bpe", metadata={"help": "bpe | char | gpt2 | cl100k_base | o200k_base"})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size (bpe only)"})
    n_examples: int = field(default=60000, metadata={"help": "documents in the built-in corpus"})
    ops: str = field(default="+-", metadata={"help": "built-in corpus: operators of the arithmetic task"})
    max_digits: int = field(default=2, metadata={"help": "built-in corpus: operands have 1..max_digits digits"})
    flaw_rate: float = field(default=0.6, metadata={"help": "built-in corpus: share of flawed worked solutions "
                                                            "in the planted-misconception situation (tasks.py)"})
    batch_size: int = 16
    block_size: int = field(default=128, metadata={"help": "tokens per training sequence"})
    grad_accum: int = 1
    max_iters: int = field(default=750, metadata={"help": "optimizer steps (the default budget: the same model "
                                                         "on any machine, ~4 minutes on 2 CPU cores)"})
    max_seconds: float = field(default=0.0, metadata={"help": "wall-clock budget instead of or besides max_iters; "
                                                              "0 = none"})
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_iters: int = 20
    log_interval: int = 25
    n_eval: int = field(default=500, metadata={"help": "held-out problems for the final greedy accuracy"})
    device: str = "auto"
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (CUDA)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt.pt"})
    init_from: str = field(default="", metadata={"help": "start from this checkpoint's weights and tokenizer "
                                                         "(fine-tuning); its architecture replaces --preset/--model"})
    sft: str = field(default="", metadata={"help": "JSON lines of {prompt, completion}: supervised fine-tuning "
                                                   "with the loss on completion tokens only"})
    seed: int = 1337


def model_args_from(cfg: TrainConfig, vocab_size: int) -> ModelArgs:
    """ModelArgs for the preset, with the tokenizer's vocabulary, the block size and --model overrides."""
    types = {f.name: f.type for f in fields(ModelArgs)}
    overrides = {}
    for item in filter(None, (s.strip() for s in cfg.model.split(","))):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--model: unknown ModelArgs field '{key}'; valid: {', '.join(types)}")
        kind = types[key] if isinstance(types[key], type) else type(getattr(ModelArgs, key))
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    base = ModelArgs.preset(cfg.preset)
    seq = max(cfg.block_size, base.max_seq_len)
    defaults = {"vocab_size": vocab_size, "max_seq_len": seq, "original_seq_len": max(seq, base.original_seq_len)}
    try:
        return ModelArgs.preset(cfg.preset, **{**defaults, **overrides})
    except ValueError as e:
        raise SystemExit(f"invalid model configuration: {e}") from e


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
        raise SystemExit(f"--sft={path}: no such file (make one with `python r1.py coldstart` or "
                         "`python r1.py reject`)")
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

def make_optimizer(model: Transformer, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW (V3 §4.2). Weight decay only on matrices: not on norms, biases or the embedding table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.startswith("cuda"))


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_iters steps, then cosine from lr to lr*min_lr_ratio over progress in [0, 1]."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def peak_flops(device: str) -> tuple[float, str]:
    """Peak FLOP/s to divide by for MFU: a measured fp32 matmul rate on CPU, the dense bf16 spec on a GPU
    (cost.GPUS, with sources). FLOPs per token come from cost.flops_per_token."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} dense bf16 spec {value / 1e12:.0f} TFLOP/s"
        return 0.0, f"{name}: peak unknown (add it to cost.GPUS), MFU not shown"
    if device == "cpu":
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        for _ in range(3):
            a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ b
            n += 1
        rate = n * 2 * 1024 ** 3 / (time.perf_counter() - t0)
        return rate, f"measured fp32 1024x1024 matmul on this CPU: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)"
    return 0.0, f"{device}: peak unknown, MFU not shown"


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
                model(x, y)
            losses.append(model.loss_parts["ce"])
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def heldout_accuracy(model, tok, task, n: int, path: Path) -> float:
    """Greedy accuracy on n held-out problems (never in the corpus), with grpo.py's evaluation, so the
    pretraining and RL figures are measured identically; writes one JSON line per problem to path."""
    records, summary = grpo.evaluate(model, tok, tasks.heldout_problems(task, n, seed=0), max_new_tokens=64)
    grpo.write_jsonl(path, records)
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
# 6. The training loop
# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Run pretraining as configured by argv (or sys.argv); returns a summary dict."""
    cfg = parse_config(TrainConfig, argv, description="Pretrain a DeepSeek-V3-style model (tinyseek).")
    ddp, device = setup_distributed(pick_device(cfg.device))
    out_dir = Path(cfg.out_dir) if Path(cfg.out_dir).is_absolute() else ROOT / cfg.out_dir
    master = ddp.master
    if master:
        print_config(cfg, "train config")
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + ddp.rank)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    # ---- data and model (fresh, or the weights, architecture and tokenizer of --init_from) ----
    if cfg.init_from:
        model, tok = model_from_checkpoint(read_checkpoint(cfg.init_from, hint="python train.py"), device)
        args = model.args
        if cfg.block_size > args.max_seq_len:
            raise SystemExit(f"--block_size={cfg.block_size} exceeds the max_seq_len={args.max_seq_len} of "
                             f"{cfg.init_from}; use --block_size={args.max_seq_len} or less")
        tok, train_data, val_data, desc = load_data(cfg, tok, max_len=cfg.block_size)
    else:
        tok, train_data, val_data, desc = load_data(cfg)
        args = model_args_from(cfg, tok.n_vocab)
        model = Transformer(args).to(device)
    kind = "sft" if cfg.sft else "pretrain"
    optimizer = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed + ddp.rank)     # each rank draws its own batches (sharding)
    step, elapsed_before, metrics, load_history = 0, 0.0, [], []
    ckpt_path = out_dir / "ckpt.pt"
    if cfg.resume:
        ckpt = read_checkpoint(ckpt_path, hint="python train.py")
        if ckpt["model_args"] != args.to_dict():
            diff = {k: (ckpt["model_args"].get(k), v) for k, v in args.to_dict().items()
                    if ckpt["model_args"].get(k) != v}
            raise CheckpointError(f"cannot resume: model arguments differ (checkpoint, now): {diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed_before = ckpt["step"], ckpt["elapsed"]
        gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        metrics = ckpt.get("metrics", [])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    if master:
        c = count_params(args)
        sizes = "" if cfg.sft else f"; {len(train_data):,} train / {len(val_data):,} val tokens"
        print(f"data: {desc}; tokenizer {tok.name} ({tok.n_vocab} tokens){sizes}")
        if cfg.init_from:
            print(f"initialised from {cfg.init_from} (its architecture; --preset and --model are not used)")
        name = f"from {cfg.init_from}" if cfg.init_from else cfg.preset
        print(f"model: {name}, {c['total'] / 1e6:.2f}M parameters ({c['activated'] / 1e6:.2f}M activated per "
              f"token) + {c['mtp'] / 1e6:.2f}M MTP; device {device}" + (f" x {ddp.world_size} ranks" if ddp.enabled else ""))
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp.enabled:
        # MoE: an expert that got no token this step has no gradient, so DDP must allow unused parameters.
        model = DDP(model, device_ids=[ddp.local_rank] if device.startswith("cuda") else None,
                    find_unused_parameters=True)
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    peak, peak_desc = peak_flops(device)
    fpt = flops_per_token(args, cfg.block_size)
    if master:
        print(f"MFU peak: {peak_desc}; {fpt / 1e6:.1f} MFLOPs per token")

    # ---- Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit ----
    stop = {"signal": None}
    def on_signal(signum, frame):
        """Remember the signal; the loop finishes its step, writes a checkpoint and exits."""
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(final_metrics=None):
        """Write out_dir/ckpt.pt atomically (rank 0 only) with everything --resume needs."""
        if not master:
            return
        save_checkpoint(ckpt_path, {
            "model": raw.state_dict(), "model_args": args.to_dict(), "tokenizer": tok.to_dict(),
            "config": asdict(cfg), "kind": kind, "step": step, "elapsed": elapsed,
            "optimizer": optimizer.state_dict(), "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()},
            "metrics": metrics, **({"final": final_metrics} if final_metrics else {})})

    t_start = time.perf_counter()
    elapsed = elapsed_before
    t_log, tokens_since_log = time.perf_counter(), 0
    model.train()
    while True:
        elapsed = elapsed_before + time.perf_counter() - t_start
        progress = max(step / cfg.max_iters, elapsed / cfg.max_seconds if cfg.max_seconds > 0 else 0.0)
        if progress >= 1.0 or stop["signal"] is not None:
            break
        lr = lr_at(progress, step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr

        # ---- forward / backward over grad_accum micro-batches ----
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg, gen, device)
            tokens_since_log += x.numel() * ddp.world_size            # SFT batches vary in length
            sync = not ddp.enabled or micro == cfg.grad_accum - 1
            with ctx, (contextlib.nullcontext() if sync else model.no_sync()):
                _, loss = model(x, y, token_mask=sft_token_mask(y) if cfg.sft else None)
            (loss / cfg.grad_accum).backward()
        parts = raw.loss_parts
        if not math.isfinite(loss.item()):
            print(f"step {step}: loss is {loss.item()}; stopping. The last good checkpoint ({ckpt_path}) is "
                  "untouched. Try a lower --lr or --grad_clip.", file=sys.stderr)
            raise SystemExit(2)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- aux-loss-free balancing: every rank must apply the same bias step, so sum the loads first ----
        load = raw.expert_load()                                   # (moe layers, E) tokens this step
        if ddp.enabled:
            dist.all_reduce(load)
        vio = raw.update_bias(load)                                # MaxVio per layer of this step's load
        step += 1

        if master and (step % cfg.log_interval == 0 or step == 1):
            dt = time.perf_counter() - t_log
            tps = tokens_since_log / dt
            mfu = tps * fpt / (peak * ddp.world_size) if peak else float("nan")
            row = {"step": step, "loss": loss.item(), "ce": parts["ce"], "mtp": parts["mtp"],
                   "balance": parts["balance"], "lr": lr, "grad_norm": float(grad_norm), "tok_per_s": tps,
                   "mfu": mfu, "max_vio": vio.mean().item(), "elapsed": elapsed}
            metrics.append(row)
            load_history.append((step, load.cpu()))
            print(f"step {step:5d} | loss {row['loss']:.4f} (ce {parts['ce']:.4f} mtp {parts['mtp']:.4f} "
                  f"bal {parts['balance']:.2e}) | lr {lr:.2e} | {tps:,.0f} tok/s | MFU {100 * mfu:.2f}% | "
                  f"MaxVio {row['max_vio']:.2f} | {elapsed:.0f}s")
            t_log, tokens_since_log = time.perf_counter(), 0
        if step % cfg.eval_interval == 0:
            losses = estimate_loss(raw, train_data, val_data, cfg, device, ctx)
            if master:
                metrics.append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
                print(f"step {step:5d} | eval: train CE {losses['train']:.4f}, val CE {losses['val']:.4f}")
                checkpoint()

    # ---- the end: final eval, checkpoint, plots ----
    for s, h in old_handlers.items():
        signal.signal(s, h)
    losses = estimate_loss(raw, train_data, val_data, cfg, device, ctx)
    summary = {"step": step, "seconds": round(elapsed, 1), "train_loss": losses["train"],
               "val_loss": losses["val"], "interrupted": stop["signal"] is not None}
    if master:
        metrics.append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
        print(f"done: {step} steps in {elapsed:.0f}s; train CE {losses['train']:.4f}, val CE {losses['val']:.4f}")
        if not cfg.data and stop["signal"] is None and cfg.n_eval > 0:
            eval_path = out_dir / f"eval_{kind}.jsonl"
            acc = heldout_accuracy(raw, tok, corpus_task(cfg), cfg.n_eval, eval_path)
            summary["heldout_accuracy"] = acc
            print(f"greedy accuracy on {cfg.n_eval} held-out problems: {100 * acc:.1f}% (records in {eval_path})")
        checkpoint(summary)
        with open(out_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        plots = plot_run(metrics, load_history, out_dir)
        print(f"wrote {ckpt_path}, {out_dir / 'metrics.jsonl'}, " + ", ".join(str(p) for p in plots))
        if stop["signal"] is not None:
            print("interrupted: resume with `python train.py --resume` (same flags)")
        else:
            print(f"next: python grpo.py --init_from={ckpt_path}   |   python sample.py --out_dir={out_dir}")
    cleanup_distributed(ddp)
    return summary


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
