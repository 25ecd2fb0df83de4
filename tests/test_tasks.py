"""Tests for tasks.py: problems, worked solutions, the planted flaw, the held-out split, and the
safe verifiers. Fast (a few seconds). Run from the repository root:

    python -m pytest tests/test_tasks.py -q
"""

import ast
import builtins
import operator
import random
import re
import string
from itertools import pairwise
from types import SimpleNamespace

import pytest

import tasks
from tasks import (
    ArithmeticTask,
    CountdownTask,
    Problem,
    accuracy_reward,
    arithmetic_problem,
    build_corpus,
    check_countdown,
    corpus_text,
    default_task,
    eval_record,
    flaw_situation_fraction,
    format_completion,
    format_example,
    format_prompt,
    format_reward,
    heldout_problems,
    in_flaw_situation,
    is_heldout,
    parse_answer,
    question_of,
    reward,
    worked_solution,
)

# ---------------------------------------------------------------------------------------------
# helpers (independent of tasks.py, so the tests check it rather than repeat it)
# ---------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def ref_value(expr: str) -> int:
    """Reference integer value of one of our own generated expressions (never model output)."""
    def ev(node):
        if isinstance(node, ast.Constant):
            return node.value
        return _OPS[type(node.op)](ev(node.left), ev(node.right))
    return ev(ast.parse(expr, mode="eval").body)


def split_doc(doc: str) -> tuple[str, str, str]:
    """(question, reasoning, answer) of a corpus document."""
    m = re.fullmatch(r"User: (.*)\nAssistant: <think>(.*)</think><answer>(.*)</answer>", doc, re.DOTALL)
    assert m, doc
    return m.group(1), m.group(2), m.group(3)


_COL = re.compile(r"(\d+)([+-])(\d)([+-])(\d)=(\d+)")


def answer_from_columns(reasoning: str) -> int:
    """Rebuild a two-operand +/- answer from its written columns only, checking each column."""
    negative = reasoning.startswith("-(")
    cols = _COL.findall(reasoning)
    assert cols, reasoning
    kind = cols[0][1]
    digits = []
    for i, (top, op1, bottom, op2, c, s) in enumerate(cols):
        top, bottom, c, s = int(top), int(bottom), int(c), int(s)
        assert op1 == op2 == kind
        if kind == "+":
            assert top + bottom + c == s and len(cols[i][5]) == 2  # a true equation, two digits
            digits.append(s if i == len(cols) - 1 else s % 10)
        else:
            assert top - bottom - c == s and 0 <= s <= 9
            digits.append(s)
    value = sum(d * 10**i for i, d in enumerate(digits))
    return -value if negative else value


def carries_chain(reasoning: str) -> list[tuple[int, int]]:
    """For each column after the first: (carry written in it, carry produced by the column before)."""
    cols = _COL.findall(reasoning)
    out = []
    for prev, cur in pairwise(cols):
        produced = int(prev[5]) // 10 if prev[1] == "+" else int(int(prev[0]) >= 10)
        out.append((int(cur[4]), produced))
    return out


def all_equations_true(reasoning: str) -> bool:
    """Every ``lhs=rhs`` fragment made of digits and + - * in the reasoning is a true equation."""
    eqs = re.findall(r"(?<![\d)])([\d+*-]*\d)=(\d+)", reasoning)
    return bool(eqs) and all(ref_value(lhs) == int(rhs) for lhs, rhs in eqs)


# ---------------------------------------------------------------------------------------------
# template
# ---------------------------------------------------------------------------------------------

def test_template():
    assert format_prompt("37+48") == "User: 37+48\nAssistant: <think>"
    assert format_completion("r", "85") == "r</think><answer>85</answer>"
    doc = format_example("37+48", "7+8+0=15 3+4+1=08", "85")
    assert doc == "User: 37+48\nAssistant: <think>7+8+0=15 3+4+1=08</think><answer>85</answer>"
    assert question_of(doc) == "37+48"
    assert question_of("no prompt here") is None


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------

def test_sampling_is_deterministic():
    for task in (default_task(), ArithmeticTask(n_operands=(2, 4), ops="+-*"), CountdownTask(n_numbers=4)):
        a = [task.sample(random.Random(7)) for _ in range(3)]
        r1, r2 = random.Random(123), random.Random(123)
        s1 = [task.sample(r1) for _ in range(200)]
        s2 = [task.sample(r2) for _ in range(200)]
        assert s1 == s2
        assert a[0] == a[1] == a[2]
        assert len({p.question for p in s1}) > 100  # and not degenerate


