"""Tests for extras/bench.py: every comparison's arms differ only in the thing compared, the rows return
numbers that fill docs/bench/template.md, and --quick produces every row.

Run: python -m pytest tests/test_bench.py -q          (add -m "not slow" to skip the --quick run)
"""

import json
import os
import string
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from extras import bench
from model import ModelArgs
from train import count_params

ROOT = Path(__file__).resolve().parents[1]
MODES = {"quick": bench.BenchConfig(quick=True), "full": bench.BenchConfig()}
DENSE = {"n_dense_layers": 4}
EXPECTED = {                       # comparison -> {arm: {ModelArgs field: value in that arm}}
    **{f"moe_vs_dense{d}_{k}": {f"dense{d}_{k}": DENSE} for d in ("", "_text") for k in ("seconds", "tokens")},
    "balancing": {"aux_loss": {"bias_update_speed": 0.0, "seq_aux_alpha": bench.AUX_LOSS_ALPHA},
                  "no_balance": {"bias_update_speed": 0.0, "seq_aux_alpha": 0.0}},
    "mtp": {"no_mtp": {"mtp_depth": 0}},
    "fp8": {"fp8": {"fp8": True}},
    "optimizer_seconds": {"adamw_seconds": {}},
    "optimizer_tokens": {"adamw_tokens": {}},
}
TRAIN_EXPECTED = {f"adamw_{k}": {"optimizer": "adamw", "lr": 3e-3} for k in ("seconds", "tokens")}   # AdamW's own lr


@pytest.mark.parametrize("mode", MODES)
def test_training_arms_differ_only_in_the_compared_fields(mode):
    arms = bench.arm_configs(MODES[mode], "t.txt")
    assert set(arms) == set(EXPECTED)
    for name, pair in arms.items():
        bench.check_arms(pair)                                   # what bench.py itself runs before training
        first = pair[0]
        for arm in pair[1:]:
            a, b = first.model_args(512), arm.model_args(512)
            expected_train = TRAIN_EXPECTED.get(arm.name, {})
            assert bench.config_diff(first.train, arm.train) - {"model"} == set(expected_train), (name, arm.name)
            assert all(getattr(arm.train, f) == v for f, v in expected_train.items()), (name, arm.name)
            assert set(arm.train_differs_in) == set(expected_train), (name, arm.name)
            assert bench.config_diff(a, b) == set(arm.differs_in), (name, arm.name)
            for f, value in EXPECTED[name][arm.name].items():
                assert getattr(b, f) == value, (name, arm.name, f)
        assert first.model_args(512).fp8 is False and first.model_args(512).mtp_depth == 1
    # an arm name is one run: identical configurations wherever it appears
    by_name = {}
    for pair in arms.values():
        for arm in pair:
            assert by_name.setdefault(arm.name, arm.train) == arm.train, arm.name
    assert arms["moe_vs_dense_tokens"][0].name == "base" == arms["balancing"][0].name == arms["mtp"][0].name
    assert arms["fp8"][0].train == replace(by_name["base"], dtype="bfloat16")   # BF16: the base run under bf16
    assert arms["optimizer_tokens"][0].name == "base" and by_name["base"].optimizer == "muon"   # train.py's default
    assert arms["optimizer_seconds"][0].name == "moe_seconds"   # row 6c reuses row 2a's runs for its Muon arms


@pytest.mark.parametrize("mode", MODES)
def test_budgets_equal_seconds_and_equal_tokens(mode):
    cfg, b = MODES[mode], bench.budget(MODES[mode])
    arms = bench.arm_configs(cfg, "t.txt")
    for data in ("", "_text"):
        for arm in arms[f"moe_vs_dense{data}_seconds"]:
            assert arm.train.max_seconds == b.seconds_per_arm > 0 and arm.train.max_iters >= 10**9
        for arm in arms[f"moe_vs_dense{data}_tokens"]:
            assert arm.train.max_iters == b.steps_per_arm and arm.train.max_seconds == 0
    for pair in arms.values():
        for arm in pair:
            t = arm.train
            text = "_text" in arm.name
            assert (t.data, t.tokenizer) == (("t.txt", "char") if text else ("", "bpe")), arm.name
            assert (t.seed, t.n_examples, t.preset, t.n_eval) == (cfg.seed, b.n_examples, "tiny", 0)
    for arm in arms["optimizer_seconds"]:
        assert arm.train.max_seconds == b.seconds_per_arm > 0 and arm.train.max_iters >= 10**9
    for name in ("balancing", "mtp", "fp8", "optimizer_tokens"):
        assert all(a.train.max_iters == b.steps_per_arm and a.train.max_seconds == 0 for a in arms[name])
    custom = bench.arm_configs(bench.BenchConfig(quick=True, seconds_per_arm=3, steps_per_arm=7))
    assert custom["moe_vs_dense_seconds"][1].train.max_seconds == 3 and custom["fp8"][1].train.max_iters == 7


