"""Tests for the defects of issue 14 (review and new-user trial), one section per item:

  4. --loss_type=grpo divides by all G completions of the batch (DSM eq. 3), masked rows included
  6. dynamic sampling judges a group on accuracy (DAPO), the mu=1 loss note, the k3 KL gradient
  7. extras/r1.py: cold-start questions and rejection-sampling prompts are disjoint
  8. tasks.question_of: linear time, never raises
 11. checkpoints: a kill in the middle of a save leaves the previous file loadable; a damaged file is one line
 12. every script rejects bad flag values right after parsing: one line naming the flag, no traceback
 13. extras/hf.py speaks the same --key=value parser; a missing folder says so; extras/r1.py --help
and of issue 33 (reliability): GRPO's backward outside autocast, weight checksums, --init_from on --resume,
FP8 rollouts on the learner's path and ue8m0 scales, --device=auto never mps, the two RL policies

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_hardening.py -q
"""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import grpo
import tasks
from checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from extras import r1

REPO = Path(__file__).resolve().parent.parent


# ---- 4. loss_type=grpo: 1/G over all completions ----------------------------------------------------

def masked_batch():
    """N=4 completions (P=2 groups of G=2), T=3 slots, old_logp = 0 so rho = exp(logp).

    row 0: A=+1, rho [1.0, 1.5, 0.9], 3 tokens
    row 1: A=-1, fully masked (a truncated completion under --mask_truncated)
    row 2: A=+2, rho [1.1, 0.5, -], 2 tokens
    row 3: A=-2, rho [1.0, 1.0, 1.3], 3 tokens
    """
    rho = torch.tensor([[1.0, 1.5, 0.9], [2.0, 2.0, 2.0], [1.1, 0.5, 7.0], [1.0, 1.0, 1.3]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return rho.log(), torch.zeros(4, 3), torch.tensor([1.0, -1.0, 2.0, -2.0]), mask


def test_grpo_loss_divides_by_all_completions_including_masked_rows():
    logp, old, adv, mask = masked_batch()
    # Per-token terms -min(rho A, clip(rho, 0.8, 1.2) A), by hand:
    #   row 0 (A=+1): -1.0, -min(1.5, 1.2) = -1.2, -0.9                    -> token mean -3.1/3
    #   row 2 (A=+2): -min(2.2, 2.4) = -2.2, -min(1.0, 1.6) = -1.0         -> token mean -3.2/2
    #   row 3 (A=-2): 2.0, 2.0, -min(-2.6, -2.4) = 2.6                       -> token mean 6.6/3
    # DSM eq. 3: 1/G per group, averaged over the groups = sum of the 4 token means / 4 (row 1 adds 0).
    expected = (-3.1 / 3 + 0.0 - 3.2 / 2 + 6.6 / 3) / 4
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, 0.2, 0.2, 0.0, "grpo", 3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)               # -0.10833; dividing by 3 gives -0.1444
    # truncating a row does not make its siblings weigh more: the three other means keep weight 1/4
    logp.requires_grad_(True)
    grpo.grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.2, 0.0, "grpo", 3)[0].backward()
    expected_grad = torch.tensor([[-1 / 12] * 3, [0.0] * 3, [-2 / 8, -2 / 8, 0.0], [2 / 12] * 3])
    torch.testing.assert_close(logp.grad, expected_grad)                  # -A_i / (|o_i| N), N = 4