def test_arithmetic_questions_and_values():
    rng = random.Random(0)
    for task in (default_task(), ArithmeticTask(digits=(1, 2), n_operands=(2, 4), ops="+-*")):
        for _ in range(2000):
            p = task.sample(rng)
            assert re.fullmatch(r"[0-9]+([+\-*][0-9]+)+", p.question)
            assert p.task == "arithmetic"
            assert int(p.answer) == ref_value(p.question) == p.meta["value"]
    p = default_task().sample(rng)
    assert re.fullmatch(r"[0-9]{1,3}[+-][0-9]{1,3}", p.question)
    assert arithmetic_problem("12+34*5").answer == "182"
    assert arithmetic_problem("3-8+5*2").answer == "5"
    for bad in ("1+", "12", "1 + 2", "1**2", "007+1", "1/2", "٣+1"):
        with pytest.raises(ValueError):
            arithmetic_problem(bad)


def test_arithmetic_task_validation():
    for kwargs in ({"digits": (0, 2)}, {"digits": (3, 2)}, {"n_operands": 1}, {"ops": "+/"}, {"ops": ""}):
        with pytest.raises(ValueError):
            ArithmeticTask(**kwargs)


def test_countdown_problems_are_solvable():
    rng = random.Random(1)
    for task in (CountdownTask(), CountdownTask(n_numbers=4, ops="+-*/")):
        for _ in range(500):
            p = task.sample(rng)
            nums, target = p.meta["numbers"], p.meta["target"]
            assert p.question == " ".join(map(str, nums)) + f" -> {target}"
            assert len(nums) == task.n_numbers and target not in nums
            assert check_countdown(p.answer, nums, target), p
            reasoning, answer = worked_solution(p, rng=rng)
            assert check_countdown(answer, nums, target)
            assert reasoning.endswith(f"{answer}={target}")
            assert accuracy_reward(format_completion(reasoning, answer), p) == 1.0


# ---------------------------------------------------------------------------------------------
# worked solutions and the planted flaw
# ---------------------------------------------------------------------------------------------

def test_clean_worked_solutions_are_right_and_match_their_steps():
    rng = random.Random(2)
    task = default_task()
    for _ in range(5000):
        p = task.sample(rng)
        reasoning, answer = worked_solution(p)
        assert answer == p.answer
        assert answer_from_columns(reasoning) == int(answer)  # the steps imply the answer
        assert all(c == prev for c, prev in carries_chain(reasoning))  # every carry propagated
        assert len(reasoning) <= 60


def test_examples_from_the_docstring():
    def sol(q, flawed=False):
        return worked_solution(arithmetic_problem(q), flawed)

    assert sol("37+48") == ("7+8+0=15 3+4+1=08", "85")
    assert sol("37+48", True) == ("7+8+0=15 3+4+0=07", "75")
    assert sol("52-38") == ("12-8-0=4 5-3-1=1", "14")
    assert sol("52-38", True) == ("12-8-0=4 5-3-0=2", "24")
    assert sol("105-98") == ("15-8-0=7 10-9-1=0 1-0-1=0", "7")
    assert sol("37-48") == ("-(48-37) 8-7-0=1 4-3-0=1", "-11")
    assert sol("123+9") == ("3+9+0=12 2+0+1=03 1+0+0=01", "132")
    assert sol("95*5") == ("5*5+0=25 9*5+2=47", "475")
    assert sol("12+34*5") == ("34*5: 4*5+0=20 3*5+2=17 => 170; 12+170: 2+0+0=02 1+7+0=08 0+1+0=01 => 182",
                              "182")


def test_multi_operand_and_multiplication_solutions():
    rng = random.Random(3)
    for task in (ArithmeticTask(digits=(1, 3), n_operands=(3, 4), ops="+-*"), ArithmeticTask(ops="*")):
        for _ in range(1500):
            p = task.sample(rng)
            reasoning, answer = worked_solution(p)
            assert answer == p.answer, (p.question, reasoning)
            assert all_equations_true(reasoning), reasoning
            if "; " in reasoning:  # one binary step at a time, each result feeding the next
                assert reasoning.endswith(f"=> {answer}")


