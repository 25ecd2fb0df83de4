"""
tinyseek/extras/hf.py -- convert between tinyseek checkpoints and Hugging Face DeepseekV3 checkpoints.

    python -m extras.hf export --ckpt=out/ckpt.pt --out=hf_out            # tinyseek -> HF folder
    python -m extras.hf export --ckpt=out/ckpt.pt --out=hf_out --verify   # ... and compare logits with transformers
    python -m extras.hf import --hf_dir=hf_out --out=out_hf/ckpt.pt       # HF folder -> tinyseek checkpoint
    python sample.py --init_from=out_hf/ckpt.pt                    # then sample from it as usual

An exported folder opens with `transformers.AutoModelForCausalLM.from_pretrained(folder)` (and so with the tools
built on the same format). The strongest test an educational implementation can pass is that an independent
implementation, fed the same weights, computes the same numbers: tests/test_hf.py checks that transformers'
`DeepseekV3ForCausalLM` gives our logits to float32 rounding and the same greedy text.

What differs between the two implementations, and how each difference is converted
---------------------------------------------------------------------------------
1. Names. Ours follow the official DeepSeek-V3 inference code; transformers uses the names of the released
   checkpoint (see `_BLOCK_RENAMES`): wq_a -> q_a_proj, q_norm -> q_a_layernorm, wkv_a -> kv_a_proj_with_mqa,
   kv_norm -> kv_a_layernorm, wkv_b -> kv_b_proj, wo -> o_proj, w1/w3/w2 -> gate_proj/up_proj/down_proj,
   attn_norm/ffn_norm -> input_layernorm/post_attention_layernorm, embed -> model.embed_tokens,
   head -> lm_head, and the balancing bias gate.bias -> gate.e_score_correction_bias. Every matrix is stored
   the same way round (out_features x in_features), so a rename is all most weights need.

2. Experts. We keep one small MLP module per expert. The released checkpoint stores one tensor per expert and
   projection, `model.layers.{i}.mlp.experts.{j}.gate_proj.weight`, and that is what export writes.
   transformers 5 fuses them when it loads: `experts.gate_up_proj` (E, 2I, D) is [w1; w3] of every expert
   stacked, `experts.down_proj` (E, D, I) is every w2. Import accepts both layouts and splits a fused
   gate_up_proj at row I: the first half is the gate projection w1, the second the up projection w3.

3. RoPE channel layout. The official code rotates adjacent channel pairs (2j, 2j+1) (a complex view), and so
   do we. transformers supports that layout with `rope_interleave: true`, the layout of the released weights,
   so export writes that flag and copies the rotary weights unchanged. (Internally transformers then returns
   the rotated channels de-interleaved, evens first; it does so for queries and keys alike, which permutes
   both sides of every dot product the same way and changes no attention score.) A checkpoint with
   `rope_interleave: false` pairs channel j with channel j + d/2 instead ("rotate_half"); import converts it
   by permuting the rotary output rows of wq / wq_b (per head) and wkv_a so that HF's pair (j, j + d/2)
   lands on our pair (2j, 2j+1).

4. YaRN and the two "mscales". The official code, and ours, applies YaRN only when max_seq_len exceeds
   original_seq_len; transformers applies it whenever `rope_scaling.type` is "yarn". So export writes
   rope_scaling only when our model uses it (factor, original_max_position_embeddings, beta_fast,
   beta_slow) and import refuses a yarn config whose max_position_embeddings does not exceed the original
   length (the two would disagree). transformers derives two numbers from the YaRN parameters: the softmax
   scale is multiplied by (0.1 mscale_all_dim ln(factor) + 1)^2, which is our `mscale` (V2 appendix); and
   cos/sin are multiplied by (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1), a rotary
   amplitude that the official code does not have. Writing mscale = mscale_all_dim = our mscale makes that
   ratio exactly 1 (the released V3 config does the same); import refuses configs where it is not 1.
   The YaRN ramp's upper end is clamped at d-1 in model.py, transformers and the official code alike.

5. Routing. transformers' DeepseekV3 router does what model.Gate does with score_func="sigmoid": biased
   scores choose, a group scores the sum of its top two biased scores, other groups are masked with -inf,
   gates are the unbiased sigmoid scores normalised over the chosen experts (norm_topk_prob) times
   routed_scaling_factor (our route_scale). It has no softmax (V2) scoring, so such models cannot be
   exported, and a config asking for anything else (scoring_func, topk_method, norm_topk_prob=false,
   moe_layer_freq != 1) is refused on import.

6. Multi-Token Prediction. The released checkpoint stores MTP module k as an extra layer,
   `model.layers.{n_layers + k}`: enorm, hnorm, eh_proj, the transformer block under the usual layer names,
   shared_head.norm (our mtp.{k}.norm), plus copies of the embedding (embed_tokens) and of the output head
   (shared_head.head), which our model shares instead. Export writes exactly that; import checks the copies
   equal the shared tensors. transformers' `DeepseekV3ForCausalLM` does not run these layers in a forward
   pass and leaves them out when it loads. We also write `tie_last_hidden_states: false`, so that
   transformers' MTP drafting is handed the last block's output before the final norm, the h^0 our MTP
   module was trained on (see model.MTPModule); tests check its MTP layer then gives our MTP logits. Two
   limits on the transformers side: its drafter looks for MTP weights only at layer 61 (the 671B shape),
   and with more than one module it feeds module k+1 the *normalised* output of module k, where ours
   feeds the output before mtp.{k}.norm; only depth 1, V3's, means the same thing in both.

7. Small things that must agree: RMSNorm eps (ours is 1e-6), no Linear biases (attention_bias false),
   num_key_value_heads = n_heads. Import refuses configs that differ, and anything quantised
   (quantization_config, e.g. the FP8 release: dequantise it to bf16 first). Our output head is separate
   from the embedding, so export writes tie_word_embeddings false, and import gives a tied checkpoint's
   head a copy of its embedding.

Honest notes. A model trained with fp8=True is exported with its float32 master weights; transformers runs
them unquantised, so its logits match our fp8=False forward, not our simulated-FP8 one. Training knobs that
HF has no field for (mtp_lambda, bias_update_speed, ...) ride along in config.json under
"tinyseek_model_args" so a round trip restores them. The tokenizer: export writes `tokenizer_tinyseek.json`
(our `Tokenizer.to_dict()`, exact) and, when the `tokenizers` package is installed, a `tokenizer.json` that
transformers loads: the same byte-level BPE (the same regex, the merges rewritten as HF merge rules) that
prepends <|bos|> like our training documents; tests check it encodes like ours. Import reads back only
`tokenizer_tinyseek.json`; for other checkpoints name one of our tokenizers or expect a clear error.

transformers and safetensors are development dependencies: model.py, train.py and sample.py never import
them, and this file imports them only inside the functions that need them.
"""

