"""
tinyseek/sample.py -- generate text from a checkpoint: the inference side of DeepSeek-V3.

    python sample.py                                   # out/ckpt.pt, the default arithmetic question
    python sample.py --prompt="FILE:question.txt" --num_samples=4 --temperature=0.8
    python sample.py --speculative                     # MTP drafts, the main model verifies
    python sample.py --compile                         # torch.compile the per-step decoding path

Three ideas are on show here, each a few dozen lines.

1. The latent KV cache (V2 §2.1). A transformer decodes one token at a time, and every new token attends
   to the keys and values of all earlier ones. Recomputing them at every step costs O(T) work per layer
   for the T-th token (O(T^2) for the whole text), so decoders keep them in a cache instead. With standard
   multi-head attention the cache holds 2 * n_h * d_h numbers per token per layer (a key and a value for
   every head); for V3's shape that is 2 * 128 * 128 = 32768 numbers. MLA caches only what the keys and
   values are made *from*: the compressed latent c^KV (d_c = kv_lora_rank = 512) and the small decoupled
   rotary key k^R shared by all heads (d_h^R = 64), 576 numbers, 1.8% of the MHA cache (V2 Table 1:
   "(d_c + d_h^R) l", or 4.5 d_h per layer). Long contexts and large batches then fit into memory, which is
   why MLA was invented.

2. Weight absorption (V2 §2.1.3). A cached latent still has to be up-projected to per-head keys and values
   before attention -- unless the up-projections are folded elsewhere: q^T (W^UK c) = (W^UK^T q)^T c, so
   W^UK moves into the query, and W^UV can be applied after the attention-weighted sum of latents. The
   model then attends over the latent cache directly, like multi-query attention with a single 576-wide
   key head and 512-wide value head. `--attn_impl=naive` keeps the up-projected keys and values in the
   cache instead (same weights, same outputs, much bigger cache), so the two can be compared.

3. Self-speculative decoding with the MTP module (V3 §2.2). V3 trains a Multi-Token Prediction module that
   predicts the token *after* the next one from the trunk's hidden state and the next token's embedding.
   The report notes it can be kept at inference as a draft model: it guesses token n+2 cheaply, and the
   main model checks the guess in the same forward pass that produces token n+1, so an accepted guess is
   a token for free. V3 reports 85-90% acceptance of the second token and 1.8 times the tokens per second (V3
   §5.4.3). The official inference code does not use MTP at all; this file does, with the standard
   speculative-sampling acceptance rule, so the text has exactly the main model's distribution.

Honest notes on what is simplified: speculative decoding runs one sequence at a time and drafts one token
(depth 1); everything runs in float32 by default (bf16 autocast works too); on a CPU and a tiny model, the
timings are dominated by Python and per-call overhead, not by the arithmetic the caches save. Every text is representable: the tokenizers are
byte-level (BPE over UTF-8 bytes), so any character falls back to its bytes; even a lone surrogate, which
has no UTF-8 form, is encoded as U+FFFD rather than raising.
"""

import functools
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, load_model
from cli import (
    DEVICE_CHOICES,
    parse_config,
    pick_device,
    print_config,
    valid_device_name,
)
from model import MLA, ModelArgs, Transformer, kv_cache_numbers_per_token
from tasks import THINK_OPEN, eval_record, format_prompt
from tokenizer import Tokenizer, get_tokenizer