def test_policy_update_keeps_truncated_rows_in_the_grpo_denominator(monkeypatch):
    """Through policy_update: with --mask_truncated the loss gets the mask and still divides by P*G."""
    seen = {}
    real = grpo.grpo_loss

    def spy(logp, old, ref, adv, mask, *args):
        loss, stats = real(logp, old, ref, adv, mask, *args)
        seen["rows"], seen["mask"] = logp.shape[0], mask.clone()
        seen["by_hand"] = sum((-adv[i] * mask[i].sum() / mask[i].sum().clamp(min=1)).item()
                              for i in range(logp.shape[0])) / logp.shape[0]
        return loss, stats

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    torch.manual_seed(0)
    from model import ModelArgs, Transformer
    from tokenizer import get_tokenizer
    tok = get_tokenizer("char")
    model = Transformer(ModelArgs.preset("tiny", vocab_size=tok.n_vocab, dim=32, inter_dim=64, moe_inter_dim=16,
                                         n_layers=2, kv_lora_rank=16, q_lora_rank=0, mtp_depth=0))
    cfg = grpo.GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=3, beta=0.0, mask_truncated=True)
    problem = tasks.arithmetic_problem("1+1")
    groups = [grpo.Group(problem, [tok.bos_id], [[50, tok.eos_id], [51, 52, 53]], [True, False], ["", ""],
                         [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]),
              grpo.Group(problem, [tok.bos_id], [[54, tok.eos_id], [55, tok.eos_id]], [True, True], ["", ""],
                         [0.0, 1.0], [0.0, 1.0], [0.0, 0.0])]
    opt = grpo.make_rl_optimizer(model, cfg)
    stats = grpo.policy_update(model, None, opt, groups, cfg, tok.eos_id)
    assert seen["rows"] == 4 and seen["mask"].any(dim=1).tolist() == [True, False, True, True]
    assert stats["trained_seqs"] == 3
    # mu=1: rho = 1, so the loss is -(1/4) sum of the advantages of the unmasked rows (not -(1/3) ...)
    assert stats["loss"] == pytest.approx(seen["by_hand"], abs=1e-5)
    assert stats["loss"] == pytest.approx(-(1 - 1 + 1) / 4, abs=1e-3)     # advantages ~ +1, (-1 masked), -1, +1


# ---- 6. dynamic sampling on accuracy; the mu=1 loss note; the k3 gradient ---------------------------

def scored_group(question: str, accuracy: list, fmt: list) -> grpo.Group:
    """A group with given accuracy and format rewards (total = accuracy + 0.1 format, R1-Zero's weights)."""
    n = len(accuracy)
    return grpo.Group(tasks.arithmetic_problem(question), [0], [[1]] * n, [True] * n, [""] * n,
                      [a + 0.1 * f for a, f in zip(accuracy, fmt)], list(accuracy), list(fmt))


def test_zero_variance_is_judged_on_accuracy_not_total_reward():
    all_wrong_mixed_format = scored_group("1+2", [0, 0, 0, 0], [1, 0, 1, 0])   # totals 0.1, 0, 0.1, 0
    all_right_mixed_format = scored_group("2+2", [1, 1, 1, 1], [1, 1, 0, 1])
    mixed = scored_group("3+2", [1, 0, 0, 0], [1, 1, 1, 1])
    assert all_wrong_mixed_format.zero_variance and all_right_mixed_format.zero_variance
    assert not mixed.zero_variance


def test_dynamic_sampling_replaces_groups_that_are_all_right_or_all_wrong(monkeypatch):
    """First draw: one informative group and two whose answers are all wrong / all right but whose format
    rewards differ. DAPO's rule replaces the two; a rule on the total reward would keep them."""
    draws = iter([
        [scored_group("1+1", [1, 0], [1, 1]), scored_group("1+2", [0, 0], [1, 0]), scored_group("1+3", [1, 1], [0, 1])],
        [scored_group("2+1", [0, 1], [1, 1]), scored_group("2+2", [0, 0], [1, 1])],
        [scored_group("3+1", [1, 0], [0, 0])],
    ])
    monkeypatch.setattr(grpo, "sample_groups", lambda *args, **kwargs: next(draws))
    cfg = grpo.GRPOConfig(group_size=2, prompts_per_step=3, dynamic_sampling=True, dynamic_max_tries=3)
    groups, info = grpo.collect_rollouts(None, None, lambda n: [None] * n, 3, cfg, None)
    assert [g.problem.question for g in groups] == ["1+1", "2+1", "3+1"]
    assert info["zero_var_frac"] == pytest.approx(2 / 3) and info["resampled"] == 3