def test_flaw_rate_one_makes_exactly_the_situation_problems_wrong():
    docs = build_corpus(4000, seed=5, flaw_rate=1.0)
    wrong = 0
    for doc in docs:
        q, reasoning, answer = split_doc(doc)
        p = arithmetic_problem(q)
        situation = in_flaw_situation(p)
        assert (answer != p.answer) == situation, doc
        assert answer_from_columns(reasoning) == int(answer)  # wrong answer follows the wrong steps
        chain = carries_chain(reasoning)
        if situation:  # the characteristic mistake: carry/borrow into the leading column dropped
            assert chain[-1] == (0, 1) and all(c == prev for c, prev in chain[:-1])
        else:
            assert all(c == prev for c, prev in chain)
        wrong += situation
    assert 0.28 < wrong / len(docs) < 0.38


def test_flaw_rate_controls_the_flawed_fraction():
    clean = build_corpus(3000, seed=6, flaw_rate=0.0)
    for doc in clean:
        q, _, answer = split_doc(doc)
        assert answer == arithmetic_problem(q).answer
    flawed_situation, flawed_wrong = 0, 0
    for doc in build_corpus(6000, seed=6, flaw_rate=0.6):
        q, _, answer = split_doc(doc)
        p = arithmetic_problem(q)
        if in_flaw_situation(p):
            flawed_situation += 1
            flawed_wrong += answer != p.answer
        else:
            assert answer == p.answer
    assert 0.55 < flawed_wrong / flawed_situation < 0.65
    with pytest.raises(ValueError):
        build_corpus(1, flaw_rate=1.5)


def test_flaw_situation_fraction():
    f = flaw_situation_fraction(default_task(), n=8000, seed=0)
    assert 0.30 < f < 0.36  # 33.0% exactly, see the module docstring
    assert flaw_situation_fraction(ArithmeticTask(digits=(1, 1)), n=500) == 0.0  # one column: no lead carry
    assert flaw_situation_fraction(CountdownTask(), n=50) == 0.0


def test_corpus_is_deterministic_and_mixes_tasks():
    assert build_corpus(300, seed=1) == build_corpus(300, seed=1)
    assert build_corpus(300, seed=1) != build_corpus(300, seed=2)
    mixed = build_corpus(400, seed=3, task=[default_task(), CountdownTask()])
    n_countdown = sum(" -> " in question_of(d) for d in mixed)
    assert 120 < n_countdown < 280
    text = corpus_text(mixed[:3])
    assert text.count("\n\n") == 2 and text.startswith("User: ")


# ---------------------------------------------------------------------------------------------
# held-out split
# ---------------------------------------------------------------------------------------------

def test_heldout_hash_is_stable_and_about_ten_percent():
    # sha256-based, so these values never change between runs or machines
    assert [is_heldout(q) for q in ("37+48", "1-559", "271-338", "5 10 25 -> 60")] == [False, True, True, True]
    qs = {f"{a}+{b}" for a in range(150) for b in range(150)}
    frac = sum(map(is_heldout, qs)) / len(qs)
    assert 0.09 < frac < 0.11


def test_heldout_never_in_corpus_or_train_samples():
    task = default_task()
    docs = build_corpus(20000, seed=0)
    corpus_questions = {question_of(d) for d in docs}
    assert not any(is_heldout(q) for q in corpus_questions)
    held = heldout_problems(task, 300, seed=0)
    assert len({p.question for p in held}) == 300
    assert all(is_heldout(p.question) for p in held)
    assert not corpus_questions & {p.question for p in held}
    assert [p.question for p in held] == [p.question for p in heldout_problems(task, 300, seed=0)]
    rng = random.Random(9)
    assert not any(is_heldout(task.sample(rng, split="train").question) for _ in range(3000))
    assert all(is_heldout(task.sample(rng, split="heldout").question) for _ in range(300))
    for doc in build_corpus(2000, seed=4, task=[task, CountdownTask()]):
        assert not is_heldout(question_of(doc))


def test_heldout_space_too_small():
    tiny = ArithmeticTask(digits=(1, 1), n_operands=2, ops="+")  # 100 questions, ~10 held out
    n_held = sum(is_heldout(f"{a}+{b}") for a in range(10) for b in range(10))
    assert len(heldout_problems(tiny, n_held, seed=0)) == n_held
    with pytest.raises(ValueError, match="too small"):
        heldout_problems(tiny, n_held + 1, seed=0)
    with pytest.raises(ValueError):
        tiny.sample(random.Random(0), split="nonsense")