# ----------------------------------------------------------------------------------------------------
# 1. Settings
# ----------------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    """Every flag of `python sample.py`; each field is `--name=value` on the command line."""
    # where the model comes from
    out_dir: str = field(default="out", metadata={"help": "folder with ckpt.pt"})
    init_from: "str | None" = field(default=None, metadata={"help": "checkpoint file; overrides out_dir"})
    # what to generate
    prompt: str = field(default=format_prompt("37+48"), metadata={"help": "prompt text, or FILE:path"})
    bos: bool = field(default=True, metadata={"help": "start the prompt with BOS, as training documents do"})
    num_samples: int = field(default=1, metadata={"help": "continuations to sample (1: streamed as produced)"})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens per sample"})
    stop: str = field(default="</answer>", metadata={"help": "stop after this text (EOS always stops); '' = none"})
    # how to sample
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: "int | None" = field(default=None, metadata={"help": "sample among the k most likely tokens only"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: smallest set with this much probability, (0, 1]"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    # how to decode
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    attn_impl: str = field(default="absorb", metadata={"help": "absorb (latent cache) or naive (per-head k, v)"})
    speculative: bool = field(default=False, metadata={"help": "MTP drafts, the main model verifies"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the per-step decoding path (run_blocks)"})
    interactive: bool = field(default=False, metadata={"help": "chat: a prompt loop that streams answers (/help)"})
    template: str = field(default="auto", metadata={"help": "chat prompt format: auto (from the checkpoint), r1 "
                                                            "(the R1-Zero template) or raw (text continued as is)"})

    def __post_init__(self):
        """Reject values that make no sense, with a message saying what is allowed."""
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p={self.top_p} must be in (0, 1]; 1 disables nucleus sampling")
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature} must be >= 0 (0 means greedy decoding)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"--top_k={self.top_k} must be a positive integer or none")
        for name in ("max_new_tokens", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be at least 1")
        if self.attn_impl not in ("absorb", "naive"):
            raise ValueError(f"--attn_impl={self.attn_impl!r} must be 'absorb' or 'naive'")
        if not valid_device_name(self.device):
            raise ValueError(f"--device={self.device!r} is invalid: choose {DEVICE_CHOICES}")
        if self.prompt.startswith("FILE:") and not Path(self.prompt[len("FILE:"):]).expanduser().is_file():
            raise ValueError(f"--prompt={self.prompt!r} is invalid: that file does not exist (FILE:path reads the "
                             "prompt from a file)")

    def checkpoint_path(self) -> Path:
        """init_from if given, else out_dir/ckpt.pt; a relative path counts from the current folder."""
        return Path(str(self.init_from)) if self.init_from is not None else Path(self.out_dir) / "ckpt.pt"


# ----------------------------------------------------------------------------------------------------
# 2. Prompts
# ----------------------------------------------------------------------------------------------------

def read_prompt(text: str) -> str:
    """The prompt itself, or the contents of `path` for 'FILE:path'. Raises ValueError if unreadable."""
    if not text.startswith("FILE:"):
        return text
    path = Path(text[len("FILE:"):]).expanduser()
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist (--prompt=FILE:path reads the prompt from a file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({e})") from e


def encode_prompt(tok: Tokenizer, text: str, bos: bool = True) -> list[int]:
    """Token ids of the prompt; an empty prompt becomes [BOS] so the model has something to start from."""
    ids = tok.encode(text, bos=bos)   # byte-level: every string has an encoding
    return ids or [tok.bos_id]


def fit_prompt(ids: list[int], max_seq_len: int, max_new_tokens: int) -> list[int]:
    """Keep the prompt's last tokens so that prompt + max_new_tokens fits the model's context.

    Prints a warning on stderr when tokens are dropped; raises ValueError if no prompt token would fit."""
    room = max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of max_seq_len={max_seq_len} tokens; ask for fewer new tokens")
    if len(ids) > room:
        print(f"warning: the prompt has {len(ids)} tokens but only {room} fit before {max_new_tokens} new "
              f"ones (max_seq_len={max_seq_len}); keeping its last {room} tokens", file=sys.stderr)
        ids = ids[-room:]
    return ids


def completion_text(tok: Tokenizer, ids: list[int], stop: str = "") -> tuple[str, bool]:
    """Text of generated ids without the EOS token, cut just after the first `stop` string.

    Returns (text, ended) where ended says whether EOS or the stop string was reached."""
    ended = bool(ids) and ids[-1] == tok.eos_id
    text = tok.decode(ids[:-1] if ended else ids)
    if stop and stop in text:
        text, ended = text[:text.index(stop) + len(stop)], True
    return text, ended


# ----------------------------------------------------------------------------------------------------
# 3. Loading
# ----------------------------------------------------------------------------------------------------

def load(cfg: SampleConfig, device: str) -> tuple[Transformer, Tokenizer]:
    """The checkpoint's model (eval mode, on `device`, with cfg.attn_impl) and tokenizer.

    Raises CheckpointError naming the command that makes a checkpoint when there is none."""
    model, tok, _ = load_model(cfg.checkpoint_path(), device, hint="python train.py", attn_impl=cfg.attn_impl)
    return model, tok


def random_tiny_model(seed: int, device: str, max_seq_len: int = 512,
                      attn_impl: str = "absorb") -> tuple[Transformer, Tokenizer]:
    """An untrained `tiny` preset model with the byte tokenizer, for notebooks and measurements without a checkpoint.

    The context is widened to max_seq_len (default 512) so that 256+ new tokens fit after a prompt; that
    only changes the rotary tables, not a single weight."""
    tok = get_tokenizer("char")
    torch.manual_seed(seed)
    args = ModelArgs.preset("tiny", vocab_size=tok.n_vocab, max_seq_len=max_seq_len, original_seq_len=max_seq_len,
                            attn_impl=attn_impl)
    return Transformer(args).to(device).eval(), tok


@contextmanager
def attention_path(model: Transformer, attn_impl: "str | None"):
    """Temporarily switch every MLA layer (main and MTP blocks) to 'naive' or 'absorb'; None keeps it.

    Both paths use the same weights; only what the cache holds differs (see model.MLA)."""
    layers = [m for m in model.modules() if isinstance(m, MLA)]
    before = [m.attn_impl for m in layers]
    for m in layers:
        m.attn_impl = attn_impl or m.attn_impl
    try:
        yield
    finally:
        for m, impl in zip(layers, before):
            m.attn_impl = impl


def compile_decoding(model: Transformer, **compile_kwargs) -> Transformer:
    """torch.compile the per-step path of decoding, in place: Transformer.run_blocks (embedding and blocks),
    and greedy speculative decoding's two calls, prefill_and_draft and verify_and_draft (kept on the model as
    `model.compiled_rounds`), with dynamic shapes since the cache grows by one
    position per step. The host-side decisions of a step (position, mask, which rows are still running) stay
    in Python around it. On a CPU, inductor's C++ wrapper (cpp_wrapper) launches the generated kernels from
    compiled code instead of from Python, which suits a decoding step of a small model: hundreds of tiny
    kernels. Returns the model.

    A recompile to expect: with dynamic shapes the compiler gives input sizes that happen to be equal one symbol
    ("duck sizing"), so when a cache length at the first compiled call equals an unrelated size among the
    inputs, the two are tied and the next, longer step compiles again. Duck sizing stays on: turning it off
    (torch.fx.experimental._config.use_duck_shape) made every compiled step slower, a cost paid per token
    where the recompile is paid once."""
    inductor = compile_kwargs.get("backend", "inductor") == "inductor"
    if model.embed.weight.device.type == "cpu" and inductor and not {"mode", "options"} & set(compile_kwargs):
        compile_kwargs["options"] = {"cpp_wrapper": True}
    model.run_blocks = torch.compile(model.run_blocks, dynamic=True, **compile_kwargs)
    if model.mtp:   # greedy speculative decoding's two calls (the MTP block inside); sampled drafts stay eager
        model.compiled_rounds = tuple(torch.compile(functools.partial(fn, model), dynamic=True, **compile_kwargs)
                                      for fn in (prefill_and_draft, verify_and_draft))
    model.compiled_decoding = True                   # decode under no_grad: compile cannot take inference tensors
    return model


def current_attn_impl(model: Transformer) -> str:
    """The attention path the model's MLA layers use now ('naive' or 'absorb')."""
    return next(m.attn_impl for m in model.modules() if isinstance(m, MLA))


# ----------------------------------------------------------------------------------------------------
# 4. Decoding: without a cache, and with the (latent or naive) KV cache
# ----------------------------------------------------------------------------------------------------

def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: "int | None" = None,
                   top_p: "float | None" = None) -> torch.Tensor:
    """The distribution decoding draws from: (B, V) logits -> (B, V) probabilities of softmax(logits / T)
    restricted to the top_k tokens and/or the smallest set holding top_p of the mass (one-hot argmax at
    temperature 0). Speculative decoding needs these probabilities themselves, not just a sample."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        remove = sorted_probs.cumsum(-1) - sorted_probs >= top_p          # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: "int | None" = None,
                top_p: "float | None" = None, generator: "torch.Generator | None" = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V): argmax when temperature == 0, else a draw from
    sampling_probs(logits, temperature, top_k, top_p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)              # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def decoding_mode(model: Transformer):
    """The autograd mode decoding runs in: torch.inference_mode (no autograd bookkeeping at all), or no_grad
    once run_blocks is compiled (compile_decoding), since torch.compile cannot take the inference tensors
    that inference_mode creates."""
    return torch.no_grad() if getattr(model, "compiled_decoding", False) else torch.inference_mode()


def decoding(fn):
    """Decorator: run fn(model, ...) under decoding_mode(model), i.e. torch.inference_mode, or no_grad when
    the model's decoding path is compiled. Generator functions are handled as torch's own decorators do: the
    mode holds inside each step only, never in the caller's code between steps."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        """fn wrapped by this model's decoding mode, chosen at call time (compiling may change it)."""
        return decoding_mode(model)(fn)(model, *args, **kwargs)
    return wrapper


@decoding
def generate_uncached(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                      top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
                      generator: "torch.Generator | None" = None) -> list[int]:
    """The baseline: every step runs the whole sequence so far through the model again, no cache.

    Returns the new tokens (ending with eos_id if it was produced). Same sampling as the cached paths."""
    idx = torch.tensor([prompt], dtype=torch.long, device=model.embed.weight.device)   # (1, T)
    out = []
    for _ in range(max_new_tokens):
        logits = model(idx)[0][:, -1]                                   # (1, V): all T positions recomputed
        nxt = sample_next(logits, temperature, top_k, top_p, generator)   # (1,)
        out.append(int(nxt))
        if int(nxt) == eos_id:
            break
        idx = torch.cat([idx, nxt[:, None]], dim=1)                      # (1, T + 1)
    return out


@decoding
def decode_steps(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
                 generator: "torch.Generator | None" = None, drop_finished: bool = True,
                 share_prompts: bool = True) -> Iterator[torch.Tensor]:
    """Decode a batch with the KV cache, yielding the (B,) new tokens of each step as soon as they exist.

    Prompts of different lengths are left-padded to the longest, L tokens, and the padding slots are
    removed from attention (cache.key_mask); RoPE only sees relative positions, so a padded prompt computes
    exactly what it would alone. The prompts go through the model once (prefill); after that every step
    feeds one token per row and reads everything earlier from the cache. Rows that produced eos_id keep
    emitting it; the steps end when every row has, or after max_new_tokens. With drop_finished (default)
    a finished row also leaves the batch (cache.keep_rows), so later steps only compute the rows still
    running; drop_finished=False keeps computing every row, the plain version (same tokens under greedy
    decoding; a sampled row draws from the same distribution, but the random stream is split differently).
    With share_prompts (default) a prompt that occurs several times in the batch -- GRPO samples G
    completions of each question -- is prefilled once, and its cache row and logits are copied to the rows
    that repeat it (prefix sharing); share_prompts=False prefills every row, the plain version (same logits
    up to float rounding). Uses the model's current attention path (see `attention_path`). Raises
    ValueError for an empty prompt.
    """
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token (start empty prompts with BOS)")
    B, L = len(prompts), max(len(p) for p in prompts)
    device = model.embed.weight.device
    pad = eos_id if eos_id is not None else 0
    distinct = {}                                                         # prompt -> its row in the prefill
    source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts] if share_prompts else range(B)
    todo = list(distinct) if share_prompts else prompts                   # the prompts that are prefilled
    idx = torch.full((len(todo), L), pad, dtype=torch.long, device=device)   # (U, L) left-padded prompts
    cache = model.new_cache(len(todo), L + max_new_tokens, current_attn_impl(model))
    for b, p in enumerate(todo):
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        cache.key_mask[b, :L - len(p)] = False                           # padding is never attended to
    logits = model.next_logits(idx, cache)                                # (U, V) prefill: whole prompts
    if len(todo) < B:                                                     # copy each prompt's row to its repeats
        source = torch.tensor(source, device=device)                      # (B,) prefill row of each batch row
        cache.keep_rows(source)
        logits = logits.index_select(0, source)                           # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)               # per cache row
    rows = None                      # which prompt each cache row decodes, once rows have left (None: all)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)    # (b,) one per cache row
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt == eos_id)
        yield nxt if rows is None else torch.full((B,), pad, device=device).index_copy_(0, rows, nxt)
        if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
            return
        if drop_finished and eos_id is not None and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)                          # cache rows still running
            cache.keep_rows(keep)
            rows = keep if rows is None else rows[keep]
            nxt, done = nxt[keep], done[keep]
        logits = model.next_logits(nxt[:, None], cache)                   # (b, V) one new token per row


@decoding
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
                   generator: "torch.Generator | None" = None,
                   attn_impl: "str | None" = None) -> tuple[list[list[int]], list[bool]]:
    """Sample continuations for prompts of different lengths in one batch, with the KV cache.

    Shorter prompts are left-padded and their padding slots masked out of attention (cache.key_mask);
    RoPE only sees relative positions, so a padded prompt computes exactly what it would alone.
    attn_impl ('naive' / 'absorb', None = the model's own) picks the attention path for this call.
    Returns (completions, finished): each completion's new tokens, ending with eos_id if it was produced
    (nothing after it), and whether it ended with eos_id before max_new_tokens ran out.
    """
    with attention_path(model, attn_impl):
        steps = list(decode_steps(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, generator))
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]   # (B, new)
    completions, finished = [], []
    for row in rows:
        if eos_id is not None and eos_id in row:
            completions.append(row[:row.index(eos_id) + 1])
            finished.append(True)
        else:
            completions.append(row)
            finished.append(False)
    return completions, finished


def stream(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
           generator: "torch.Generator | None" = None) -> Iterator[int]:
    """One sequence with the KV cache, yielding each new token id as soon as it is sampled."""
    for nxt in decode_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p, eos_id, generator):
        yield int(nxt[0])


# ----------------------------------------------------------------------------------------------------
# 5. Speculative decoding with the MTP module as the draft model
# ----------------------------------------------------------------------------------------------------
# Notation: x_0 .. x_m are the tokens so far, x_m the newest one, not yet fed to the trunk. h_i is the
# trunk's last hidden state at position i (h^0 in V3 eq. 21); the head turns h_i into a distribution for
# x_{i+1}, and MTP module 1 turns (h_i, Emb(x_{i+1})) into a guess for x_{i+2}. One round:
#
#   draft:   MTP(h_{m-1}, x_m)           -> q, a distribution for x_{m+1}; sample the draft d ~ q
#   verify:  trunk([x_m, d]) in ONE call -> p at position m (for x_{m+1}) and p' at m+1 (for x_{m+2})
#   accept d with probability min(1, p(d) / q(d))  -> keep d, and sample x_{m+2} ~ p' for free
#   reject                                          -> x_{m+1} ~ norm(max(0, p - q)), drop position m+1
#
# This rule (Leviathan et al. 2023; Chen et al. 2023) makes x_{m+1} distributed exactly as p: P(x) =
# min(q(x), p(x)) + (1 - sum_y min(q(y), p(y))) * norm(max(0, p - q))(x) = p(x). Greedy decoding is the
# special case of one-hot p and q: d is kept iff it is the main model's argmax, so the text is identical to
# plain greedy decoding, only produced in fewer main-model calls.
#
# The two caches and the rollback. cache.pos counts positions written to the main layers, cache.mtp_pos
# those written to the MTP block. Invariant at the top of each round: the main cache holds positions
# 0..m-1 (pos = m); the MTP cache holds 0..mtp_pos-1, and `pending` keeps h at positions mtp_pos..m-1
# (one or two of them), whose MTP inputs were not final yet when they were computed.
#   - draft feeds `pending` with the tokens one step after them, x_{mtp_pos+1}..x_m: all accepted, so the
#     MTP cache only ever holds positions whose h and next token are final. mtp_pos becomes m.
#   - verify writes positions m (x_m) and m+1 (d) to the main cache; pos becomes m+2.
#   - accepted: both positions are right; pending = [h_m, h_{m+1}]; the next round starts at m+2.
#   - rejected: slot m+1 holds the wrong token d, so set pos back to m+1 (the stale slot is simply
#     overwritten next round and never attended to before that); pending = [h_m]; next round at m+1.
#
# Greedy decoding needs no random draw between verify and draft, so it runs a round as one call
# (verify_and_draft below): the trunk verifies [x_m, d] and picks x_{m+1}, x_{m+2}; in the same call the
# MTP block drafts from positions m and m+1 with those picks as inputs. Position m's input is final either
# way; position m+1's only if d is kept, and rolling the positions back to m+1 drops it otherwise, exactly
# like the main cache's slot. The prompt and the first draft are one call too (prefill_and_draft). One call
# per round instead of two: a compiled round pays dynamo's per-call guard check and the host work around it
# once (bench row 4b and docs/results_history.md give the measured effect).

@dataclass
class SpecStats:
    """Counters of one or more speculative runs."""
    drafts: int = 0          # tokens the MTP module proposed
    accepted: int = 0        # ... of which the main model kept
    forwards: int = 0        # main-model calls (prefill included); plain decoding needs one per token
    tokens: int = 0          # tokens returned

    @property
    def acceptance(self) -> float:
        """Accepted drafts / drafts (0 when nothing was drafted)."""
        return self.accepted / max(self.drafts, 1)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model call: 1 for plain decoding, up to 2 with one draft token."""
        return self.tokens / max(self.forwards, 1)


def verify_draft(p: torch.Tensor, q: torch.Tensor, draft: int,
                 generator: "torch.Generator | None" = None) -> tuple[int, bool]:
    """The speculative-sampling rule for one position: keep `draft` (drawn from q) or replace it.

    p, q (V,): the main model's and the draft model's distributions. Returns (token, accepted); the token
    is distributed exactly as p whatever q is."""
    u = torch.rand((), device=p.device, generator=generator)
    if u < p[draft] / q[draft]:                                             # prob min(1, p(d)/q(d))
        return draft, True
    residual = (p - q).clamp(min=0)                                        # where p has mass q lacks
    if residual.sum() <= 0:                                                # p == q up to rounding
        residual = p
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator)), False


@decoding
def speculative_stream(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                       top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
                       generator: "torch.Generator | None" = None,
                       stats: "SpecStats | None" = None, fused: bool = True) -> Iterator[int]:
    """Self-speculative decoding of one sequence: MTP module 1 drafts, the main model verifies.

    Yields each new token id as soon as it is final; updates `stats` (a SpecStats) if given. Stops after
    max_new_tokens tokens or eos_id. Uses the model's current attention path. Greedy decoding (temperature
    0) runs each round as one call, verify_and_draft, unless fused=False; fused=False, and any
    sampling, runs the plain version: a draft call (mtp_draft) and a verify call (trunk) per round. Both
    give the same tokens and counts. Raises ValueError if the model has no MTP module or the prompt is
    empty."""
    if len(model.mtp) == 0:
        raise ValueError("speculative decoding drafts with the MTP module, but this model has mtp_depth=0")
    if not prompt:
        raise ValueError("the prompt needs at least one token (start empty prompts with BOS)")
    stats = stats if stats is not None else SpecStats()
    device = model.embed.weight.device

    def probs(logits):                                                     # (N, V) -> (N, V)
        """The distribution this call samples from (temperature, top_k, top_p applied)."""
        return sampling_probs(logits, temperature, top_k, top_p)

    def sample(dist):                                                      # (V,) -> one token id
        """One draw from a probability vector, with this call's generator."""
        return int(torch.multinomial(dist, 1, generator=generator))

    greedy = temperature == 0       # one-hot p and q: the rule below reduces to comparing argmaxes

    cache = model.new_cache(1, len(prompt) + max_new_tokens, current_attn_impl(model))
    if greedy and fused:
        yield from _fused_greedy(model, prompt, cache, max_new_tokens, eos_id, stats)
        return
    h = model.trunk(torch.tensor([prompt], device=device), cache)         # (1, P, D) h^0 of every prompt position
    last = model.head(model.norm(h[:, -1])).float()                       # (1, V)
    x = prompt + [int(last.argmax()) if greedy else sample(probs(last)[0])]   # x_P from the prefill
    stats.forwards += 1
    stats.tokens += 1
    yield x[-1]
    yield from _emit(_two_call_rounds(model, x, h, cache, greedy, probs, sample, generator), x, stats, eos_id,
                     max_new_tokens)


def _two_call_rounds(model: Transformer, x: list[int], h: torch.Tensor, cache, greedy: bool, probs, sample,
                     generator) -> Iterator[tuple[list[int], bool]]:
    """speculative_stream's rounds as two calls each, a draft (mtp_draft) and a verify (trunk), after the
    prefill: x holds the prompt and x_P (the caller appends each round's tokens), h (1, P, D) the prompt's h^0.
    Yields (the round's new tokens, whether the draft was kept)."""
    device = model.embed.weight.device
    pending = h                                                           # h at positions mtp_pos .. pos-1
    while True:
        m = cache.pos                                                     # position of x_m = x[-1]
        # draft: the MTP block sees the pending positions and, for each, the token one step later
        ahead = torch.tensor([x[cache.mtp_pos + 1:m + 1]], device=device)        # (1, len(pending))
        q_logits = model.mtp_draft(pending, ahead, cache)[:, -1]           # (1, V) for x_{m+1}; mtp_pos = m
        if greedy:
            draft = int(q_logits.argmax())
        else:
            q = probs(q_logits)[0]                                         # (V,)
            draft = sample(q)
        # verify: x_m and the draft in one main-model call, positions m and m+1
        h2 = model.trunk(torch.tensor([[x[m], draft]], device=device), cache)    # (1, 2, D); pos = m + 2
        p_logits = model.head(model.norm(h2)).float()[0]                   # (2, V) for x_{m+1}, x_{m+2}
        if greedy:
            # verify_draft with one-hot p and q keeps d iff p's argmax is d, else returns p's argmax
            token, bonus = p_logits.argmax(-1).tolist()
            accepted = token == draft
        else:
            p = probs(p_logits)                                            # (2, V)
            token, accepted = verify_draft(p[0], q, draft, generator)
            bonus = sample(p[1]) if accepted else None                     # the bonus token x_{m+2}
        if accepted:
            new, pending = [draft, bonus], h2
        else:
            new, pending = [token], h2[:, :1]                              # h_m is still right ...
            cache.pos = m + 1                                              # ... slot m+1 (the draft) is not
        yield new, accepted


def _emit(rounds: Iterator[tuple[list[int], bool]], x: list[int], stats: SpecStats, eos_id: "int | None",
          max_new_tokens: int) -> Iterator[int]:
    """Speculative rounds -> tokens, after x_P: count each round in stats, append its tokens to x and yield
    them one at a time; stop (closing `rounds`) after eos_id or the max_new_tokens-th new token."""
    n_new = 1                                                             # x_P, already yielded
    if n_new == max_new_tokens or x[-1] == eos_id:
        return
    for new, accepted in rounds:
        stats.forwards += 1
        stats.drafts += 1
        stats.accepted += accepted
        for t in new:
            x.append(t)
            n_new += 1
            stats.tokens += 1
            yield t
            if t == eos_id or n_new == max_new_tokens:
                return


def prefill_and_draft(model: Transformer, idx: torch.Tensor, layer_caches: list, mtp_cache: dict,
                      mask: "torch.Tensor | None") -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy self-speculative decoding's first call: the prompt and the first draft in one call.

    idx (B, P), the prompt at positions 0..P-1, goes through the trunk, whose last position picks the
    greedy x_P; MTP module 1 then reads every prompt position with the token one step later (x_1 .. x_P),
    and its last position drafts x_{P+1}. Writes positions 0..P-1 of the main and the MTP caches; the
    caller sets cache.pos and cache.mtp_pos to P. Returns (x_P (B,), q logits (B, V) of the first draft)."""
    h = model.run_blocks(idx, layer_caches, 0, mask)                     # (B, P, D)
    nxt = model.head(model.norm(h[:, -1])).float().argmax(-1)            # (B,) x_P
    ahead = torch.cat([idx[:, 1:], nxt[:, None]], dim=1)                 # (B, P) x_1 .. x_P
    return nxt, model.run_mtp(h, ahead, mtp_cache, 0, mask)[:, -1]       # (B,), (B, V)


def verify_and_draft(model: Transformer, pair: torch.Tensor, layer_caches: list, mtp_cache: dict, start: int,
                     mask: "torch.Tensor | None") -> tuple[torch.Tensor, torch.Tensor]:
    """One round of greedy self-speculative decoding in one call: verify a draft and draft the next round.

    pair (B, 2) = [x_m, d], the newest token and the draft, at positions start = m and m + 1. The trunk
    verifies both (h_m, h_{m+1}) and picks the greedy tokens after them, picks (B, 2) = [x_{m+1}, x_{m+2}];
    d is right iff picks[:, 0] == d. MTP module 1 then drafts from both positions at once with the
    picked tokens as its inputs, so one of its two outputs is the next round's draft whatever the
    verdict: q[:, 0] from (h_m, x_{m+1}), the draft for x_{m+2} if d is rejected, and q[:, 1] from
    (h_{m+1}, x_{m+2}), the draft for x_{m+3} if d is kept. Writes positions m, m+1 of the main and the MTP
    caches; the caller sets cache.pos and cache.mtp_pos to m + 1 (reject) or m + 2 (accept). Returns
    (picks (B, 2), q logits (B, 2, V)). Same tokens as mtp_draft + trunk, in one call instead of two."""
    h = model.run_blocks(pair, layer_caches, start, mask)                # (B, 2, D) h_m, h_{m+1}
    picks = model.head(model.norm(h)).float().argmax(-1)                 # (B, 2) x_{m+1}, x_{m+2}
    return picks, model.run_mtp(h, picks, mtp_cache, start, mask)       # (B, 2), (B, 2, V)


def _round_calls(model: Transformer) -> tuple:
    """(prefill_and_draft, verify_and_draft) bound to model: their compiled forms after compile_decoding."""
    return getattr(model, "compiled_rounds", None) or (functools.partial(prefill_and_draft, model),
                                                       functools.partial(verify_and_draft, model))


def _fused_greedy(model: Transformer, prompt: list[int], cache, max_new_tokens: int, eos_id: "int | None",
                  stats: SpecStats) -> Iterator[int]:
    """speculative_stream's greedy path, one model call per round: prefill_and_draft for the prompt and the
    first draft, then verify_and_draft for each round (their compiled forms after compile_decoding). Yields the
    new tokens, counting them in stats; cache is empty and holds prompt + max_new_tokens positions."""
    device = model.embed.weight.device
    P = len(prompt)
    prefill, _ = _round_calls(model)
    nxt, q = prefill(torch.tensor([prompt], device=device), cache.layers, cache.mtp_layers[0],
                     cache.attn_mask(0, P))                               # x_P (1,), first draft's logits (1, V)
    cache.pos = cache.mtp_pos = P
    x = prompt + [int(nxt[0])]
    stats.forwards += 1
    stats.tokens += 1
    yield x[-1]
    yield from _emit(_fused_rounds(model, x, int(q[0].argmax()), cache), x, stats, eos_id, max_new_tokens)


def _fused_rounds(model: Transformer, x: list[int], draft: int, cache) -> Iterator[tuple[list[int], bool]]:
    """The greedy rounds of _fused_greedy, one verify_and_draft call each: x holds the prompt and x_P (the
    caller appends each round's tokens), draft is the first draft. Yields (new tokens, draft kept)."""
    device = model.embed.weight.device
    _, verify = _round_calls(model)
    while True:
        m = cache.pos                                                     # position of x_m = x[-1]
        pair = torch.tensor([[x[m], draft]], device=device)               # (1, 2) positions m, m+1
        picks, q = verify(pair, cache.layers, cache.mtp_layers[0], m, cache.attn_mask(m, 2))
        token, bonus = picks[0].tolist()                                  # the main model's x_{m+1}, x_{m+2}
        guesses = q[0].argmax(-1).tolist()                                # next draft after a reject / an accept
        accepted = token == draft
        new, draft = ([draft, bonus], guesses[1]) if accepted else ([token], guesses[0])
        cache.pos = cache.mtp_pos = m + len(new)                          # a rejected slot m+1 is overwritten
        yield new, accepted


def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                         top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
                         generator: "torch.Generator | None" = None,
                         fused: bool = True) -> tuple[list[int], SpecStats]:
    """speculative_stream collected: (new tokens, SpecStats)."""
    stats = SpecStats()
    out = list(speculative_stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, generator,
                                  stats, fused))
    return out, stats


# ----------------------------------------------------------------------------------------------------
# 6. Held-out evaluation: greedy answers to questions never seen in training, checked by tasks.py's rules
# ----------------------------------------------------------------------------------------------------
# train.py (after pretraining), grpo.py (before, during and after RL) and the R1 recipe all measure with
# this one function, so their accuracy figures are comparable.

def prompt_tokens(tok: Tokenizer, question: str) -> list[int]:
    """[BOS] + the R1-Zero prompt, ending right after <think>, exactly as pretraining documents begin."""
    return [tok.bos_id] + tok.encode(format_prompt(question))


@torch.no_grad()
def evaluate(model: Transformer, tok: Tokenizer, problems: list, max_new_tokens: int, batch_size: int = 250,
             step: "int | None" = None) -> tuple[list[dict], dict]:
    """Greedy completions (temperature 0) for held-out problems, verified by tasks.eval_record.

    Returns (records, summary): one JSON-ready dict per problem with question, completion, answer,
    correct plus predicted, format, finished and step; summary has accuracy, format and
    length (mean completion tokens) and n.
    """
    model.eval()
    records, lengths = [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        comps, fins = generate_batch(model, [prompt_tokens(tok, p.question) for p in chunk], max_new_tokens,
                                     temperature=0.0, eos_id=tok.eos_id)
        for p, c, f in zip(chunk, comps, fins):
            records.append({**eval_record(p, completion_text(tok, c)[0]), "finished": f, "step": step})
            lengths.append(len(c))
    n = max(1, len(records))
    summary = {"accuracy": sum(r["correct"] for r in records) / n, "format": sum(r["format"] for r in records) / n,
               "length": sum(lengths) / n, "n": len(records)}
    return records, summary


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (arXiv 2107.03374, eq. 1) from n samples of which c are right.

    pass@k = 1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, hold
    at least one right one. The ratio of binomials is computed as prod_{i=n-c+1}^{n} (1 - k / i), which
    never forms the huge binomials themselves (stable for any n). Requires 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:                                    # every k-subset holds a right sample
        return 1.0
    prob_none = 1.0
    for i in range(n - c + 1, n + 1):
        prob_none *= 1.0 - k / i
    return 1.0 - prob_none


def evaluate_pass_at_k(model: Transformer, tok: Tokenizer, problems: list, max_new_tokens: int, n_samples: int,
                       ks: "tuple[int, ...]" = (1, 8, 64), temperature: float = 1.0, batch_size: int = 512,
                       generator: "torch.Generator | None" = None, groups: "dict | None" = None) -> dict:
    """pass@k on held-out problems: n_samples sampled completions per problem, verified by tasks.eval_record.

    Each problem's c right answers out of n give pass_at_k(n, c, k) for every k in `ks` (k <= n_samples);
    the summary averages them over all problems and over each subset in `groups` (name -> one bool per
    problem, e.g. the flaw-situation questions). Returns {"n_samples", "temperature", "correct": [c per
    problem], "all": {"n", "pass@k": {k: value}}, <group name>: {...}}. Sampling, not greedy: pass@1 here is
    the mean sampled accuracy, which can differ from the greedy accuracy of `evaluate`.
    """
    bad = [k for k in ks if not 1 <= k <= n_samples]
    if bad:
        raise ValueError(f"every k must be in [1, n_samples={n_samples}], got {bad}; raise n_samples or drop k")
    model.eval()
    prompts = [prompt_tokens(tok, p.question) for p in problems for _ in range(n_samples)]  # problem-major
    right = []
    for i in range(0, len(prompts), batch_size):
        comps, _ = generate_batch(model, prompts[i:i + batch_size], max_new_tokens, temperature=temperature,
                                  eos_id=tok.eos_id, generator=generator)
        for j, c in enumerate(comps):
            right.append(eval_record(problems[(i + j) // n_samples], completion_text(tok, c)[0])["correct"])
    correct = [sum(right[q * n_samples:(q + 1) * n_samples]) for q in range(len(problems))]

    def summarise(keep: list) -> dict:
        """Mean pass@k over the problems where keep is True."""
        cs = [c for c, kept in zip(correct, keep) if kept]
        return {"n": len(cs), "pass@k": {k: sum(pass_at_k(n_samples, c, k) for c in cs) / max(1, len(cs))
                                          for k in ks}}

    out = {"n_samples": n_samples, "temperature": temperature, "correct": correct,
           "all": summarise([True] * len(problems))}
    for name, keep in (groups or {}).items():
        out[name] = summarise(list(keep))
    return out


# ----------------------------------------------------------------------------------------------------
# 7. Cache sizes (decoding speed is measured side by side by `python -m extras.bench`, rows 1b, 4b, 8b)
# ----------------------------------------------------------------------------------------------------

def cache_sizes(model: Transformer, max_len: int) -> dict:
    """KV-cache bytes measured from real KVCache tensors (batch 1, max_len tokens) for both MLA paths,
    next to a standard MHA with the same heads, which is computed (2 n_h d_h numbers) since it has no
    implementation here. Per token per layer, and in total for all max_len tokens and all layers."""
    a = model.args
    absorb, naive = model.new_cache(1, max_len, "absorb"), model.new_cache(1, max_len, "naive")
    n_cached_layers = a.n_layers + a.mtp_depth
    elem = absorb.stored(absorb.layers[0])[0].element_size()
    mha = kv_cache_numbers_per_token(a)["mha"] * elem
    return {
        "per_token_per_layer": {"absorb": absorb.bytes_per_token_per_layer(),
                                "naive": naive.bytes_per_token_per_layer(), "mha_computed": mha},
        # the same figure read off the whole allocation, as a cross-check
        "per_token_per_layer_from_total": {"absorb": absorb.total_bytes() / (max_len * n_cached_layers),
                                           "naive": naive.total_bytes() / (max_len * n_cached_layers)},
        "total": {"absorb": absorb.total_bytes(), "naive": naive.total_bytes(),
                  "mha_computed": mha * max_len * n_cached_layers},
        "max_len": max_len,
        "layers": n_cached_layers,
    }


# ----------------------------------------------------------------------------------------------------
# 7b. Chat: `python sample.py --interactive`
# ----------------------------------------------------------------------------------------------------
# A prompt loop around the same streaming decoders: every question is a fresh prompt (no history; the
# models here were trained on single questions or plain text), and the answer is printed token by token.
# Settings change between questions with slash commands. Ctrl-C stops the answer being written and
# returns to the prompt; Ctrl-D (end of input) or /quit leaves.

CHAT_HELP = ("commands: /temperature T (0 = greedy) | /top_k K or none | /top_p P | /max_new_tokens N | "
             "/speculative on|off | /template r1|raw | /settings | /help | /quit (or Ctrl-D); "
             "Ctrl-C stops an answer")


def chat_template(ckpt: dict) -> tuple[str, str]:
    """('r1' or 'raw', why): which prompt format the checkpoint's model was trained on.

    Reasoning checkpoints (GRPO, SFT on worked solutions, pretraining on the built-in arithmetic corpus,
    whose documents all start with the R1-Zero prompt) get tasks.format_prompt around the question; a model
    pretrained on a text file (--data) just continues the text it is given (without BOS, as in training)."""
    kind, data = ckpt.get("kind", "?"), (ckpt.get("config") or {}).get("data", "")
    if kind in ("grpo", "sft"):
        return "r1", f"a {kind} checkpoint"
    if kind == "pretrain" and not data:
        return "r1", "pretrained on the built-in arithmetic corpus"
    if kind == "pretrain":
        return "raw", f"pretrained on the text file {data}"
    return "raw", f"a checkpoint of kind {kind!r}"


def chat_command(line: str, cfg: SampleConfig, model: Transformer) -> "tuple[SampleConfig, str] | None":
    """Apply one slash command to the settings: (new settings, message to print), or None for /quit.

    Invalid commands or values leave the settings unchanged and return a one-line explanation."""
    name, _, value = line[1:].strip().partition(" ")
    value = value.strip()
    if name in ("quit", "exit", "q"):
        return None
    if name == "help":
        return cfg, CHAT_HELP
    if name == "settings":
        return cfg, chat_settings(cfg)
    if name == "speculative" and value in ("on", "off"):
        if value == "on" and len(model.mtp) == 0:
            return cfg, "this checkpoint has no MTP module (mtp_depth=0), so speculative decoding is unavailable"
        new = replace(cfg, speculative=value == "on")
    elif name == "template" and value in ("r1", "raw"):
        new = replace(cfg, template=value)
    elif name in ("temperature", "top_p", "top_k", "max_new_tokens") and value:
        kind = float if name in ("temperature", "top_p") else int
        try:
            parsed = None if name == "top_k" and value.lower() == "none" else kind(value)
            new = replace(cfg, **{name: parsed})              # SampleConfig checks the range
        except ValueError as e:
            reason = str(e).split(" ", 1)[1] if str(e).startswith("--") else f"expects {kind.__name__}"
            return cfg, f"/{name} {value}: {reason}; e.g. {CHAT_EXAMPLES[name]}"
    else:
        return cfg, f"unknown command or value: {line.strip()!r}; {CHAT_HELP}"
    return new, chat_settings(new)


CHAT_EXAMPLES = {"temperature": "/temperature 0.7", "top_p": "/top_p 0.9", "top_k": "/top_k 10 or /top_k none",
                 "max_new_tokens": "/max_new_tokens 64"}


def chat_settings(cfg: SampleConfig) -> str:
    """The sampling settings in effect, on one line."""
    return (f"settings: template={cfg.template} temperature={cfg.temperature} top_k={cfg.top_k} "
            f"top_p={cfg.top_p} max_new_tokens={cfg.max_new_tokens} "
            f"speculative={'on' if cfg.speculative else 'off'}")


def chat_answer(model: Transformer, tok: Tokenizer, question: str, cfg: SampleConfig,
                gen: torch.Generator, interrupted: "Callable[[], bool] | None" = None) -> None:
    """Stream one answer to `question` under the current settings, then a line with its speed.
    `interrupted()` turning true (Ctrl-C, see ChatInterrupt) stops it with KeyboardInterrupt before the next token."""
    if cfg.template == "r1":                               # the answer starts inside the template's <think>
        prompt, stop, shown = prompt_tokens(tok, question), cfg.stop, THINK_OPEN
    else:                                                  # text files are trained on without BOS
        prompt, stop, shown = encode_prompt(tok, question, bos=False), "", question
    prompt = fit_prompt(prompt, model.args.max_seq_len, cfg.max_new_tokens)
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "eos_id": tok.eos_id,
                "generator": gen}
    stats, t0 = SpecStats(), time.perf_counter()
    tokens = (speculative_stream(model, prompt, cfg.max_new_tokens, stats=stats, **sampling)
              if cfg.speculative else stream(model, prompt, cfg.max_new_tokens, **sampling))
    print(shown, end="", flush=True)
    n = len(print_stream(tokens, tok, stop, interrupted))
    seconds = time.perf_counter() - t0
    spec = f", {stats.acceptance:.0%} of MTP drafts accepted" if cfg.speculative else ""
    print(f"[{n} tokens, {n / seconds:.1f} tokens/s{spec}]", flush=True)


class ChatInterrupt:
    """The chat's SIGINT handler. At the prompt it raises KeyboardInterrupt, which ends the blocking input();
    while an answer streams it only sets `requested`, which the token loop (print_stream) reads before each
    token, so the answer always stops there.

    Why not let Ctrl-C raise KeyboardInterrupt during an answer too: the exception is raised in whatever
    Python code runs when the signal is handled, and when that is a finaliser (a __del__ or a weakref callback
    run by the garbage collector), the interpreter prints "Exception ignored in ..." and drops it, so the
    answer went on as if no key had been pressed."""

    def __init__(self):
        self.at_prompt = False
        self.requested = False

    def __call__(self, signum, frame):
        """Raise at the prompt; otherwise remember the request for the token loop."""
        if self.at_prompt:
            raise KeyboardInterrupt
        self.requested = True


def chat(cfg: SampleConfig) -> int:
    """The prompt loop of `python sample.py --interactive`: read a line, answer it or run a /command.

    Returns the exit status: 0 after /quit or end of input, 1 if the checkpoint cannot be loaded."""
    try:
        import readline  # noqa: F401  (arrow keys and history for input() in a terminal, where available)
    except ImportError:
        pass
    if cfg.template not in ("auto", "r1", "raw"):
        print(f"error: --template={cfg.template!r} must be auto, r1 or raw", file=sys.stderr)
        return 1
    # Ctrl-C raises KeyboardInterrupt (below: it stops an answer), also where this process was started with
    # SIGINT ignored, as a shell does for a job it puts in the background, which Python then leaves ignored.
    # Whatever handler was there before is given back when the chat ends, on every path.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        device = pick_device(cfg.device)
        try:
            model, tok, ckpt = load_model(cfg.checkpoint_path(), device, hint="python train.py",
                                          attn_impl=cfg.attn_impl)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        template, why = chat_template(ckpt)
        if cfg.template != "auto":
            template, why = cfg.template, f"--template={cfg.template}"
        cfg = replace(cfg, template=template, speculative=cfg.speculative and len(model.mtp) > 0)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        print(f"tinyseek chat: {model.args.n_layers} layers, dim {model.args.dim}, device {device}; {why}, so "
              f"{'questions get the R1-Zero prompt' if template == 'r1' else 'your text is continued as is'}\n"
              f"{chat_settings(cfg)}\n{CHAT_HELP}", flush=True)
        interrupt = ChatInterrupt()
        signal.signal(signal.SIGINT, interrupt)
        return chat_loop(cfg, model, tok, gen, interrupt)
    finally:
        signal.signal(signal.SIGINT, previous)


def chat_loop(cfg: SampleConfig, model: Transformer, tok: Tokenizer, gen: torch.Generator,
              interrupt: ChatInterrupt) -> int:
    """Read a line, answer it or run a /command, until /quit or end of input (returns 0)."""
    while True:
        interrupt.at_prompt = True
        try:
            line = input("> ")
        except EOFError:                                   # end of input: Ctrl-D, or the end of a piped file
            print("\nbye")
            return 0
        except KeyboardInterrupt:                          # Ctrl-C at the prompt: say how to leave
            print("\n(/quit or Ctrl-D leaves)", flush=True)
            continue
        finally:
            interrupt.at_prompt = False
        interrupt.requested = False
        try:
            if line.startswith("/"):
                result = chat_command(line, cfg, model)
                if result is None:
                    print("bye")
                    return 0
                cfg, message = result
                print(message, flush=True)
            elif line.strip():
                chat_answer(model, tok, line.strip() if cfg.template == "r1" else line, cfg, gen,
                            lambda: interrupt.requested)
        except KeyboardInterrupt:                          # Ctrl-C during an answer: drop it, keep chatting
            print("\n[stopped]", flush=True)
        except ValueError as e:                            # e.g. max_new_tokens leaves no room for the prompt
            print(f"error: {e}", flush=True)


# ----------------------------------------------------------------------------------------------------
# 8. Main
# ----------------------------------------------------------------------------------------------------

def print_stream(tokens: Iterable[int], tok: Tokenizer, stop: str,
                 interrupted: "Callable[[], bool] | None" = None) -> list[int]:
    """Print tokens as text while they arrive; stop after EOS or the stop string. Returns the ids used.

    Every step decodes all new ids and prints the part not shown yet; trailing U+FFFD is held back, since
    it may be the first bytes of a multi-byte character whose remaining bytes are still to come. When
    `interrupted()` is true before a token, KeyboardInterrupt is raised here, in the loop itself."""
    ids, shown = [], ""
    for t in tokens:
        if interrupted is not None and interrupted():
            raise KeyboardInterrupt
        ids.append(t)
        text, ended = completion_text(tok, ids, stop)
        safe = text if ended else text.rstrip("\ufffd")
        if safe.startswith(shown):
            print(safe[len(shown):], end="", flush=True)
            shown = safe
        if ended:
            break
    text, _ = completion_text(tok, ids, stop)
    print(text[len(shown):] if text.startswith(shown) else "", flush=True)
    return ids


def main(argv: "list[str] | None" = None) -> int:
    """Parse flags, load the checkpoint, then generate (streaming for one sample, batched for several)."""
    cfg = parse_config(SampleConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.interactive:
        return chat(cfg)
    print_config(cfg, "sample")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    try:
        model, tok = load(cfg, device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model: {model.args.n_layers} layers, dim {model.args.dim}, {cfg.attn_impl} attention, "
          f"context {model.args.max_seq_len}, device {device}")
    if cfg.compile:
        compile_decoding(model)
    try:
        prompt = fit_prompt(encode_prompt(tok, read_prompt(cfg.prompt), cfg.bos), model.args.max_seq_len,
                            cfg.max_new_tokens)
        if cfg.speculative and len(model.mtp) == 0:
            raise ValueError("--speculative needs an MTP module, but this checkpoint has mtp_depth=0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.compile:
        # compile outside the timed run: the first steps of a decode with the same shapes (the cache's length,
        # prompt + max_new_tokens, is part of them) and the same path (greedy speculation compiles its fused
        # round, sampled speculation a two-token verify call)
        t0 = time.perf_counter()
        steps = (speculative_stream(model, prompt, cfg.max_new_tokens, cfg.temperature) if cfg.speculative else
                 decode_steps(model, [prompt] * (1 if cfg.num_samples == 1 else cfg.num_samples),
                              cfg.max_new_tokens, 0.0))
        for _ in zip(range(3), steps):                # prefill and two steps (a verify when speculative)
            pass
        steps.close()
        print(f"compiled the decoding step in {time.perf_counter() - t0:.1f} s")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "eos_id": tok.eos_id,
                "generator": gen}
    prompt_text = tok.decode([t for t in prompt if t != tok.bos_id])
    stats, n_tokens, t0 = SpecStats(), 0, time.perf_counter()
    if cfg.num_samples == 1 or cfg.speculative:
        # one sequence at a time, printed as it is produced
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"---- sample {i + 1} ----")
            print(prompt_text, end="", flush=True)
            tokens = (speculative_stream(model, prompt, cfg.max_new_tokens, stats=stats, **sampling)
                      if cfg.speculative else stream(model, prompt, cfg.max_new_tokens, **sampling))
            n_tokens += len(print_stream(tokens, tok, cfg.stop))
    else:
        # a batch of samples of the same prompt, printed when all are done
        completions, _ = generate_batch(model, [prompt] * cfg.num_samples, cfg.max_new_tokens, **sampling)
        for i, ids in enumerate(completions):
            print(f"---- sample {i + 1} ----\n{prompt_text}{completion_text(tok, ids, cfg.stop)[0]}")
            n_tokens += len(ids)
    seconds = time.perf_counter() - t0
    print(f"---- {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s) ----")
    if cfg.speculative:
        print(f"speculative: {stats.acceptance:.1%} of {stats.drafts} MTP drafts accepted, "
              f"{stats.tokens_per_forward:.2f} tokens per main-model call")
    else:
        print("next: --speculative drafts with the MTP module; `python -m extras.bench --only=1,4` measures "
              "decoding speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