import argparse
import importlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from checkpoint import (
    CheckpointError,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from model import ModelArgs, RMSNorm, Transformer, precompute_rope
from tokenizer import Tokenizer, get_tokenizer

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
RMS_EPS = RMSNorm(1).eps                    # model.py's RMSNorm eps (1e-6); HF's rms_norm_eps must equal it
EXTRA_ARGS_KEY = "tinyseek_model_args"      # our full ModelArgs, kept in config.json for the round trip


class HFConversionError(CheckpointError):
    """A Hugging Face checkpoint cannot be converted to or from tinyseek (the message says why)."""


def _need(module: str):
    """Import an optional dependency, or raise an error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise HFConversionError(f"extras/hf.py needs the `{module}` package for this: pip install {module} "
                                "(it is a development dependency, listed in requirements-dev.txt)") from e


# ----------------------------------------------------------------------------------------------------
# 1. Weight names
# ----------------------------------------------------------------------------------------------------

# Inside one transformer block: our name prefix -> HF name prefix (the first matching entry wins).
_BLOCK_RENAMES = [
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.wq.", "self_attn.q_proj."),                      # q_lora_rank == 0
    ("attn.wq_a.", "self_attn.q_a_proj."),                  # W^DQ
    ("attn.q_norm.", "self_attn.q_a_layernorm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),                  # [W^UQ; W^QR] per head
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."),       # [W^DKV; W^KR]
    ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."),                # [W^UK; W^UV] per head
    ("attn.wo.", "self_attn.o_proj."),
    ("ffn.gate.weight", "mlp.gate.weight"),                 # expert centroids e_i
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),  # balancing bias b_i (selection only)
]
_FFN = re.compile(r"ffn\.((?:experts\.\d+\.|shared_experts\.)?)w([123])\.weight")
_PROJ = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def _block_key(rest: str) -> str:
    """Name inside a block, ours -> HF: 'attn.wkv_a.weight' -> 'self_attn.kv_a_proj_with_mqa.weight'."""
    m = _FFN.fullmatch(rest)
    if m:
        return f"mlp.{m.group(1)}{_PROJ[m.group(2)]}.weight"
    for ours, theirs in _BLOCK_RENAMES:
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise HFConversionError(f"no Hugging Face name is known for the block weight '{rest}'")


def hf_key(key: str, n_layers: int) -> str:
    """Our state-dict key -> the key of the released DeepseekV3 checkpoint layout.

    MTP module k becomes layer n_layers + k, as in the released checkpoint."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
    if key in top:
        return top[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        return f"model.layers.{m.group(1)}.{_block_key(m.group(2))}"
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            return f"model.layers.{layer}.{_block_key(rest[len('block.'):])}"
        rest = {"norm.weight": "shared_head.norm.weight"}.get(rest, rest)   # enorm, hnorm, eh_proj keep names
        return f"model.layers.{layer}.{rest}"
    raise HFConversionError(f"no Hugging Face name is known for the tinyseek weight '{key}'")


def _meta_shapes(args: ModelArgs) -> dict:
    """Our state-dict keys and shapes for `args`, from a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# 2. Configuration: ModelArgs <-> config.json
# ----------------------------------------------------------------------------------------------------

def hf_config(args: ModelArgs, tokenizer: "Tokenizer | None" = None, dtype: str = "float32") -> dict:
    """The config.json of a DeepseekV3 checkpoint holding a model with `args` (HF field names).

    Raises HFConversionError for models transformers' DeepseekV3 cannot run the same way (softmax routing,
    expert groups of one expert)."""
    a = args
    if a.score_func != "sigmoid":
        raise HFConversionError(f"ModelArgs.score_func={a.score_func!r}: transformers' DeepseekV3 router only "
                                "implements sigmoid scoring (V3); softmax routing (V2) cannot be exported")
    if a.n_routed_experts // a.n_expert_groups < 2:
        raise HFConversionError(f"n_routed_experts={a.n_routed_experts} in n_expert_groups={a.n_expert_groups} "
                                "leaves one expert per group; transformers scores a group by its top two experts")
    cfg = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": a.vocab_size,
        "hidden_size": a.dim,
        "intermediate_size": a.inter_dim,
        "moe_intermediate_size": a.moe_inter_dim,
        "num_hidden_layers": a.n_layers,
        "first_k_dense_replace": a.n_dense_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads,
        "n_routed_experts": a.n_routed_experts,
        "n_shared_experts": a.n_shared_experts,
        "num_experts_per_tok": a.n_activated_experts,
        "n_group": a.n_expert_groups,
        "topk_group": a.n_limited_groups,
        "routed_scaling_factor": a.route_scale,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",                  # top-k with the aux-loss-free correction bias
        "norm_topk_prob": True,
        "moe_layer_freq": 1,
        "q_lora_rank": a.q_lora_rank or None,       # HF spells "no query compression" as null
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "max_position_embeddings": a.max_seq_len,
        "rope_theta": a.rope_theta,
        "rope_scaling": None,
        "rope_interleave": True,                    # RoPE pairs (2j, 2j+1), the official layout
        "rms_norm_eps": RMS_EPS,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": a.init_std,
        "num_nextn_predict_layers": a.mtp_depth,
        "tie_last_hidden_states": False,            # MTP is fed the last block's output before the final norm
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": tokenizer.bos_id if tokenizer is not None else None,
        "eos_token_id": tokenizer.eos_id if tokenizer is not None else None,
        EXTRA_ARGS_KEY: a.to_dict(),
    }
    if a.max_seq_len > a.original_seq_len:          # YaRN is on in model.py only in this case
        cfg["rope_scaling"] = {
            "type": "yarn", "factor": a.rope_factor, "original_max_position_embeddings": a.original_seq_len,
            "beta_fast": a.beta_fast, "beta_slow": a.beta_slow,
            # mscale_all_dim is our softmax-scale mscale; mscale = mscale_all_dim makes HF's cos/sin factor 1
            "mscale": a.mscale, "mscale_all_dim": a.mscale,
        }
        if not a.mscale:
            cfg["rope_scaling"]["attention_factor"] = 1.0   # HF would otherwise default to 0.1 ln(factor) + 1
    return cfg


def _yarn_mscale(factor: float, mscale: float) -> float:
    """0.1 mscale ln(factor) + 1 (V2 appendix), 1 when there is no extension."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def args_from_hf_config(cfg: dict) -> tuple[ModelArgs, dict]:
    """ModelArgs for a DeepseekV3 config.json dict, plus {'rope_interleave': bool, 'tie_word_embeddings': bool}.

    Raises HFConversionError naming the field for anything model.py cannot reproduce exactly."""
    def bad(field, why):
        raise HFConversionError(f"config.json field {field}={cfg.get(field)!r} is not supported: {why}")

    if cfg.get("quantization_config"):
        bad("quantization_config", "quantised weights (e.g. the FP8 release) must be dequantised to bf16/fp32 "
            "first")
    archs = cfg.get("architectures") or [ARCHITECTURE]
    if cfg.get("model_type") != MODEL_TYPE or ARCHITECTURE not in archs:
        raise HFConversionError(f"unknown architecture: config.json has model_type={cfg.get('model_type')!r}, "
                                f"architectures={cfg.get('architectures')!r}; only {MODEL_TYPE!r} "
                                f"({ARCHITECTURE}) checkpoints can be imported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
    for field in required:
        if not isinstance(cfg.get(field), int):
            bad(field, "an integer is required")
    checks = [  # field, the only value we can reproduce, why
        ("hidden_act", "silu", "our SwiGLU uses SiLU"),
        ("attention_bias", False, "our Linears have no bias"),
        ("mlp_bias", False, "our Linears have no bias"),
        ("scoring_func", "sigmoid", "only sigmoid routing (V3) matches transformers' DeepseekV3"),
        ("topk_method", "noaux_tc", "only bias-corrected group-limited top-k (V3) is implemented"),
        ("norm_topk_prob", True, "our sigmoid gates are always normalised over the chosen experts"),
        ("moe_layer_freq", 1, "every layer after the dense ones is MoE here"),
    ]
    for field, want, why in checks:
        if cfg.get(field, want) != want:
            bad(field, f"must be {want!r} ({why})")
    if abs(cfg.get("rms_norm_eps", RMS_EPS) - RMS_EPS) > 1e-12:
        bad("rms_norm_eps", f"model.py's RMSNorm uses eps={RMS_EPS}")
    if cfg.get("num_key_value_heads") not in (None, cfg["num_attention_heads"]):
        bad("num_key_value_heads", "MLA has no grouped key/value heads; it must equal num_attention_heads")

    extras = cfg.get(EXTRA_ARGS_KEY) or {}
    known = {f for f in ModelArgs.__dataclass_fields__}
    kw = {k: v for k, v in extras.items() if k in known}     # training knobs and unused YaRN fields
    kw.update(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], inter_dim=cfg["intermediate_size"],
        moe_inter_dim=cfg["moe_intermediate_size"], n_layers=cfg["num_hidden_layers"],
        n_dense_layers=cfg.get("first_k_dense_replace") or 0, n_heads=cfg["num_attention_heads"],
        n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg.get("n_shared_experts") or 0,
        n_activated_experts=cfg["num_experts_per_tok"], n_expert_groups=cfg.get("n_group") or 1,
        n_limited_groups=cfg.get("topk_group") or 1, score_func="sigmoid",
        route_scale=float(cfg.get("routed_scaling_factor", 1.0)), q_lora_rank=cfg.get("q_lora_rank") or 0,
        kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
        max_seq_len=cfg["max_position_embeddings"],
        mtp_depth=cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0,
        init_std=cfg.get("initializer_range", extras.get("init_std", 0.006)),
    )
    # RoPE: legacy `rope_scaling` + `rope_theta` (released checkpoints) or transformers 5's `rope_parameters`.
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    kw["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        orig = rope.get("original_max_position_embeddings")
        if not isinstance(orig, int):
            bad("rope_scaling", "yarn needs an integer original_max_position_embeddings")
        if kw["max_seq_len"] <= orig:
            bad("rope_scaling", f"transformers applies YaRN at every length, model.py (like the official code) "
                f"only when max_position_embeddings ({kw['max_seq_len']}) exceeds original_max_position_embeddings "
                f"({orig})")
        factor = rope.get("factor") or kw["max_seq_len"] / orig
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        amplitude = rope.get("attention_factor")
        if amplitude is None:
            amplitude = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                         if mscale and mscale_all_dim else _yarn_mscale(factor, 1.0))
        if abs(amplitude - 1.0) > 1e-9:
            bad("rope_scaling", f"it scales cos/sin by {amplitude:.6f} (mscale != mscale_all_dim); the official code "
                "and model.py have no rotary amplitude")
        if not rope.get("truncate", True):
            bad("rope_scaling", "truncate=false is a YaRN variant model.py does not implement")
        kw.update(original_seq_len=orig, rope_factor=float(factor), beta_fast=rope.get("beta_fast") or 32,
                  beta_slow=rope.get("beta_slow") or 1, mscale=float(mscale_all_dim or 0.0))
    elif rope_type == "default":
        # no YaRN: model.py must not switch it on either, so original_seq_len covers the whole context
        kw["original_seq_len"] = max(kw["max_seq_len"], extras.get("original_seq_len", 0))
    else:
        bad("rope_scaling", f"rope type {rope_type!r}; only default RoPE and yarn are implemented")
    try:
        args = ModelArgs(**kw)
    except ValueError as e:
        raise HFConversionError(f"config.json describes a model model.py rejects: {e}") from e
    return args, {"rope_interleave": bool(cfg.get("rope_interleave", True)),
                  "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))}


# ----------------------------------------------------------------------------------------------------
# 3. Tokenizer
# ----------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies in HF files."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer(tok: Tokenizer):
    """Our tokenizer as a `tokenizers.Tokenizer` (byte-level BPE that transformers can load).

    Same pre-tokenisation regex and vocabulary ids. tiktoken merges any adjacent pair whose bytes form a
    token, lowest rank first; HF BPE applies listed merge rules, first listed first. So every way of
    splitting a token into two tokens becomes a rule, ordered by the rank of the token it creates, and
    `ignore_merges` makes a chunk that is a whole token map to it directly, as tiktoken does. The special
    tokens keep their ids; <|bos|> is prepended to every encoding, like our training documents."""
    tokenizers = _need("tokenizers")
    enc, to_char = tok.enc, _bytes_to_unicode()
    specials = {tok.bos_id, tok.eos_id}
    vocab = {}
    for i in range(enc.n_vocab):
        if i in specials:
            continue
        try:
            vocab[enc.decode_single_token_bytes(i)] = i
        except KeyError:                                  # a hole in a pretrained vocabulary
            continue
    merges = []
    for token, rank in vocab.items():
        splits = [(vocab[token[:k]], vocab[token[k:]]) for k in range(1, len(token))
                  if token[:k] in vocab and token[k:] in vocab]
        merges += [(rank, left, right) for left, right in splits]
    merges.sort()
    word = {i: "".join(to_char[b] for b in t) for t, i in vocab.items()}
    model = tokenizers.models.BPE(vocab={s: i for i, s in word.items()},
                                  merges=[(word[left], word[right]) for _, left, right in merges],
                                  ignore_merges=True)
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(enc._pat_str), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = tokenizers.decoders.ByteLevel()
    bos, eos = enc.decode_single_token_bytes(tok.bos_id).decode(), enc.decode_single_token_bytes(tok.eos_id).decode()
    hf.add_special_tokens([tokenizers.AddedToken(bos, special=True, normalized=False),
                           tokenizers.AddedToken(eos, special=True, normalized=False)])
    if hf.token_to_id(bos) != tok.bos_id or hf.token_to_id(eos) != tok.eos_id:
        raise HFConversionError("special token ids changed while building the HF tokenizer")
    hf.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.bos_id)])
    # Ours encodes "<|eos|>" typed in text as plain characters. This object does too; the saved file cannot
    # say so, so tokenizer_config.json asks transformers for it with split_special_tokens.
    hf.encode_special_tokens = True
    return hf


