"""Tests for extras/hf.py: Hugging Face DeepseekV3 checkpoints, proved equal to transformers' own implementation.

Parity: a random model exported to HF gives the same logits in transformers' DeepseekV3ForCausalLM (several
batches; q_lora_rank 0 and > 0; sigmoid group-limited routing with a random non-zero balancing bias; a dense
layer; shared experts; YaRN on in one case), the same greedy text, and the same MTP logits. HF-made
checkpoints (either RoPE layout, per-expert or fused experts) import to the same logits. Round trip:
import_hf(export_hf(model)) is the same model, MTP included. Bad input gives errors naming the file, field
or tensor. About 20 s on one CPU thread, most of it importing transformers:

    OMP_NUM_THREADS=1 python -m pytest tests/test_hf.py -q

Tests that need transformers skip (saying why) when it is missing; CI installs it (requirements-dev.txt).
"""

import json
import re

import pytest
import torch

from checkpoint import load_model, save_checkpoint
from extras import hf
from extras.hf import HFConversionError, export_hf, import_hf
from model import ModelArgs, Transformer
from sample import generate_batch
from tokenizer import get_tokenizer, train_bpe

safetensors_torch = pytest.importorskip("safetensors.torch", reason="extras/hf.py reads and writes safetensors files; "
                                        "pip install -r requirements-dev.txt")

NEEDS_TRANSFORMERS = "parity is checked against transformers' DeepseekV3; pip install -r requirements-dev.txt"
TOK = get_tokenizer("char")

# Two configurations between them cover every feature the issue asks for.
CONFIGS = {
    # plain query projection (q_lora_rank 0), 4 groups of 2 experts with 2 allowed, 2 shared experts, no YaRN
    "q_lora_0": {"q_lora_rank": 0, "n_routed_experts": 8, "n_expert_groups": 4, "n_limited_groups": 2,
                 "n_activated_experts": 3, "n_shared_experts": 2, "route_scale": 2.5,
                 "max_seq_len": 48, "original_seq_len": 48},
    # compressed queries, 2 groups of 4 experts with 1 allowed, YaRN on (context 64 > 24) with mscale 0.7
    "q_lora_yarn": {"q_lora_rank": 24, "n_routed_experts": 8, "n_expert_groups": 2, "n_limited_groups": 1,
                    "n_activated_experts": 2, "n_shared_experts": 1, "route_scale": 1.5,
                    "max_seq_len": 64, "original_seq_len": 24, "rope_factor": 4.0, "mscale": 0.7},
    # YaRN whose ramp ends past the last channel pair (clamped at d-1, as the official code does)
    "yarn_wide_ramp": {"qk_rope_head_dim": 4, "rope_theta": 100.0, "max_seq_len": 96, "original_seq_len": 64,
                       "rope_factor": 2.0},
}


