"""Tests for extras/r1.py: cold-start data, rejection sampling keeps exactly the verified samples, clear errors,
and (slow) the whole R1 recipe and the distillation comparison end to end at toy budgets.

Run: python -m pytest tests/test_r1.py -q            (add -m "not slow" to skip the end-to-end run)
"""

import json

import pytest
import torch

import grpo
import tasks
import train
from extras import r1


def group(question: str, texts: list[str], finished: list[bool]) -> grpo.Group:
    """A scored grpo.Group for an arithmetic question, as grpo.sample_groups would build it."""
    problem = tasks.arithmetic_problem(question)
    scores = [tasks.reward(t, problem) for t in texts]
    return grpo.Group(problem, [0], [[1]] * len(texts), finished, texts, [s["total"] for s in scores],
                      [s["accuracy"] for s in scores], [s["format"] for s in scores])


def test_select_verified_keeps_exactly_the_verified_finished_wellformed_samples():
    g1 = group("37+48", ["7+8+0=15 3+4+1=08</think><answer>85</answer>",      # right: kept
                         "7+8+0=15 3+4+0=07</think><answer>75</answer>",      # wrong answer
                         "7+8+0=15 3+4+1=08<answer>85</answer>",              # right answer, broken format
                         "7+8+0=15 3+4+1=08</think><answer>85</answer>"],     # right but cut off (no EOS)
               [True, True, True, False])
    g2 = group("9-3", ["9-3-0=6</think><answer>6</answer>", "</think><answer>6</answer>"], [True, True])
    rows = r1.select_verified([g1, g2])
    assert [(r["question"], r["completion"]) for r in rows] == [
        ("37+48", "7+8+0=15 3+4+1=08</think><answer>85</answer>"),
        ("9-3", "9-3-0=6</think><answer>6</answer>"),
        ("9-3", "</think><answer>6</answer>")]
    for r in rows:
        assert r["prompt"] == tasks.format_prompt(r["question"])
        assert tasks.reward(r["completion"], tasks.arithmetic_problem(r["question"])) == \
            {"accuracy": 1.0, "format": 1.0, "total": 1.1}


def test_rejection_sample_counts_yield_and_coverage():
    """With a scripted sampler, every verified sample and only those come back, batch after batch."""
    script = {"1+1": ["</think><answer>2</answer>", "</think><answer>3</answer>"],
              "2+2": ["</think><answer>5</answer>", "</think><answer>5</answer>"],
              "3+3": ["</think><answer>6</answer>", "</think><answer>6</answer>"]}

    def fake_sample_groups(model, tok, problems, k, max_new_tokens, temperature, reward_fn, generator):
        assert k == 2
        return [group(p.question, script[p.question], [True, True]) for p in problems]

    problems = [tasks.arithmetic_problem(q) for q in script]
    rows, stats = r1.rejection_sample(None, None, problems, k=2, prompts_per_batch=2,
                                      sample_groups=fake_sample_groups)
    assert [(r["question"], r["completion"]) for r in rows] == [
        ("1+1", "</think><answer>2</answer>"), ("3+3", "</think><answer>6</answer>"),
        ("3+3", "</think><answer>6</answer>")]
    assert stats == {"samples": 6, "kept": 3, "yield": 0.5, "prompts": 3, "covered": 2}


def test_rejection_sampling_that_keeps_nothing_is_an_error_not_an_empty_dataset(tmp_path):
    def all_wrong(model, tok, problems, k, *args):
        return [group(p.question, ["</think><answer>0</answer>"] * k, [True] * k) for p in problems]

    with pytest.raises(r1.NothingVerified, match="kept none of 8 samples"):
        r1.rejection_sample(None, None, [tasks.arithmetic_problem(q) for q in ("1+2", "3+4")], k=4,
                            sample_groups=all_wrong)


def test_rejection_sample_with_a_real_model_keeps_only_what_the_verifier_accepts():
    """Real sampling from a random model: the rows are exactly the accepted samples of the groups drawn."""
    from model import ModelArgs, Transformer
    from tokenizer import get_tokenizer
    tok = get_tokenizer("char")
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=tok.n_vocab, dim=32, inter_dim=64, moe_inter_dim=16,
                                         n_layers=2, kv_lora_rank=16, q_lora_rank=0)).eval()
    drawn = []

    def recording(*args, **kwargs):
        groups = grpo.sample_groups(*args, **kwargs)
        drawn.extend(groups)
        # make every second sample of each group a right, well-formed answer, so something is kept
        for g in groups:
            for i in range(0, len(g.texts), 2):
                g.texts[i] = f"</think><answer>{g.problem.answer}</answer>"
                g.finished[i] = True
                g.accuracy[i] = g.format[i] = 1.0
        return groups

    problems = [tasks.arithmetic_problem(q) for q in ("12+30", "45-7", "8+8")]
    rows, stats = r1.rejection_sample(model, tok, problems, k=4, max_new_tokens=12, sample_groups=recording,
                                      generator=torch.Generator().manual_seed(0))
    expected = [(g.problem.question, t) for g in drawn for t, f, a, m in zip(g.texts, g.finished, g.accuracy, g.format)
                if f and a == 1.0 and m == 1.0]
    assert [(r["question"], r["completion"]) for r in rows] == expected
    assert stats["samples"] == 12 and stats["kept"] == len(expected) >= 6