def test_mu1_loss_is_zero_only_for_grpo_without_masked_rows_and_beta0():
    """The docstring's claim, checked: with rho = 1 the loss is 0 for grpo, no masked rows, beta = 0, and
    not otherwise (a masked row, length-weighted dapo/dr_grpo, or a KL term)."""
    torch.manual_seed(0)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.1], [0.1, 1.1, 0.0, 0.0]])
    adv = grpo.group_advantages(rewards).flatten()                    # (8,) each group sums to 0
    logp = torch.randn(8, 5)
    full = torch.ones(8, 5, dtype=torch.bool)
    ragged = full.clone()
    ragged[0, 2:] = ragged[5, 1:] = False                              # unequal lengths, no row masked
    one_row_masked = full.clone()
    one_row_masked[3] = False
    ref = logp + 0.3 * torch.randn(8, 5)

    def loss(mask, loss_type="grpo", beta=0.0):
        return grpo.grpo_loss(logp, logp, ref, adv, mask, 0.2, 0.2, beta, loss_type, 5)[0].item()

    assert loss(full) == pytest.approx(0.0, abs=1e-6) and loss(ragged) == pytest.approx(0.0, abs=1e-6)
    assert abs(loss(one_row_masked)) > 0.05
    assert abs(loss(ragged, "dapo")) > 0.01 and abs(loss(ragged, "dr_grpo")) > 0.01
    assert loss(full, beta=0.1) > 1e-3


def test_k3_gradient_expectation_is_the_gradient_of_the_reverse_kl():
    """kl_unbiased's docstring: E_{y~pi_theta}[grad k3(y)] = grad KL(pi_ref || pi_theta), not grad KL(pi_theta || pi_ref),
    computed exactly over a 6-token vocabulary (the sampling weights pi_theta(y) are not differentiated)."""
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(6), -1)
    logp = torch.log_softmax(theta, -1)
    expected_k3 = (logp.exp().detach() * grpo.kl_unbiased(logp, ref_logp)).sum()
    g_k3, = torch.autograd.grad(expected_k3, theta)
    logp = torch.log_softmax(theta, -1)
    g_reverse, = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), theta)       # KL(ref || theta)
    logp = torch.log_softmax(theta, -1)
    g_forward, = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta)          # KL(theta || ref)
    torch.testing.assert_close(g_k3, g_reverse)
    assert (g_k3 - g_forward).abs().max() > 1e-2
    # its value, in contrast, is unbiased for KL(theta || ref)
    with torch.no_grad():
        logp = torch.log_softmax(theta, -1)
        value = (logp.exp() * grpo.kl_unbiased(logp, ref_logp)).sum()
        assert value.item() == pytest.approx((logp.exp() * (logp - ref_logp)).sum().item(), rel=1e-5)


# ---- 7. r1: cold-start and rejection-sampling questions are disjoint ---------------------------------

def test_cold_start_and_rejection_prompts_are_disjoint(tmp_path, monkeypatch):
    """The questions `reject` samples from are never cold-start questions (default sizes 300 and 1000)."""
    cfg = r1.R1Config(device="cpu")
    cold = {row["question"] for row in r1.cold_start_examples(cfg.n_cold, r1.task_of(cfg), cfg.seed)}
    seen = []

    class Stub(torch.nn.Module):
        """Stands in for a loaded checkpoint: reject_to_file only asks for its device."""
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    def fake_rejection_sample(model, tok, problems, *args, **kwargs):
        seen.extend(problems)
        return [], {"samples": 0, "kept": 0, "yield": 0.0, "prompts": len(problems), "covered": 0}

    monkeypatch.setattr(r1, "load_model", lambda *args, **kwargs: (Stub(), None, {}))
    monkeypatch.setattr(r1, "rejection_sample", fake_rejection_sample)
    r1.reject_to_file(cfg, tmp_path / "ckpt.pt", tmp_path / "rejection.jsonl", cfg.seed)
    prompts = [p.question for p in seen]
    assert len(cold) == 300 and len(prompts) == 1000 == len(set(prompts))
    assert not cold & set(prompts)
    assert not any(tasks.is_heldout(q) for q in prompts)


# ---- 8. tasks.question_of --------------------------------------------------------------------------

_REFERENCE = re.compile(r"User: (.*)\nAssistant: <think>")   # the old definition, quadratic on long lines


