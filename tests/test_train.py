"""Tests for train.py: data, a short run lowers the loss, balancing, exact resume, bad input, torchrun.

Run: python -m pytest tests/test_train.py -q            (add -m "not slow" to skip the torchrun run)
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import CheckpointError, load_model

ROOT = Path(__file__).resolve().parents[1]
# A very small model and data set so each run takes seconds.
SMALL = ["--n_examples=3000", "--batch_size=8", "--block_size=48", "--max_seconds=0", "--eval_interval=1000",
         "--eval_iters=2", "--n_eval=0", "--log_interval=5", "--device=cpu",
         "--model=dim=48,inter_dim=96,moe_inter_dim=24,n_layers=2,kv_lora_rank=16,q_lora_rank=32"]


def run(tmp_path, *flags):
    return train.main([*SMALL, f"--out_dir={tmp_path}", *flags])


def test_builtin_data_is_deterministic_and_split():
    cfg = train.TrainConfig(n_examples=500)
    tok1, tr1, va1, _ = train.load_data(cfg)
    tok2, tr2, va2, _ = train.load_data(cfg)
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2)
    assert tok1.to_dict() == tok2.to_dict()
    assert len(tr1) == pytest.approx(9 * len(va1), rel=0.01)
    assert tr1[0].item() == tok1.bos_id
    assert tok1.decode(tr1[:60].tolist()).count("<think>") >= 1


def test_text_file_data_with_char_tokenizer(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("To be, or not to be, that is the question.\n" * 300)
    summary = run(tmp_path / "out", f"--data={f}", "--tokenizer=char", "--max_iters=15")
    assert summary["step"] == 15
    _model, tok, ckpt = load_model(tmp_path / "out" / "ckpt.pt")
    assert tok.name == "char" and ckpt["config"]["data"] == str(f)


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    summary = run(tmp_path, "--max_iters=60", "--lr=3e-3")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json
    rows = [json.loads(x) for x in lines]
    logged = [r for r in rows if "loss" in r]
    assert logged[-1]["ce"] < 0.6 * logged[0]["ce"]
    assert summary["val_loss"] < 0.6 * logged[0]["ce"]
    assert {"lr", "tok_per_s", "mfu", "max_vio", "mtp", "balance", "mtp_lambda"} <= set(logged[-1])
    # each row carries the MTP weight its step used (V3 §4.2: 0.3, then 0.1 from 67.6% of the run), so mtp / mtp_lambda
    # is the MTP module's own cross-entropy on either side of the switch (notebook 04 plots it)
    assert logged[0]["mtp_lambda"] == pytest.approx(0.3) and logged[-1]["mtp_lambda"] == pytest.approx(0.1)
    assert 0.5 * logged[-1]["ce"] < logged[-1]["mtp"] / logged[-1]["mtp_lambda"] < 2 * logged[-1]["ce"]
    for name in ("ckpt.pt", "loss.png", "expert_load.png"):
        assert (tmp_path / name).stat().st_size > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "pretrain" and ckpt["config"]["max_iters"] == 60 and ckpt["step"] == 60


def test_bias_update_keeps_maxvio_below_gamma_zero(tmp_path):
    import json

    def mean_vio(out, gamma):
        run(out, "--max_iters=80", "--batch_size=16", f"--model=dim=48,inter_dim=96,moe_inter_dim=24,n_layers=2,kv_lora_rank=16,"
                                   f"q_lora_rank=32,bias_update_speed={gamma}", "--log_interval=1")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        vios = [r["max_vio"] for r in rows if "max_vio" in r][-40:]
        return sum(vios) / len(vios)

    frozen = mean_vio(tmp_path / "g0", 0.0)
    balanced = mean_vio(tmp_path / "g1", 0.01)
    assert balanced < 0.7 * frozen


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_is_exact(tmp_path, monkeypatch, optimizer):
    straight = tmp_path / "straight"
    run(straight, "--max_iters=20", f"--optimizer={optimizer}")
    # Interrupted run: a SIGTERM arrives during step 11; the loop finishes that step, checkpoints and exits.
    resumed = tmp_path / "resumed"
    calls = {"n": 0}
    real_get_batch = train.get_batch

    def get_batch_then_signal(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_batch(*a, **kw)

    monkeypatch.setattr(train, "get_batch", get_batch_then_signal)
    first = run(resumed, "--max_iters=20", f"--optimizer={optimizer}")
    monkeypatch.setattr(train, "get_batch", real_get_batch)
    assert first["interrupted"] and first["step"] == 11
    second = run(resumed, "--max_iters=20", "--resume", f"--optimizer={optimizer}")
    assert second["step"] == 20
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k              # bit-identical, router biases included
    assert second["val_loss"] == a["final"]["val_loss"]


def test_resume_with_another_optimizer_says_which_to_use(tmp_path):
    run(tmp_path, "--max_iters=3", "--optimizer=adamw")
    with pytest.raises(CheckpointError, match="--optimizer=adamw"):
        run(tmp_path, "--max_iters=6", "--resume", "--optimizer=muon")


def test_newton_schulz_orthogonalises_each_matrix_of_a_batch_alone():
    torch.manual_seed(0)
    G = torch.randn(4, 48, 96) * torch.logspace(-2, 1, 96)           # wide, singular values over 3 decades
    O = train.zeropower_via_newtonschulz(G)
    alone = torch.stack([train.zeropower_via_newtonschulz(g[None])[0] for g in G])
    torch.testing.assert_close(O, alone, rtol=1e-5, atol=1e-6)       # batching changes nothing
    s = torch.linalg.svdvals(O)                                       # (4, 48): all pushed near 1
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 100
    tall = train.zeropower_via_newtonschulz(G.mT)                     # a tall matrix: the transpose's factor
    torch.testing.assert_close(tall, O.mT, rtol=1e-5, atol=1e-6)
    half = train.zeropower_via_newtonschulz(G, dtype=torch.bfloat16)  # the GPU's precision: same factor
    assert half.dtype == torch.bfloat16
    err = (half.float() - O).norm() / O.norm()
    assert err < 0.03, err                                            # bf16 has 8 bits of mantissa


def test_newton_schulz_folds_the_sums_into_the_products_without_changing_them():
    """zeropower_via_newtonschulz writes a X + (b A + c A A) X as two baddbmm calls; the plain form, written
    out here in float64, gives the same factor."""
    torch.manual_seed(0)
    G = torch.randn(3, 32, 80)
    a, b, c = 3.4445, -4.775, 2.0315
    X = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(train.zeropower_via_newtonschulz(G).double(), X, rtol=1e-4, atol=1e-5)


def test_newton_schulz_precision_depends_on_the_device_type_only(monkeypatch):
    """bfloat16 on a GPU, float32 on every CPU whatever its instructions, and Muon.step uses that rule."""
    assert train.newton_schulz_dtype("cuda") == torch.bfloat16
    assert train.newton_schulz_dtype("cpu") == train.newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert not hasattr(train, "cpu_has_bf16_matmul")                   # no probe of the CPU model
    seen = []
    monkeypatch.setattr(train, "zeropower_via_newtonschulz",
                        lambda G, steps, dtype: seen.append(dtype) or G / G.norm())
    p = torch.nn.Parameter(torch.randn(8, 16))
    p.grad = torch.randn(8, 16)
    train.Muon([p]).step()
    assert seen.pop() == torch.float32                                 # the step uses what the rule says


def test_muon_step_equals_torch_optim_muon():
    """Ours (same-shape matrices batched, in newton_schulz_dtype: float32 on a CPU) against
    torch.optim.Muon (one at a time, bfloat16) with Moonlight's learning-rate scale: the same update up to
    bfloat16's rounding in the Newton-Schulz step."""
    torch.manual_seed(0)
    shapes = [(32, 64), (32, 64), (96, 32), (48, 48)]
    ours = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = train.Muon(ours, lr=3e-2, weight_decay=0.1)
    opt_ref = torch.optim.Muon(ref, lr=3e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, r in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    for p, r, p0 in zip(ours, ref, start):
        moved = (r - p0).norm()
        assert moved > 0.05 * p0.norm()                               # the steps are not negligible...
        assert (p - r).norm() < 0.03 * moved                          # ...and agree to bf16 precision
    with pytest.raises(ValueError, match="2-D"):
        train.Muon([torch.nn.Parameter(torch.ones(3))])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from model import ModelArgs, Transformer
    model = Transformer(ModelArgs.preset("tiny"))
    opt = train.make_optimizer(model, train.TrainConfig(optimizer="muon"), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert on_muon.isdisjoint(on_adamw) and on_muon | on_adamw == set(names.values())
    assert {"embed.weight", "head.weight", "norm.weight", "layers.1.ffn.gate.weight"} <= on_adamw
    assert {"layers.0.attn.wq_a.weight", "layers.1.ffn.experts.3.w2.weight", "mtp.0.eh_proj.weight"} <= on_muon
    assert all(model.get_parameter(n).dim() == 2 for n in on_muon)
    assert len(opt.param_groups) == 3                                  # one schedule sets every group's lr
    assert isinstance(train.make_optimizer(model, train.TrainConfig(optimizer="adamw"), "cpu"), torch.optim.AdamW)


def test_resume_with_different_model_args_names_the_mismatch(tmp_path):
    run(tmp_path, "--max_iters=3")
    with pytest.raises(CheckpointError, match="n_layers"):
        train.main([*SMALL, f"--out_dir={tmp_path}", "--max_iters=6", "--resume",
                    "--model=dim=48,inter_dim=96,moe_inter_dim=24,n_layers=3,kv_lora_rank=16,q_lora_rank=32"])


def test_resume_without_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="python train.py"):
        run(tmp_path, "--resume")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable tinyseek checkpoint"):
        run(tmp_path, "--resume")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, "--max_iters=4")
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_forward = train.Transformer.forward

    def nan_forward(self, idx, targets=None, cache=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, cache, **kwargs)
        return logits, loss * float("nan") if loss is not None else None

    monkeypatch.setattr(train.Transformer, "forward", nan_forward)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_iters=4", "--eval_interval=1")
    assert e.value.code == 2
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("flags,message", [
    (["--data=/no/such/file.txt"], "no such file"),
    (["--tokenizer=klingon"], "--tokenizer='klingon' is invalid: choose one of bpe"),
    (["--model=n_activated_experts=99"], "n_activated_experts"),
    (["--model=warp=9"], "unknown ModelArgs field"),
])
def test_bad_input_exits_with_clear_message(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *flags)
    assert message in str(e.value) + capsys.readouterr().err   # argparse prints config errors to stderr


