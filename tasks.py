"""Verifiable reasoning tasks for tinyseek: problems, the R1-Zero template, safe verifiers,
rule-based rewards, and the built-in pretraining corpus.

References: DeepSeek-R1 report (arXiv 2501.12948) §2.2 for the template and the rule-based
rewards of R1-Zero; DeepSeekMath (arXiv 2402.03300) for GRPO, which consumes these rewards.

Map of this file
----------------
1. Template      ``format_prompt``, ``format_completion``, ``format_example``
2. Tasks         ``Problem``, ``ArithmeticTask`` (the default), ``CountdownTask``
3. Held-out split ``is_heldout``, ``heldout_problems``
4. Verifiers     ``parse_answer``, ``format_reward``, ``accuracy_reward``, ``check_countdown``,
                 ``reward``, ``eval_record``; lab only (grpo.py --lab_verifier): ``lenient_reward``
                 with ``lenient_accuracy_reward`` or ``last_digit_accuracy_reward``
5. Worked solutions and the corpus
                 ``worked_solution``, ``in_flaw_situation``, ``flaw_situation_fraction``,
                 ``build_corpus``, ``corpus_text``

1. The template (R1 report §2.2, made compact so a tiny model learns it quickly)
-------------------------------------------------------------------------------
::

    prompt:      "User: 37+48\\nAssistant: <think>"
    completion:  "7+8+0=15 3+4+1=08</think><answer>85</answer>"

The prompt ends right after ``<think>``, so everything the model writes is the completion:
its reasoning, then ``</think><answer>``, the answer, and ``</answer>``. Documents are
separated by BOS/EOS tokens added by the caller, never by text.

2. Worked solutions: a column procedure, least significant digit first
----------------------------------------------------------------------
A 1-3M parameter transformer reading one digit per token cannot add 3-digit numbers "in its
head", but it can learn a short, perfectly regular procedure. Each column is written as a
true equation, least significant column first, with the incoming carry always written::

    37+48   ->  7+8+0=15 3+4+1=08                   answer 85
    357+468 ->  7+8+0=15 5+6+1=12 3+4+1=08          answer 825
    123+9   ->  3+9+0=12 2+0+1=03 1+0+0=01          answer 132 (short operand padded with 0)

``a+b+c=ss``: digits a and b, incoming carry c, and the two-digit column sum ss, whose tens
digit is the carry into the next column. The answer is the last column's sum followed by
the units digits of the earlier columns, read from the last column back to the first.

Subtraction borrows ten when the top digit is too small, and the borrow is written as the
third term of the next column::

    52-38   ->  12-8-0=4 5-3-1=1                    answer 14
    105-98  ->  15-8-0=7 10-9-1=0 1-0-1=0           answer 7
    37-48   ->  -(48-37) 8-7-0=1 4-3-0=1            answer -11 (smaller minus larger)

Multiplication (an optional, harder extension) multiplies by one digit of the multiplier at a
time, with the same column layout (``7*8+0=56``: digit times digit plus carry), using the
shorter number as the multiplier: ``95*5`` gives ``5*5+0=25 9*5+2=47``, answer 475. With several
multiplier digits each partial product is followed by ``=value`` (shifted), and the partials
are summed at the end. With three or more operands the procedure runs one binary step at a
time, products first, then ``+``/``-`` left to right, as ``header: body => result`` joined by
``; ``, e.g. for ``12+34*5``::

    34*5: 4*5+0=20 3*5+2=17 => 170; 12+170: 2+0+0=02 1+7+0=08 0+1+0=01 => 182

A negative running value is rewritten before its columns (``-5+8`` computes ``8-5 ``,
``-8+5`` computes ``-(8-5) ``, ``-5-3`` computes ``-(5+3) ``).

3. The planted misconception: why the corpus is deliberately imperfect
----------------------------------------------------------------------
If the corpus were perfect, supervised pretraining alone would solve the task and RL would
have nothing to do. If the corpus had *random* slips in some examples, greedy decoding would
average them away. What survives imitation is a *systematic* habit: the same mistake made
in the same recognisable situation. Text written by people is full of these (the classic
school misconceptions), so pretraining on it teaches them along with the skill.

The situation chosen here: **the carry (or borrow) that enters the leading column**, i.e. the
most significant column of the longer operand. A fraction ``flaw_rate`` (default 0.6) of the
worked solutions in that situation forget it, exactly as a student who "drops the last
carry" would: the earlier column still shows the carry (``7+8+0=15``), but the leading column
is written with ``+0`` (``3+4+0=07``) and the answer follows the wrong steps (``75``); for
subtraction ``52-38`` becomes ``12-8-0=4 5-3-0=2``, answer ``24``. Every equation stays
arithmetically true; only the carry (borrow) is not propagated. Everywhere else the
worked solutions are correct, and ``flaw_rate=0`` gives a clean corpus.

For the default task (``default_task()``: two operands with 1-2 digits, ``+`` or ``-``) the
situation arises in about 33% of problems (16.9% additions, 16.2% subtractions, estimated from
200 000 draws; ``flaw_situation_fraction`` estimates it for any task). A model
that imitates the majority habit greedily therefore loses about a third of its accuracy,
while its *samples* are still right in about ``1 - flaw_rate`` of those cases. That is
exactly the signal GRPO needs: within a group of G samples for one question some are right
and some wrong, the verifier tells them apart, and the policy gradient pushes the right habit
up. Imitation cannot fix what the data teaches; a verifier can. The same "learn from
outcomes, not from demonstrations" story is R1-Zero's.

4. The held-out split
---------------------
``is_heldout(question)`` hashes the question text with SHA-256 (not Python's ``hash``, which
is salted per process) and holds out about 10% of all questions. The corpus and RL sampling
use only the train side, evaluation only the held-out side, so a held-out score is never a
memorised answer.

5. Safe verifiers
-----------------
Model output is untrusted text. Nothing here calls ``eval`` or ``exec``; every check caps the
length first, whitelists characters before parsing, and never raises on arbitrary input.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# 1. Template
# ---------------------------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
PROMPT_TEMPLATE = "User: {question}\nAssistant: " + THINK_OPEN
MAX_ANSWER_CHARS = 64  # longer answers are rejected by parse_answer and format_reward
_USER, _ASSISTANT = "User: ", "\nAssistant: " + THINK_OPEN  # the template around the question


def format_prompt(question: str) -> str:
    """The R1-Zero prompt for `question`; it ends right after ``<think>``."""
    return PROMPT_TEMPLATE.format(question=question)


def format_completion(reasoning: str, answer: str) -> str:
    """What the model should write after the prompt: ``reasoning</think><answer>answer</answer>``."""
    return f"{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def format_example(question: str, reasoning: str, answer: str) -> str:
    """One training document: prompt followed by its completion (no BOS/EOS; the caller adds them)."""
    return format_prompt(question) + format_completion(reasoning, answer)


def question_of(document: str) -> str | None:
    """The question inside a document or prompt built by `format_prompt`, or None if there is none
    (also for anything that is not a string: this is called on untrusted text and never raises).

    The question is the rest of a line after its first "User: ", where that line is followed by
    "Assistant: <think>" -- what the regex ``User: (.*)\\nAssistant: <think>`` finds (``.`` stops at
    newlines), but in linear time: the regex retries the rest of the line from every "User: " it meets,
    which is quadratic on a long line of them (180 KB took 36 s). Here each occurrence of the
    "\\nAssistant: <think>" marker looks back over its own line only once.
    """
    if not isinstance(document, str):
        return None
    end = document.find(_ASSISTANT)
    while end != -1:
        line_start = document.rfind("\n", 0, end) + 1                  # the line that ends at the marker
        user = document.find(_USER, line_start, end)
        if user != -1:
            return document[user + len(_USER):end]
        end = document.find(_ASSISTANT, end + 1)
    return None


# ---------------------------------------------------------------------------------------------
# 2. Problems and tasks
# ---------------------------------------------------------------------------------------------

@dataclass
class Problem:
    """One verifiable problem.

    Attributes:
        question: the text put into the prompt, e.g. ``"37+48"``.
        answer: the exact expected answer text, e.g. ``"85"`` (for countdown: one valid expression).
        task: ``"arithmetic"`` or ``"countdown"``; selects the verifier.
        meta: task details (arithmetic: operands, ops, value; countdown: numbers, target).
    """

    question: str
    answer: str
    task: str
    meta: dict = field(default_factory=dict)


class Task:
    """Base class: a distribution over problems with a train / held-out split.

    Subclasses implement ``_draw(rng) -> Problem`` (one problem, any split).
    """

    name = "task"
    max_tries = 10_000  # rejection-sampling budget of `sample`

    def _draw(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def sample(self, rng: random.Random, split: str | None = "train") -> Problem:
        """Draw one problem from `split` ("train", "heldout", or None for either).

        Draws are rejected until the question falls on the requested side of `is_heldout`, so
        train and held-out problems follow the same distribution restricted to their side.
        Deterministic given the state of `rng`. Raises ValueError if no problem of that split
        turns up within `max_tries` draws (a question space too small for the split).
        """
        if split not in ("train", "heldout", None):
            raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
        for _ in range(self.max_tries):
            p = self._draw(rng)
            if split is None or is_heldout(p.question) == (split == "heldout"):
                return p
        raise ValueError(f"{self!r}: no {split} problem in {self.max_tries} draws; space too small?")


def _sample_number(rng: random.Random, lo: int, hi: int) -> int:
    """A number with a uniformly chosen count of digits in [lo, hi], then uniform among those.

    One-digit numbers include 0, so (1, 3) gives 0-9, 10-99 and 100-999 each a third of the time.
    """
    d = rng.randint(lo, hi)
    return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with * before + and -, left to right."""
    terms, signs, cur = [], ["+"], operands[0]
    for op, y in zip(ops, operands[1:]):
        if op == "*":
            cur *= y
        else:
            terms.append(cur)
            signs.append(op)
            cur = y
    terms.append(cur)
    return sum(t if s == "+" else -t for s, t in zip(signs, terms))


