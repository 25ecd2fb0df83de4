"""
tinyseek/extras/rl_lab.py -- what RL really adds, and how it goes wrong: pass@k and a lab of GRPO's failure modes.

    python -m extras.rl_lab                 # every run below, one after the other; finished runs are skipped
    python -m extras.rl_lab --quick         # a smoke test of the whole pipeline with tiny budgets
    python -m extras.rl_lab --only=collapse # some runs only (comma-separated names); the report is rebuilt

Results go to docs/rl_lab/: results.json (every curve and figure, with the command that made it), results.md
(the same as tables) and PNG plots; checkpoints and logs of the runs to out_rl_lab/ (not committed).
notebooks/07_rl_lab.ipynb reads them beside grpo.py.

Two questions every student of R1-Zero asks next
------------------------------------------------
1. Does RL teach the model anything its samples could not already do? pass@k answers it: draw n samples per
   question, count the c right ones, and estimate the chance that k samples hold at least one right answer,
   pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, unbiased; sample.pass_at_k). pass@1 is the sampled
   accuracy; pass@64 asks whether the right answer is *in reach* at all. Yue et al. (arXiv 2504.13837) found
   the base model's pass@k above the RL model's at large k: RL sharpens what is there rather than adding.
   Here the built-in task makes the question exact: the pretraining corpus drops the carry into the leading
   column in a fraction `flaw_rate` of the worked solutions of that situation (tasks.py §3), so at flaw_rate
   0.6 the base samples the right habit 40% of the time, at 0.99 once in a hundred, at 1.0 never. The lab
   pretrains at each rate, runs the same GRPO budget on each, and sets the base's pass@k on the flaw-situation
   questions against what GRPO gains there.
2. Why do so many GRPO runs fail? Each known failure is reproduced on the same task and budget, with its
   curves and the setting that cures it, measured the same way:

     run            what it changes (against `cure`)                    the failure it shows
     hack_lenient   --lab_verifier=lenient (substring check)            reward hacking: the verifier is gamed
     fmt_weak       --w_fmt=1.0 on the weak base                        the format reward drowns accuracy
     len_dr_grpo    --loss_type=dr_grpo (vs grpo's per-sequence mean)   length bias of the normalisation [DR]
     nosig_weak     a base pretrained 60 steps                          no signal: zero-variance groups
     nosig_dapo     the same with --dynamic_sampling                    what DAPO's filter does about it
     collapse       --lr=3e-3 --beta=0                                  entropy collapse, degenerate output
     collapse_mild  --lr=1e-3 --beta=0                                  the same, ten times gentler
     hack_lenient_1.0  the lenient verifier on the flaw 1.0 base        hacking where the right habit is rare
     len_dr_grpo_weak  dr_grpo on the weak base (vs nosig_weak)         length bias where lengths vary
     hack_last_digit   --lab_verifier=last_digit (units digit only)     reward hacking: the verifier pays the
                                                                        base's planted mistake, RL never fixes it

   The cure of hack_lenient, hack_last_digit, len_dr_grpo and the collapses is the default run `beyond_0.6`
   (grpo.py's defaults on the flaw 0.6 base, the strict verifier), that of hack_lenient_1.0 is beyond_1.0, and
   that of fmt_weak is nosig_weak (w_fmt=0.1, the same weak base). Which of them reproduce their failure, and
   which did not at this budget, is written beside their figures in docs/rl_lab/results.md.

Every run is grpo.py (or train.py) itself, called with the flags printed in results.json, so any curve can be
re-made by hand. The budget is small on purpose (GRPO 30 steps of 16 questions x 8 samples, from bases
pretrained with train.py's defaults): a failure that needs many GPU hours elsewhere shows up here on a CPU,
because the model and the task are tiny. What is simplified: one seed per run (differences of a few points are noise:
the held-out set has 300 questions, about 100 of them in the flaw situation), and pass@k is estimated from
64 samples of 200 held-out questions at temperature 1, the rollout temperature.

References: Chen et al. 2021 (arXiv 2107.03374, pass@k); Yue et al. 2025 (arXiv 2504.13837, "Does RL really
incentivize reasoning capacity beyond the base model?"); [DR] Dr. GRPO (arXiv 2503.20783); [DAPO] (arXiv
2503.14476); DeepSeekMath (arXiv 2402.03300) §5.2.2 (RL raised Maj@K, not Pass@K).
"""