def small_args(**kw) -> ModelArgs:
    """A small model with one dense layer and two MoE layers, one MTP module, the byte tokenizer's vocabulary."""
    base = {"vocab_size": TOK.n_vocab, "dim": 64, "inter_dim": 96, "moe_inter_dim": 32, "n_layers": 3,
            "n_dense_layers": 1, "n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 16, "mtp_depth": 1, "init_std": 0.1}
    return ModelArgs.preset("tiny", **{**base, **kw})


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A model whose every tensor matters: random norms around one and a random balancing bias, large enough
    (std 0.1 against sigmoid scores of spread ~0.1) to change which experts are chosen."""
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for m in model.moe_layers():
            m.gate.bias.normal_(0.0, 0.1)
    return model


def batches(args: ModelArgs, seed: int = 1) -> list[torch.Tensor]:
    """Token batches of several shapes, the last one as long as the context."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.vocab_size, shape, generator=g)
            for shape in ((1, 1), (2, 17), (3, args.max_seq_len))]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(our model, folder it was exported to) for each configuration."""
    model = random_model(small_args(**CONFIGS[request.param]))
    out = tmp_path_factory.mktemp(request.param)
    export_hf(model, out, tokenizer=TOK)
    return model, out


# ----------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_logits_match_transformers(exported, transformers):
    model, out = exported
    theirs_model = hf.load_transformers_model(out)
    assert type(theirs_model).__name__ == "DeepseekV3ForCausalLM"
    for idx in batches(model.args):
        ours, _ = model(idx)
        theirs = theirs_model(input_ids=idx).logits
        scale = ours.abs().max().item()
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), f"max |logit difference| {diff:.3g} for a batch {tuple(idx.shape)}"
    # The comparison has teeth: without the balancing bias our logits would be far from transformers'.
    saved = [m.gate.bias.clone() for m in model.moe_layers()]
    for m in model.moe_layers():
        m.gate.bias.zero_()
    try:
        unbiased, _ = model(idx)
    finally:
        for m, b in zip(model.moe_layers(), saved):
            m.gate.bias.copy_(b)
    assert (unbiased - theirs).abs().max().item() > 1e-3


@torch.no_grad()
def test_greedy_generation_matches_token_for_token(exported, transformers):
    model, out = exported
    theirs_model = hf.load_transformers_model(out)
    prompt = batches(model.args, seed=2)[1][:, :6]                  # (2, 6)
    n = model.args.max_seq_len - prompt.shape[1]                     # run to the end of the context
    ours, _ = generate_batch(model, prompt.tolist(), n, temperature=0)   # sample.py's cached decoding
    theirs = theirs_model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[:, prompt.shape[1]:].tolist()


def mtp_state_for_transformers(out, args: ModelArgs) -> dict:
    """The exported MTP layer renamed for transformers' MtpModel: enorm/hnorm/eh_proj, the block under
    mtp_block with its experts fused (gate_up_proj = [gate; up] per expert), shared_head.norm -> post_norm."""
    sd = safetensors_torch.load_file(str(out / "model.safetensors"))
    pre, new = f"model.layers.{args.n_layers}.", {}
    for key, t in sd.items():
        rest = key[len(pre):] if key.startswith(pre) else None
        if rest is None or rest in ("embed_tokens.weight", "shared_head.head.weight") or ".experts." in rest:
            continue
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            new[f"layers.0.{rest}"] = t
        elif rest == "shared_head.norm.weight":
            new["layers.0.post_norm.weight"] = t
        else:
            new[f"layers.0.mtp_block.{rest}"] = t
    def w(j, proj):
        return sd[f"{pre}mlp.experts.{j}.{proj}_proj.weight"]
    experts = range(args.n_routed_experts)
    new["layers.0.mtp_block.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w(j, "gate"), w(j, "up")])
                                                                      for j in experts])
    new["layers.0.mtp_block.mlp.experts.down_proj"] = torch.stack([w(j, "down") for j in experts])
    return new


@torch.no_grad()
def test_mtp_module_matches_transformers(exported, transformers):
    """Our MTP module and transformers' MtpModel (the drafter of generate(use_mtp=True)) agree on the stored
    layer, and the exported config hands MTP the last block's output before the final norm, as ours does."""
    from transformers.modeling_layers import MtpModel
    model, out = exported
    theirs_model = hf.load_transformers_model(out)
    mtp = MtpModel(theirs_model, 1).eval()
    missing, unexpected = mtp.load_state_dict(mtp_state_for_transformers(out, model.args), strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight", "shared_head.weight"}   # shared, tied
    idx = batches(model.args)[1]
    T = idx.shape[1]
    h0 = model.trunk(idx)                                                         # (B, T, D) before the norm
    module = model.mtp[0]
    h1 = module(h0[:, :T - 1], model.embed(idx[:, 1:]), model.rope_cos[:T - 1], model.rope_sin[:T - 1])
    ours = model.head(module.norm(h1))                                            # predicts t_{i+2}
    h0_theirs = theirs_model(input_ids=idx, output_hidden_states=True).hidden_states[-1]
    assert (h0_theirs - h0).abs().max().item() < 1e-4
    positions = torch.arange(1, T).expand(idx.shape[0], -1)                       # those of t_{i+1}
    theirs = mtp._project_to_logits(mtp.forward_layer(0, h0_theirs[:, :T - 1], positions, None,
                                                      input_ids=idx[:, 1:]))
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, ours.abs().max().item())


