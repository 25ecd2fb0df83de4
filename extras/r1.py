"""
tinyseek/extras/r1.py -- from R1-Zero to R1: cold-start SFT, rejection sampling, and distillation into a smaller model.

    python -m extras.r1 coldstart --out=out_r1/cold_start.jsonl      # a few hundred clean worked examples
    python -m extras.r1 reject --init_from=out_grpo/ckpt.pt --out=out_r1/rejection.jsonl --k=4 --n_prompts=1000
    python -m extras.r1 recipe                                       # the whole R1 sequence, stage by stage
    python -m extras.r1 distill --teacher_data=out_r1/rejection.jsonl  # a small student: distillation vs RL

R1-Zero (grpo.py) learns to reason from pure RL, but the DeepSeek-R1 report (arXiv 2501.12948, §2.3) lists
its problems: poor readability, mixed languages, a slow and unstable start. R1 is trained in four stages:

  1. cold start (§2.3.1): SFT of the base model on a few thousand long, readable, *clean* chains of
     thought, so that RL starts from a model that already writes in the wanted format;
  2. reasoning-oriented RL (§2.3.2): GRPO with rule-based rewards, as for R1-Zero (plus a language-
     consistency reward that a one-language toy does not need);
  3. rejection sampling and SFT (§2.3.3): sample many answers per prompt from the stage-2 checkpoint, keep
     only the correct, well-formed ones (~600k reasoning samples, plus ~200k non-reasoning ones) and
     fine-tune the *base* model on them again, for two epochs;
  4. RL for all scenarios (§2.3.4): a second RL stage.

Distillation (§2.4, §4.1): small dense models (Qwen, Llama) fine-tuned by SFT only on the same 800k
samples beat the same models trained by large-scale RL themselves (Table 6: Qwen-32B distilled 72.6% vs
RL-trained 47.0% on AIME 2024). "Distillation" here means supervised learning on a teacher's verified
outputs, not logit matching: that is the practice at the centre of the debate about who may distil whom.

The scaled-down version below follows the same sequence on the built-in arithmetic task (tasks.py), where
the pretraining corpus plants a systematic mistake (a dropped carry) that RL has to unlearn:

  stage           what runs                                                  code
  base            pretraining on the flawed corpus                           train.py
  cold start      SFT on `n_cold` clean worked examples (prompt masked)      train.py --sft --init_from
  RL              GRPO, rule-based accuracy + format rewards                 grpo.py
  rejection SFT   k samples per training prompt from the RL model, keep the  extras.r1 reject, then
                  verified ones; SFT of the BASE model on them               train.py --sft
  RL again        GRPO from the rejection-SFT model (optional)               grpo.py
  R1-Zero         for comparison, not a stage: GRPO straight from the base    grpo.py

Every stage is evaluated the same way: greedy decoding on the same `n_eval` held-out problems (never seen
in any stage), checked by the verifier. `recipe` prints each stage's command, accuracy and an example
completion and draws r1_stages.png; `distill` pretrains a `nano` student, then fine-tunes it on the
teacher's verified samples and, separately, trains it with GRPO from its own pretraining.

What is not reproduced: the cold-start data of R1 were long chains of thought written in a readable
format with a summary, collected from models and human annotators; here they are the task's own clean
worked solutions. R1's reward models for helpfulness and harmlessness, its non-reasoning SFT data and
the language-consistency reward have no counterpart in a one-task toy.
"""

import json
import math
import random
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

import torch

import grpo
import tasks
import train
from checkpoint import CheckpointError, load_model, read_checkpoint, write_jsonl
from cli import (
    DEVICE_CHOICES,
    parse_command,
    parse_config,
    pick_device,
    print_config,
    progress,
    valid_device_name,
)
from model import PRESETS
from sample import evaluate

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# 1. Configuration (one dataclass; each command reads the fields it needs)
# ----------------------------------------------------------------------------------------------------