import contextlib
import json
import math
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import grpo
import tasks
import train
from checkpoint import load_model, read_checkpoint
from cli import parse_config, print_config
from sample import evaluate_pass_at_k

COMMAND = "python -m extras.rl_lab"


def _flag(default, help_text: str):
    """A dataclass field whose help text shows up in `python -m extras.rl_lab --help`."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class LabConfig:
    """The lab's knobs; the runs themselves are listed in PRETRAINS and RUNS."""

    out_dir: str = _flag("out_rl_lab", "checkpoints and logs of every run (reused: a finished run is skipped)")
    results_dir: str = _flag("docs/rl_lab", "results.json, results.md and the plots")
    quick: bool = _flag(False, "smoke test: tiny budgets, out_dir/quick and results_dir/quick by default")
    only: str = _flag("", "comma-separated run names to (re)run; the report covers every finished run")
    grpo_steps: int = _flag(30, "GRPO steps of every run")
    prompts_per_step: int = _flag(16, "questions per GRPO step")
    group_size: int = _flag(8, "samples per question (G)")
    n_eval: int = _flag(300, "held-out questions of the greedy evaluation during GRPO")
    eval_interval: int = _flag(5, "greedy held-out evaluation every this many GRPO steps")
    n_pass: int = _flag(200, "held-out questions for pass@k")
    n_samples: int = _flag(64, "samples per question for pass@k (the largest k)")
    max_new_tokens: int = _flag(64, "completion length limit of GRPO and pass@k (grpo.py's default)")
    device: str = _flag("cpu", "cpu | cuda | mps | auto")
    seed: int = _flag(0, "seed of pass@k's sampling")

    def __post_init__(self):
        """Quick mode shrinks every budget (and keeps its results apart from the stored ones)."""
        if self.quick:
            self.out_dir = self.out_dir if self.out_dir != "out_rl_lab" else "out_rl_lab/quick"
            self.results_dir = self.results_dir if self.results_dir != "docs/rl_lab" else "out_rl_lab/quick/results"
            self.grpo_steps, self.prompts_per_step, self.group_size = 2, 2, 4
            self.n_eval, self.eval_interval, self.n_pass, self.n_samples = 8, 1, 6, 4
            self.max_new_tokens = 16
        for name in ("grpo_steps", "prompts_per_step", "n_eval", "eval_interval", "n_pass", "n_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"--group_size={self.group_size} is invalid: GRPO needs at least 2 samples per question")

    def ks(self) -> list[int]:
        """The k of the pass@k curves: 1, 2, 4, ... up to n_samples."""
        return [2 ** i for i in range(int(math.log2(self.n_samples)) + 1)]


# ----------------------------------------------------------------------------------------------------
# 1. The runs
# ----------------------------------------------------------------------------------------------------

FLAW_RATES = (0.6, 0.9, 0.99, 1.0)
# pretraining runs: name -> train.py flags (plus --n_eval=0 --out_dir); the weak base stops after 60 steps
PRETRAINS = {**{f"flaw{r}": [f"--flaw_rate={r}"] for r in FLAW_RATES},
             "weak": ["--flaw_rate=0.6", "--max_iters=60", "--warmup_iters=10"]}
QUICK_PRETRAIN = ["--max_iters=3", "--warmup_iters=1", "--n_examples=300", "--batch_size=4", "--eval_iters=1",
                  "--vocab_size=300"]


@dataclass
class Run:
    """One GRPO run of the lab: its base (a PRETRAINS name), its grpo.py flags, and what it is compared with."""
    name: str
    section: str          # "beyond" (point 2) or the failure mode it shows
    base: str
    flags: list
    cure: str = ""        # the run that shows the cure, measured the same way
    passk: bool = False   # also estimate pass@k of its final checkpoint


RUNS = [   # in the order they run: the flaw 0.6 base serves the first five
    Run("beyond_0.6", "beyond", "flaw0.6", [], passk=True),
    Run("hack_lenient", "reward hacking", "flaw0.6", ["--lab_verifier=lenient"], cure="beyond_0.6", passk=True),
    Run("collapse", "collapse", "flaw0.6", ["--lr=3e-3", "--beta=0"], cure="beyond_0.6", passk=True),
    Run("len_dr_grpo", "length bias", "flaw0.6", ["--loss_type=dr_grpo"], cure="beyond_0.6"),
    *[Run(f"beyond_{r}", "beyond", f"flaw{r}", [], passk=True) for r in FLAW_RATES[1:]],
    Run("nosig_weak", "no signal", "weak", []),
    Run("nosig_dapo", "no signal", "weak", ["--dynamic_sampling"], cure="nosig_weak"),
    Run("fmt_weak", "format dominates", "weak", ["--w_fmt=1.0"], cure="nosig_weak"),
    Run("hack_lenient_1.0", "reward hacking, flaw 1.0", "flaw1.0", ["--lab_verifier=lenient"], cure="beyond_1.0",
        passk=True),
    Run("collapse_mild", "mild collapse", "flaw0.6", ["--lr=1e-3", "--beta=0"], cure="beyond_0.6", passk=True),
    Run("len_dr_grpo_weak", "length bias, weak base", "weak", ["--loss_type=dr_grpo"], cure="nosig_weak"),
    Run("hack_last_digit", "reward hacking, last digit", "flaw0.6", ["--lab_verifier=last_digit"], cure="beyond_0.6"),
]
FAILURES = [("reward hacking", "hack_lenient", "beyond_0.6"), ("format dominates", "fmt_weak", "nosig_weak"),
            ("length bias", "beyond_0.6", "len_dr_grpo"), ("no signal", "nosig_weak", "nosig_dapo"),
            ("collapse", "collapse", "beyond_0.6"), ("reward hacking, flaw 1.0", "hack_lenient_1.0", "beyond_1.0"),
            ("mild collapse", "collapse_mild", "beyond_0.6"), ("length bias, weak base", "nosig_weak", "len_dr_grpo_weak"),
            ("reward hacking, last digit", "hack_last_digit", "beyond_0.6")]


def pretrain_argv(cfg: LabConfig, name: str) -> list[str]:
    """train.py's flags for one base."""
    extra = QUICK_PRETRAIN if cfg.quick else []
    return [*PRETRAINS[name], *extra, "--n_eval=0", f"--device={cfg.device}",
            f"--out_dir={Path(cfg.out_dir) / ('pretrain_' + name)}"]


def grpo_argv(cfg: LabConfig, run: Run) -> list[str]:
    """grpo.py's flags for one run: the lab's common budget, then the run's own flags."""
    return [f"--init_from={Path(cfg.out_dir) / ('pretrain_' + run.base) / 'ckpt.pt'}",
            f"--out_dir={Path(cfg.out_dir) / ('grpo_' + run.name)}", f"--max_iters={cfg.grpo_steps}",
            f"--prompts_per_step={cfg.prompts_per_step}", f"--group_size={cfg.group_size}",
            f"--n_eval={cfg.n_eval}", f"--eval_interval={cfg.eval_interval}", f"--device={cfg.device}",
            f"--max_new_tokens={cfg.max_new_tokens}",
            *(["--warmup_iters=1"] if cfg.quick else []), *run.flags]


def command_line(script: str, argv: list[str]) -> str:
    """The shell command that runs `script` with `argv`."""
    return " ".join(shlex.quote(a) for a in ["python", script, *argv])


def _quiet(fn, argv: list[str], log_path: Path):
    """Call a script's main(argv) with its printout going to log_path (the lab prints one line per run)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        return fn(argv)


def pretrain_done(cfg: LabConfig, name: str) -> bool:
    """True if the base's checkpoint holds a finished run with the flags PRETRAINS gives it."""
    path = Path(cfg.out_dir) / f"pretrain_{name}" / "ckpt.pt"
    if not path.is_file():
        return False
    ckpt = read_checkpoint(path, hint="python -m extras.rl_lab")
    stored = ckpt.get("config", {})
    want = parse_config(train.TrainConfig, pretrain_argv(cfg, name))
    same = all(stored.get(k) == getattr(want, k) for k in ("flaw_rate", "max_iters", "n_examples", "warmup_iters"))
    return "final" in ckpt and same


def ensure_pretrain(cfg: LabConfig, name: str) -> str:
    """Pretrain one base unless a finished checkpoint with the same flags exists; return its command."""
    argv = pretrain_argv(cfg, name)
    if pretrain_done(cfg, name):
        print(f"  pretrain {name}: reused {Path(cfg.out_dir) / ('pretrain_' + name) / 'ckpt.pt'}")
    else:
        t0 = time.perf_counter()
        _quiet(train.main, argv, Path(cfg.out_dir) / f"pretrain_{name}.log")
        print(f"  pretrain {name}: done in {time.perf_counter() - t0:.0f}s")
    return command_line("train.py", argv)


def ensure_grpo(cfg: LabConfig, run: Run) -> str:
    """Run one GRPO run unless it finished before with the same flags (lab_done.json); return its command."""
    argv = grpo_argv(cfg, run)
    out = Path(cfg.out_dir) / f"grpo_{run.name}"
    marker = out / "lab_done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("argv") == argv:
        print(f"  grpo {run.name}: reused {out}")
    else:
        t0 = time.perf_counter()
        _quiet(grpo.main, argv, Path(cfg.out_dir) / f"grpo_{run.name}.log")
        marker.write_text(json.dumps({"argv": argv}))
        print(f"  grpo {run.name}: done in {time.perf_counter() - t0:.0f}s")
    return command_line("grpo.py", argv)


# ----------------------------------------------------------------------------------------------------
# 2. Measures: pass@k of a checkpoint, curves of a run
# ----------------------------------------------------------------------------------------------------

def passk_problems(cfg: LabConfig) -> list:
    """The held-out questions of pass@k: the first n_pass of grpo.py's held-out set (eval_seed 0)."""
    return tasks.heldout_problems(tasks.default_task(), cfg.n_pass, seed=0)


def passk_of(cfg: LabConfig, ckpt_path: Path) -> dict:
    """pass@k (all held-out questions and the flaw-situation ones) of a checkpoint, cached beside it."""
    cache = ckpt_path.parent / "lab_passk.json"
    key = {"n_pass": cfg.n_pass, "n_samples": cfg.n_samples, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
           "mtime": ckpt_path.stat().st_mtime}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["result"]
    model, tok, _ = load_model(str(ckpt_path), cfg.device)
    problems = passk_problems(cfg)
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(cfg.seed)
    with torch.no_grad():
        res = evaluate_pass_at_k(model, tok, problems, cfg.max_new_tokens, cfg.n_samples, tuple(cfg.ks()),
                                 temperature=1.0, generator=gen, groups={"flaw": [tasks.in_flaw_situation(p) for p in problems]})
    res["flaw_mask"] = [tasks.in_flaw_situation(p) for p in problems]
    cache.write_text(json.dumps({"key": key, "result": res}))
    return json.loads(json.dumps(res))                 # int keys become strings, as after a reload


# degenerate output: one character 4+ times in a row ("!!!!") or a piece of 2-12 characters 3+ times
# ("<answer><answer><answer>"); no worked solution of the default task contains either
_REPEAT = re.compile(r"(.)\1{3,}|(.{2,12}?)\2{2,}")


def eval_stats(path: Path) -> dict:
    """Greedy held-out completions of one evaluation (grpo.py's eval_step{N}.jsonl): strict accuracy, what the
    lab verifiers (substring and last digit) would accept, accuracy on the flaw-situation questions, and the share of degenerate
    completions (_REPEAT: "!!!!" or "<answer><answer><answer>", which no worked solution contains)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    flaw = [tasks.in_flaw_situation(tasks.arithmetic_problem(r["question"])) for r in rows]
    n, n_flaw = max(1, len(rows)), max(1, sum(flaw))
    problems = [tasks.arithmetic_problem(r["question"]) for r in rows]
    lenient = [tasks.lenient_accuracy_reward(r["completion"], p) for r, p in zip(rows, problems)]
    last_digit = [tasks.last_digit_accuracy_reward(r["completion"], p) for r, p in zip(rows, problems)]
    return {"accuracy": sum(r["correct"] for r in rows) / n,
            "lenient_accuracy": sum(lenient) / n, "last_digit_accuracy": sum(last_digit) / n,
            "flaw_accuracy": sum(r["correct"] for r, f in zip(rows, flaw) if f) / n_flaw,
            "other_accuracy": sum(r["correct"] for r, f in zip(rows, flaw) if not f) / max(1, len(rows) - sum(flaw)),
            "format": sum(r["format"] for r in rows) / n,
            "degenerate": sum(bool(_REPEAT.search(r["completion"])) for r in rows) / n,
            "example": next((r["completion"] for r, f in zip(rows, flaw) if f), "")}


CURVE_KEYS = ("reward", "accuracy", "format", "zero_var_frac", "length", "entropy", "kl", "resampled", "length_right",
              "length_wrong")


def verifier_of(flags: list) -> str:
    """The accuracy verifier a run trains against: grpo.py's --lab_verifier among its flags, else strict."""
    return next((f.split("=", 1)[1] for f in flags if f.startswith("--lab_verifier=")), "strict")


def run_record(cfg: LabConfig, run: Run, command: str) -> dict:
    """Everything the report needs from one finished run: per-step curves, held-out evaluations, pass@k."""
    out = Path(cfg.out_dir) / f"grpo_{run.name}"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [h for h in history if "reward" in h]
    curves = {"step": [h["step"] for h in train_rows],
              # length_right / length_wrong are None on a step without right (wrong) rollouts
              **{k: [h.get(k, None if k.startswith("length_") else 0.0) for h in train_rows] for k in CURVE_KEYS}}
    evals = []
    for h in history:
        if "heldout_acc" in h:
            evals.append({"step": h["step"], "length": h["heldout_len"],
                          **eval_stats(out / f"eval_step{h['step']}.jsonl")})
    rec = {"name": run.name, "section": run.section, "base": run.base, "cure": run.cure, "command": command,
           "flags": run.flags, "verifier": verifier_of(run.flags), "curves": curves, "evals": evals}
    if run.passk:
        rec["passk"] = passk_of(cfg, out / "ckpt.pt")
    return rec


# ----------------------------------------------------------------------------------------------------
# 3. Report: results.json, results.md, plots
# ----------------------------------------------------------------------------------------------------

def _pk(res: dict, group: str, k: int) -> float:
    """pass@k of one group from a stored pass@k result (keys are strings after a JSON round trip)."""
    return res[group]["pass@k"][str(k)]


def beyond_table(results: dict) -> list[dict]:
    """Point 2: per flaw rate, the base's and the GRPO model's pass@k and greedy accuracy on flaw questions."""
    rows = []
    for r in FLAW_RATES:
        run = results["runs"].get(f"beyond_{r}")
        base = results["bases"].get(f"flaw{r}", {}).get("passk")
        if not run or not base or "passk" not in run:
            continue
        ks = [int(k) for k in base["all"]["pass@k"]]
        big = max(ks)
        first, last = run["evals"][0], run["evals"][-1]
        rows.append({"flaw_rate": r, "k_max": big,
                     "base_flaw_pass1": _pk(base, "flaw", 1), "base_flaw_passmax": _pk(base, "flaw", big),
                     "rl_flaw_pass1": _pk(run["passk"], "flaw", 1), "rl_flaw_passmax": _pk(run["passk"], "flaw", big),
                     "base_all_pass1": _pk(base, "all", 1), "rl_all_pass1": _pk(run["passk"], "all", 1),
                     "base_all_passmax": _pk(base, "all", big), "rl_all_passmax": _pk(run["passk"], "all", big),
                     "greedy_flaw_before": first["flaw_accuracy"], "greedy_flaw_after": last["flaw_accuracy"],
                     "greedy_all_before": first["accuracy"], "greedy_all_after": last["accuracy"]})
    return rows


def window_mean(values: list, first: bool, n: int = 5) -> "float | None":
    """Mean of the first (or last) n logged values, skipping None (a step without such rollouts)."""
    part = [v for v in (values[:n] if first else values[-n:]) if v is not None]
    return sum(part) / len(part) if part else None


def ends(values: "list | None") -> str:
    """'a → b': window_mean of the first and of the last five steps of a curve ('–' if not logged)."""
    a, b = (window_mean(values, True), window_mean(values, False)) if values else (None, None)
    return "–" if a is None or b is None else f"{a:.1f} → {b:.1f}"


def write_markdown(results: dict, path: Path) -> None:
    """results.md: the command, then one table per point (every number read from results.json), and the
    hand-written findings.md beside it (what each run shows), if there is one."""
    pct = lambda x: f"{100 * x:.1f}"
    lines = [f"# RL lab results (`{results['command']}`)", "",
             (f"Made by `{results['command']}` (extras/rl_lab.py); every figure below is read from results.json "
              "beside this file. Commands of every run are listed at the end."), "",
             "## pass@k of the pretrained and the GRPO model (flaw rate 0.6)", ""]
    base, rl = results["bases"].get("flaw0.6", {}).get("passk"), results["runs"].get("beyond_0.6", {}).get("passk")
    if base and rl:
        ks = list(base["all"]["pass@k"])
        lines += [(f"{base['n_samples']} samples per question at temperature {base['temperature']}, "
                   f"{base['all']['n']} held-out questions ({base['flaw']['n']} in the flaw situation)."), "",
                  "| model | questions | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for label, res in (("pretrained", base), ("GRPO", rl)):
            for group, gname in (("all", "all"), ("flaw", "flaw situation")):
                lines.append(f"| {label} | {gname} | " + " | ".join(pct(res[group]["pass@k"][k]) for k in ks) + " |")
    lines += ["", "## Can RL go beyond the base model? (flaw-situation questions, %)", "",
              ("| flaw rate | base pass@1 | base pass@max | GRPO pass@1 | GRPO pass@max | greedy before | "
               "greedy after |"), "|---|---|---|---|---|---|---|"]
    for row in results["beyond"]:
        lines.append(f"| {row['flaw_rate']} | {pct(row['base_flaw_pass1'])} | {pct(row['base_flaw_passmax'])} | "
                     f"{pct(row['rl_flaw_pass1'])} | {pct(row['rl_flaw_passmax'])} | "
                     f"{pct(row['greedy_flaw_before'])} | {pct(row['greedy_flaw_after'])} |")
    if results["beyond"]:
        lines.append(f"\npass@max is pass@{results['beyond'][0]['k_max']}; greedy is the held-out accuracy before "
                     "and after GRPO on the flaw-situation questions of grpo.py's evaluation.")
    findings = path.parent / "findings.md"     # hand-written: what each run shows (kept beside the results)
    if findings.is_file():
        lines += ["", findings.read_text().strip()]
    lines += ["", "## Failure modes (first and last held-out evaluation, greedy, %)", "",
              ("| run | section | trained on | held-out acc | lenient acc | last-digit acc | flaw acc | degenerate | "
               "rollout reward | entropy | KL | zero-var groups | length | length wrong | length right |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["runs"].items():
        e0, e1, c = rec["evals"][0], rec["evals"][-1], rec["curves"]
        num, tok = (lambda x: f"{x:.3f}"), (lambda x: f"{x:.1f}")
        span = lambda key, f=pct, c=c: f"{f(c[key][0])} → {f(c[key][-1])}"
        both = lambda key, e0=e0, e1=e1: (f"{pct(e0[key])} → {pct(e1[key])}" if key in e0 and key in e1 else "–")
        lines.append(f"| {name} | {rec['section']} | {rec.get('verifier', verifier_of(rec['flags']))} | "
                     f"{both('accuracy')} | {both('lenient_accuracy')} | {both('last_digit_accuracy')} | "
                     f"{both('flaw_accuracy')} | {both('degenerate')} | {span('reward', num)} | "
                     f"{span('entropy', num)} | {span('kl', num)} | {span('zero_var_frac')} | {span('length', tok)} | "
                     f"{ends(c.get('length_wrong'))} | {ends(c.get('length_right'))} |")
    lines += ["", ("Rollout columns: first and last GRPO step (sampled at temperature 1); length wrong / right: mean "
                   "tokens of the rollouts the run's own accuracy verifier called wrong / right, averaged over the first "
                   "and the last five steps (– where not logged). Held-out columns: greedy, first and last evaluation; "
                   "lenient and last-digit acc: what those lab verifiers would accept. Degenerate: share of greedy "
                   "held-out completions that repeat themselves (one character 4+ times or a piece of 2-12 characters 3+ "
                   "times in a row)."), "", "## Commands", ""]
    for name, cmd in results["commands"].items():
        lines.append(f"- {name}: `{cmd}`")
    path.write_text("\n".join(lines) + "\n")


def plot_all(results: dict, out: Path) -> list[Path]:
    """The lab's figures: pass@k curves, the flaw-rate sweep, one panel grid per failure mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        """Write one figure and close it."""
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)

    base, rl = results["bases"].get("flaw0.6", {}).get("passk"), results["runs"].get("beyond_0.6", {}).get("passk")
    if base and rl:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, group, title in ((axes[0], "all", "all held-out questions"),
                                 (axes[1], "flaw", "flaw-situation questions")):
            for res, label, color in ((base, "pretrained", "tab:gray"), (rl, "after GRPO", "tab:blue")):
                ks = [int(k) for k in res[group]["pass@k"]]
                ax.plot(ks, [100 * v for v in res[group]["pass@k"].values()], marker="o", color=color, label=label)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="k (samples drawn)", ylabel="pass@k (%)", ylim=(0, 102),
                   title=f"pass@k, {title} ({res[group]['n']})")
            ax.legend()
        save(fig, "passk_flaw0.6.png")
    rows = results["beyond"]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        x = range(len(rows))
        big = rows[0]["k_max"]
        for key, label, style in (("base_flaw_pass1", "base pass@1", "o--"), ("base_flaw_passmax", f"base pass@{big}", "s--"),
                                  ("rl_flaw_pass1", "GRPO pass@1", "o-"), ("rl_flaw_passmax", f"GRPO pass@{big}", "s-")):
            axes[0].plot(list(x), [100 * r[key] for r in rows], style, label=label)
        axes[0].set_xticks(list(x), [str(r["flaw_rate"]) for r in rows])
        axes[0].set(xlabel="flaw rate of the pretraining corpus", ylabel="flaw-situation questions solved (%)",
                    ylim=(-2, 102), title="Base vs GRPO on the planted mistake, by flaw rate")
        axes[0].legend(fontsize=8)
        for r in rows:
            gain = 100 * (r["greedy_flaw_after"] - r["greedy_flaw_before"])
            axes[1].scatter(100 * r["base_flaw_passmax"], gain)
            axes[1].annotate(f"flaw {r['flaw_rate']}", (100 * r["base_flaw_passmax"], gain), fontsize=8)
        axes[1].set(xlabel=f"base pass@{big} on flaw-situation questions (%)",
                    ylabel="GRPO gain, greedy flaw-situation accuracy (points)",
                    title="Can RL go beyond what the base can sample?")
        save(fig, "beyond_base.png")
    panels = (("reward", "rollout reward (mean)"), ("heldout", "greedy held-out accuracy (%)"),
              ("length", "sampled completion length (tokens)"), ("entropy", "policy entropy (nats/token)"),
              ("kl", "KL to the reference (per token)"), ("zero_var_frac", "zero-variance groups (share)"))
    for section, bad, good in FAILURES:
        runs = [results["runs"].get(n) for n in (bad, good)]
        if not all(runs):
            continue
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        proxy = runs[0].get("verifier", verifier_of(runs[0]["flags"]))    # the verifier the failing run trained on
        for rec in runs:
            c = rec["curves"]
            for ax, (key, label) in zip(axes.flat, panels):
                if key == "heldout":
                    line, = ax.plot([e["step"] for e in rec["evals"]], [100 * e["accuracy"] for e in rec["evals"]],
                                    marker="o", label=f"{rec['name']} (strict)")
                    if section.startswith("reward hacking") and f"{proxy}_accuracy" in rec["evals"][0]:
                        ax.plot([e["step"] for e in rec["evals"]], [100 * e[f"{proxy}_accuracy"] for e in rec["evals"]],
                                ls="--", color=line.get_color(), label=f"{rec['name']} ({proxy} verifier)")
                elif key == "length" and section.startswith("length bias") and c.get("length_wrong"):
                    for sub, ls in (("length_wrong", "--"), ("length_right", ":")):
                        ax.plot(c["step"], [float("nan") if v is None else v for v in c[sub]], ls=ls,
                                label=f"{rec['name']} ({sub.split('_')[1]})")
                else:
                    ax.plot(c["step"], c[key], label=rec["name"])
                ax.set(xlabel="GRPO step", ylabel=label, title=label.split(" (")[0])
        for ax in axes.flat:
            ax.legend(fontsize=7)
        fig.suptitle(f"Failure mode: {section} ({bad} vs {good})")
        save(fig, f"failure_{re.sub('[^a-z0-9]+', '_', section)}.png")
    return paths


# ----------------------------------------------------------------------------------------------------
# 4. Main
# ----------------------------------------------------------------------------------------------------

def stored_results(path: Path) -> dict:
    """The results.json a previous lab run wrote into results_dir ({} if there is none)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def keep_stored(stored: dict, run: Run, cfg: LabConfig) -> bool:
    """True if results.json holds a record of `run` made by the command this config would run: the report then
    keeps it, so `--only=...` on a machine without the other runs' checkpoints does not drop their results."""
    rec = stored.get("runs", {}).get(run.name)
    return bool(rec) and rec.get("command") == command_line("grpo.py", grpo_argv(cfg, run))


def main(argv=None) -> dict:
    """Run (or reuse) every pretraining and GRPO run of the lab, then write results and plots."""
    cfg = parse_config(LabConfig, argv, description="RL lab: pass@k and GRPO's failure modes on the built-in task")
    print_config(cfg, "rl lab config")
    only = {s for s in cfg.only.split(",") if s}
    unknown = only - {r.name for r in RUNS}
    if unknown:
        raise SystemExit(f"error: unknown run(s) {sorted(unknown)} in --only; choose from "
                         + ", ".join(r.name for r in RUNS))
    out, res_dir = Path(cfg.out_dir), Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    command = COMMAND + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    stored = stored_results(res_dir / "results.json")
    results = {"command": command, "config": asdict(cfg), "bases": {}, "runs": {}, "commands": {}}
    for run in [r for r in RUNS if not only or r.name in only]:     # each base is pretrained when first needed
        if f"pretrain_{run.base}" not in results["commands"]:
            results["commands"][f"pretrain_{run.base}"] = ensure_pretrain(cfg, run.base)
        results["commands"][run.name] = ensure_grpo(cfg, run)
    for run in RUNS:                                    # the report covers every finished run, not only todo
        if (out / f"grpo_{run.name}" / "lab_done.json").is_file():
            results["commands"].setdefault(run.name, command_line("grpo.py", grpo_argv(cfg, run)))
            results["runs"][run.name] = run_record(cfg, run, results["commands"][run.name])
            print(f"  measured {run.name}")
        elif keep_stored(stored, run, cfg):             # finished elsewhere: its stored record, same command
            results["commands"].setdefault(f"pretrain_{run.base}", command_line("train.py", pretrain_argv(cfg, run.base)))
            results["commands"][run.name] = stored["runs"][run.name]["command"]
            results["runs"][run.name] = stored["runs"][run.name]
            print(f"  kept the stored results of {run.name}")
    for r in FLAW_RATES:
        ckpt, base_cmd = out / f"pretrain_flaw{r}" / "ckpt.pt", command_line("train.py", pretrain_argv(cfg, f"flaw{r}"))
        if f"beyond_{r}" in results["runs"] and ckpt.is_file():
            results["bases"][f"flaw{r}"] = {"command": base_cmd, "passk": passk_of(cfg, ckpt)}
            print(f"  pass@k of base flaw{r}")
        elif f"beyond_{r}" in results["runs"] and stored.get("bases", {}).get(f"flaw{r}", {}).get("command") == base_cmd:
            results["bases"][f"flaw{r}"] = stored["bases"][f"flaw{r}"]
            print(f"  kept the stored pass@k of base flaw{r}")
    results["beyond"] = beyond_table(results)
    (res_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, res_dir / "results.md")
    plots = plot_all(results, res_dir)
    print(f"wrote {res_dir}/results.json, results.md and {len(plots)} plots; runs in {out}")
    return results


if __name__ == "__main__":
    main()
