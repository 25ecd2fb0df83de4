"""Tests for extras/bench.py: every comparison's arms differ only in the thing compared, and --quick produces every row.

Run: python -m pytest tests/test_bench.py -q          (add -m "not slow" to skip the ~3-minute --quick run)
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from extras import bench
from model import count_params

ROOT = Path(__file__).resolve().parents[1]
MODES = {"quick": bench.BenchConfig(quick=True), "full": bench.BenchConfig()}
EXPECTED = {                       # comparison -> {arm: {ModelArgs field: value in that arm}}
    "moe_vs_dense": {"dense": {"n_dense_layers": 4}},
    "balancing": {"aux_loss": {"bias_update_speed": 0.0, "seq_aux_alpha": bench.AUX_LOSS_ALPHA},
                  "no_balance": {"bias_update_speed": 0.0, "seq_aux_alpha": 0.0}},
    "mtp": {"no_mtp": {"mtp_depth": 0}},
    "fp8": {"fp8": {"fp8": True}},
}


@pytest.mark.parametrize("mode", MODES)
def test_training_arms_differ_only_in_the_compared_fields(mode):
    arms = bench.arm_configs(MODES[mode])
    assert set(arms) == set(EXPECTED)
    for name, pair in arms.items():
        bench.check_arms(pair)                                   # what bench.py itself runs before training
        first = pair[0]
        for arm in pair[1:]:
            a, b = first.model_args(512), arm.model_args(512)
            assert bench.config_diff(first.train, arm.train) == {"model"}, (name, arm.name)
            assert bench.config_diff(a, b) == set(arm.differs_in), (name, arm.name)
            for field, value in EXPECTED[name][arm.name].items():
                assert getattr(b, field) == value, (name, arm.name, field)
        assert first.model_args(512).fp8 is False and first.model_args(512).mtp_depth == 1
    # the arms called 'base' are one run: identical configurations wherever they appear
    bases = [arm.train for pair in arms.values() for arm in pair if arm.name == "base"]
    assert len(bases) == 3 and all(b == bases[0] for b in bases)
    assert arms["moe_vs_dense"][0].train == replace(bases[0], max_iters=10**9,
                                                    max_seconds=bench.budget(MODES[mode]).seconds_per_arm)


@pytest.mark.parametrize("mode", MODES)
def test_budgets_equal_seconds_for_row_2_equal_steps_for_rows_3_to_5(mode):
    cfg, b = MODES[mode], bench.budget(MODES[mode])
    arms = bench.arm_configs(cfg)
    for arm in arms["moe_vs_dense"]:
        assert arm.train.max_seconds == b.seconds_per_arm > 0 and arm.train.max_iters >= 10**9
    for name in ("balancing", "mtp", "fp8"):
        for arm in arms[name]:
            assert arm.train.max_iters == b.steps_per_arm and arm.train.max_seconds == 0
    for pair in arms.values():
        for arm in pair:
            t = arm.train
            assert (t.seed, t.data, t.n_examples, t.preset, t.n_eval) == (cfg.seed, "", b.n_examples, "tiny", 0)
    custom = bench.arm_configs(bench.BenchConfig(quick=True, seconds_per_arm=3, steps_per_arm=7))
    assert custom["moe_vs_dense"][1].train.max_seconds == 3 and custom["fp8"][1].train.max_iters == 7


def test_dense_arm_activates_as_many_parameters_as_the_moe():
    moe, dense = (arm.model_args(285) for arm in bench.arm_configs(MODES["full"])["moe_vs_dense"])
    pm, pd = count_params(moe), count_params(dense)
    assert dense.n_dense_layers == dense.n_layers and moe.n_dense_layers < moe.n_layers
    assert pd["activated"] == pytest.approx(pm["activated"], rel=0.01)
    assert pm["total"] > 1.3 * pd["total"]                     # the MoE holds many more parameters ...
    assert pm["mtp"] == pd["mtp"]                              # ... and the same MTP module (an MoE block in both)


def test_check_arms_rejects_any_other_difference():
    moe, dense = bench.arm_configs(MODES["quick"])["moe_vs_dense"]
    with pytest.raises(ValueError, match="lr"):
        bench.check_arms([moe, replace(dense, train=replace(dense.train, lr=1e-3))])
    with pytest.raises(ValueError, match="n_heads"):
        bench.check_arms([moe, replace(dense, train=bench.with_model(dense.train, n_heads=2))])
    with pytest.raises(ValueError, match="inter_dim"):
        bench.check_arms([moe, replace(dense, differs_in=frozenset({"n_dense_layers"}))])


def test_decode_and_grpo_arms_differ_in_one_field():
    for mode in MODES.values():
        d = bench.decode_configs(mode)
        assert bench.config_diff(d["absorb"], d["naive"]) == {"attn_impl"}
        assert d["absorb"].max_seq_len >= bench.budget(mode).decode_prompt + bench.budget(mode).decode_new
        assert d["absorb"].original_seq_len == d["absorb"].max_seq_len          # no YaRN
        g = bench.grpo_configs(mode, "ckpt.pt")
        assert sorted(g) == [4, 8, 16]
        for cfg in g.values():
            assert bench.config_diff(g[4], cfg) <= {"group_size"} and cfg.group_size in g


def test_mla_row_measures_cache_bytes_from_tensors():
    cfg = bench.BenchConfig(quick=True)
    b = bench.Bench(cfg, "cpu", Path("unused"))
    b.budget = replace(b.budget, decode_prompt=40, decode_new=4, repeats=1)
    rows = bench.compare_mla(b)
    assert [r["id"] for r in rows] == ["1a", "1b"]
    n = rows[0]["numbers"]
    # tiny: latent d_c + d_h^R = 32 + 16; naive per-head keys 4 * (32 + 16) and values 4 * 32; float32
    assert (n["bytes_absorb"], n["bytes_naive"], n["bytes_mha_formula"]) == (48 * 4, 320 * 4, 256 * 4)
    assert rows[1]["numbers"]["same_tokens"] is True
    assert rows[1]["numbers"]["tok_s_absorb"] > 0 and rows[1]["numbers"]["tok_s_naive"] > 0


def test_gpu_row_path_runs_on_a_cpu_with_a_small_preset(tmp_path):
    b = bench.Bench(bench.BenchConfig(quick=True), "cpu", tmp_path)
    g = bench.gpu_efficiency(b, device="cpu", preset="tiny", steps=4, batch_size=2, block_size=32,
                             compile_model=False, n_examples=2000)
    assert g["steps"] == 4 and g["tok_per_s"] > 0 and g["peak_mem"] is None
    assert (tmp_path / "runs" / "gpu_tiny" / "train.log").stat().st_size > 0


def test_flags_and_table():
    assert bench.BenchConfig(only="3, 1").selected() == [1, 3]
    assert bench.BenchConfig().selected() == list(range(1, 9))
    for bad in ("9", "x"):
        with pytest.raises(ValueError, match="1-8"):
            bench.BenchConfig(only=bad)
    meta = {"date": "d", "machine": bench.machine(), "command": "python -m extras.bench", "mode": "quick", "seconds": 60}
    text = bench.markdown([bench.row("1a", "a | b", "m", "1.00x", "r")], meta, ["note"], ["x.png"])
    assert "| 1a | a \\| b | m | 1.00x | r |" in text and "![x](x.png)" in text and "python -m extras.bench" in text


@pytest.mark.slow
def test_quick_run_produces_every_row(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}          # no thread oversubscription on a shared CI box
    proc = subprocess.run([sys.executable, "-m", "extras.bench", "--quick", f"--out_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    ids = [r["id"] for r in res["rows"]]
    for number in range(1, 9):
        assert any(i.rstrip("ab") == str(number) for i in ids), (number, ids)
    assert {"1a", "1b", "2", "3", "4a", "4b", "5", "6a", "6b", "7"} <= set(ids)
    row8 = [r for r in res["rows"] if r["id"].startswith("8")]
    assert all("skipped" in r["measured"] for r in row8) or {r["id"] for r in row8} == {"8a", "8b"}
    gpu = next(r for r in res["rows"] if r["id"] == "6b")
    if not torch.cuda.is_available():
        assert "not measured yet" in gpu["measured"] and "--only=6 --device=cuda" in gpu["reading"]
    md = (out / "results.md").read_text()
    for i in ids:
        assert f"| {i} |" in md
    assert "- date:" in md and "- machine:" in md and "- command: `python -m extras.bench --quick" in md
    for png in ("moe_vs_dense.png", "balancing.png", "mtp.png", "fp8.png", "grpo_time.png"):
        assert (out / png).stat().st_size > 0 and f"({png})" in md
