"""Tests for a student's first hour: the chat (`python sample.py --interactive`, driven through stdin), the
`--help` of every script (each flag has a help text and shows its default), and the supported Python
versions. About a minute on one CPU thread:

    OMP_NUM_THREADS=1 python -m pytest tests/test_chat.py -q
"""

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_sample import TOK, small_args

from checkpoint import save_checkpoint
from model import Transformer
from sample import (
    SampleConfig,
    chat_command,
    chat_template,
    completion_text,
    encode_prompt,
    generate_batch,
    generate_uncached,
    prompt_tokens,
)

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path: Path, config: dict, kind: str = "pretrain", **arg_kw) -> Transformer:
    """A random tiny model saved in the format train.py writes; returns the model (eval mode)."""
    torch.manual_seed(0)
    model = Transformer(small_args(**arg_kw)).eval()
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model.args.to_dict(),
                           "tokenizer": TOK.to_dict(), "config": config, "kind": kind})
    return model


@pytest.fixture(scope="module")
def reasoning_ckpt(tmp_path_factory):
    """(path, model): pretrained on the built-in arithmetic corpus (config data ''), so the R1 template."""
    path = tmp_path_factory.mktemp("chat") / "ckpt.pt"
    return path, make_checkpoint(path, {"data": ""})


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def run_chat(ckpt: Path, lines: list[str], *flags: str) -> subprocess.CompletedProcess:
    """`python sample.py --interactive` with `lines` typed on stdin (then end of input)."""
    return subprocess.run([sys.executable, "sample.py", "--interactive", f"--init_from={ckpt}", *flags], check=False,
                          input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          encoding="utf-8", errors="replace", cwd=ROOT, env=env(), timeout=300)


def greedy_text(model: Transformer, prompt: list[int], n: int, stop: str) -> str:
    """What greedy decoding must print for `prompt`, computed here without any cache."""
    ids = generate_uncached(model, prompt, n, temperature=0.0, eos_id=TOK.eos_id)
    return completion_text(TOK, ids, stop)[0]


# ---------------------------------------------------------------------------------------------- chat

def test_chat_template_follows_what_the_checkpoint_was_trained_on():
    assert chat_template({"kind": "pretrain", "config": {"data": ""}})[0] == "r1"      # built-in corpus
    assert chat_template({"kind": "pretrain", "config": {}})[0] == "r1"
    assert chat_template({"kind": "grpo", "config": {"data": ""}})[0] == "r1"
    assert chat_template({"kind": "sft", "config": {}})[0] == "r1"
    assert chat_template({"kind": "pretrain", "config": {"data": "book.txt"}})[0] == "raw"  # --data
    assert chat_template({"kind": "hf_import", "config": {"hf_dir": "x"}})[0] == "raw"


def test_chat_commands_change_settings_and_reject_bad_values():
    model = Transformer(small_args(mtp_depth=0))
    cfg = SampleConfig(template="r1")
    new, msg = chat_command("/temperature 0.7", cfg, model)
    assert new.temperature == 0.7 and "temperature=0.7" in msg
    new, _ = chat_command("/top_k 10", new, model)
    assert new.top_k == 10 and new.temperature == 0.7
    new, _ = chat_command("/top_k none", new, model)
    assert new.top_k is None
    for bad in ("/temperature -1", "/temperature warm", "/top_k 0", "/top_p 1.5", "/max_new_tokens 0"):
        same, msg = chat_command(bad, cfg, model)
        assert same is cfg and "\n" not in msg and bad.split()[0] in msg, (bad, msg)
    same, msg = chat_command("/speculative on", cfg, model)       # no MTP module in this model
    assert same is cfg and "mtp_depth=0" in msg
    same, msg = chat_command("/frobnicate", cfg, model)
    assert same is cfg and "unknown command" in msg and "/help" in msg and "\n" not in msg
    assert chat_command("/quit", cfg, model) is None


def test_chat_through_stdin_streams_greedy_answers(reasoning_ckpt):
    """The answers the chat prints are the model's greedy completions of the R1-Zero prompt, with and
    without speculative decoding; commands are acknowledged, a bad one gets a one-line help."""
    path, model = reasoning_ckpt
    n = 24
    r = run_chat(path, ["/help", "/top_k 10", "/top_k none", "/bogus", "37+48", "/speculative on", "37+48",
                        "/speculative off", "/temperature 0.7", "12-5", "/quit"],
                 "--temperature=0", f"--max_new_tokens={n}")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "R1-Zero prompt" in out and "/temperature" in out and "/speculative on|off" in out   # banner, /help
    assert "top_k=10" in out and "temperature=0.7" in out
    bogus = [line for line in out.splitlines() if "'/bogus'" in line]
    assert len(bogus) == 1 and "unknown command" in bogus[0] and "/help" in bogus[0]
    expected = "<think>" + greedy_text(model, prompt_tokens(TOK, "37+48"), n, "</answer>")
    assert out.count(expected) == 2, (expected, out)             # plain, then speculative: the same text
    assert "MTP drafts accepted" in out
    assert len(re.findall(r"\[\d+ tokens, [\d.]+ tokens/s", out)) == 3
    assert out.rstrip().endswith("bye")