def test_dense_arm_activates_as_many_parameters_as_the_moe():
    moe, dense = (arm.model_args(285) for arm in bench.arm_configs(MODES["full"])["moe_vs_dense_seconds"])
    pm, pd = count_params(moe), count_params(dense)
    assert dense.n_dense_layers == dense.n_layers and moe.n_dense_layers < moe.n_layers
    assert pd["activated"] == pytest.approx(pm["activated"], rel=0.01)
    assert pm["total"] > 1.3 * pd["total"]                     # the MoE holds many more parameters ...
    assert pm["mtp"] == pd["mtp"]                              # ... and the same MTP module (an MoE block in both)


def test_check_arms_rejects_any_other_difference():
    moe, dense = bench.arm_configs(MODES["quick"])["moe_vs_dense_seconds"]
    with pytest.raises(ValueError, match="lr"):
        bench.check_arms([moe, replace(dense, train=replace(dense.train, lr=1e-3))])
    with pytest.raises(ValueError, match="n_heads"):
        bench.check_arms([moe, replace(dense, train=bench.with_model(dense.train, n_heads=2))])
    with pytest.raises(ValueError, match="inter_dim"):
        bench.check_arms([moe, replace(dense, differs_in=frozenset({"n_dense_layers"}))])
    bf16, fp8 = bench.arm_configs(MODES["quick"])["fp8"]
    with pytest.raises(ValueError, match="seed"):
        bench.check_arms([bf16, replace(fp8, train=replace(fp8.train, seed=1))])
    with pytest.raises(ValueError, match="optimizer"):                # a TrainConfig difference must be declared
        bench.check_arms([bf16, replace(fp8, train=replace(fp8.train, optimizer="adamw"))])
    muon, adamw = bench.arm_configs(MODES["quick"])["optimizer_tokens"]
    assert (muon.train.lr, adamw.train.lr) == (train.DEFAULT_LR["muon"], train.DEFAULT_LR["adamw"])
    with pytest.raises(ValueError, match="seed"):                     # ... and is the only one allowed
        bench.check_arms([muon, replace(adamw, train=replace(adamw.train, seed=1))])


def test_decode_and_grpo_arms_differ_in_one_field():
    for preset, context in (("tiny", 1000), ("small", 2048)):
        d = bench.decode_configs(preset, context, 32)
        assert bench.config_diff(d["absorb"], d["naive"]) == {"attn_impl"}
        assert d["absorb"].max_seq_len == context + 32 == d["absorb"].original_seq_len          # no YaRN
    for mode in MODES.values():
        g = bench.grpo_configs(mode, "ckpt.pt")
        assert sorted(g) == [4, 8, 16]
        for cfg in g.values():
            assert bench.config_diff(g[4], cfg) <= {"group_size"} and cfg.group_size in g
    assert bench.budget(MODES["full"]).small_context == 2048 and bench.budget(MODES["full"]).fp8_seeds == 3


def test_cache_bytes_row_reads_the_cache_tensors():
    n = bench.cache_bytes(None)
    # tiny: latent d_c + d_h^R = 32 + 16; naive per-head keys 4 * (32 + 16) and values 4 * 32; float32
    assert (n["tiny_absorb"], n["tiny_naive"], n["tiny_mha_formula"]) == (48 * 4, 320 * 4, 256 * 4)
    s = ModelArgs.preset("small")
    assert n["small_absorb"] == 4 * (s.kv_lora_rank + s.qk_rope_head_dim)
    assert n["small_naive"] == 4 * s.n_heads * (s.qk_head_dim + s.v_head_dim)