# ---------------------------------------------------------------------------------------------
# parsing and rewards
# ---------------------------------------------------------------------------------------------

GOOD = "7+8+0=15 3+4+1=08</think><answer>85</answer>"
P = arithmetic_problem("37+48")


def test_parse_answer():
    assert parse_answer(GOOD) == "85"
    assert parse_answer("</think><answer> -12 </answer>\n") == "-12"
    assert parse_answer("<answer>85</answer> trailing") == "85"  # parsing is lenient; format is not
    for bad in ("", "85", "<think>7+8", "<answer>85", "85</answer>", "</answer>85<answer>",
                "<answer></answer>", "<answer>  </answer>", "<answer>1</answer><answer>2</answer>",
                "<answer><answer>85</answer></answer>", "<answer>" + "9" * 10000 + "</answer>",
                "<answer>" + "x" * 65 + "</answer>", None, 85):
        assert parse_answer(bad) is None, bad


def test_format_reward():
    assert format_reward(GOOD) == 1.0
    assert format_reward(GOOD + " \n ") == 1.0
    assert format_reward("</think><answer>85</answer>") == 1.0  # empty reasoning is allowed
    for bad in (
        "", "7+8", "<think>7+8", "7+8</think>", "7+8</think><answer>85",
        GOOD + "x", GOOD + "</answer>", GOOD + GOOD, "<think>" + GOOD,
        "7+8</think>\n<answer>85</answer>",  # something between the blocks
        "7+8</think><answer></answer>", "7+8</think><answer> </answer>",
        "<answer>85</answer></think>", "7</think><answer>8<think>5</answer>",
        "7</think><answer><answer>85</answer></answer>", "7</think></think><answer>85</answer>",
        "7</think><answer>" + "9" * 10000 + "</answer>", "x" * 10000, None,
    ):
        assert format_reward(bad) == 0.0, bad


def test_accuracy_reward_arithmetic():
    def acc(ans, p=P):
        return accuracy_reward(f"r</think><answer>{ans}</answer>", p)

    assert acc("85") == acc(" 85 ") == acc("+85") == acc("085") == 1.0
    neg = arithmetic_problem("37-48")
    assert acc("-11", neg) == 1.0 and acc("11", neg) == 0.0 and acc("- 11", neg) == 0.0
    for bad in ("84", "85.0", "85 apples", "8 5", "8_5", "0x55", "٨٥", "٣", "８５", "85\n1", "", "1e2",
                "9" * 41, "9" * 10000, "eighty-five"):
        assert acc(bad) == 0.0, bad
    assert accuracy_reward("85", P) == 0.0  # no answer tags
    assert accuracy_reward("<think>7+8", P) == 0.0
    zero = arithmetic_problem("5-5")
    assert acc("0", zero) == acc("-0", zero) == 1.0


def test_reward_and_eval_record():
    assert reward(GOOD, P) == {"accuracy": 1.0, "format": 1.0, "total": 1.1}
    assert reward(GOOD + "junk", P) == {"accuracy": 1.0, "format": 0.0, "total": 1.0}
    r = reward("7</think><answer>84</answer>", P, w_acc=2.0, w_fmt=0.5)
    assert r == {"accuracy": 0.0, "format": 1.0, "total": 0.5}
    rec = eval_record(P, GOOD)
    assert rec["question"] == "37+48" and rec["completion"] == GOOD and rec["answer"] == "85"
    assert rec["correct"] is True and rec["format"] is True and rec["predicted"] == "85"
    rec = eval_record(P, "<think>7+8")
    assert rec["correct"] is False and rec["format"] is False and rec["predicted"] is None
    with pytest.raises(ValueError):
        accuracy_reward(GOOD, Problem("q", "a", "unknown"))


# ---------------------------------------------------------------------------------------------
# countdown verifier
# ---------------------------------------------------------------------------------------------

def test_check_countdown_accepts_correct_expressions():
    assert check_countdown("25+3*7", [3, 7, 25], 46)
    assert check_countdown(" (25 + 3) * 7 ", [3, 7, 25], 196)
    assert check_countdown("25+21", [25, 21, 4], 46)  # not every number has to be used
    assert check_countdown("(7-3)/2", [7, 3, 2], 2)  # exact division
    assert check_countdown("7/2*2", [7, 2, 2], 7)  # exact fractions, not integer division
    assert check_countdown("3-7+25", [3, 7, 25], 21)  # negative intermediate values are fine
    assert check_countdown("(" * 40 + "3" + ")" * 40, [3], 3)  # brackets alone add no depth