def test_chat_raw_text_for_a_model_trained_on_a_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = make_checkpoint(path, {"data": "poems.txt"})
    r = run_chat(path, ["The sea"], "--temperature=0", "--max_new_tokens=20")   # ends with end of input
    assert r.returncode == 0, r.stderr
    assert "poems.txt" in r.stdout and "continued as is" in r.stdout
    expected = "The sea" + greedy_text(model, encode_prompt(TOK, "The sea", bos=False), 20, "")
    assert expected in r.stdout
    assert "<think>" not in r.stdout and r.stdout.rstrip().endswith("bye")


def test_chat_without_a_checkpoint_says_how_to_make_one(tmp_path):
    r = run_chat(tmp_path / "missing.pt", ["hello"])
    assert r.returncode == 1
    assert "python train.py" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT is POSIX")
def long_answer_checkpoint(path: Path) -> Transformer:
    """A random model (raw template) whose greedy answer to "Once upon a time" runs on: no EOS in 1000 tokens."""
    model = make_checkpoint(path, {"data": "long.txt"}, max_seq_len=4096, original_seq_len=4096)
    prompt = encode_prompt(TOK, "Once upon a time", bos=False)
    assert TOK.eos_id not in generate_batch(model, [prompt], 1000, temperature=0.0)[0][0]
    return model


def test_ctrl_c_stops_the_answer_not_the_chat(tmp_path):
    """SIGINT while an answer streams prints [stopped] and returns to the prompt; the chat goes on. One
    signal, whenever it lands during the answer (test_ctrl_c_in_a_finaliser_still_stops_the_answer below
    covers the moment where a raised KeyboardInterrupt used to be lost)."""
    path = tmp_path / "ckpt.pt"
    long_answer_checkpoint(path)
    proc = subprocess.Popen([sys.executable, "sample.py", "--interactive", f"--init_from={path}",
                             "--max_new_tokens=4000", "--temperature=0"], cwd=ROOT, env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace")
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()

    def wait_for(text: str, timeout: float = 120.0) -> None:
        t0 = time.time()
        while text not in "".join(chunks):
            if proc.poll() is not None or time.time() - t0 > timeout:
                proc.kill()
                pytest.fail(f"waited for {text!r}; got {''.join(chunks)[-500:]!r}; stderr {proc.stderr.read()[-500:]!r}")
            time.sleep(0.02)

    try:
        wait_for("> ")
        proc.stdin.write("Once upon a time\n")
        proc.stdin.flush()
        wait_for("Once upon a time")                       # the answer has started streaming
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)                    # once: it must stop the answer wherever it lands
        wait_for("[stopped]")
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    out = "".join(chunks)
    assert "[stopped]" in out and out.rstrip().endswith("bye")
    assert not re.search(r"\[\d+ tokens", out)                 # the stopped answer never finished