def test_learning_rate_defaults_to_the_optimizers_own():
    assert train.TrainConfig().lr == train.DEFAULT_LR["muon"] == 4.5e-3
    assert train.TrainConfig(optimizer="adamw").lr == train.DEFAULT_LR["adamw"] == 3e-3
    assert train.TrainConfig(optimizer="adamw", lr=1e-3).lr == 1e-3          # a given --lr is kept
    with pytest.raises(ValueError, match="--lr=-0.001 is invalid"):
        train.TrainConfig(lr=-1e-3)


def test_empty_data_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n")
    with pytest.raises(SystemExit, match="empty"):
        run(tmp_path, f"--data={f}")


def test_named_tokenizer_offline_is_a_clear_message(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit, match="--tokenizer=bpe"):
        run(tmp_path, "--tokenizer=gpt2")


def test_unknown_flag_lists_valid_flags():
    r = subprocess.run([sys.executable, "train.py", "--learning_rate=1"], check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "unrecognized arguments: --learning_rate=1" in r.stderr and "--lr" in r.stderr
    r = subprocess.run([sys.executable, "train.py", "--batch_size=many"], check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "train.py", *SMALL,
                        "--max_iters=8", f"--out_dir={tmp_path}"], check=False, cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x 2 ranks" in r.stdout
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8


# ---- supervised fine-tuning (--sft): completion-only loss, reusing the pretraining loop ----

def write_sft(path, pairs):
    import json
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return path


def sft_examples(tok, n=6):
    import tasks
    rows = []
    for i in range(n):
        q = f"{10 + i}+{20 + 3 * i}"
        reasoning, answer = tasks.worked_solution(tasks.arithmetic_problem(q))
        rows.append({"prompt": tasks.format_prompt(q), "completion": tasks.format_completion(reasoning, answer)})
    return train.encode_sft(rows, tok, max_len=128)


def test_sft_batch_targets_only_completion_tokens():
    from tokenizer import get_tokenizer
    tok = get_tokenizer("char")
    examples = sft_examples(tok)
    x, y = train.sft_batch(examples, 4, torch.Generator().manual_seed(0), "cpu")
    ix = torch.randint(len(examples), (4,), generator=torch.Generator().manual_seed(0)).tolist()
    for row, i in enumerate(ix):
        ids, n_prompt = examples[i]
        n = len(ids) - 1
        assert torch.equal(x[row, :n], ids[:-1])
        assert (y[row, :n_prompt - 1] == -1).all()                 # predicting a prompt token: no loss
        assert torch.equal(y[row, n_prompt - 1:n], ids[n_prompt:])  # completion (and EOS) targets
        assert (y[row, n:] == -1).all()                            # padding: no loss
        assert tok.decode(ids[n_prompt:-1].tolist()).endswith("</answer>")


def test_sft_prompt_tokens_contribute_zero_gradient():
    """The loss depends only on completion positions: the gradient reaching the logits of prompt and padding
    positions is exactly zero, and changing what the prompt positions 'should' predict changes nothing."""
    from model import ModelArgs, Transformer
    from tokenizer import get_tokenizer
    tok = get_tokenizer("char")
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=tok.n_vocab, dim=48, inter_dim=96, moe_inter_dim=24,
                                         n_layers=2, kv_lora_rank=16, q_lora_rank=32)).eval()
    x, y = train.sft_batch(sft_examples(tok), 3, torch.Generator().manual_seed(1), "cpu")
    head_outputs = []                                              # main head first, then the MTP head call
    handle = model.head.register_forward_hook(lambda module, inputs, out: head_outputs.append(out))
    _, loss = model(x, y)
    handle.remove()
    main_logits = head_outputs[0]                                  # (B, T, V)
    main_logits.retain_grad()
    loss.backward()
    grad = main_logits.grad.abs().sum(-1)                          # (B, T)
    assert (grad[y == -1] == 0).all()
    assert (grad[y != -1] > 0).all()
    # filling in the prompt targets (plain language-model training) would change the loss
    y_all = torch.where((y == -1) & (x != 0), torch.roll(x, -1, dims=1), y)
    _, loss_all = model(x, y_all)
    assert loss_all.item() != pytest.approx(loss.item())