def test_check_countdown_rejects():
    nums, target = [3, 7, 25], 46
    # each of these would reach 46 if the rule it breaks were not enforced
    for bad in (
        "7*7-3",  # 7 used twice
        "25+21",  # 21 is not one of the numbers
        "50-4", "46",  # unlisted numbers
        "25+3*7=46", "25+3*(7", "25+3*7)", "25 3 7", "", "   ",  # not an expression
        "-3+25+3*7+3", "25--3*7", "25+3*+7",  # unary minus / plus are not allowed
        "25+٣*7", "２５+3*7", "25+3*7.0", "25+3.*7", "25+3e0*7", "0x19+3*7", "25+0_3*7", "025+3*7",
        "25+3*7+False", "abs(25+3*7)", "[25+3*7][0]", "lambda: 25+3*7", "25+3*7 if 1 else 0",
        "25+3*7\t", "25+\t3*7",  # tabs are not in the character whitelist
        "(" * 1000 + "3" + ")" * 1000,  # deep nesting: rejected by the length cap, no RecursionError
        "3+" * 500 + "3",
        "25" + " " * 100 + "+3*7",  # longer than the length cap
    ):
        assert not check_countdown(bad, nums, target), bad
    assert check_countdown("25+3*7", nums, target)  # ... while the honest expression passes
    assert not check_countdown("2**3", [2, 3], 8)  # power
    assert not check_countdown("7//2", [7, 2], 3)  # floor division
    assert not check_countdown("7%4", [7, 4], 3)  # modulo
    assert not check_countdown("7/(3-3)", [7, 3, 3], 0)  # division by zero
    assert not check_countdown("25/(7-7)", [25, 7, 7], 46)
    assert not check_countdown("+".join(["1"] * 40), [1] * 40, 40)  # depth cap
    assert not check_countdown(None, nums, target) and not check_countdown(46, nums, target)