@pytest.mark.slow                # builds the 266M-parameter `small` preset (1 GiB)
def test_absorb_decode_row_on_a_short_context(tmp_path):
    b = bench.Bench(bench.BenchConfig(quick=True), "cpu", tmp_path)
    b.budget = replace(b.budget, tiny_context=24, small_context=8, decode_new=3, repeats=1)
    n = bench.absorb_decode(b)
    for key in ("tiny_b1", "small_b1", "small_b8"):
        assert n[f"{key}_tok_s_absorb"] > 0 and n[f"{key}_tok_s_naive"] > 0
        assert n[f"{key}_ratio"] == pytest.approx(n[f"{key}_tok_s_absorb"] / n[f"{key}_tok_s_naive"])
        assert n[f"{key}_read_naive_kib"] > n[f"{key}_read_absorb_kib"] > 0
    s = ModelArgs.preset("small")     # bytes read per token: per position and layer x layers x mean context
    assert n["small_b1_read_absorb_kib"] * 2**10 == 4 * (s.kv_lora_rank + s.qk_rope_head_dim) * s.n_layers * 9.5
    assert n["tiny_b1_same_tokens"] == "yes"


def test_accumulation_row_is_skipped_until_wired_and_measures_through_the_hook(tmp_path, monkeypatch):
    b = bench.Bench(bench.BenchConfig(quick=True), "cpu", tmp_path)
    monkeypatch.setattr(bench, "ACCUMULATION_MATMUL", None)
    assert "not measured" in bench.accumulation(b)["skipped"]             # no made-up numbers
    calls = []

    def exact(a, w, bits, n_c):
        """A float32 matmul: an accumulator with no precision limit."""
        calls.append((a.shape[1], bits, n_c))
        return a @ w
    monkeypatch.setattr(bench, "ACCUMULATION_MATMUL", exact)
    n = bench.accumulation(b)
    assert (4096, 14, None) in calls and (4096, 14, 128) in calls
    assert 0 <= n["plain_4096"] < 1e-4 and 0 <= n["promoted_4096"] < 1e-4   # percent: float32 rounding only
    row = bench.fill(bench.read_template(), "5b", n)
    assert "K = 4096" in row["measured"] and "{" not in row["measured"]


def test_fp8_row_compares_with_bf16_in_pairs_of_seeds():
    bf16, fp8 = bench.arm_configs(MODES["full"])["fp8"]
    assert bf16.train.dtype == fp8.train.dtype == "bfloat16"             # V3's baseline, not float32
    assert fp8.model_args(512).fp8 and not bf16.model_args(512).fp8
    for seed in (1337, 1338, 1339):                                      # how fp8_vs_bf16 builds each seed's pair
        pair = [replace(a, name=f"{a.name}_s{seed}", train=replace(a.train, seed=seed)) for a in (bf16, fp8)]
        bench.check_arms(pair)
        assert {a.train.seed for a in pair} == {seed}


def test_gpu_row_path_runs_on_a_cpu_with_a_small_preset(tmp_path):
    b = bench.Bench(bench.BenchConfig(quick=True), "cpu", tmp_path)
    arms = {impl: bench.gpu_efficiency(b, device="cpu", preset="tiny", steps=4, batch_size=2, block_size=32,
                                       compile_model=False, n_examples=2000, model=f"train_attn_impl={impl}")
            for impl in ("absorb", "naive")}
    for impl, g in arms.items():
        assert g["steps"] == 4 and g["tok_per_s"] > 0 and g["peak_mem"] is None and g["first_step_s"] > 0
        log = (tmp_path / "runs" / f"gpu_tiny_train_attn_impl-{impl}" / "train.log").read_text()
        assert f"train_attn_impl={impl}" in log
    # the same weights and data: the paths differ in rounding only (naive == absorbed is tested in test_model)
    assert arms["naive"]["val_loss"] == pytest.approx(arms["absorb"]["val_loss"], rel=1e-3)
    n = arms["absorb"] | {f"naive_{k}": v for k, v in arms["naive"].items()} | {"naive_over_absorb": 1.0}
    row = bench.fill(bench.read_template(), "6b", n | {"peak_mem": 0.0, "naive_peak_mem": 0.0})
    assert "naive" in row["measured"] and "{" not in "".join(row.values())


def test_text_corpus_is_prose_from_the_repository(tmp_path):
    text = bench.write_text_corpus(tmp_path / "c.txt").read_text()
    assert len(text) > 50_000 and "Multi-Token Prediction" in text and "def " not in text[:2000]