class ScanCountingStr(str):
    """A str that counts the characters its find/rfind calls look at (the span each search covers)."""
    scanned = 0

    def find(self, sub, start=0, end=None):
        """str.find, counting the span [start, end)."""
        end = len(self) if end is None else end
        ScanCountingStr.scanned += max(0, end - start)
        return str.find(self, sub, start, end)

    def rfind(self, sub, start=0, end=None):
        """str.rfind, counting the span [start, end)."""
        end = len(self) if end is None else end
        ScanCountingStr.scanned += max(0, end - start)
        return str.rfind(self, sub, start, end)


def test_question_of_is_linear_on_long_adversarial_input():
    """180 KB of 'User: ' on one line (36 s with the regex, which retries the line from every 'User: ') and
    180 KB of short lines: question_of's searches together look at no more than 3 characters per input
    character, an operation count that does not depend on the machine (a quadratic scan would look at
    ~30,000 per character here). The count needs question_of to read the text through str.find/rfind,
    which the first assert checks."""
    for text in ("User: " * 30_000, "User: x\n" * 22_500, "User: " * 30_000 + "\nAssistant: <think>",
                 ("User: \nAssistant: " * 5_000) + "User: 1+1\nAssistant: <think>"):
        ScanCountingStr.scanned = 0
        got = tasks.question_of(ScanCountingStr(text))
        assert 0 < ScanCountingStr.scanned <= 3 * len(text), (len(text), ScanCountingStr.scanned)
        assert got == (_REFERENCE.search(text).group(1) if text.endswith("<think>") else None)


@pytest.mark.parametrize("value", [None, 42, 3.5, b"User: 1+1\nAssistant: <think>", ["User: 1+1"], {}])
def test_question_of_never_raises(value):
    assert tasks.question_of(value) is None


def test_question_of_agrees_with_the_regex_on_random_documents():
    pieces = ["User: ", "User:", "\n", "Assistant: <think>", "Assistant: ", "<think>", "x", "12+3", " ", "\r"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        m = _REFERENCE.search(text)
        assert tasks.question_of(text) == (m.group(1) if m else None), repr(text)
    assert tasks.question_of(tasks.format_example("37+48", "r", "85")) == "37+48"


# ---- 11. checkpoints under faults --------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from checkpoint import save_checkpoint
    path, mode = sys.argv[2], sys.argv[3]
    ws = [torch.empty(20_000) for _ in range(400)]              # 32 MB in 400 records: the file grows gradually
    for i in range(10_000):
        model = {f"w{j}": w.fill_(float(i)) for j, w in enumerate(ws)}
        payload = {"model": model, "model_args": {}, "tokenizer": {}, "step": i}
        if mode == "atomic":
            save_checkpoint(path, payload)
        else:
            torch.save(payload, path)                           # the naive way: write the target in place
        print(i, os.path.getsize(path), flush=True)              # the size of a complete save
""")


def kill_in_the_middle_of_a_save(tmp_path: Path, mode: str) -> Path:
    """Start a process that saves a 32 MB checkpoint again and again; SIGKILL it while it is writing the
    second or a later one (the file being written exists and is not complete). Returns the target path."""
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(path), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline().split()
        assert first[:1] == ["0"], "the writer did not finish its first save"
        full = int(first[1])                      # measured by the writer: the file may already be rewritten
        writing = path.with_name(path.name + ".tmp") if mode == "atomic" else path
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                size = writing.stat().st_size
            except FileNotFoundError:
                continue
            if 0 < size < full // 2:                             # a save is under way, half of it still to write
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("never caught the writer in the middle of a save")
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return path


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = kill_in_the_middle_of_a_save(tmp_path, "atomic")
    ckpt = read_checkpoint(path)
    w = torch.cat(list(ckpt["model"].values()))
    assert w.numel() == 8_000_000 and bool((w == ckpt["step"]).all())   # every tensor from one whole save


def test_kill_during_a_plain_torch_save_is_caught_as_one_clear_line(tmp_path):
    """The control: writing the target in place, the same kill leaves a damaged file (what the atomic
    save prevents), and read_checkpoint reports it in one line naming the file."""
    path = kill_in_the_middle_of_a_save(tmp_path, "direct")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert_one_clear_line(str(err.value), path)


def assert_one_clear_line(message: str, path: Path) -> None:
    """A single line that names the file and passes on none of torch's advice to disable weights_only."""
    assert "\n" not in message and str(path) in message
    assert "weights_only" not in message.lower() and "weights only" not in message.lower()
    assert len(message) < 250 + len(str(path)), message


def damaged_checkpoints(tmp_path: Path) -> dict:
    """Files that are not loadable checkpoints, each written the way such a file comes about."""
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.randn(1000)}, "model_args": {}, "tokenizer": {}})
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "random": random.Random(0).randbytes(5000),
             "header only": data[:64]}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.pt"
        out[name].write_bytes(content)
    out["code inside"] = tmp_path / "module.pt"            # a pickled module: weights_only refuses it
    torch.save({"model": torch.nn.Linear(2, 2), "model_args": {}, "tokenizer": {}}, out["code inside"])
    return out