def test_sft_run_from_checkpoint_learns_completions(tmp_path):
    import tasks
    run(tmp_path / "base", "--max_iters=5")
    pairs = []
    for i in range(40):
        q = f"{i % 9 + 1}+{i // 9 + 1}"
        reasoning, answer = tasks.worked_solution(tasks.arithmetic_problem(q))
        pairs.append((tasks.format_prompt(q), tasks.format_completion(reasoning, answer)))
    data = write_sft(tmp_path / "pairs.jsonl", pairs)
    summary = run(tmp_path / "sft", f"--sft={data}", f"--init_from={tmp_path / 'base' / 'ckpt.pt'}",
                  "--max_iters=40", "--lr=3e-3", "--warmup_iters=5")
    import json
    logged = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in logged if "ce" in r]
    assert ce[-1] < 0.5 * ce[0]
    assert summary["step"] == 40
    _model, tok, ckpt = load_model(tmp_path / "sft" / "ckpt.pt")
    base = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "sft" and ckpt["model_args"] == base["model_args"]
    assert tok.to_dict() == base["tokenizer"]                      # the checkpoint's tokenizer is kept


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "line 2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 'line 2: needs string fields "prompt" and "completion"'),
    ('{"prompt": "a", "completion": 3}\n', 'line 1: needs string fields'),
    ('[1, 2]\n', 'line 1: needs string fields'),
    ('{"prompt": "a", "completion": ""}\n', "line 1: the completion is empty"),
    ("\n\n", "holds no examples"),
])
def test_malformed_sft_file_names_the_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(SystemExit, match=message):
        run(tmp_path / "out", f"--sft={f}", "--max_iters=2")


def test_sft_example_too_long_is_named(tmp_path):
    f = write_sft(tmp_path / "long.jsonl", [("User: 1+1\nAssistant: <think>", "x" * 500)] * 3)
    with pytest.raises(SystemExit, match="example 1: prompt \\+ completion are"):
        run(tmp_path / "out", f"--sft={f}", "--max_iters=2", "--tokenizer=char")


def test_sft_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match="extras.r1"):
        run(tmp_path / "out", f"--sft={tmp_path / 'nope.jsonl'}", "--max_iters=2")