def test_ctrl_c_in_a_finaliser_still_stops_the_answer(tmp_path, monkeypatch, capsys):
    """The cause of the flake: a KeyboardInterrupt raised while Python runs a finaliser (a __del__, a weakref
    callback of the garbage collector) is printed as "Exception ignored" and dropped, so the answer went on.
    Here the SIGINT is delivered inside a __del__ during the answer, deterministically (os.kill runs the
    handler before it returns); the chat must still stop the answer and go on."""
    import builtins

    import sample
    path = tmp_path / "ckpt.pt"
    long_answer_checkpoint(path)

    class SignalWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    real_stream = sample.stream

    def stream_with_a_finaliser(*args, **kwargs):
        for i, token in enumerate(real_stream(*args, **kwargs)):
            if i == 5:
                SignalWhenCollected()                    # collected at once: its __del__ sends the SIGINT
            yield token

    monkeypatch.setattr(sample, "stream", stream_with_a_finaliser)
    lines = iter(["Once upon a time", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    before = signal.getsignal(signal.SIGINT)
    assert sample.main(["--interactive", f"--init_from={path}", "--max_new_tokens=60", "--temperature=0",
                        "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "[stopped]" in out and not re.search(r"\[\d+ tokens", out), out[-500:]
    assert out.rstrip().endswith("bye")
    assert signal.getsignal(signal.SIGINT) is before       # the chat gives the previous handler back


# ---------------------------------------------------------------------------------------------- --help

SCRIPTS = {"train.py": ["train.py"], "grpo.py": ["grpo.py"], "sample.py": ["sample.py"],
           "extras.bench": ["-m", "extras.bench"], "extras.cost": ["-m", "extras.cost"],
           "extras.hf export": ["-m", "extras.hf", "export"], "extras.hf import": ["-m", "extras.hf", "import"],
           "extras.r1 recipe": ["-m", "extras.r1", "recipe"]}
# TrainConfig is being restructured elsewhere; its flags get help texts there. strict:
# once every flag is documented, the expected failure turns into a failure that says to drop this marker.
UNDOCUMENTED_YET: set = set()


def help_entries(text: str) -> dict[str, str]:
    """{'--flag': its help text} from argparse's --help output (an entry may wrap onto further lines)."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):                         # '  --flag VALUE    help text' or just '  --flag VALUE'
            invocation, _, help_text = line.strip().partition("  ")
            current = invocation.split()[0].rstrip(",")
            entries[current] = help_text.strip()
        elif current and line.startswith("    ") and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    entries.pop("-h", None)
    return entries


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.xfail(
    strict=True, reason="some TrainConfig flags have no help text yet")) if s in UNDOCUMENTED_YET
    else s for s in SCRIPTS])
def test_every_flag_has_help_and_default(script):
    r = subprocess.run([sys.executable, *SCRIPTS[script], "--help"], check=False, capture_output=True, text=True,
                       cwd=ROOT,
                       env={**env(), "COLUMNS": "100"}, timeout=120)
    assert r.returncode == 0, r.stderr
    entries = help_entries(r.stdout)
    assert len(entries) >= 3, r.stdout
    lacking = sorted(flag for flag, text in entries.items()
                     if not re.sub(r"\(default: .*\)$", "", text).strip()               # no help text
                     or ("(default: " not in text and "(required)" not in text))      # no default
    assert not lacking, f"{script}: flags without a help text or a default: {lacking}"


def test_help_entries_parser_sees_every_flag():
    """The parser above must not skip flags (or the help test would pass vacuously)."""
    r = subprocess.run([sys.executable, "sample.py", "--help"], check=False, capture_output=True, text=True,
                       cwd=ROOT,
                       env={**env(), "COLUMNS": "100"}, timeout=120)
    entries = help_entries(r.stdout)
    assert set(entries) == {f"--{f.name}" for f in dataclasses.fields(SampleConfig)}
    assert "(default: 0.8)" in entries["--temperature"] and "temperature" in entries["--temperature"]


# ---------------------------------------------------------------------------------------------- Python

def test_pyproject_states_the_supported_python_versions():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'requires-python\s*=\s*">=3\.10"', text)
    assert "Python 3.10" in (ROOT / "README.md").read_text()


def python_3_10() -> "str | None":
    """A working Python 3.10 interpreter (on PATH, or installed by pyenv), or None."""
    candidates = [shutil.which("python3.10"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))]
    for exe in filter(None, candidates):
        r = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.startswith("Python 3.10"):
            return exe
    return None


OLDEST = python_3_10()
CHECK_310 = """
import ast, importlib, importlib.util, sys
bad = []
for path in sys.argv[1:]:
    tree = compile(open(path, encoding="utf-8").read(), path, "exec", ast.PyCF_ONLY_AST)  # 3.10 syntax
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \\
                and node.module.split(".")[0] in sys.stdlib_module_names:
            module = importlib.import_module(node.module)
            bad += [f"{path}: from {node.module} import {a.name}" for a in node.names if not hasattr(module, a.name)
                    and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
        elif isinstance(node, ast.Import):
            bad += [f"{path}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in sys.stdlib_module_names and importlib.util.find_spec(a.name) is None]
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


@pytest.mark.skipif(OLDEST is None, reason="no Python 3.10 interpreter found to check the oldest supported version")
def test_every_file_runs_on_python_3_10_syntax_and_stdlib():
    """The oldest supported Python (3.10) parses every file, and every standard-library name they import
    exists there (the test environment's packages, torch included, are not installed for 3.10)."""
    files = [str(p) for p in ROOT.rglob("*.py") if ".git" not in p.parts]
    r = subprocess.run([OLDEST, "-c", CHECK_310, *files], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