def test_damaged_checkpoint_is_one_clear_line(tmp_path):
    for name, path in damaged_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        assert_one_clear_line(str(err.value), path)
        assert ("refuses" if name == "code inside" else "truncated or corrupt") in str(err.value), name


def test_damaged_checkpoint_on_the_command_line(tmp_path):
    path = damaged_checkpoints(tmp_path)["code inside"]
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={path}", "--device=cpu"], cwd=REPO, check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert_one_clear_line(lines[0], path)


def test_failed_save_leaves_no_temporary_file_and_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_args": {}, "tokenizer": {}})

    class Unpicklable:
        """torch.save fails on it halfway through the payload."""
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "bad": Unpicklable()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))


def test_save_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    """The order that survives a power cut: data on disk (fsync of the file), then the rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "model_args": {}, "tokenizer": {}})
    assert events[:2] == ["fsync", "replace"]



# ---- 12. every script rejects bad flags right after parsing ------------------------------------------

# (command line after `python`, what the last line of stderr must contain: the flag and its value)
BAD_FLAGS = [
    (["train.py", "--max_iters=-1"], ["--max_iters", "-1"]),
    (["train.py", "--max_iters=0"], ["--max_iters", "0"]),
    (["train.py", "--batch_size=0"], ["--batch_size", "0"]),
    (["train.py", "--preset=huge"], ["--preset", "huge"]),
    (["grpo.py", "--group_size=1"], ["--group_size", "1"]),
    (["grpo.py", "--max_iters=0"], ["--max_iters", "0"]),
    (["grpo.py", "--temperature=0"], ["--temperature", "0"]),
    (["grpo.py", "--loss_type=ppo"], ["--loss_type", "ppo"]),
    (["grpo.py", "--ops=x"], ["--ops", "x"]),
    (["grpo.py", "--digits_min=3", "--digits_max=2"], ["--digits_m", "3"]),
    (["sample.py", "--top_p=2"], ["--top_p", "2"]),
    (["sample.py", "--top_k=0"], ["--top_k", "0"]),
    (["sample.py", "--device=gpu"], ["--device", "gpu"]),
    (["sample.py", "--prompt=FILE:/no/such/prompt.txt"], ["--prompt", "/no/such/prompt.txt"]),
    (["-m", "extras.bench", "--only=9"], ["--only", "9"]),
    (["-m", "extras.bench", "--device=tpu"], ["--device", "tpu"]),
    (["-m", "extras.cost", "--mfu=2"], ["--mfu", "2"]),
    (["-m", "extras.cost", "--gpu=A100", "--precision=fp8"], ["--precision", "fp8"]),
    (["-m", "extras.cost", "--tokens=0"], ["--tokens", "0"]),
    (["-m", "extras.hf", "export", "--dtype=int8"], ["--dtype", "int8"]),
    (["-m", "extras.hf", "import", "--hf_dir=/no/such/folder"], ["--hf_dir", "/no/such/folder", "no such folder"]),
    (["-m", "extras.hf", "import", "--hf_dir=.", "--tokenizer=bert"], ["--tokenizer", "bert"]),
    (["-m", "extras.r1", "recipe", "--k=0"], ["--k", "0"]),
    (["-m", "extras.r1", "coldstart", "--n_cold=0"], ["--n_cold", "0"]),
    (["-m", "extras.r1", "reject", "--init_from=x.pt", "--temperature=0"], ["--temperature", "0"]),
    (["-m", "extras.r1", "distill", "--student_preset=huge"], ["--student_preset", "huge"]),
]


def run_rejected(argv: list, cwd: Path) -> dict:
    """Run `python *argv` from `cwd` (an empty folder: a script that wrongly starts work writes nothing into
    the repository) and return its exit status, output and CPU seconds (user + system, which a loaded
    machine does not inflate the way it does wall-clock time). Killed after 120 s."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    script = [str(REPO / argv[0]), *argv[1:]] if argv[0].endswith(".py") else argv
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, *script], cwd=cwd, env=env, stdout=fo, stderr=fe)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "stdout": out.read_text(), "stderr": err.read_text(),
            "cpu_s": usage.ru_utime + usage.ru_stime}