def _write_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> list[str]:
    """Write tokenizer_tinyseek.json and, if possible, tokenizer.json + tokenizer_config.json; return notes."""
    _write_json(out / "tokenizer_tinyseek.json", tok.to_dict())
    try:
        hf = hf_tokenizer(tok)
    except HFConversionError as e:
        return [f"no tokenizer.json written ({e}); tokenizer_tinyseek.json holds the exact tokenizer"]
    hf.save(str(out / "tokenizer.json"))
    bos, eos = tok.decode([tok.bos_id]), tok.decode([tok.eos_id])
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        # our tokenizer encodes "<|eos|>" typed in text as plain characters; so must HF's
        "split_special_tokens": True})
    return []


def load_hf_tokenizer(hf_dir) -> "Tokenizer | None":
    """Our Tokenizer saved by export_hf (tokenizer_tinyseek.json), or None if the folder has none."""
    path = Path(hf_dir) / "tokenizer_tinyseek.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise HFConversionError(f"{path} is not a readable tinyseek tokenizer: {e}") from e


# ----------------------------------------------------------------------------------------------------
# 4. Export
# ----------------------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    """Write JSON to a temporary file next to `path`, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def to_hf_state_dict(state: dict, args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """Our state dict -> HF tensors in the released checkpoint layout (one tensor per expert projection).

    The router (gate weight and balancing bias) stays float32 whatever `dtype` is, as transformers keeps it.
    MTP layers also get copies of the embedding and head, which the released checkpoint stores per layer."""
    out = {}
    for key, t in state.items():
        keep_fp32 = key.endswith(("ffn.gate.weight", "ffn.gate.bias"))
        out[hf_key(key, args.n_layers)] = t.detach().to("cpu", torch.float32 if keep_fp32 else dtype).contiguous()
    for k in range(args.mtp_depth):
        layer = f"model.layers.{args.n_layers + k}."
        out[layer + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[layer + "shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def export_hf(model_or_ckpt, out_dir, tokenizer: "Tokenizer | None" = None, dtype: str = "float32") -> dict:
    """Write a Hugging Face DeepseekV3 checkpoint folder: config.json, model.safetensors, tokenizer files.

    Args:
        model_or_ckpt: a Transformer, a checkpoint dict ({"model", "model_args", "tokenizer"?}) or the path of
            a tinyseek checkpoint file.
        out_dir: folder to write (created if needed; files in it are replaced).
        tokenizer: the model's Tokenizer (default: the checkpoint's, if it has one).
        dtype: "float32" (default, exact), "bfloat16" or "float16" for the weight matrices.
    Returns: {"files": [paths written], "notes": [things the reader should know]}.
    Raises HFConversionError for models transformers cannot run identically (see hf_config).
    """
    save_file = _need("safetensors.torch").save_file
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise HFConversionError(f"dtype={dtype!r}; choose one of {sorted(dtypes)}")
    if isinstance(model_or_ckpt, (str, Path)):
        model_or_ckpt = read_checkpoint(model_or_ckpt)
    if isinstance(model_or_ckpt, Transformer):
        args, state = model_or_ckpt.args, model_or_ckpt.state_dict()
    elif isinstance(model_or_ckpt, dict) and "model" in model_or_ckpt and "model_args" in model_or_ckpt:
        args, state = ModelArgs(**model_or_ckpt["model_args"]), model_or_ckpt["model"]
        if tokenizer is None and model_or_ckpt.get("tokenizer"):
            tokenizer = Tokenizer.from_dict(model_or_ckpt["tokenizer"])
    else:
        raise HFConversionError(f"export_hf needs a Transformer, a checkpoint dict or a path, got "
                                f"{type(model_or_ckpt).__name__}")
    config = hf_config(args, tokenizer, dtype)
    tensors = to_hf_state_dict(state, args, dtypes[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if args.fp8:
        notes.append("the model simulates FP8 matmuls; its float32 master weights were exported, and transformers "
                     "runs them unquantised")
    _write_json(out / "config.json", config)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    shutil.copymode(out / "config.json", tmp)    # the writer makes it owner-only; use the usual permissions
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                 "eos_token_id": config["eos_token_id"]})
    if tokenizer is not None:
        notes += _write_tokenizer(tokenizer, out, args.max_seq_len)
    else:
        notes.append("no tokenizer was given, so none was written")
    files = sorted(str(p) for p in out.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    return {"files": files, "notes": notes}


# ----------------------------------------------------------------------------------------------------
# 5. Import
# ----------------------------------------------------------------------------------------------------

class _TensorFiles:
    """The tensors of a folder's model.safetensors or sharded model-*.safetensors, read one at a time."""

    def __init__(self, folder: Path):
        safetensors = _need("safetensors")
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            others = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
            raise HFConversionError(f"no model.safetensors (or model.safetensors.index.json) in {folder}"
                                    + (f"; only {others[0]} etc. (PyTorch pickles), which are not read" if others
                                       else ""))
        self.where, self.handles = {}, {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise HFConversionError(f"{path} is listed in the shard index but missing")
            try:
                handle = safetensors.safe_open(str(path), framework="pt")
            except Exception as e:     # safetensors raises its own error type for a damaged header
                raise HFConversionError(f"{path} is not a readable safetensors file: {e}") from e
            self.handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.where[key] = name

    def keys(self) -> set:
        """Every tensor name in the checkpoint."""
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, as float32 (bf16/fp16 are widened exactly); quantised dtypes are refused."""
        t = self.handles[self.where[key]].get_tensor(key)
        if not t.is_floating_point() or t.element_size() < 2:
            raise HFConversionError(f"'{key}' has dtype {t.dtype}; quantised checkpoints must be dequantised first")
        return t.float()


def _rope_rows_to_interleaved(w: torch.Tensor, start: int, d: int, stride: int) -> torch.Tensor:
    """Reorder, in every `stride`-row block, the d rotary output rows at `start`: HF's half-split layout
    (pair j = rows j and j + d/2) -> the official interleaved one (pair j = rows 2j, 2j+1)."""
    perm = torch.arange(d).view(2, d // 2).t().flatten()          # [0, d/2, 1, d/2 + 1, ...]
    blocks = w.view(-1, stride, w.shape[-1]).clone()
    blocks[:, start:start + d] = blocks[:, start:start + d][:, perm]
    return blocks.view_as(w)


def _model_from_state(args: ModelArgs, state: dict) -> Transformer:
    """A Transformer holding exactly the tensors of `state` (our keys, checked shapes), without first filling
    memory with random weights: built on the meta device, the loaded tensors are assigned in place, and
    the buffers that are not stored (rotary tables, expert load counters) are rebuilt."""
    with torch.device("meta"):
        model = Transformer(args)
    derived = {k for k, _ in model.named_buffers()} - set(model.state_dict())
    if not all(k in ("rope_cos", "rope_sin") or k.endswith(".load") for k in derived):
        model = Transformer(args)                # a buffer we do not know how to rebuild: build normally
        model.load_state_dict(state, strict=True)
        return model
    model.load_state_dict(state, strict=True, assign=True)
    model.rope_cos, model.rope_sin = precompute_rope(args)
    for m in model.moe_layers():
        m.load = torch.zeros(m.load.shape)      # tokens per expert, counted from zero
    for m in model.modules():                     # plain tensor attributes made on meta, e.g. a zero loss
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(m, name, torch.zeros(value.shape, dtype=value.dtype))
    return model


_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def import_hf(hf_dir, mtp: bool = True) -> tuple[ModelArgs, Transformer]:
    """Load a Hugging Face DeepseekV3 checkpoint folder into model.py: returns (ModelArgs, Transformer in eval).

    Reads config.json and model.safetensors (or a sharded index), accepts per-expert and fused expert
    tensors and either RoPE layout, and loads the MTP layers when they are stored (mtp=False drops them;
    transformers' own save_pretrained does not keep them). Raises HFConversionError naming the file,
    field or tensor for: missing files, unsupported config fields, missing, unexpected or mis-shaped
    tensors."""
    folder = Path(hf_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFConversionError(f"no config.json in {folder}; is this a Hugging Face model folder?")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFConversionError(f"{cfg_path} is not readable JSON: {e}") from e
    args, info = args_from_hf_config(cfg)
    files = _TensorFiles(folder)
    names, n, declared = files.keys(), args.n_layers, args.mtp_depth
    if declared and (not mtp or not any(k.startswith(f"model.layers.{n}.") for k in names)):
        args = ModelArgs(**{**args.to_dict(), "mtp_depth": 0})
    dropped = range(n, n + declared) if args.mtp_depth == 0 else range(0)    # MTP layers left out on purpose
    used, fused_cache = set(), {}

    def fetch(key: str) -> torch.Tensor:
        """A tensor by its released-checkpoint name, cut out of a fused expert tensor if stored that way."""
        m = _PER_EXPERT.fullmatch(key)
        if key not in names and m:
            fused = f"{m.group(1)}.{'down' if m.group(3) == 'down' else 'gate_up'}_proj"
            if fused in names:
                if fused not in fused_cache:                        # read once per layer, not once per expert
                    fused_cache.clear()
                    fused_cache[fused] = files.get(fused)
                used.add(fused)
                both = fused_cache[fused][int(m.group(2))]          # (2I, D) = [w1; w3] or (D, I) = w2
                half = both.shape[0] // 2
                part = {"down": both, "gate": both[:half], "up": both[half:]}[m.group(3)]
                return part.clone()
        if key == "lm_head.weight" and key not in names and info["tie_word_embeddings"]:
            key = "model.embed_tokens.weight"
        if key not in names:
            raise HFConversionError(f"{folder} lacks the weight '{key}' that config.json implies")
        used.add(key)
        return files.get(key)

    state = {}
    for ours, shape in _meta_shapes(args).items():
        theirs = hf_key(ours, n)
        t = fetch(theirs)
        if tuple(t.shape) != shape:
            raise HFConversionError(f"shape mismatch for '{theirs}' (tinyseek '{ours}'): checkpoint {tuple(t.shape)}"
                                    f", config.json implies {shape}")
        state[ours] = t
    fused_cache.clear()
    if not info["rope_interleave"]:
        d, qk = args.qk_rope_head_dim, args.qk_head_dim
        for key in list(state):
            if key.endswith("attn.wkv_a.weight"):
                state[key] = _rope_rows_to_interleaved(state[key], args.kv_lora_rank, d, args.kv_lora_rank + d)
            elif key.endswith(("attn.wq.weight", "attn.wq_b.weight")):
                state[key] = _rope_rows_to_interleaved(state[key], args.qk_nope_head_dim, d, qk)
    # Every stored tensor must have been used, be a copy of one we share, or be one we may ignore.
    for key in sorted(names - used):
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        layer = int(layer.group(1)) if layer else -1
        copy = re.fullmatch(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight", key)
        if copy and n <= layer < n + args.mtp_depth:
            shared = state["embed.weight" if copy.group(1) == "embed_tokens" else "head.weight"]
            if not torch.equal(files.get(key), shared):
                raise HFConversionError(f"'{key}' differs from the main model's copy; tinyseek's MTP modules share "
                                        "the embedding and head (import with mtp=False to drop the MTP layers)")
        elif not (key.endswith("rotary_emb.inv_freq") or layer in dropped):   # inv_freq is recomputed
            raise HFConversionError(f"unexpected weight '{key}' in {folder}: config.json does not describe it")
    return args, _model_from_state(args, state).eval()


# ----------------------------------------------------------------------------------------------------
# 6. Checking against transformers
# ----------------------------------------------------------------------------------------------------

def load_transformers_model(hf_dir, quiet: bool = True):
    """transformers' DeepseekV3ForCausalLM from a folder: float32, eval mode, eager attention.

    quiet=True hides transformers' load report, which lists the MTP layers of an exported folder as
    unexpected (its DeepseekV3ForCausalLM does not run them), and its progress bar."""
    transformers = _need("transformers")
    log = transformers.utils.logging
    level, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    if quiet:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    finally:
        log.set_verbosity(level)
        if bar:
            log.enable_progress_bar()


@torch.no_grad()
def max_logit_diff(model: Transformer, hf_model, idx: torch.Tensor) -> float:
    """max |our logits - transformers' logits| over a batch of token ids idx (B, T)."""
    ours, _ = model(idx)
    theirs = hf_model(input_ids=idx).logits.float()
    return (ours - theirs).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------------

def main(argv: "list[str] | None" = None) -> int:
    """`python -m extras.hf export ...` or `python -m extras.hf import ...`; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}    # --help shows every default
    ex = sub.add_parser("export", help="tinyseek checkpoint -> Hugging Face folder", **defaults)
    ex.add_argument("--ckpt", default="out/ckpt.pt", help="tinyseek checkpoint file")
    ex.add_argument("--out", default="hf_out", help="folder to write")
    ex.add_argument("--dtype", default="float32", help="float32 (exact), bfloat16 or float16")
    ex.add_argument("--verify", action="store_true", help="load the folder with transformers, compare logits")
    im = sub.add_parser("import", help="Hugging Face folder -> tinyseek checkpoint", **defaults)
    im.add_argument("--hf_dir", required=True, default=argparse.SUPPRESS,
                    help="folder with config.json and model.safetensors (required)")
    im.add_argument("--out", default="out_hf/ckpt.pt", help="tinyseek checkpoint file to write")
    im.add_argument("--tokenizer", default="auto", help="auto (the folder's tokenizer_tinyseek.json) or one of "
                    "ours by name: char, gpt2, cl100k_base, o200k_base")
    im.add_argument("--no_mtp", action="store_true", help="drop the MTP layers")
    cfg = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"---- hf {cfg.command} ----")
    for k, v in vars(cfg).items():
        print(f"  {k} = {v!r}")
    try:
        return _export_cli(cfg) if cfg.command == "export" else _import_cli(cfg)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _export_cli(cfg) -> int:
    """Body of `python -m extras.hf export`."""
    ckpt = read_checkpoint(cfg.ckpt)
    res = export_hf(ckpt, cfg.out, dtype=cfg.dtype)
    for f in res["files"]:
        print(f"wrote {f} ({os.path.getsize(f) / 2**20:.2f} MiB)")
    for note in res["notes"]:
        print(f"note: {note}")
    if cfg.verify:
        model, _ = model_from_checkpoint(ckpt)
        model.eval()
        idx = torch.randint(0, model.args.vocab_size, (2, min(32, model.args.max_seq_len)),
                            generator=torch.Generator().manual_seed(0))
        diff = max_logit_diff(model, load_transformers_model(cfg.out), idx)
        print(f"verify: max |logit difference| vs transformers on 2 x {idx.shape[1]} random tokens: {diff:.3g}")
    print(f"next: AutoModelForCausalLM.from_pretrained({cfg.out!r}) in transformers, or "
          f"python -m extras.hf import --hf_dir={cfg.out} --out=out_hf/ckpt.pt")
    return 0


def _import_cli(cfg) -> int:
    """Body of `python -m extras.hf import`."""
    if cfg.tokenizer == "auto":
        tok = load_hf_tokenizer(cfg.hf_dir)
        if tok is None:
            raise HFConversionError(
                f"{cfg.hf_dir} has no tokenizer_tinyseek.json, so no tinyseek tokenizer can be recovered (a HF "
                "tokenizer.json of another model is not one of ours); pass --tokenizer=NAME with one of char, "
                "gpt2, cl100k_base, o200k_base if the model was trained with it")
    else:
        tok = get_tokenizer(cfg.tokenizer)
    args, model = import_hf(cfg.hf_dir, mtp=not cfg.no_mtp)
    if tok.n_vocab > args.vocab_size:
        raise HFConversionError(f"tokenizer {tok.name!r} has {tok.n_vocab} ids but the model only "
                                f"vocab_size={args.vocab_size}")
    save_checkpoint(cfg.out, {"model": model.state_dict(), "model_args": args.to_dict(), "tokenizer": tok.to_dict(),
                              "config": {"hf_dir": str(cfg.hf_dir)}, "kind": "hf_import"})
    print(f"imported {args.n_layers} layers (+{args.mtp_depth} MTP), dim {args.dim}, vocab {args.vocab_size}, "
          f"tokenizer {tok.name!r} -> {cfg.out}")
    print(f"next: python sample.py --init_from={cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