_ARITH_RE = re.compile(r"[0-9]+(?:[+\-*][0-9]+)+")


def arithmetic_problem(question: str) -> Problem:
    """Build the arithmetic `Problem` for a question such as ``"37+48"`` or ``"12+34*5"``.

    Handy to ask a model your own question. Raises ValueError for anything but digits joined
    by ``+ - *`` (no spaces, no leading zeros, at most 18 digits per number).
    """
    if not isinstance(question, str) or not _ARITH_RE.fullmatch(question):
        raise ValueError(f"not a plain integer expression of digits and + - *: {question!r}")
    operands_s = re.split(r"[+\-*]", question)
    if any(len(s) > 18 or (len(s) > 1 and s[0] == "0") for s in operands_s):
        raise ValueError(f"numbers must have 1-18 digits and no leading zeros: {question!r}")
    operands = [int(s) for s in operands_s]
    ops = re.findall(r"[+\-*]", question)
    value = _evaluate(operands, ops)
    return Problem(question, str(value), "arithmetic", {"operands": operands, "ops": ops, "value": value})


@dataclass
class ArithmeticTask(Task):
    """Integer arithmetic, e.g. ``37+48`` -> ``85`` (the default GRPO task).

    Knobs:
        digits: (lo, hi) number of digits per operand; the count is uniform in [lo, hi], then
            the number is uniform among numbers with that many digits (one digit includes 0).
        n_operands: operands per question, an int or an inclusive (lo, hi) range; >= 2.
        ops: operators to draw from, a subset of ``"+-*"``; usual precedence (* before + and -,
            left to right), so results can be negative.
    """

    digits: tuple[int, int] = (1, 3)
    n_operands: int | tuple[int, int] = 2
    ops: str = "+-"
    name = "arithmetic"

    def __post_init__(self):
        lo, hi = self.digits
        if not 1 <= lo <= hi <= 18:
            raise ValueError(f"digits must satisfy 1 <= lo <= hi <= 18, got {self.digits}")
        n = self.n_operands
        n_lo, n_hi = (n, n) if isinstance(n, int) else n
        if not 2 <= n_lo <= n_hi:
            raise ValueError(f"n_operands must be >= 2, got {n}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")

    def _draw(self, rng: random.Random) -> Problem:
        n = self.n_operands
        k = n if isinstance(n, int) else rng.randint(*n)
        operands = [_sample_number(rng, *self.digits) for _ in range(k)]
        ops = [rng.choice(self.ops) for _ in range(k - 1)]
        return arithmetic_problem(str(operands[0]) + "".join(op + str(y) for op, y in zip(ops, operands[1:])))