@pytest.mark.parametrize("argv, expected", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_rejected_before_any_work(argv, expected, tmp_path):
    r = run_rejected(argv, tmp_path)           # one Python start and torch import each; -n spreads them
    assert r["rc"] != 0, r
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert r["stdout"] == "", "the script printed (and so started work) before rejecting the flag"
    last = r["stderr"].strip().splitlines()[-1]
    for part in expected:                       # the flag (with or without its dashes) and the value
        assert part.lstrip("-") in last, last
    assert r["cpu_s"] < 5, f"{r['cpu_s']:.1f} CPU seconds: the check should come right after parsing"


# ---- 13. extras/hf.py and extras/r1.py command lines ---------------------------------------------------

def test_hf_import_of_a_missing_folder_says_so(tmp_path):
    from extras import hf
    with pytest.raises(hf.HFConversionError, match="no such folder"):
        hf.import_hf(tmp_path / "missing")


def test_hf_uses_the_key_value_parser_of_every_script(tmp_path, capsys):
    """--verify=false and --no_mtp=true are --key=value booleans, as in every other script (argparse's
    store_true flags refused a value); parsing succeeds and the run stops at the missing checkpoint."""
    from extras import hf
    assert hf.main(["export", f"--ckpt={tmp_path / 'none.pt'}", f"--out={tmp_path / 'hf'}", "--verify=false"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        hf.main(["import", f"--hf_dir={tmp_path / 'missing'}", "--no_mtp=true"])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("module, commands", [
    ("r1", {"coldstart": ("--n_cold", "--k"), "reject": ("--init_from", "--rl_steps"),
            "recipe": ("--rl_steps", "--teacher_data"), "distill": ("--student_preset", "--init_from")}),
    ("hf", {"export": ("--dtype", "--hf_dir"), "import": ("--hf_dir", "--dtype")}),
])
def test_help_lists_each_commands_own_flags(module, commands, capsys):
    """`python -m extras.<module> --help` exits 0 and shows, per command, the flags it uses (and not
    another command's); `COMMAND --help` shows that command's flags."""
    main = __import__(f"extras.{module}", fromlist=["main"]).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sections = dict(re.findall(r"\n  (\w+): .*\n((?:    --.*\n?)+)", text))
    assert set(sections) == set(commands), text
    for command, (own, other) in commands.items():
        assert f"--{own.lstrip('-')}=" in sections[command] and f"{other}=" not in sections[command], command
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        help_text = capsys.readouterr().out
        assert own in help_text and other not in help_text


def test_r1_help_from_the_command_line():
    for argv in (["--help"], ["recipe", "--help"]):
        r = subprocess.run([sys.executable, "-m", "extras.r1", *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=300, check=False)
        assert r.returncode == 0 and "--rl_steps" in r.stdout and "Traceback" not in r.stderr


def test_r1_rejects_a_flag_its_command_does_not_use(capsys):
    with pytest.raises(SystemExit) as e:
        r1.main(["coldstart", "--k=4"])
    assert e.value.code == 2 and "--k=4" in capsys.readouterr().err


# ---- issue 33: reliability past one process ---------------------------------------------------------------
# (items 1 and 2, the collectives and the exact resume on two ranks, are in tests/test_multirank.py;
#  item 9's chat Ctrl-C is in tests/test_chat.py)

GRPO_TINY = ["--prompts_per_step=2", "--group_size=2", "--max_new_tokens=6", "--n_eval=0", "--device=cpu"]


def save_fp8_checkpoint(path: Path, **kw) -> Path:
    """A random tiny model with FP8 on (8 x 8 tiles fit its sizes) and a BPE tokenizer, as train.py writes it."""
    from test_grpo import tiny_args

    from model import Transformer
    from tokenizer import get_tokenizer
    tok = get_tokenizer("bpe", text=tasks.corpus_text(tasks.build_corpus(300)), vocab_size=300)
    torch.manual_seed(0)
    args = tiny_args(tok.n_vocab, max_seq_len=128, original_seq_len=128, fp8=True, fp8_block=8, **kw)
    save_checkpoint(path, {"model": Transformer(args).state_dict(), "model_args": args.to_dict(),
                           "tokenizer": tok.to_dict(), "config": {}, "kind": "pretrain"})
    return path


def test_grpo_backward_runs_outside_autocast(tmp_path, monkeypatch):
    """Item 3: under --dtype=bfloat16 only the forward passes autocast; FP8's weight gradient stays float32,
    and no backward (the router's float32 matmul included) runs with autocast on."""
    import model as model_module
    seen = []
    real_backward = model_module.FP8LinearFunction.backward

    def spy(ctx, dy):
        grads = real_backward(ctx, dy)
        seen.append((grads[1].dtype, torch.is_autocast_enabled("cpu")))
        return grads

    monkeypatch.setattr(model_module.FP8LinearFunction, "backward", staticmethod(spy))
    ckpt = save_fp8_checkpoint(tmp_path / "fp8.pt")
    grpo.main([*GRPO_TINY, f"--init_from={ckpt}", f"--out_dir={tmp_path / 'run'}", "--max_iters=1",
               "--dtype=bfloat16"])
    assert seen, "no FP8 backward ran"
    assert all(dtype == torch.float32 and not autocast_on for dtype, autocast_on in seen), set(seen)


def flip_bytes_in_the_largest_tensor(path: Path, n: int = 16) -> None:
    """Flip n bytes in the middle of the largest tensor of a torch.save file; the zip headers stay intact
    (torch stores each tensor's bytes uncompressed under archive/data/N)."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    middle = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(middle, middle + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_weights_are_one_clear_line_and_old_checkpoints_still_load(tmp_path):
    """Item 4: a checkpoint whose tensor bytes changed is refused by its checksum, on the command line too;
    one written before checksums existed loads as before."""
    from test_grpo import save_tiny_checkpoint
    path = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    old = tmp_path / "old.pt"                        # the same checkpoint as written before checksums
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt.pop("model_sha256")) == 64
    torch.save(ckpt, old)
    assert read_checkpoint(old)["model"].keys() == ckpt["model"].keys()
    flip_bytes_in_the_largest_tensor(path)
    assert torch.load(path, weights_only=True)["model"].keys() == ckpt["model"].keys()   # torch does not notice
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "damaged" in str(err.value)
    assert_one_clear_line(str(err.value), path)
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={path}", "--device=cpu", "--max_new_tokens=4"],
                       cwd=REPO, check=False, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "damaged" in lines[0], (r.returncode, r.stdout[-300:], r.stderr)
    assert_one_clear_line(lines[0], path)


def test_grpo_resume_refuses_another_init_from(tmp_path, capsys):
    """Item 5: the KL reference is the starting checkpoint; --resume with other weights is one line."""
    from test_grpo import save_tiny_checkpoint
    first, other = save_tiny_checkpoint(tmp_path / "a.pt", seed=0), save_tiny_checkpoint(tmp_path / "b.pt", seed=1)
    flags = [*GRPO_TINY, f"--out_dir={tmp_path / 'run'}"]
    grpo.main([*flags, f"--init_from={first}", "--max_iters=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        grpo.main([*flags, f"--init_from={other}", "--max_iters=2", "--resume"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"resume with --init_from={first}" in err and "KL" in err, err
    assert grpo.main([*flags, f"--init_from={first}", "--max_iters=2", "--resume"])["step"] == 2


def test_fp8_rollouts_decode_on_the_learners_path(tmp_path):
    """Item 6: with fp8 on, the log-probabilities the rollouts sample from are the learner's, up to float
    rounding, even for a checkpoint that decodes absorbed and trains naive (the paths round differently)."""
    from cli import Dist
    from cli import parse_config as parse
    from sample import current_attn_impl
    ckpt = save_fp8_checkpoint(tmp_path / "fp8.pt", attn_impl="absorb", train_attn_impl="naive")
    cfg = parse(grpo.GRPOConfig, [*GRPO_TINY, f"--init_from={ckpt}", f"--out_dir={tmp_path / 'run'}"])
    run = grpo.setup(cfg, Dist(), "cpu")
    model = run.model
    idx = torch.randint(0, model.args.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        learner = torch.log_softmax(model(idx)[0][:, -1], -1)                       # no cache: the update's path
        rollout = torch.log_softmax(model.next_logits(idx, model.new_cache(3, 24, current_attn_impl(model))), -1)
    assert (rollout - learner).abs().max().item() < 1e-5           # the same FP8 roundings: float rounding only


def test_fp8_defaults_to_power_of_two_scales():
    """Item 7: V3 §3.3's power-of-two (ue8m0) scales are the default with fp8 on; the dequantised operands of
    every GEMM are then exact in bf16, so autocast does not round the weight-gradient operands a second time."""
    from test_grpo import tiny_args

    from model import Linear, Transformer
    args = tiny_args(64, fp8=True, fp8_block=8)
    assert args.fp8_scale_fmt == "ue8m0"
    torch.manual_seed(0)
    model = Transformer(args)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.fp8_scale_fmt == "ue8m0" for m in linears)
    lin = model.layers[0].attn.wkv_a
    lin.record = {}
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    for gemm in ("fprop", "dgrad", "wgrad"):
        for operand in lin.record[gemm]:
            assert torch.equal(operand.to(torch.bfloat16).float(), operand.float()), gemm


def test_auto_never_picks_mps_and_mps_says_it_is_untested(monkeypatch, capsys):
    """Item 8: 'auto' is CUDA or the CPU; 'mps' only when asked for, with a one-line note."""
    from cli import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "cpu"
    assert capsys.readouterr().err == ""
    assert pick_device("mps") == "mps"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "untested" in err and "--device=cpu" in err


def test_rl_updates_the_router_bias_at_the_presets_constant_speed():
    """Item 10 (router): GRPO's bias step is args.bias_update_speed, whatever speed a schedule left on the
    model (pretraining's V3 schedule ends at 0); --update_router_bias=false freezes the biases."""
    from test_grpo import tiny_args

    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_args(64, bias_update_speed=0.01))
    model.bias_update_speed = 0.0                    # where train.py's schedule leaves it at the end
    before = [m.gate.bias.clone() for m in model.moe_layers()]
    model.train()
    model(torch.randint(0, 64, (4, 16)))
    grpo.sync_router_bias(model, True)
    steps = torch.cat([(m.gate.bias - b).abs() for m, b in zip(model.moe_layers(), before)])
    assert bool(((steps - 0.01).abs() < 1e-6).any()) and bool(((steps < 1e-6) | ((steps - 0.01).abs() < 1e-6)).all())
    frozen = [m.gate.bias.clone() for m in model.moe_layers()]
    model(torch.randint(0, 64, (4, 16)))
    grpo.sync_router_bias(model, False)
    assert all(torch.equal(m.gate.bias, b) for m, b in zip(model.moe_layers(), frozen))


@pytest.mark.parametrize("spelling, value", [("85", 85), ("085", 85), ("+85", 85), (" 85 ", 85), ("-0", 0),
                                             ("0085", 85)])
def test_verifier_judges_the_value_not_the_spelling(spelling, value):
    """Item 10 (verifier): non-canonical integers are accepted (tasks.parse_int's documented policy), by the
    accuracy reward the RL optimises and the held-out accuracy alike (both call accuracy_reward)."""
    problem = tasks.arithmetic_problem("80+5" if value == 85 else "5-5")
    assert tasks.parse_int(spelling) == value
    assert tasks.accuracy_reward(f"<think>x</think> <answer>{spelling}</answer>", problem) == 1.0