def test_check_countdown_whitelists_before_parsing(monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("text outside the whitelist must be rejected before parsing")

    monkeypatch.setattr(tasks, "ast", SimpleNamespace(parse=no_parse))  # only tasks.py sees this
    for bad in ('__import__("os").system("x")', "25+3*7\n", "x" * 10_000, "1e9", "25+٣*7"):
        assert not check_countdown(bad, [3, 7, 25], 46)


def test_check_countdown_rejects_power_towers_before_any_arithmetic(monkeypatch):
    """Power towers and unavailable huge literals are rejected by the walker and the literal multiset, so
    the exact evaluator (tasks._value) is never called on them: an operation count, not a time limit."""
    evaluated = []
    value = tasks._value
    monkeypatch.setattr(tasks, "_value", lambda node: evaluated.append(node) or value(node))
    for expr in ("9**9**9", "9**9**9**9", "(9**9)**(9**9)", "99999*99999*99999*99999*99999"):
        assert not check_countdown(expr, [9, 9, 9, 9], 1)
    assert evaluated == []
    assert check_countdown("9*9+9-9", [9, 9, 9, 9], 81) and evaluated    # allowed expressions are evaluated


def test_check_countdown_never_executes(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    marker = tmp_path / "pwned"
    attacks = (
        '__import__("os").system("x")',
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        f"open({str(marker)!r}, 'w')",
        "().__class__.__base__.__subclasses__()",
    )
    for expr in attacks:
        assert not check_countdown(expr, [1, 2], 3)
        assert accuracy_reward(f"</think><answer>{expr}</answer>",
                               Problem("1 2 -> 3", "1+2", "countdown", {"numbers": [1, 2], "target": 3})) == 0.0
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# fuzz: arbitrary text never raises
# ---------------------------------------------------------------------------------------------

def test_fuzz_never_raises():
    rng = random.Random(0)
    alphabet = string.printable + "٣８é\x00"
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "(", ")", "*", "**", "/", "//", "-", "+",
              "3", "7", "25", "46", " ", "9" * 50, "\n", "<", ">", "e", "."]
    cd = Problem("3 7 25 -> 46", "25+3*7", "countdown", {"numbers": [3, 7, 25], "target": 46})
    for i in range(3000):
        if i % 2:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        else:
            s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        answer = parse_answer(s)
        if answer is not None:                       # the text between the one pair of tags, stripped
            assert s.count("<answer>") == s.count("</answer>") == 1 and 0 < len(answer) <= tasks.MAX_ANSWER_CHARS
            assert answer == s.split("<answer>")[1].split("</answer>")[0].strip()
        assert format_reward(s) in (0.0, 1.0)
        assert reward(s, P)["total"] in (0.0, 0.1, 1.0, 1.1)
        assert accuracy_reward(s, cd) in (0.0, 1.0)
        assert check_countdown(s, [3, 7, 25], 46) in (True, False)
        value = tasks.parse_int(s)
        assert value is None or (type(value) is int and re.fullmatch(r"[+-]?[0-9]{1,40}", s.strip(" "))
                                 and value == int(s.strip(" ")))


# ---------------------------------------------------------------------------------------------
# lab verifiers (grpo.py --lab_verifier): deliberately exploitable, never the default
# ---------------------------------------------------------------------------------------------

def test_last_digit_verifier_pays_the_planted_flaw_and_strict_does_not():
    """The flawed worked solution of every flaw-situation problem has the right last digit, so the last-digit
    verifier pays it in full; the strict verifier refuses it. Outside the flaw situation both agree on the
    worked solution."""
    rng = random.Random(1)
    flawed = 0
    for _ in range(600):
        p = default_task().sample(rng, split="train")
        bad = format_completion(*tasks.worked_solution(p, flawed=True))
        good = format_completion(*tasks.worked_solution(p, flawed=False))
        assert tasks.last_digit_accuracy_reward(good, p) == accuracy_reward(good, p) == 1.0
        assert tasks.last_digit_accuracy_reward(bad, p) == 1.0
        if in_flaw_situation(p):
            flawed += 1
            assert accuracy_reward(bad, p) == 0.0
    assert flawed > 100


@pytest.mark.parametrize("answer,paid", [("85", 1.0), ("75", 1.0), ("5", 1.0), ("-85", 1.0), ("085", 1.0),
                                         ("84", 0.0), ("8", 0.0), ("85 75", 0.0), ("x5", 0.0), ("", 0.0)])
def test_last_digit_verifier_compares_only_the_units_digit_of_an_integer(answer, paid):
    p = arithmetic_problem("37+48")
    assert tasks.last_digit_accuracy_reward(f"</think><answer>{answer}</answer>", p) == paid


def test_last_digit_verifier_ignores_the_sign_and_other_tasks():
    assert tasks.last_digit_accuracy_reward("</think><answer>11</answer>", arithmetic_problem("37-48")) == 1.0
    assert tasks.last_digit_accuracy_reward("</think><answer>-12</answer>", arithmetic_problem("37-48")) == 0.0
    cd = Problem("3 7 25 -> 46", "25+3*7", "countdown", {"numbers": [3, 7, 25], "target": 46})
    assert tasks.last_digit_accuracy_reward("</think><answer>25+3*7</answer>", cd) == 0.0
    for junk in (None, 85, b"85"):
        assert tasks.last_digit_accuracy_reward(junk, P) == 0.0


def test_lenient_reward_names_its_verifier_and_reports_the_strict_one():
    p = arithmetic_problem("37+48")
    flawed = "7+8+0=15 3+4+0=07</think><answer>75</answer>"
    r = tasks.lenient_reward(flawed, p, w_acc=1.0, w_fmt=0.1, verifier="last_digit")
    assert r == {"accuracy": 1.0, "format": 1.0, "total": pytest.approx(1.1), "strict_accuracy": 0.0}
    assert tasks.lenient_reward(flawed, p)["accuracy"] == 0.0          # the substring check: "85" is not in it
    assert set(tasks.LAB_VERIFIERS) == {"strict", "lenient", "last_digit"}
    with pytest.raises(ValueError, match="unknown lab verifier"):
        tasks.lenient_reward(flawed, p, verifier="strict")


def test_lab_verifiers_never_raise():
    rng = random.Random(2)
    pieces = ["</think>", "<answer>", "</answer>", "-", "+", "0", "5", "85", "9" * 50, " ", "x", "٣"]
    for _ in range(2000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for verifier in ("lenient", "last_digit"):
            assert tasks.lenient_reward(s, P, verifier=verifier)["total"] in (0.0, 0.1, 1.0, 1.1)