def hf_made_checkpoint(transformers, folder, rope_interleave: bool, tied: bool = False):
    """A random checkpoint made by transformers itself (save_pretrained), with a non-zero balancing bias."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=200, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=64, rope_interleave=rope_interleave, initializer_range=0.2, num_mtp_layers=0,
        tie_word_embeddings=tied)
    torch.manual_seed(3)
    theirs = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in theirs.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    theirs.save_pretrained(folder)
    return theirs


@pytest.mark.parametrize("rope_interleave, tied", [(True, False), (False, True)])
@torch.no_grad()
def test_checkpoints_made_by_transformers_import_to_the_same_logits(transformers, tmp_path, rope_interleave, tied):
    """rope_interleave=False is the half-split RoPE layout: import permutes the rotary rows into ours. A tied
    output head is stored once, as the embedding: import copies it into our separate head."""
    theirs = hf_made_checkpoint(transformers, tmp_path, rope_interleave, tied)
    stored = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in stored) != tied
    args, model = import_hf(tmp_path)
    assert (args.q_lora_rank, args.n_expert_groups, args.mtp_depth) == (24, 2, 0)
    idx = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(4))
    ours, _ = model(idx)
    assert (ours - theirs(input_ids=idx).logits).abs().max().item() <= 1e-5 * max(1.0, ours.abs().max().item())


@torch.no_grad()
def test_a_folder_transformers_resaved_imports_to_the_same_model(exported, transformers, tmp_path):
    """save_pretrained rewrites the config (rope_parameters instead of rope_scaling) and drops the MTP layer."""
    model, out = exported
    hf.load_transformers_model(out).save_pretrained(tmp_path)
    args, back = import_hf(tmp_path)
    assert args == ModelArgs(**{**model.args.to_dict(), "mtp_depth": 0})
    idx = batches(model.args)[2]
    assert torch.equal(back(idx)[0], model(idx)[0])


@torch.no_grad()
def test_fused_expert_tensors_import_like_per_expert_ones(transformers, tmp_path):
    """transformers 5 holds experts fused in memory (gate_up_proj, down_proj); a file in that layout loads too."""
    theirs = hf_made_checkpoint(transformers, tmp_path / "per_expert", rope_interleave=True)
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    safetensors_torch.save_file(state, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    a = import_hf(tmp_path / "per_expert")[1].state_dict()
    b = import_hf(fused)[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_files_encode_like_ours(tmp_path, transformers):
    """tokenizer.json (via AutoTokenizer) encodes like our BPE with BOS; tokenizer_tinyseek.json is exact."""
    corpus = "".join(f"User: {a}+{b}\nAssistant: <think>{a}+{b}={a + b}</think><answer>{a + b}</answer>\n"
                     "the model thinks about each digit.\n" for a in range(0, 400, 7) for b in (3, 58))
    tok = train_bpe(corpus, vocab_size=400)
    model = random_model(small_args(vocab_size=tok.n_vocab, n_layers=1, n_dense_layers=1, mtp_depth=0))
    export_hf(model, tmp_path, tokenizer=tok)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [corpus[:2000], "", "naïve café 東京 😀 don't  <think> 12+34 </think>", "x <|eos|> typed as text",
             "aaaa aaaaa\n\n\t  spaced"]
    for text in texts:
        ids = tok.encode(text, bos=True)
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == tok.decode(ids)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert hf.load_hf_tokenizer(tmp_path).to_dict() == tok.to_dict()
    char = hf.hf_tokenizer(TOK)                                # the byte tokenizer converts too
    assert all(char.encode(t).ids == TOK.encode(t, bos=True) for t in texts)


# ----------------------------------------------------------------------------------------------------
# Round trip and command line (no transformers needed)
# ----------------------------------------------------------------------------------------------------

def test_round_trip_gives_the_identical_model_mtp_included(exported):
    model, out = exported
    args, back = import_hf(out)
    assert args == model.args
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("mtp.0.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.rope_cos, model.rope_cos)                      # derived buffers rebuilt
    stored = safetensors_torch.load_file(str(out / "model.safetensors"))
    n = model.args.n_layers                                                # MTP as the released checkpoint stores it
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "mlp.gate.e_score_correction_bias", "embed_tokens.weight", "shared_head.head.weight"):
        assert f"model.layers.{n}.{name}" in stored
    assert torch.equal(stored["model.layers.1.mlp.gate.e_score_correction_bias"], model.layers[1].ffn.gate.bias)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_interleave"] and config["num_nextn_predict_layers"] == 1
    assert (config["rope_scaling"] is None) == (model.args.max_seq_len <= model.args.original_seq_len)
    assert hf.load_hf_tokenizer(out).to_dict() == TOK.to_dict()


def test_mtp_layers_can_be_left_out(exported):
    model, out = exported
    args, back = import_hf(out, mtp=False)
    assert args.mtp_depth == 0 and not any(k.startswith("mtp.") for k in back.state_dict())
    idx = batches(model.args)[1]
    assert torch.equal(back(idx)[0], model(idx)[0])


# config.json of the released DeepSeek-V3 (its FP8 quantization_config left out: that one is refused)
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


def test_the_released_v3_config_is_our_671b_preset():
    args, info = hf.args_from_hf_config(V3_CONFIG)
    assert args == ModelArgs.preset("671B", max_seq_len=163840, init_std=0.02)
    assert info == {"rope_interleave": True, "tie_word_embeddings": False}
    back = hf.hf_config(args)                                  # and our export writes the same fields
    shared = [k for k in V3_CONFIG if k in back and k not in ("bos_token_id", "eos_token_id", "torch_dtype")]
    assert len(shared) > 30 and all(back[k] == V3_CONFIG[k] for k in shared)
    with pytest.raises(HFConversionError, match="quantization_config.*dequantised"):
        hf.args_from_hf_config({**V3_CONFIG, "quantization_config": {"quant_method": "fp8"}})


def test_yarn_config_maps_mscale_to_the_softmax_scale_only():
    a = small_args(**CONFIGS["q_lora_yarn"])
    assert hf.hf_config(a)["rope_scaling"] == {
        "type": "yarn", "factor": a.rope_factor, "original_max_position_embeddings": a.original_seq_len,
        "beta_fast": a.beta_fast, "beta_slow": a.beta_slow, "mscale": a.mscale, "mscale_all_dim": a.mscale}
    assert hf.hf_config(small_args(**{**CONFIGS["q_lora_yarn"], "mscale": 0.0}))["rope_scaling"]["attention_factor"] == 1
    assert hf.hf_config(small_args(**CONFIGS["q_lora_0"]))["rope_scaling"] is None     # YaRN off in model.py


def test_transformers_derives_our_softmax_scale_and_no_rotary_amplitude(exported, transformers):
    model, out = exported
    theirs = hf.load_transformers_model(out)
    assert theirs.model.layers[0].self_attn.scaling == pytest.approx(model.layers[0].attn.softmax_scale, rel=1e-12)
    assert theirs.model.rotary_emb.attention_scaling == 1.0


def test_command_line_round_trip_and_sample_loads_the_result(tmp_path, capsys):
    model = random_model(small_args(**CONFIGS["q_lora_0"]))
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": model.args.to_dict(),
                           "tokenizer": TOK.to_dict(), "config": {}, "kind": "pretrain"})
    assert hf.main(["export", f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}"]) == 0
    assert hf.main(["import", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'back.pt'}"]) == 0
    back, tok, meta = load_model(tmp_path / "back.pt")                     # what sample.py does
    assert meta["kind"] == "hf_import" and tok.to_dict() == TOK.to_dict()
    idx = batches(model.args)[1]
    assert torch.equal(back(idx)[0], model(idx)[0])
    (tmp_path / "hf" / "tokenizer_tinyseek.json").unlink()
    assert hf.main(["import", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'x.pt'}"]) == 1
    assert "no tinyseek tokenizer can be recovered" in capsys.readouterr().err
    assert hf.main(["import", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'x.pt'}", "--tokenizer=char"]) == 0


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def folder(exported, tmp_path):
    """A writable copy of an exported folder."""
    _, out = exported
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def edit_config(folder, **changes):
    """Change fields of the folder's config.json."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    """Apply fn to the folder's tensors (a dict) and write them back."""
    path = folder / "model.safetensors"
    state = safetensors_torch.load_file(str(path))
    fn(state)
    safetensors_torch.save_file(state, str(path))


def test_missing_files_are_named(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFConversionError, match="no model.safetensors"):
        import_hf(folder)
    (folder / "config.json").unlink()
    with pytest.raises(HFConversionError, match="no config.json"):
        import_hf(folder)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unknown architecture.*llama"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "quantization_config"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                       "mscale_all_dim": 0.5}}, "rope_scaling.*mscale != mscale_all_dim"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
])
def test_unsupported_config_fields_are_refused_by_name(folder, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(HFConversionError, match=message):
        import_hf(folder)


def test_bad_tensors_are_named(folder):
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    original = safetensors_torch.load_file(str(folder / "model.safetensors"))[key]
    edit_tensors(folder, lambda s: s.update({key: s[key][:-1].clone()}))
    with pytest.raises(HFConversionError, match=re.escape(f"shape mismatch for '{key}'")):
        import_hf(folder)
    edit_tensors(folder, lambda s: s.pop(key))
    with pytest.raises(HFConversionError, match=re.escape(f"lacks the weight '{key}'")):
        import_hf(folder)
    edit_tensors(folder, lambda s: s.update({key: original, "model.extra.weight": torch.zeros(1)}))
    with pytest.raises(HFConversionError, match="unexpected weight 'model.extra.weight'"):
        import_hf(folder)


def test_models_transformers_cannot_run_the_same_way_are_not_exported(tmp_path):
    with pytest.raises(HFConversionError, match="score_func='softmax'"):
        export_hf(Transformer(small_args(score_func="softmax", n_expert_groups=1, n_limited_groups=1)), tmp_path)
    with pytest.raises(HFConversionError, match="one expert per group"):
        export_hf(Transformer(small_args(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2)), tmp_path)
    assert not any(tmp_path.iterdir())                                     # nothing half-written
