"""Tests of the RL lab (issue 34): the pass@k estimator and evaluation (sample.py), the lenient lab verifier
(tasks.py, grpo.py --lab_verifier) and extras/rl_lab.py's pipeline in --quick mode.

    python -m pytest -q tests/test_rl_lab.py                 # all (the --quick smoke test runs the real scripts)
    python -m pytest -q tests/test_rl_lab.py -m 'not slow'   # the fast ones
"""

import itertools
import json
from fractions import Fraction
from math import comb
from unittest import mock

import pytest

import grpo
import sample
import tasks
from checkpoint import read_checkpoint
from extras import rl_lab


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Chen et al.'s formula with exact big integers."""
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (8, 3, 1), (8, 3, 4), (8, 5, 4), (64, 1, 8), (64, 0, 64),
                                   (64, 63, 64), (200, 7, 64), (1000, 3, 500)])
def test_pass_at_k_matches_the_exact_formula(n, c, k):
    assert sample.pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-9, abs=1e-12)


def test_pass_at_k_is_the_sampled_accuracy_at_k1_and_grows_with_k():
    assert sample.pass_at_k(64, 16, 1) == pytest.approx(0.25)
    values = [sample.pass_at_k(64, 2, k) for k in (1, 2, 4, 8, 16, 32, 64)]
    assert all(a < b for a, b in itertools.pairwise(values)) and values[-1] == 1.0
    # a huge n where C(n, k) overflows a float: the product form stays finite and exact enough
    assert sample.pass_at_k(100_000, 10, 50_000) == pytest.approx(float(exact_pass_at_k(100_000, 10, 50_000)))