def test_template_has_every_row_and_its_placeholders_are_the_rows_numbers():
    template = bench.read_template()
    assert set(bench.ROWS) | {"skipped", "quick", "notes"} == set(template)
    for rid in bench.ROWS:
        assert set(template[rid]) >= {"comparison", "measured", "ratio", "reading"}, rid
    n = bench.cache_bytes(None)                                  # a real row's numbers fill its section
    row = bench.fill(template, "1a", n)
    assert f"{n['tiny_absorb']} B" in row["measured"] and "{" not in "".join(row.values())
    with pytest.raises(KeyError):
        bench.fill(template, "1a", {})                           # a missing number is an error, not blank text
    row = bench.fill(template, "6b", bench.skipped("no GPU", "run it on one"))
    assert (row["measured"], row["ratio"], row["reading"]) == ("no GPU", "-", "run it on one")
    for rid in bench.ROWS:                                       # every placeholder is a plain name
        names = {f for s in template[rid].values() for _, f, _, _ in string.Formatter().parse(s) if f}
        assert all(f.isidentifier() for f in names), (rid, names)


def test_flags_and_table():
    assert bench.BenchConfig(only="3, 1").selected() == ["1a", "1b", "3"]
    assert bench.BenchConfig(only="6B,4").selected() == ["4a", "4b", "6b"]
    assert bench.BenchConfig().selected() == list(bench.ROWS)
    for bad in ("9", "x", "6d", "3a"):
        with pytest.raises(ValueError, match="1-8"):
            bench.BenchConfig(only=bad)
    meta = {"date": "d", "machine": bench.machine(), "command": "python -m extras.bench", "mode": "quick", "seconds": 60}
    row = {"id": "1a", "comparison": "a | b", "measured": "m", "ratio": "1.00x", "reading": "r"}
    text = bench.markdown([row], meta, ["note"], ["x.png"])
    assert "| 1a | a \\| b | m | 1.00x | r |" in text and "![x](x.png)" in text and "python -m extras.bench" in text


def test_progress_lines_count_percent_and_eta(capsys):
    p = bench.Progress(4, "row", "")
    for i in range(4):
        p(f"item {i}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("row 1/4 (0%) item 0") and "ETA -" in lines[0]
    assert lines[2].startswith("row 3/4 (50%) item 2") and "ETA 0:00" in lines[2]


@pytest.mark.slow
def test_quick_run_produces_every_row(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}          # no thread oversubscription on a shared CI box
    # every row, with a fraction of the quick budgets for training (1 s and 4 steps per arm instead of 8 s and 24):
    # this checks that each row runs and reports, not its figures, and the two flags are exercised on the way
    proc = subprocess.run([sys.executable, "-m", "extras.bench", "--quick", "--seconds_per_arm=1", "--steps_per_arm=4",
                           f"--out_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "row 15/15 (93%)" in proc.stdout and "ETA" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    ids = [r["id"] for r in res["rows"]]
    assert ids == list(bench.ROWS)
    n = res["numbers"]
    assert n["4b"]["same_tokens"] == "yes" and 0 <= n["4b"]["acceptance"] <= 1
    assert n["5a"]["seeds"] == 3 and len(n["5a"]["per_seed_fp8"]) == 3
    assert n["1b"]["small_b8_tok_s_absorb"] > 0 and n["2b"]["t_loss_moe"] > 0
    assert n["2a"]["seconds"] == 1 and n["2a"]["t_steps_moe"] == n["2a"]["t_steps_dense"] == 4
    row8 = [r for r in res["rows"] if r["id"].startswith("8")]
    assert all(r["ratio"] == "-" for r in row8) or all(r["ratio"].endswith("x") for r in row8)
    if not torch.cuda.is_available():
        assert "not measured" in n["6b"]["skipped"] and "--only=6b --device=cuda" in n["6b"]["how"]
    md = (out / "results.md").read_text()
    for i in ids:
        assert f"| {i} |" in md
    assert "- date:" in md and "- machine:" in md and "- command: `python -m extras.bench --quick" in md
    assert n["6c"]["t_loss_muon"] > 0 and n["6c"]["s_steps_adamw"] > 0
    for png in ("moe_vs_dense.png", "moe_vs_dense_text.png", "balancing.png", "mtp.png", "fp8.png", "optimizer.png",
                "grpo_time.png"):
        assert (out / png).stat().st_size > 0 and f"({png})" in md