@dataclass
class R1Config:
    """Every setting of extras/r1.py's commands (each is a --flag)."""
    out_dir: str = field(default="out_r1", metadata={"help": "where outputs go: every stage's folder (recipe, distill), "
                                                     "the default --out file (coldstart, reject)"})
    out: str = field(default="", metadata={"help": "coldstart/reject: the JSONL file to write (default: "
                                                   "out_dir/cold_start.jsonl, out_dir/rejection.jsonl)"})
    init_from: str = field(default="", metadata={"help": "reject: checkpoint to sample from"})
    # ---- the task (the same knobs as train.py's built-in corpus) ----
    ops: str = field(default="+-", metadata={"help": "operators of the arithmetic task, a subset of '+-*'"})
    max_digits: int = field(default=2, metadata={"help": "most digits per operand (train.py --max_digits)"})
    # ---- base model (recipe) ----
    base: str = field(default="", metadata={"help": "recipe: pretrained checkpoint to start from; empty = "
                                                    "pretrain one now with train.py's defaults"})
    pretrain_iters: int = field(default=750, metadata={"help": "pretraining steps of a base or student (a step "
                                                              "budget, so results do not depend on machine speed)"})
    pretrain_examples: int = field(default=60000, metadata={"help": "documents in the pretraining corpus "
                                                                    "(train.py --n_examples)"})
    # ---- cold start ----
    n_cold: int = field(default=300, metadata={"help": "clean worked examples in the cold-start set"})
    cold_steps: int = field(default=150, metadata={"help": "SFT steps on the cold-start set"})
    # ---- SFT (cold start, rejection SFT, distillation) ----
    sft_lr: float = field(default=1e-3, metadata={"help": "learning rate of every SFT stage"})
    sft_steps: int = field(default=300, metadata={"help": "SFT steps on rejection-sampled data"})
    sft_batch_size: int = field(default=16, metadata={"help": "sequences per SFT step"})
    # ---- RL (grpo.py) ----
    rl_steps: int = field(default=60, metadata={"help": "GRPO steps per RL stage"})
    rl_lr: float = field(default=1e-4, metadata={"help": "learning rate of every RL stage (grpo.py --lr)"})
    final_rl: bool = field(default=True, metadata={"help": "recipe: run the second RL stage"})
    zero_baseline: bool = field(default=True, metadata={"help": "recipe: also run R1-Zero (RL straight from the "
                                                                "base, no cold start) for comparison"})
    # ---- rejection sampling ----
    k: int = field(default=4, metadata={"help": "samples per prompt"})
    n_prompts: int = field(default=1000, metadata={"help": "training prompts to sample for"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rejection sampling (> 0)"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion length limit (sampling, RL, evaluation)"})
    # ---- distillation ----
    student_preset: str = field(default="nano", metadata={"help": "distill: the student's preset (model.py)"})
    teacher_data: str = field(default="", metadata={"help": "distill: teacher's verified samples (JSONL); "
                                                            "empty = out_dir/rejection.jsonl from `recipe`"})
    # ---- evaluation and system ----
    n_eval: int = field(default=500, metadata={"help": "held-out problems evaluated after every stage"})
    seed: int = field(default=1337, metadata={"help": "one seed for the questions, sampling and every stage"})
    device: str = field(default="auto", metadata={"help": DEVICE_CHOICES})

    def __post_init__(self):
        """Reject impossible settings before anything runs (argparse turns the ValueError into one line
        naming the flag, its value and the rule)."""
        def bad(name, rule):
            """Raise the ValueError for --name breaking `rule`."""
            raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: {rule}")

        for name in ("pretrain_iters", "pretrain_examples", "n_cold", "cold_steps", "sft_steps", "sft_batch_size",
                     "rl_steps", "k", "n_prompts", "max_new_tokens", "max_digits"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if not self.temperature > 0:
            bad("temperature", "must be > 0: rejection sampling needs varied samples")
        if self.n_eval < 1:
            bad("n_eval", "must be >= 1: every stage is scored on held-out problems")
        for name in ("sft_lr", "rl_lr"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if not self.ops or set(self.ops) - set("+-*"):
            bad("ops", "must be a non-empty subset of '+-*'")
        if self.student_preset not in PRESETS:
            bad("student_preset", "choose one of " + ", ".join(PRESETS))
        if not valid_device_name(self.device):
            bad("device", "choose " + DEVICE_CHOICES)


# Each command, what it does, and the R1Config fields it reads (its flags; any other flag is an error).
COMMANDS = {
    "coldstart": ("write the cold-start SFT set: n_cold clean worked examples",
                  ("out", "out_dir", "n_cold", "ops", "max_digits", "sft_lr", "seed")),
    "reject": ("rejection-sample a checkpoint into an SFT set of verified samples",
               ("init_from", "out", "out_dir", "k", "n_prompts", "n_cold", "temperature", "max_new_tokens", "ops",
                "max_digits", "seed", "device")),
    "recipe": ("the R1 sequence: base, cold start, RL, rejection sampling, SFT of the base, RL again, and R1-Zero",
               ("out_dir", "base", "pretrain_iters", "pretrain_examples", "n_cold", "cold_steps", "sft_lr", "sft_steps",
                "sft_batch_size", "rl_steps", "rl_lr", "final_rl", "zero_baseline", "k", "n_prompts", "temperature",
                "max_new_tokens", "n_eval", "ops", "max_digits", "seed", "device")),
    "distill": ("a smaller student: SFT on the teacher's verified samples vs its own GRPO",
                ("out_dir", "teacher_data", "student_preset", "pretrain_iters", "pretrain_examples", "sft_lr",
                 "sft_steps", "sft_batch_size", "rl_steps", "rl_lr", "max_new_tokens", "n_eval", "ops", "max_digits",
                 "seed", "device")),
}


def command_config(command: str) -> type:
    """The dataclass of one command: only the R1Config fields it reads (COMMANDS), so `--help` lists exactly
    those and a flag it would ignore is an unknown-flag error; creating one validates it as an R1Config."""
    used = COMMANDS[command][1]
    specs = [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in fields(R1Config)
             if f.name in used]

    def __post_init__(self):
        """Check the flags with R1Config's rules."""
        R1Config(**asdict(self))

    return make_dataclass(f"R1{command.capitalize()}Config", specs, namespace={"__post_init__": __post_init__})


def task_of(cfg: R1Config) -> tasks.ArithmeticTask:
    """The arithmetic task of the built-in corpus, as train.py builds it."""
    return tasks.ArithmeticTask(digits=(1, cfg.max_digits), n_operands=2, ops=cfg.ops)


def resolve(path: str) -> Path:
    """A path from a flag: absolute as given, relative ones from the repository root (not the cwd)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


# ----------------------------------------------------------------------------------------------------
# 2. SFT data: cold-start examples and rejection sampling
# ----------------------------------------------------------------------------------------------------

def training_prompts(task: tasks.Task, n: int, seed: int) -> list:
    """Up to n distinct training-split problems (never a held-out one), fewer only if the task has fewer,
    in the order one seeded stream draws them."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(100 * n):
        p = task.sample(rng, split="train")
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                break
    return out


def prompt_sets(task: tasks.Task, n_cold: int, n_prompts: int, seed: int) -> tuple[list, list]:
    """The cold-start questions and the rejection-sampling prompts, disjoint: the first n_cold and the next
    (up to) n_prompts distinct questions of one stream. Drawing both with the same seed from two streams
    would make the cold-start set the first n_cold rejection prompts, so rejection SFT would partly
    re-teach questions the cold start already gave clean solutions for. The cold-start set depends on
    n_cold and the seed only, so `coldstart` and `reject` run separately agree with `recipe`."""
    problems = training_prompts(task, n_cold + n_prompts, seed)
    return problems[:n_cold], problems[n_cold:]


def cold_start_examples(n: int, task: tasks.Task, seed: int = 0) -> list[dict]:
    """n clean worked examples (no planted mistake) of distinct training-split questions, as SFT pairs
    {"prompt", "completion", "question", "answer"}: R1's cold-start data, scaled down (§2.3.1). Their
    questions are prompt_sets' cold-start set, never a rejection-sampling prompt."""
    problems = prompt_sets(task, n, 0, seed)[0]
    if len(problems) < n:
        raise SystemExit(f"--n_cold={n}: the task has only {len(problems)} distinct training questions")
    rows = []
    for p in problems:
        reasoning, answer = tasks.worked_solution(p, flawed=False)
        completion = tasks.format_completion(reasoning, answer)
        rows.append({"prompt": tasks.format_prompt(p.question), "completion": completion, "question": p.question,
                     "answer": answer})
    return rows


class NothingVerified(RuntimeError):
    """Rejection sampling kept no sample: there is no dataset to train on."""


def select_verified(groups: list) -> list[dict]:
    """The samples of grpo.Group objects that pass every check, as SFT pairs.

    Kept: the verifier accepts the answer (accuracy 1), the format check passes (format 1) and the sample
    ended with EOS (a completion cut off at the length limit is not a finished answer). R1 §2.3.3 also
    dropped mixed-language, over-long and code-block outputs; none occur here."""
    rows = []
    for g in groups:
        for text, finished, acc, fmt in zip(g.texts, g.finished, g.accuracy, g.format):
            if acc == 1.0 and fmt == 1.0 and finished:
                rows.append({"prompt": tasks.format_prompt(g.problem.question), "completion": text,
                             "question": g.problem.question, "answer": g.problem.answer})
    return rows


@torch.no_grad()
def rejection_sample(model, tok, problems: list, k: int, max_new_tokens: int = 64, temperature: float = 1.0,
                     prompts_per_batch: int = 64, generator: "torch.Generator | None" = None,
                     sample_groups: Callable = grpo.sample_groups) -> tuple[list[dict], dict]:
    """Sample k completions per problem, keep the verified ones (select_verified).

    Returns (rows, stats): stats has samples, kept, yield (kept / samples), prompts and covered (prompts
    with at least one kept sample). Raises NothingVerified when nothing passes."""
    rows, n_samples, covered = [], 0, 0
    for i in range(0, len(problems), prompts_per_batch):
        groups = sample_groups(model, tok, problems[i:i + prompts_per_batch], k, max_new_tokens, temperature,
                               tasks.reward, generator)
        kept = select_verified(groups)
        rows += kept
        n_samples += sum(len(g.texts) for g in groups)
        covered += len({r["question"] for r in kept})
    stats = {"samples": n_samples, "kept": len(rows), "yield": len(rows) / max(1, n_samples),
             "prompts": len(problems), "covered": covered}
    if not rows:
        raise NothingVerified(
            f"rejection sampling kept none of {n_samples} samples ({len(problems)} prompts x {k}): the model "
            "never produced a verified, well-formed, finished answer. Sample from a better checkpoint, or raise "
            "--k / --n_prompts; an empty dataset is not written.")
    return rows, stats


def reject_to_file(cfg: R1Config, init_from: Path, out: Path, seed: int) -> dict:
    """Load a checkpoint, rejection-sample cfg.n_prompts x cfg.k, write the kept rows to `out` and the stats
    (with the settings and the checkpoint's identity) to out.stats.json. When that stats file already matches
    (same settings, same checkpoint file, data present) the sampling is not repeated: an interrupted recipe
    continues after it. The prompts are prompt_sets' second set: none is a question of the cold-start set
    (cfg.n_cold, same seed)."""
    settings = {"init_from": str(init_from), "ckpt_mtime_ns": init_from.stat().st_mtime_ns if init_from.exists()
                else None, "k": cfg.k, "n_prompts": cfg.n_prompts, "n_cold": cfg.n_cold,
                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": seed, "ops": cfg.ops,
                "max_digits": cfg.max_digits}
    stats_path = out.with_name(out.name + ".stats.json")
    if out.is_file() and stats_path.is_file():
        done = json.loads(stats_path.read_text())
        if done.get("settings") == settings:
            print(f"skipped: {out} already holds this rejection sampling ({done['stats']['kept']} rows)")
            return done["stats"]
    model, tok, _ = load_model(init_from, pick_device(cfg.device), hint="python grpo.py")
    problems = prompt_sets(task_of(cfg), cfg.n_cold, cfg.n_prompts, seed)[1]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    t0 = time.perf_counter()
    rows, stats = rejection_sample(model, tok, problems, cfg.k, cfg.max_new_tokens, cfg.temperature, generator=gen)
    stats["seconds"] = time.perf_counter() - t0
    write_jsonl(out, rows)
    write_jsonl(stats_path, [{"settings": settings, "stats": stats}])     # one JSON object, written atomically
    print(f"rejection sampling from {init_from}: {stats['samples']} samples ({stats['prompts']} prompts x {cfg.k}, "
          f"temperature {cfg.temperature:g}), kept {stats['kept']} = yield {100 * stats['yield']:.1f}%; "
          f"{stats['covered']} prompts ({100 * stats['covered'] / stats['prompts']:.1f}%) have at least one; "
          f"{stats['seconds']:.0f}s -> {out}")
    return stats


# ----------------------------------------------------------------------------------------------------
# 3. Stages: each runs train.py or grpo.py in this process, then the same held-out evaluation
# ----------------------------------------------------------------------------------------------------

def evaluate_stage(ckpt: Path, cfg: R1Config, path: Path) -> dict:
    """Greedy accuracy of a checkpoint on the cfg.n_eval held-out problems (sample.evaluate), the records
    written to `path`, and one example: the first held-out question where the planted mistake could occur
    (or the first question, if none of them can)."""
    model, tok, _ = load_model(ckpt, pick_device(cfg.device))
    problems = tasks.heldout_problems(task_of(cfg), cfg.n_eval, seed=0)
    records, summary = evaluate(model, tok, problems, cfg.max_new_tokens)
    write_jsonl(path, records)
    example = next((r for p, r in zip(problems, records) if tasks.in_flaw_situation(p)), records[0])
    return {"accuracy": summary["accuracy"], "format": summary["format"], "n": summary["n"], "example": example}


def slug(name: str) -> str:
    """A stage name as a file-name part: 'R1-Zero (RL from base)' -> 'r1_zero_rl_from_base'."""
    return "_".join(re.findall(r"[a-z0-9]+", name.lower()))


def stage_state(ckpt: Path, script: str, argv: list[str]) -> tuple[str, "float | None"]:
    """What an earlier run left at `ckpt` for this stage: ("done", seconds) when it holds the finished run of
    `script` with exactly these flags, ("interrupted", seconds so far) when it holds the same run stopped early
    (continue with --resume), ("new", None) otherwise (missing, unreadable, or other flags: run it afresh)."""
    if not ckpt.is_file():
        return "new", None
    try:
        ck = read_checkpoint(ckpt)
    except CheckpointError:
        return "new", None
    if script == "train.py":
        want, got = asdict(parse_config(train.TrainConfig, argv)), ck.get("config", {})
        finished = "final" in ck and not ck["final"].get("interrupted")
    else:
        want, got = asdict(parse_config(grpo.GRPOConfig, argv)), ck.get("grpo_config", {})
        finished = ck.get("step") == want["max_iters"]
    if {k: v for k, v in got.items() if k != "resume"} != {k: v for k, v in want.items() if k != "resume"}:
        return "new", None
    return ("done" if finished else "interrupted"), ck.get("elapsed")


class Pipeline:
    """Runs stages in order, prints each one's command, accuracy and example, and keeps a results list."""

    def __init__(self, cfg: R1Config, out_dir: Path, results_name: str, n_stages: int = 0):
        self.cfg, self.out_dir, self.results = cfg, out_dir, []
        self.results_path = out_dir / results_name
        self.n_stages, self.done, self.t_start = n_stages, 0, time.perf_counter()

    def header(self, name: str) -> None:
        """'==== stage 3/7: RL | 2 done, ETA 6m10s ====': where the pipeline stands (ETA at its pace so far)."""
        where = ""
        if self.n_stages:
            eta = progress(self.done, self.n_stages, time.perf_counter() - self.t_start).split("| ")[1]
            where = f" ({self.done + 1}/{self.n_stages}, {eta})"
        print(f"\n==== stage: {name}{where} ====")

    def stage(self, name: str, script: str, argv: list[str], ckpt: "Path | None" = None, run: bool = True) -> dict:
        """Run `script` (train.py / grpo.py) with argv unless run=False (an existing checkpoint), evaluate
        the checkpoint it wrote, print and record the result. A stage whose checkpoint already holds this
        finished run is skipped; one that was interrupted continues with --resume (stage_state)."""
        self.header(name)
        ckpt = ckpt or Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir="))) / "ckpt.pt"
        state, seconds = stage_state(ckpt, script, argv) if run else ("given", None)
        if state == "done":
            print(f"skipped: {ckpt} already holds this finished stage (delete it to run the stage again)")
        elif state != "given":
            argv = [*argv, "--resume"] if state == "interrupted" else argv
            print("$ python " + " ".join(shlex.quote(a) for a in [script, *argv]))
            t0 = time.perf_counter()
            (train.main if script == "train.py" else grpo.main)(argv)
            seconds = (seconds or 0.0) + time.perf_counter() - t0
        res = {"stage": name, "command": f"python {script} " + " ".join(argv), "checkpoint": str(ckpt),
               "seconds": None if seconds is None else round(seconds, 1),
               **evaluate_stage(ckpt, self.cfg, self.out_dir / f"eval_{slug(name)}.jsonl")}
        ex = res["example"]
        print(f"---- {name}: held-out accuracy {100 * res['accuracy']:.1f}% (format {100 * res['format']:.1f}%, "
              f"{res['n']} problems, greedy)" + (f"; stage took {seconds:.0f}s" if seconds else ""))
        print(f"     example: {ex['question']} -> {ex['completion']!r} "
              f"({'right' if ex['correct'] else 'wrong, expected ' + ex['answer']})")
        self.results.append(res)
        self.save()
        self.done += 1
        return res

    def note(self, name: str, info: dict) -> None:
        """Record a non-model step (data generation) in the results."""
        self.results.append({"stage": name, **info})
        self.save()

    def save(self) -> None:
        """The results as JSON lines, rewritten after every stage so an interrupted run keeps what it measured."""
        write_jsonl(self.results_path, self.results)


def sft_argv(cfg: R1Config, data: Path, init_from: Path, out_dir: Path, steps: int) -> list[str]:
    """train.py flags for one SFT stage (no internal evaluation: the pipeline evaluates every stage alike)."""
    return [f"--sft={data}", f"--init_from={init_from}", f"--out_dir={out_dir}", f"--max_iters={steps}",
            "--max_seconds=0", f"--lr={cfg.sft_lr}", f"--batch_size={cfg.sft_batch_size}", "--warmup_iters=10",
            f"--eval_interval={steps}", "--eval_iters=5", "--n_eval=0", f"--ops={cfg.ops}",
            f"--max_digits={cfg.max_digits}", f"--seed={cfg.seed}", f"--device={cfg.device}"]


def rl_argv(cfg: R1Config, init_from: Path, out_dir: Path) -> list[str]:
    """grpo.py flags for one RL stage (grpo.py's defaults otherwise)."""
    return [f"--init_from={init_from}", f"--out_dir={out_dir}", f"--max_iters={cfg.rl_steps}", "--max_seconds=0",
            f"--lr={cfg.rl_lr}", "--n_eval=0", f"--ops={cfg.ops}", f"--digits_max={cfg.max_digits}",
            f"--max_new_tokens={cfg.max_new_tokens}", f"--seed={cfg.seed}", f"--device={cfg.device}"]


def pretrain_argv(cfg: R1Config, out_dir: Path, preset: str) -> list[str]:
    """train.py flags for pretraining a base (teacher) or student model on the built-in corpus."""
    return [f"--preset={preset}", f"--out_dir={out_dir}", f"--max_iters={cfg.pretrain_iters}", "--max_seconds=0",
            f"--n_examples={cfg.pretrain_examples}", "--n_eval=0",
            f"--ops={cfg.ops}", f"--max_digits={cfg.max_digits}", f"--seed={cfg.seed}", f"--device={cfg.device}"]


def recipe(cfg: R1Config) -> list[dict]:
    """The R1 sequence (module docstring): base -> cold start -> RL -> rejection sampling -> SFT of the base
    -> RL again; then, for comparison, R1-Zero's single RL stage from the same base. Writes
    out_dir/results.jsonl (one JSON line per stage) and r1_stages.png."""
    out = resolve(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(cfg, out, "results.jsonl", n_stages=4 + cfg.final_rl + cfg.zero_baseline)
    t_start = time.perf_counter()
    if cfg.base:
        base = resolve(cfg.base)
        pipe.stage("base", "train.py", [f"--out_dir={base.parent}"], ckpt=base, run=False)
    else:
        base = out / "base" / "ckpt.pt"
        pipe.stage("base", "train.py", pretrain_argv(cfg, base.parent, "tiny"))

    cold = out / "cold_start.jsonl"
    write_jsonl(cold, cold_start_examples(cfg.n_cold, task_of(cfg), cfg.seed))
    print(f"\nwrote {cfg.n_cold} clean worked examples to {cold} (python -m extras.r1 coldstart --n_cold={cfg.n_cold} "
          f"--out={cold})")
    pipe.stage("cold start", "train.py", sft_argv(cfg, cold, base, out / "cold_start", cfg.cold_steps))
    pipe.stage("RL", "grpo.py", rl_argv(cfg, out / "cold_start" / "ckpt.pt", out / "rl"))

    print("\n==== rejection sampling from the RL checkpoint ====")
    rs = out / "rejection.jsonl"
    print(f"$ python -m extras.r1 reject --init_from={out / 'rl' / 'ckpt.pt'} --out={rs} --k={cfg.k} "
          f"--n_prompts={cfg.n_prompts} --n_cold={cfg.n_cold} --seed={cfg.seed}")
    stats = reject_to_file(cfg, out / "rl" / "ckpt.pt", rs, cfg.seed)   # skipped when already done (stats file)
    pipe.note("rejection sampling", stats)
    pipe.stage("rejection SFT", "train.py", sft_argv(cfg, rs, base, out / "rejection_sft", cfg.sft_steps))
    if cfg.final_rl:
        pipe.stage("RL again", "grpo.py", rl_argv(cfg, out / "rejection_sft" / "ckpt.pt", out / "rl_again"))
    if cfg.zero_baseline:   # not an R1 stage: the R1-Zero path from the same base, for comparison
        pipe.stage("R1-Zero (RL from base)", "grpo.py", rl_argv(cfg, base, out / "r1_zero"))
    png = plot_stages(pipe.results, out / "r1_stages.png", cfg.n_eval)
    print(f"\n==== R1 recipe done in {time.perf_counter() - t_start:.0f}s ====")
    print_table(pipe.results)
    print(f"wrote {pipe.results_path}, {png}, eval_*.jsonl in {out}")
    return pipe.results


def distill(cfg: R1Config) -> list[dict]:
    """A smaller student (cfg.student_preset) two ways, from the same pretraining: SFT on the teacher's
    verified samples (distillation) vs GRPO on its own samples (RL). Writes out_dir/distill.jsonl and
    distill.png."""
    out = resolve(cfg.out_dir)
    data = resolve(cfg.teacher_data) if cfg.teacher_data else out / "rejection.jsonl"
    if not data.is_file():
        raise SystemExit(f"no teacher data at {data}: run `python -m extras.r1 recipe` first (it writes "
                         "rejection.jsonl) or pass --teacher_data=FILE")
    n_rows = len(train.read_sft_jsonl(data))
    pipe = Pipeline(cfg, out, "distill.jsonl", n_stages=3)
    student = out / "student_base"
    pipe.stage(f"student ({cfg.student_preset}) pretrained", "train.py",
               pretrain_argv(cfg, student, cfg.student_preset))
    distilled = pipe.stage("student + distillation", "train.py",
                           sft_argv(cfg, data, student / "ckpt.pt", out / "student_distill", cfg.sft_steps))
    rl = pipe.stage("student + RL", "grpo.py", rl_argv(cfg, student / "ckpt.pt", out / "student_rl"))
    png = plot_stages(pipe.results, out / "distill.png", cfg.n_eval,
                      title=f"Student ({cfg.student_preset}): distillation vs RL from the same pretraining")
    print(f"\n==== distillation vs RL for the {cfg.student_preset} student ====")
    print_table(pipe.results)
    d, r = distilled["accuracy"], rl["accuracy"]
    print(f"distillation on {n_rows} teacher samples: {100 * d:.1f}% in {distilled['seconds']:.0f}s of SFT; "
          f"RL: {100 * r:.1f}% in {rl['seconds']:.0f}s of GRPO -> {compare_accuracies(d, r, cfg.n_eval)} "
          "(the teacher's own cost is not counted in the distillation time)")
    print(f"wrote {pipe.results_path}, {png}")
    return pipe.results


# ----------------------------------------------------------------------------------------------------
# 4. Report: table and plot
# ----------------------------------------------------------------------------------------------------

def compare_accuracies(distilled: float, rl: float, n: int) -> str:
    """Which student is ahead, read against the noise of scoring on n problems: the standard error of the
    difference of two accuracies p1, p2 measured on n problems each, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)
    (as if the two samples were independent; both students answer the same problems, so it errs on the side
    of calling a gap noise). A gap of two standard errors or more names the student that is ahead."""
    se = math.sqrt(distilled * (1 - distilled) / n + rl * (1 - rl) / n)
    gap = abs(distilled - rl)
    if gap == 0 or gap < 2 * se:
        return (f"no clear difference here ({100 * gap:.1f} points apart, less than two standard errors, "
                f"2 x {100 * se:.1f} points)")
    ahead = "distillation" if distilled > rl else "RL"
    return f"{ahead} is ahead here, by {100 * gap:.1f} points" + (f" ({gap / se:.1f} standard errors)" if se else "")


def print_table(results: list[dict]) -> None:
    """One line per evaluated stage: accuracy, format and seconds."""
    print(f"{'stage':<32} {'held-out acc':>12} {'format':>7} {'seconds':>8}")
    for r in results:
        if "accuracy" in r:
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
            print(f"{r['stage']:<32} {100 * r['accuracy']:>11.1f}% {100 * r['format']:>6.1f}% {secs:>8}")
        elif "yield" in r:
            print(f"{r['stage']:<32} yield {100 * r['yield']:.1f}% ({r['kept']} of {r['samples']} samples)")


def plot_stages(results: list[dict], path: Path, n_eval: int, title: str = "") -> Path:
    """A bar chart of held-out accuracy per stage, in order, saved as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch

    evaluated = [r for r in results if "accuracy" in r]
    fig = Figure(figsize=(max(6.0, 1.6 * len(evaluated)), 4.5))
    ax = fig.subplots()
    names = [r["stage"].replace(" + ", "\n+ ").replace(" (", "\n(") for r in evaluated]
    acc = [100 * r["accuracy"] for r in evaluated]
    # RL-only paths (R1-Zero, the student's own RL) in orange, so they stand apart from SFT-based stages
    colors = ["tab:orange" if r["stage"].startswith("R1-Zero") or r["stage"].endswith("+ RL") else "tab:blue"
              for r in evaluated]
    bars = ax.bar(range(len(evaluated)), acc, color=colors)
    for b, a in zip(bars, acc):
        ax.text(b.get_x() + b.get_width() / 2, a + 1, f"{a:.1f}%", ha="center", fontsize=9)
    ax.set_xticks(range(len(evaluated)), names, fontsize=8)
    for r in results:
        if "yield" in r:   # the rejection-sampling step between RL and rejection SFT
            ax.text(0.01, 0.97, f"rejection sampling: {r['kept']} of {r['samples']} samples kept "
                    f"(yield {100 * r['yield']:.1f}%)", transform=ax.transAxes, va="top", fontsize=8)
    ax.set(ylim=(0, 105), ylabel=f"greedy accuracy on {n_eval} held-out problems (%)",
           title=title or "R1 recipe, scaled down: held-out accuracy after each stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------------

def main(argv: "list[str] | None" = None):
    """`python -m extras.r1 COMMAND [--flag=value ...]` with COMMAND one of coldstart, reject, recipe, distill;
    `python -m extras.r1 --help` lists each command's flags."""
    command, flags = parse_command({name: (summary, command_config(name)) for name, (summary, _) in COMMANDS.items()},
                                   argv, "python -m extras.r1", (__doc__ or "").split("\n")[1])
    cfg = R1Config(**asdict(flags))
    if command == "reject" and not cfg.init_from:
        raise SystemExit("reject: say which checkpoint to sample from, e.g. --init_from=out_grpo/ckpt.pt")
    print_config(flags, f"python -m extras.r1 {command}")
    torch.manual_seed(cfg.seed)
    try:
        if command == "coldstart":
            out = resolve(cfg.out or f"{cfg.out_dir}/cold_start.jsonl")
            rows = cold_start_examples(cfg.n_cold, task_of(cfg), cfg.seed)
            write_jsonl(out, rows)
            print(f"wrote {len(rows)} clean worked examples to {out}\n"
                  f"next: python train.py --sft={out} --init_from=out/ckpt.pt --out_dir=out_cold --lr={cfg.sft_lr}")
            return rows
        if command == "reject":
            out = resolve(cfg.out or f"{cfg.out_dir}/rejection.jsonl")
            return reject_to_file(cfg, resolve(cfg.init_from), out, cfg.seed)
        return recipe(cfg) if command == "recipe" else distill(cfg)
    except (CheckpointError, NothingVerified) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