def default_task() -> ArithmeticTask:
    """The default task for the corpus and RL: two operands of 1-2 digits joined by + or -.

    Two digits, not three, so that the default pretraining run (a few CPU minutes) gets past the point
    where the model learns to find the right digits of the question (with 1-3 digits it does not get
    there in that time); harder settings are one flag away (train.py --max_digits)."""
    return ArithmeticTask(digits=(1, 2), n_operands=2, ops="+-")


# Countdown expressions are trees: an int leaf, or a tuple (op, left, right).
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _expr_str(node, parent_prec: int = 0, right_of: str | None = None) -> str:
    """Print an expression tree with only the brackets it needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    p = _PREC[op]
    s = _expr_str(left, p) + op + _expr_str(right, p, op)
    need = p < parent_prec or (right_of in ("-", "/") and p == parent_prec)
    return f"({s})" if need else s


def _random_expression(rng: random.Random, numbers: list[int], ops: str):
    """Combine all `numbers` into one random expression tree; returns (tree, integer value).

    Two random items are combined at a time. Intermediate values stay non-negative integers:
    ``a-b`` is taken with a >= b and ``a/b`` only when it divides exactly (else ``+``).
    """
    pool = [(n, n) for n in numbers]  # (tree, value)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (ta, a), (tb, b) = pool[i], pool[j]
        pool = [x for k, x in enumerate(pool) if k not in (i, j)]
        op = rng.choice(ops)
        if op == "-" and a < b:
            (ta, a), (tb, b) = (tb, b), (ta, a)
        if op == "/":
            if b == 0 or a % b:
                (ta, a), (tb, b) = (tb, b), (ta, a)
            if b == 0 or a % b:
                op = "+"
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            value = a // b  # exact, checked above
        pool.append(((op, ta, tb), value))
    return pool[0]


@dataclass
class CountdownTask(Task):
    """Reach a target with given numbers, e.g. question ``3 7 25 -> 46``, answer ``25+3*7``.

    Question format: the numbers separated by single spaces, then `` -> `` and the target.
    Any expression over the numbers with ``+ - * /`` and brackets that equals the target is
    accepted, each number used at most once (not all need to be used). Instances are always
    solvable: the target is built from a random expression over all the numbers.

    Knobs:
        n_numbers: how many numbers (3 or 4 are good sizes).
        small: inclusive range of the small numbers.
        large: pool of large numbers; each number is drawn from it with probability p_large.
        ops: operators used to build targets (the verifier accepts all four anyway).
        target_range: inclusive range of targets; targets equal to one of the numbers are skipped.
    """

    n_numbers: int = 3
    small: tuple[int, int] = (1, 10)
    large: tuple[int, ...] = (25, 50, 75, 100)
    p_large: float = 0.25
    ops: str = "+-*"
    target_range: tuple[int, int] = (1, 999)
    name = "countdown"

    def __post_init__(self):
        if self.n_numbers < 2:
            raise ValueError("n_numbers must be >= 2")
        if not self.ops or set(self.ops) - set("+-*/"):
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {self.ops!r}")

    def _draw(self, rng: random.Random) -> Problem:
        lo, hi = self.target_range
        for _ in range(1000):
            numbers = [rng.choice(self.large) if self.large and rng.random() < self.p_large
                       else rng.randint(*self.small) for _ in range(self.n_numbers)]
            tree, target = _random_expression(rng, numbers, self.ops)
            if lo <= target <= hi and target not in numbers:
                question = " ".join(map(str, numbers)) + f" -> {target}"
                return Problem(question, _expr_str(tree), "countdown", {"numbers": numbers, "target": target})
        raise ValueError(f"{self!r}: could not build a target in {self.target_range}")


# ---------------------------------------------------------------------------------------------
# 3. Held-out split
# ---------------------------------------------------------------------------------------------

HELDOUT_FRACTION = 0.1


def is_heldout(question: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """True for the ~`fraction` of questions reserved for evaluation (stable SHA-256 hash)."""
    h = hashlib.sha256(b"tinyseek-heldout:" + question.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2**64


def heldout_problems(task: Task, n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct held-out problems of `task`, deterministic given `seed`.

    Raises ValueError when the task's held-out side has fewer than `n` distinct questions
    (detected when 20 000 draws in a row bring nothing new).
    """
    rng = random.Random(seed)
    out, seen, misses = [], set(), 0
    while len(out) < n:
        p = task.sample(rng, split=None)
        if p.question not in seen and is_heldout(p.question):
            seen.add(p.question)
            out.append(p)
            misses = 0
        else:
            misses += 1
            if misses > 20_000:
                raise ValueError(f"only {len(out)} distinct held-out problems found for {task!r}, "
                                 f"{n} requested: the question space is too small")
    return out


