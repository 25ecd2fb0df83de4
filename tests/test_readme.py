"""Keep the README (and the docs pages it links) honest: commands, links, no hand-typed counts.

    python -m pytest -q tests/test_readme.py

- Every `python ...` / `torchrun ...` command shown in a code block or an inline code span uses only flags
  its program accepts: the flags are read from the program's own `--help` (argparse's, or the subcommand's
  for `python -m extras.r1 recipe` and `python -m extras.hf export`), run in this process.
- Every bare `--flag` the README names in its prose belongs to some program.
- Every relative link and image exists, and a `#anchor` names a heading of the target page.
- No test count is typed by hand (it changed with almost every commit).
- `python -m extras.figures` draws the architecture figure.
"""

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# docs/results_history.md is the record of past runs: its commands are those of their day, so it is left out.
PAGES = [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "results_history.md")

# Programs a page may run, by how they are named on the command line -> the module whose main() parses flags.
SCRIPTS = {"train.py": "train", "grpo.py": "grpo", "sample.py": "sample"}
NOT_OURS = {"pytest", "pip", "json.tool"}  # `python -m pytest`, `python -m pip`: other programs' flags


def code_texts(text: str) -> list[str]:
    """The contents of fenced code blocks (one string each) and of inline code spans outside them."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL)
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.DOTALL)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


def commands(text: str) -> list[list[str]]:
    """Every command line that starts a program, split into words: continuation lines joined, comments and a
    leading `$ ` or environment assignment dropped, pipelines and `&&` chains cut into their commands."""
    found = []
    for code in code_texts(text):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            try:
                words = shlex.split(line, comments=True)
            except ValueError:              # an output line with an unbalanced quote, not a command
                continue
            cmd: list[str] = []
            for w in words + ["&&"]:
                if w in ("&&", "|", ";", "||"):
                    while cmd and re.fullmatch(r"[A-Z_]+=\S*", cmd[0]):   # OMP_NUM_THREADS=1 python ...
                        cmd.pop(0)
                    if len(cmd) > 1 and cmd[0] in ("python", "python3", "torchrun"):   # not a bare `torchrun`
                        found.append(cmd)
                    cmd = []
                else:
                    cmd.append(w)
    return found


def program_of(cmd: list[str]) -> "tuple[str, list[str], list[str]] | None":
    """(module, subcommand argv, the user's flags) for a command that runs one of our programs, else None."""
    if cmd[0] == "torchrun":
        scripts = [w for w in cmd if w.endswith(".py")]
        assert scripts, f"torchrun command without a script: {' '.join(cmd)}"
        i = cmd.index(scripts[0])
        return SCRIPTS[scripts[0]], [], cmd[i + 1:]
    args = cmd[1:]
    if args[0] == "-m":
        module = args[1]
        if module in NOT_OURS or re.fullmatch(r"extras\.[A-Z]+", module):   # or a placeholder: extras.NAME
            return None
        assert module.startswith("extras."), f"unknown module in `{' '.join(cmd)}`"
        rest = args[2:]
        sub = [rest[0]] if rest and not rest[0].startswith("-") else []
        return module, sub, rest[len(sub):]
    if args[0] == "-c":
        return None
    assert args[0] in SCRIPTS, f"`{' '.join(cmd)}` runs {args[0]!r}, which is not one of {sorted(SCRIPTS)}"
    return SCRIPTS[args[0]], [], args[1:]


_HELP: dict = {}


def accepted_flags(module: str, sub: list[str]) -> set[str]:
    """The flags `python -m module [sub] --help` lists, read from its help text (run in this process)."""
    key = (module, tuple(sub))
    if key not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main(sub + ["--help"])
        assert exit_.value.code in (0, None), f"{module} {sub} --help exited with {exit_.value.code}"
        _HELP[key] = set(re.findall(r"--([a-z][a-z0-9_]*)", out.getvalue())) - {"help"}
        assert _HELP[key], f"{module} {sub} --help listed no flags"
    return _HELP[key]


def flags_of(words: list[str]) -> list[str]:
    """The names of the `--name[=value]` words."""
    return [w[2:].split("=", 1)[0] for w in words if w.startswith("--")]


def test_commands_are_found():
    """The extraction sees the README's main commands (guards against a parser that finds nothing)."""
    found = [" ".join(c) for c in commands(README.read_text())]
    assert "python train.py" in found and "python grpo.py" in found
    assert "python sample.py --out_dir=out_grpo" in found
    assert "python -m pytest -n auto" in found
    assert any(c.startswith("python -m extras.r1 recipe") for c in found)
    assert any(c.startswith("torchrun") for c in found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_uses_flags_that_exist(page):
    """Each command's flags are among those its program's --help lists (subcommands included)."""
    bad = []
    for cmd in commands(page.read_text()):
        prog = program_of(cmd)
        if prog is None:
            continue
        module, sub, words = prog
        unknown = [f for f in flags_of(words) if f not in accepted_flags(module, sub)]
        if unknown:
            bad.append(f"`{' '.join(cmd)}`: no such flag " + ", ".join("--" + f for f in unknown))
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


def all_programs() -> list[tuple[str, list[str]]]:
    """(module, subcommand argv) of every program: the three scripts, each extras/ module and subcommand."""
    progs = [(m, []) for m in SCRIPTS.values()]
    for path in sorted((ROOT / "extras").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"extras.{path.stem}")
        if not hasattr(module, "main"):          # a library of the programs (extras/fp8.py), no flags of its own
            continue
        subs = getattr(module, "COMMANDS", None)
        progs += [(module.__name__, [c]) for c in subs] if subs else [(module.__name__, [])]
    return progs


def test_checker_catches_a_wrong_flag():
    """The command check can fail: a misspelt flag, on a script and on a subcommand, is reported."""
    text = "```bash\npython train.py --max_iter=5 && python -m extras.r1 recipe --k=4 --n_prompt=9\n```\n"
    cmds = commands(text)
    assert len(cmds) == 2
    wrong = [f for c in cmds for m, sub, words in [program_of(c)] for f in flags_of(words)
             if f not in accepted_flags(m, sub)]
    assert wrong == ["max_iter", "n_prompt"]


def test_flags_named_in_the_readme_exist():
    """A bare `--flag` in the README's prose is a flag of one of the programs."""
    known = set().union(*(accepted_flags(m, sub) for m, sub in all_programs()))
    named = set()
    for span in code_texts(README.read_text()):
        if span.startswith("--"):
            named.update(flags_of(re.split(r"[\s/]+", span)))
    named -= {"key", "name", "flag"}                     # the placeholders of `--key=value`
    assert named, "the README names no flag in its prose"
    assert named <= known, f"flags named in the README that no program has: {sorted(named - known)}"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(text: str) -> list[str]:
    """Targets of Markdown links and images, code blocks and spans excluded."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_exists(page):
    """Relative links resolve to files in the repository; an anchor names a heading of its page."""
    bad = []
    for target in links(page.read_text()):
        if re.match(r"[a-z]+:", target):          # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
            if anchor not in {slug(h) for h in headings}:
                bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


def test_readme_links_the_docs_pages():
    """Every docs page this test checks is reachable from the README, directly or from a page it links."""
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for target in links(page.read_text()):
            path = target.partition("#")[0]
            if path.endswith(".md") and not re.match(r"[a-z]+:", path):
                file = (page.parent / path).resolve()
                if file.exists() and file not in reached:
                    reached.add(file)
                    todo.append(file)
    missing = [p.name for p in PAGES[1:] if p.resolve() not in reached]
    assert not missing, f"docs pages no link leads to: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hand_typed_test_count(page):
    """'557 tests' goes stale with every commit; pytest prints the count."""
    hits = re.findall(r"\b\d[\d,]*\s+(?:tests|test cases)\b", page.read_text())
    assert not hits, f"{page.name} types a test count by hand: {hits}"


def test_readme_has_no_clock_times():
    """Results in the README are verdicts; times of day belong with the dated runs in docs/."""
    hits = re.findall(r"\b(?:[01]\d|2[0-3]):[0-5]\d\b|\bUTC\b", README.read_text())
    assert not hits, f"clock times in the README: {hits}"


def test_architecture_figure(tmp_path):
    """extras/figures.py writes a PNG of the figure the README shows, and the README shows the committed one."""
    figures = importlib.import_module("extras.figures")
    with contextlib.redirect_stdout(io.StringIO()):
        out = figures.main([f"--out={tmp_path / 'arch.png'}", "--dpi=40"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/architecture.png" in links(README.read_text())
    # a bad flag value is one usage line, not a traceback
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        figures.main(["--out=arch.jpg"])