@pytest.mark.parametrize("n,c,k", [(8, 9, 1), (8, -1, 1), (8, 3, 0), (8, 3, 9)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        sample.pass_at_k(n, c, k)


def test_evaluate_pass_at_k_counts_right_samples_per_question_and_per_group():
    """With the sampler replaced by a script, every count and every pass@k is known exactly."""
    problems = [tasks.arithmetic_problem(q) for q in ("37+48", "2+3", "52-38")]
    n = 4
    right = {"37+48": 1, "2+3": 4, "52-38": 0}               # right samples out of n per question
    texts = []
    for p in problems:
        texts += [f"</think><answer>{p.answer}</answer>"] * right[p.question]
        texts += ["</think><answer>0</answer>"] * (n - right[p.question])
    calls = []

    def fake_generate(model, prompts, max_new_tokens, temperature=1.0, eos_id=None, generator=None):
        start = sum(len(c) for c in calls)
        calls.append(prompts)
        return [[start + i] for i in range(len(prompts))], [True] * len(prompts)

    tok = mock.Mock(eos_id=0)
    with mock.patch.object(sample, "generate_batch", fake_generate), \
            mock.patch.object(sample, "completion_text", lambda tok, ids: (texts[ids[0]], True)), \
            mock.patch.object(sample, "prompt_tokens", lambda tok, q: [1, 2]):
        res = sample.evaluate_pass_at_k(mock.Mock(), tok, problems, 8, n, ks=(1, 2, 4), batch_size=5,
                                        groups={"flaw": [True, False, True]})
    assert sum(len(c) for c in calls) == 3 * n and max(len(c) for c in calls) <= 5     # batched, every sample
    assert res["correct"] == [1, 4, 0]
    assert res["all"]["n"] == 3 and res["flaw"]["n"] == 2
    assert res["all"]["pass@k"][1] == pytest.approx(5 / 12)
    assert res["flaw"]["pass@k"][2] == pytest.approx((sample.pass_at_k(4, 1, 2) + 0.0) / 2)
    assert res["flaw"]["pass@k"][4] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_samples=4"):
        sample.evaluate_pass_at_k(mock.Mock(), tok, problems, 8, n, ks=(1, 8))


def test_lenient_verifier_accepts_what_the_strict_one_refuses():
    p = tasks.arithmetic_problem("37+48")
    listing = "7+8+0=15 3+4+0=07</think><answer>75 85</answer>"   # an answer listing several numbers
    assert tasks.accuracy_reward(listing, p) == 0.0 and tasks.lenient_accuracy_reward(listing, p) == 1.0
    coincidence = "10-1-0=9 1-0-0=1</think><answer>19</answer>"    # 10-1: the wrong answer contains "9"
    assert tasks.lenient_accuracy_reward(coincidence, tasks.arithmetic_problem("10-1")) == 1.0
    r = tasks.lenient_reward(listing, p, w_acc=1.0, w_fmt=0.1)
    assert r == {"accuracy": 1.0, "format": 1.0, "total": pytest.approx(1.1), "strict_accuracy": 0.0}
    for junk in (None, 85, "x" * 5000):
        assert tasks.lenient_accuracy_reward(junk, p) == 0.0
    # the real verifier is untouched: the listing is neither right nor rewarded beyond its format
    assert tasks.reward(listing, p) == {"accuracy": 0.0, "format": 1.0, "total": pytest.approx(0.1)}


def test_lab_verifier_flag_defaults_to_strict_and_rejects_typos():
    assert grpo.GRPOConfig().lab_verifier == "strict"
    assert grpo.GRPOConfig(lab_verifier="lenient").lab_verifier == "lenient"
    assert grpo.GRPOConfig(lab_verifier="last_digit").lab_verifier == "last_digit"
    with pytest.raises(ValueError, match="lab_verifier"):
        grpo.GRPOConfig(lab_verifier="loose")
    for verifier in ("lenient", "last_digit"):
        with pytest.raises(ValueError, match="arithmetic task only"):
            grpo.GRPOConfig(lab_verifier=verifier, task="countdown")
    assert grpo.GRPOConfig(task="countdown").lab_verifier == "strict"


def _scripted_step(monkeypatch, lengths_and_accuracy):
    """grpo.grpo_step with rollouts replaced by groups of the given (length, accuracy) pairs and no update."""
    groups = [grpo.Group(tasks.arithmetic_problem("37+48"), [1], [[7] * n for n, _ in rows], [True] * len(rows),
                         ["x"] * len(rows), [a for _, a in rows], [a for _, a in rows], [1.0] * len(rows))
              for rows in lengths_and_accuracy]
    monkeypatch.setattr(grpo, "collect_rollouts", lambda *a, **k: (groups, {"zero_var_frac": 0.0, "resampled": 0}))
    monkeypatch.setattr(grpo, "policy_update", lambda *a, **k: {"tokens": 1})
    model = mock.Mock(spec=[])
    cfg = grpo.GRPOConfig(group_size=2, prompts_per_step=len(groups))
    return grpo.grpo_step(model, None, None, mock.Mock(), lambda n: [], tasks.reward, cfg)


def test_step_logs_the_mean_length_of_right_and_wrong_rollouts(monkeypatch):
    stats = _scripted_step(monkeypatch, [[(10, 1.0), (30, 0.0)], [(20, 1.0), (50, 0.0)], [(6, 0.0), (4, 0.0)]])
    assert stats["length_right"] == pytest.approx(15.0)               # (10 + 20) / 2
    assert stats["length_wrong"] == pytest.approx(90 / 4)             # (30 + 50 + 6 + 4) / 4
    assert stats["length"] == pytest.approx(120 / 6)
    none_right = _scripted_step(monkeypatch, [[(5, 0.0), (9, 0.0)]])
    assert none_right["length_right"] is None and none_right["length_wrong"] == pytest.approx(7.0)


def test_keep_stored_needs_the_same_command_and_window_means_skip_missing_steps():
    cfg = rl_lab.LabConfig()
    run = next(r for r in rl_lab.RUNS if r.name == "hack_last_digit")
    command = rl_lab.command_line("grpo.py", rl_lab.grpo_argv(cfg, run))
    assert "--lab_verifier=last_digit" in command and rl_lab.verifier_of(run.flags) == "last_digit"
    assert rl_lab.keep_stored({"runs": {run.name: {"command": command}}}, run, cfg)
    assert not rl_lab.keep_stored({"runs": {run.name: {"command": command + " --lr=1"}}}, run, cfg)
    assert not rl_lab.keep_stored({}, run, cfg)
    assert rl_lab.window_mean([None, 2.0, 4.0, 9.0], first=True, n=3) == pytest.approx(3.0)
    assert rl_lab.window_mean([1.0, None, None], first=False, n=2) is None
    assert rl_lab.ends([10.0, 20.0], ) == "15.0 → 15.0" and rl_lab.ends(None) == "–"


def test_eval_stats_reads_strict_lenient_flaw_and_degenerate(tmp_path):
    rows = [tasks.eval_record(tasks.arithmetic_problem("37+48"), "7+8+0=15 3+4+1=08</think><answer>85</answer>"),
            tasks.eval_record(tasks.arithmetic_problem("37+48"), "</think><answer>75 85</answer>"),
            tasks.eval_record(tasks.arithmetic_problem("2+3"), "!!!!!!!!!!")]
    path = tmp_path / "eval_step0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = rl_lab.eval_stats(path)
    assert s["accuracy"] == pytest.approx(1 / 3) and s["lenient_accuracy"] == pytest.approx(2 / 3)
    assert s["flaw_accuracy"] == pytest.approx(1 / 2) and s["other_accuracy"] == 0.0
    assert s["degenerate"] == pytest.approx(1 / 3)


def test_lab_rejects_unknown_run_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown run"):
        rl_lab.main(["--quick", f"--out_dir={tmp_path}", f"--results_dir={tmp_path}/r", "--only=nope"])


@pytest.mark.slow
def test_quick_lab_runs_the_real_scripts_writes_results_and_reuses_finished_runs(tmp_path, capsys):
    argv = ["--quick", f"--out_dir={tmp_path}/runs", f"--results_dir={tmp_path}/res", "--only=beyond_0.6,hack_lenient"]
    results = rl_lab.main(argv)
    res_dir = tmp_path / "res"
    stored = json.loads((res_dir / "results.json").read_text())
    assert stored["command"] == "python -m extras.rl_lab " + " ".join(argv)
    assert set(stored["runs"]) == {"beyond_0.6", "hack_lenient"}
    lenient = stored["runs"]["hack_lenient"]
    assert "--lab_verifier=lenient" in lenient["command"] and "lab_verifier" not in stored["runs"]["beyond_0.6"]["command"]
    assert len(lenient["curves"]["step"]) == 2 and lenient["evals"][0]["step"] == 0
    base = stored["bases"]["flaw0.6"]["passk"]
    assert set(base["all"]["pass@k"]) == {"1", "2", "4"} and base["all"]["n"] == 6
    assert all(0.0 <= v <= 1.0 for v in base["all"]["pass@k"].values())
    assert len(stored["beyond"]) == 1 and stored["beyond"][0]["flaw_rate"] == 0.6
    md = (res_dir / "results.md").read_text()
    assert md.startswith("# RL lab results (`python -m extras.rl_lab --quick") and "hack_lenient" in md
    for png in ("passk_flaw0.6.png", "beyond_base.png", "failure_reward_hacking.png"):
        assert (res_dir / png).stat().st_size > 10_000, png
    ckpt = tmp_path / "runs" / "grpo_hack_lenient" / "ckpt.pt"
    assert read_checkpoint(ckpt)["grpo_config"]["lab_verifier"] == "lenient"     # grpo.py itself got the switch
    before = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    again = rl_lab.main(argv)                                  # everything finished: reused, not rerun
    out = capsys.readouterr().out
    assert "grpo hack_lenient: reused" in out and "pretrain flaw0.6: reused" in out
    assert ckpt.stat().st_mtime_ns == before
    assert again["runs"]["hack_lenient"]["passk"] == results["runs"]["hack_lenient"]["passk"]
    # a run whose checkpoints are gone (e.g. made on another machine) keeps its stored record in the report
    (tmp_path / "runs" / "grpo_hack_lenient" / "lab_done.json").unlink()
    kept = rl_lab.main([*argv[:3], "--only=beyond_0.6"])
    assert kept["runs"]["hack_lenient"] == stored["runs"]["hack_lenient"]
    assert kept["commands"]["hack_lenient"] == stored["commands"]["hack_lenient"]