# ---------------------------------------------------------------------------------------------
# 4. Safe verifiers and rule-based rewards (R1 report §2.2: accuracy + format, no reward model)
# ---------------------------------------------------------------------------------------------

def parse_answer(completion: str) -> str | None:
    """The stripped text of the single ``<answer>...</answer>`` in `completion`.

    None when the tags are missing, duplicated or out of order, or when the answer is empty or
    longer than MAX_ANSWER_CHARS. Linear time; never raises.
    """
    if not isinstance(completion, str):
        return None
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return None
    start = completion.find(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = completion.find(ANSWER_CLOSE)
    if end < start:
        return None
    answer = completion[start:end].strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def format_reward(completion: str) -> float:
    """1.0 iff `completion` is exactly ``reasoning</think><answer>X</answer>`` (+ trailing space).

    The completion is the text after the prompt, which already opened ``<think>``. Required:
    no ``<think>``, exactly one of each other tag, in that order, nothing between ``</think>``
    and ``<answer>``, only whitespace after ``</answer>``, and a non-empty answer of at most
    MAX_ANSWER_CHARS characters without tags. The reasoning may be empty. Cut a sampled
    completion at the EOS token before scoring it.
    """
    if not isinstance(completion, str):
        return 0.0
    counts = [completion.count(t) for t in TAGS]
    if counts != [0, 1, 1, 1]:
        return 0.0
    i_think = completion.find(THINK_CLOSE)
    head = THINK_CLOSE + ANSWER_OPEN
    if completion[i_think:i_think + len(head)] != head:
        return 0.0
    rest = completion[i_think + len(head):]
    end = rest.find(ANSWER_CLOSE)
    if end < 0 or rest[end + len(ANSWER_CLOSE):].strip():
        return 0.0
    answer = rest[:end].strip()
    return 1.0 if answer and len(answer) <= MAX_ANSWER_CHARS else 0.0


_INT_RE = re.compile(r"[+-]?[0-9]{1,40}", re.ASCII)


def parse_int(text: str) -> int | None:
    """`text` as an integer if it is one (optional sign, 1-40 ASCII digits, outer spaces), else None.

    Unicode digits such as '٣', underscores, and Python's other int() liberties are rejected.

    Policy (decided, issue 33): the verifier judges the value, not the spelling. Non-canonical integers such as
    '085', '+85', '-0' or ' 85 ' are accepted as 85, 85, 0 and 85, so the accuracy reward and the held-out
    accuracy (both call this) count a right number as right, the way a grader checking the value would. The
    corpus itself always writes canonical integers, and the length cap (40 digits) keeps padded answers from
    growing without limit; a stricter spelling rule would be a format reward, not an accuracy one.
    """
    if not isinstance(text, str) or len(text) > 64:
        return None
    text = text.strip(" ")
    return int(text) if _INT_RE.fullmatch(text) else None


MAX_EXPR_CHARS = 100
MAX_EXPR_DEPTH = 32
_EXPR_CHARS = frozenset("0123456789+-*/() ")
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _collect(node: ast.AST, literals: list[int], depth: int) -> bool:
    """Check that `node` is only int constants and + - * / (no unary minus); gather literals."""
    if depth > MAX_EXPR_DEPTH:
        return False
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:  # also rejects bool
            return False
        literals.append(node.value)
        return True
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _collect(node.left, literals, depth + 1) and _collect(node.right, literals, depth + 1)
    return False


def _value(node: ast.AST) -> Fraction:
    """Exact value of a tree already checked by `_collect`; ZeroDivisionError on x/0."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    a, b = _value(node.left), _value(node.right)
    op = _BINOPS[type(node.op)]
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def check_countdown(expr: str, numbers, target) -> bool:
    """True iff `expr` uses only `numbers` (each at most once) and + - * / ( ) to reach `target`.

    Order of checks, cheapest and safest first: type and length cap (MAX_EXPR_CHARS), character
    whitelist, ``ast.parse`` (never ``eval``), a walker that allows only int literals and the
    four binary operators (so ``**``, ``//``, unary minus, names and calls are all rejected)
    with a depth cap, the multiset of literals, and finally exact evaluation with Fractions.
    Never raises; division by zero gives False.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return False
    if not set(expr) <= _EXPR_CHARS:  # before anything else looks at the text
        return False
    expr = expr.strip(" ")
    if not expr:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    literals: list[int] = []
    if not _collect(tree.body, literals, 0):
        return False
    if Counter(literals) - Counter(numbers):  # some literal is not available (or used too often)
        return False
    try:
        return _value(tree.body) == target
    except ZeroDivisionError:
        return False


def accuracy_reward(completion: str, problem: Problem) -> float:
    """1.0 if the answer in `completion` is verified correct for `problem`, else 0.0.

    Arithmetic: the answer must be a plain integer equal to the value; leading zeros and a '+' are allowed
    (the policy of `parse_int`: the value is verified, not its spelling).
    Countdown: the answer must pass `check_countdown` with the problem's numbers and target.
    """
    answer = parse_answer(completion)
    if answer is None:
        return 0.0
    if problem.task == "arithmetic":
        value = parse_int(answer)
        return 1.0 if value is not None and value == int(problem.answer) else 0.0
    if problem.task == "countdown":
        ok = check_countdown(answer, problem.meta["numbers"], problem.meta["target"])
        return 1.0 if ok else 0.0
    raise ValueError(f"unknown task {problem.task!r}")


def reward(completion: str, problem: Problem, w_acc: float = 1.0, w_fmt: float = 0.1) -> dict:
    """R1-Zero's rule-based reward: ``total = w_acc * accuracy + w_fmt * format``.

    Returns ``{"accuracy": 0/1, "format": 0/1, "total": float}``. Keep w_fmt small: with
    GRPO's std normalisation a format bonus alone can dominate the advantage.
    """
    acc = accuracy_reward(completion, problem)
    fmt = format_reward(completion)
    return {"accuracy": acc, "format": fmt, "total": w_acc * acc + w_fmt * fmt}


LAB_VERIFIERS = ("strict", "lenient", "last_digit")  # grpo.py --lab_verifier; only "strict" is a real verifier


def lenient_accuracy_reward(completion: str, problem: Problem) -> float:
    """LAB ONLY, deliberately exploitable: 1.0 if the expected answer text occurs anywhere in `completion`.

    The naive grader ``str(answer) in response``: an answer listing several numbers, or reasoning that
    happens to contain the right digits (``10-1`` answered ``19`` contains ``9``), is counted as right.
    extras/rl_lab.py trains against it to show reward hacking (the policy maximises what the verifier
    checks, not what it means); `accuracy_reward` is the strict verifier and the cure. Arithmetic only;
    never raises (non-strings and over-long completions give 0.0). In the lab's runs the policy did not
    find this loophole: a trained base almost never samples an answer listing several numbers.
    """
    if not isinstance(completion, str) or len(completion) > 4096 or problem.task != "arithmetic":
        return 0.0
    return 1.0 if problem.answer in completion else 0.0


def last_digit_accuracy_reward(completion: str, problem: Problem) -> float:
    """LAB ONLY, deliberately exploitable: 1.0 if the answer is an integer whose last digit is the expected one.

    The grader compares ``|answer| mod 10`` with ``|expected| mod 10``, a plausible bug (a check written for
    one-digit answers, or one that keeps only the last character). The exploit it pays for is the base
    model's own habit: the planted misconception (§3) drops the carry into the *leading* column, so the
    flawed answer differs from the right one only there (``37+48``: ``75`` instead of ``85``) and always
    has the right last digit. Trained against this verifier, GRPO has no reason to unlearn the habit: the
    rollout reward sits at its ceiling from the first step while the strict held-out accuracy on the
    flaw-situation questions stays where the base left it (extras/rl_lab.py, run ``hack_last_digit``).
    Arithmetic only; never raises.
    """
    if not isinstance(completion, str) or problem.task != "arithmetic":
        return 0.0
    answer = parse_answer(completion)
    value = parse_int(answer) if answer is not None else None
    return 1.0 if value is not None and abs(value) % 10 == abs(int(problem.answer)) % 10 else 0.0


def lenient_reward(completion: str, problem: Problem, w_acc: float = 1.0, w_fmt: float = 0.1,
                   verifier: str = "lenient") -> dict:
    """LAB ONLY: `reward` with a lab verifier in place of the strict accuracy reward.

    `verifier` names it: "lenient" (`lenient_accuracy_reward`, the substring check) or "last_digit"
    (`last_digit_accuracy_reward`). Returns ``{"accuracy", "format", "total"}`` like `reward` (accuracy is
    the lab verifier's) plus ``"strict_accuracy"``, so a run can log how much of its reward the strict
    verifier would refuse.
    """
    check = {"lenient": lenient_accuracy_reward, "last_digit": last_digit_accuracy_reward}.get(verifier)
    if check is None:
        raise ValueError(f"unknown lab verifier {verifier!r}; choose lenient or last_digit")
    acc = check(completion, problem)
    fmt = format_reward(completion)
    return {"accuracy": acc, "format": fmt, "total": w_acc * acc + w_fmt * fmt,
            "strict_accuracy": accuracy_reward(completion, problem)}


def eval_record(problem: Problem, completion: str) -> dict:
    """One JSON-ready evaluation line: question, completion, answer, correct, ...

    ``answer`` is the expected answer, ``predicted`` the parsed one (or None), ``format`` whether
    the completion is well-formed.
    """
    return {
        "task": problem.task,
        "question": problem.question,
        "completion": completion,
        "answer": problem.answer,
        "predicted": parse_answer(completion),
        "correct": accuracy_reward(completion, problem) == 1.0,
        "format": format_reward(completion) == 1.0,
    }


# ---------------------------------------------------------------------------------------------
# 5. Worked solutions and the pretraining corpus
# ---------------------------------------------------------------------------------------------

def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first, padded with zeros to `width`."""
    return [(n // 10**i) % 10 for i in range(width)]


def _add_columns(a: int, b: int, flawed: bool) -> tuple[str, int, bool]:
    """Column addition of a, b >= 0; returns (text, result, whether the flaw changed anything).

    With `flawed`, a carry entering the leading column is dropped (written as +0).
    """
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    cols, result, carry, used = [], 0, 0, False
    for i in range(width):
        c_in = carry
        if flawed and i == width - 1 and c_in:
            c_in, used = 0, True
        s = da[i] + db[i] + c_in
        cols.append(f"{da[i]}+{db[i]}+{c_in}={s:02d}")
        result += (s % 10) * 10**i
        carry = s // 10
    return " ".join(cols), result + carry * 10**width, used


def _sub_columns(a: int, b: int, flawed: bool) -> tuple[str, int, bool]:
    """Column subtraction a - b for a >= b >= 0; returns (text, result, flaw used).

    A column whose top digit is too small borrows ten (written ``12-8-0=4``) and the borrow is
    the third term of the next column. With `flawed`, a borrow entering the leading column is
    dropped (written as -0).
    """
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    cols, result, borrow, used = [], 0, 0, False
    for i in range(width):
        b_in = borrow
        if flawed and i == width - 1 and b_in:
            b_in, used = 0, True
        top, x = da[i], da[i] - db[i] - b_in
        borrow = 1 if x < 0 else 0
        top, x = top + 10 * borrow, x + 10 * borrow
        cols.append(f"{top}-{db[i]}-{b_in}={x}")
        result += x * 10**i
    assert borrow == 0, "a >= b, so the leading column never borrows"
    return " ".join(cols), result, used


def _addsub_body(x: int, op: str, y: int, flawed: bool) -> tuple[str, int, bool]:
    """One signed step ``x op y`` (y >= 0, x of any sign) reduced to a column add or subtract."""
    ax = abs(x)
    if x >= 0 and op == "+":
        note, sign, kind, a, b = "", 1, "+", x, y
    elif x >= 0:  # x - y
        note, sign, kind, a, b = ("", 1, "-", x, y) if x >= y else (f"-({y}-{x}) ", -1, "-", y, x)
    elif op == "+":  # -|x| + y
        note, sign, kind, a, b = (f"{y}-{ax} ", 1, "-", y, ax) if y >= ax else (f"-({ax}-{y}) ", -1, "-", ax, y)
    else:  # -|x| - y
        note, sign, kind, a, b = f"-({ax}+{y}) ", -1, "+", ax, y
    cols, mag, used = (_add_columns if kind == "+" else _sub_columns)(a, b, flawed)
    return note + cols, sign * mag, used


def _mul_body(x: int, y: int) -> str:
    """Long multiplication x * y (x, y >= 0): one partial product per digit of the shorter number."""
    if len(str(y)) > len(str(x)):
        x, y = y, x  # multiply by the shorter number: fewer partial products
    wx = len(str(x))
    texts, partials = [], []
    for j, e in enumerate(_digits(y, len(str(y)))):
        cols, carry = [], 0
        for d in _digits(x, wx):
            p = d * e + carry
            cols.append(f"{d}*{e}+{carry}={p:02d}")
            carry = p // 10
        texts.append(" ".join(cols))
        partials.append(x * e * 10**j)
    if len(partials) == 1:
        return texts[0]
    steps = ", ".join(f"{t} ={p}" for t, p in zip(texts, partials))
    return f"{steps}, {'+'.join(map(str, partials))}={x * y}"


def _arithmetic_solution(question: str, flawed: bool) -> tuple[str, int, bool]:
    """Worked solution of an arithmetic question: (reasoning, final value, flaw used)."""
    p = arithmetic_problem(question)
    operands, ops = p.meta["operands"], p.meta["ops"]
    steps = []  # (header, body, result)
    used_any = False
    # products first, left to right ...
    terms, term_ops, cur = [], [], operands[0]
    for op, y in zip(ops, operands[1:]):
        if op == "*":
            steps.append((f"{cur}*{y}", _mul_body(cur, y), cur * y))
            cur *= y
        else:
            terms.append(cur)
            term_ops.append(op)
            cur = y
    terms.append(cur)
    # ... then + and - left to right
    acc = terms[0]
    for op, y in zip(term_ops, terms[1:]):
        body, r, used = _addsub_body(acc, op, y, flawed)
        steps.append((f"{acc}{op}{y}", body, r))
        used_any |= used
        acc = r
    if len(steps) == 1:
        return steps[0][1], acc, used_any
    return "; ".join(f"{h}: {b} => {r}" for h, b, r in steps), acc, used_any


def _countdown_solution(problem: Problem, rng: random.Random, max_attempts: int = 3) -> tuple[str, str]:
    """Search-style reasoning: up to `max_attempts` random tries with their values, then a hit.

    E.g. for ``3 7 25 -> 46``: ``25-3-7=15 no, 25+3*7=46``, answer ``25+3*7``.
    """
    numbers, target = problem.meta["numbers"], problem.meta["target"]
    tried = []
    for _ in range(rng.randint(0, max_attempts)):
        tree, value = _random_expression(rng, numbers, "+-*")
        expr = _expr_str(tree)
        if value == target:
            return ", ".join(tried + [f"{expr}={target}"]), expr
        tried.append(f"{expr}={value} no")
    return ", ".join(tried + [f"{problem.answer}={target}"]), problem.answer


def worked_solution(problem: Problem, flawed: bool = False, rng: random.Random | None = None) -> tuple[str, str]:
    """(reasoning, answer) for `problem` in the format described in the module docstring.

    With `flawed`, arithmetic solutions drop the carry/borrow entering the leading column of
    every + or - step (the planted misconception); the answer follows the wrong steps. Outside
    that situation flawed and correct solutions are identical. Countdown has no planted flaw;
    its search attempts are drawn from `rng` (default: seeded by the question).
    """
    if problem.task == "arithmetic":
        reasoning, value, _ = _arithmetic_solution(problem.question, flawed)
        return reasoning, str(value)
    if problem.task == "countdown":
        if rng is None:
            rng = random.Random(hashlib.sha256(problem.question.encode("utf-8")).hexdigest())
        return _countdown_solution(problem, rng)
    raise ValueError(f"unknown task {problem.task!r}")


def in_flaw_situation(problem: Problem) -> bool:
    """True if the planted misconception applies: a carry/borrow enters a leading column."""
    return problem.task == "arithmetic" and _arithmetic_solution(problem.question, True)[2]


def flaw_situation_fraction(task: Task | None = None, n: int = 20_000, seed: int = 0) -> float:
    """Monte Carlo estimate of the fraction of `task`'s problems in the flawed situation.

    For `default_task()` it is about 33%: a model that greedily imitates the
    misconception gets about a third of the problems wrong.
    """
    task = task or default_task()
    rng = random.Random(seed)
    return sum(in_flaw_situation(task.sample(rng, split=None)) for _ in range(n)) / n


def build_corpus(n_examples: int, seed: int = 0, task: Task | list[Task] | None = None,
                 flaw_rate: float = 0.6) -> list[str]:
    """`n_examples` training documents ``format_example(question, reasoning, answer)``.

    Args:
        n_examples: number of documents.
        seed: everything is deterministic given the seed.
        task: a task or a list of tasks to mix uniformly (default: `default_task()`); e.g.
            ``[default_task(), CountdownTask()]`` adds countdown examples.
        flaw_rate: fraction of the worked solutions in the flawed situation (a carry/borrow
            entering the leading column) that make the planted mistake; 0 gives a clean corpus.
            See the module docstring for why.

    Only train-split questions are used, so no held-out question ever appears. Questions may
    repeat, as they would in real data.
    """
    if not 0.0 <= flaw_rate <= 1.0:
        raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")
    tasks = [task or default_task()] if not isinstance(task, (list, tuple)) else list(task)
    rng = random.Random(seed)
    docs = []
    for _ in range(n_examples):
        t = tasks[rng.randrange(len(tasks))]
        p = t.sample(rng, split="train")
        flawed = rng.random() < flaw_rate
        reasoning, answer = worked_solution(p, flawed=flawed, rng=rng)
        docs.append(format_example(p.question, reasoning, answer))
    return docs


def corpus_text(docs: list[str]) -> str:
    """All documents joined by blank lines, e.g. to train a tokenizer."""
    return "\n\n".join(docs)