def test_cold_start_examples_are_clean_distinct_and_never_heldout():
    task = tasks.ArithmeticTask(digits=(1, 2), n_operands=2, ops="+-")
    rows = r1.cold_start_examples(300, task, seed=0)
    assert len(rows) == 300 and len({r["question"] for r in rows}) == 300
    assert not any(tasks.is_heldout(r["question"]) for r in rows)
    for r in rows:
        assert tasks.reward(r["completion"], tasks.arithmetic_problem(r["question"]))["total"] == 1.1
    # the planted mistake's situation is represented (about a third of the questions), solved correctly
    flaw = sum(tasks.in_flaw_situation(tasks.arithmetic_problem(r["question"])) for r in rows)
    assert 60 < flaw < 150


def test_cold_start_file_is_valid_sft_input(tmp_path):
    out = tmp_path / "cold.jsonl"
    rows = r1.main(["coldstart", f"--out={out}", "--n_cold=20"])
    assert train.read_sft_jsonl(out) == rows


@pytest.mark.parametrize("argv,message", [
    ([], "usage: python -m extras.r1"),
    (["train"], "got 'train'"),
    (["reject"], "--init_from"),
    (["reject", "--init_from=/nonexistent/ckpt.pt"], "no checkpoint at"),
])
def test_bad_commands_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        r1.main(argv)


def test_distill_without_teacher_data_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run `python -m extras.r1 recipe` first"):
        r1.main(["distill", f"--out_dir={tmp_path}"])


def test_distill_verdict_reads_the_gap_against_its_standard_error():
    # the README's two runs on 500 problems: 96.4% vs 97.2% and 44.2% vs 23.2%
    assert r1.compare_accuracies(0.964, 0.972, 500).startswith("no clear difference")
    assert "1.1 points" in r1.compare_accuracies(0.964, 0.972, 500)          # sqrt(.964*.036/500 + .972*.028/500)
    assert r1.compare_accuracies(0.442, 0.232, 500).startswith("distillation is ahead here, by 21.0 points")
    assert r1.compare_accuracies(0.232, 0.442, 500).startswith("RL is ahead")
    assert r1.compare_accuracies(0.30, 0.50, 20).startswith("no clear difference")   # 20 points, but on 20 problems
    assert r1.compare_accuracies(0.30, 0.50, 2000).startswith("RL is ahead")
    assert r1.compare_accuracies(1.0, 1.0, 500).startswith("no clear difference")
    assert r1.compare_accuracies(1.0, 0.0, 10) == "distillation is ahead here, by 100.0 points"   # no spread at all


@pytest.mark.parametrize("flag", ["--k=0", "--n_eval=0", "--temperature=0", "--n_prompts=0"])
def test_bad_flag_values_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit):
        r1.main(["recipe", flag])
    assert flag.split("=")[0].lstrip("-") in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_and_distill_end_to_end(tmp_path):
    """The whole sequence at toy budgets on one-digit sums: every stage runs, is evaluated on the same
    held-out problems, and the outputs (JSONL results, PNGs, the rejection-sampled SFT file) are written."""
    flags = [f"--out_dir={tmp_path}", "--max_digits=1", "--pretrain_iters=120", "--pretrain_examples=5000",
             "--n_cold=50", "--cold_steps=10", "--rl_steps=2", "--sft_steps=10", "--n_prompts=40", "--k=4",
             "--n_eval=20", "--device=cpu", "--seed=0"]
    results = r1.main(["recipe", *flags])
    stages = [r["stage"] for r in results]
    assert stages == ["base", "cold start", "RL", "rejection sampling", "rejection SFT", "RL again",
                      "R1-Zero (RL from base)"]
    for r in results:
        if "accuracy" not in r:
            continue
        records = [json.loads(line) for line in
                   (tmp_path / f"eval_{r1.slug(r['stage'])}.jsonl").read_text().splitlines()]
        assert r["n"] == len(records) == 20
        for rec in records:                                  # the verifier, applied again to each completion
            problem = tasks.arithmetic_problem(rec["question"])
            assert rec["correct"] is (tasks.accuracy_reward(rec["completion"], problem) == 1.0)
        assert r["accuracy"] == sum(rec["correct"] for rec in records) / 20
    rs = results[3]
    assert rs["samples"] == 160 and 0 < rs["kept"] <= 160 and rs["yield"] == rs["kept"] / 160
    rows = train.read_sft_jsonl(tmp_path / "rejection.jsonl")
    assert len(rows) == rs["kept"]
    for row in rows:
        assert tasks.reward(row["completion"], tasks.arithmetic_problem(row["question"]))["accuracy"] == 1.0
    saved = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in saved] == stages
    assert (tmp_path / "r1_stages.png").stat().st_size > 0

    unused_by_distill = ("--n_cold", "--cold_steps", "--n_prompts", "--k")   # each command takes only its own flags
    results = r1.main(["distill", *[f for f in flags if f.split("=")[0] not in unused_by_distill]])
    assert [r["stage"] for r in results] == ["student (nano) pretrained", "student + distillation", "student + RL"]
    ckpt = torch.load(tmp_path / "student_distill" / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "sft" and ckpt["model_args"]["n_layers"] == 2
    assert (tmp_path / "distill.png").stat().st_size > 0
