"""GRPO, GRPO with a per-call penalty, and IFPO from one BC checkpoint: the paper's three claims.

    make experiment                                    # the defaults below, ≤ 2 hours on a 2-core CPU
    python experiments/grpo_vs_ifpo.py --dry_run       # the plan, commands and time estimate; runs nothing
    python experiments/grpo_vs_ifpo.py --refined_bc data/bc_refined.jsonl   # + IFPO from a DGR-refined BC set

What it tests (docs/method.md sections 5 and 6):
  1. plain GRPO's tool-call rate keeps rising during RL;
  2. a per-call reward penalty instead of IFPO drives it to about 0 ("total avoidance");
  3. IFPO ends with a lower tool-call rate than GRPO on benign prompts at equal safety,
     keeping more reasoning.

Stages, each a train.py / eval.py run in a subprocess; a stage whose output exists is skipped, and an
RL run that was cut off resumes from its last checkpoint, so an interrupted experiment continues where
it stopped:
  1. behaviour cloning of --model on data/bc_seed.jsonl (and, with --refined_bc, on that file too)
  2. per seed, from the one BC checkpoint, with the same prompts in the same order (train.py shuffles
     them by --seed, the same for every arm): `--adv grpo`, `--adv grpo --tool_penalty 0.2` and
     `--adv ifpo`; with --refined_bc, the --refined_arms from the refined checkpoint
  3. eval.py on the base model, the BC checkpoint(s) and every RL model, one model at a time
  4. experiments/results.md (tables with Wilson 95% intervals and the seed spread, stage times) and
     experiments/*.png (tool-call rates, reward, IFPO weights over RL steps), written from the logs

Budget (2-core CPU, embedded SmolLM2-135M; the per-unit costs below, on the --fast path): the
defaults come to about 1 h 58 min, --refined_bc adds about an hour. Scale up with --steps, --seeds,
--prompts_per_step, --limit; on a GPU, --model, --train_args and --eval_args give the paper's
setting (README).
"""

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from scoring import format_cell, wilson  # noqa: E402  (the repository root is on the path from here on)

# the arms: name -> the train.py flags that make it (everything else is shared)
ARMS = {
    "grpo": ["--adv", "grpo"],
    "penalty": ["--adv", "grpo", "--tool_penalty", "0.2"],  # a per-valid-call penalty inside Eq. 1's bracket
    "ifpo": ["--adv", "ifpo"],
}
TITLES = {"grpo": "GRPO", "penalty": "GRPO + penalty 0.2/call", "ifpo": "IFPO"}
COLORS = {
    "grpo": "tab:blue",
    "penalty": "tab:green",
    "ifpo": "tab:red",
    "grpo-refined": "navy",
    "penalty-refined": "darkgreen",
    "ifpo-refined": "tab:purple",
}  # from the refined BC

# Per-unit costs on the 2-core CPU with the embedded model, on the --fast path every command here
# takes (fast.py: the plain path's tokens, log-probs and gradients, sooner), from the experiment's
# run at --steps 12 (results.md): a BC turn sample ≈ 1.2 s (1,560 samples of the 480-row data in
# 31 min), an RL rollout ≈ 4.3 s (a run of 12 steps × 16 rollouts, 160-token turns, rollout and
# update, took 12.5-16.4 min), an eval prompt ≈ 1.4 s (128-token turns, batches of 20; 2.4 min a
# trained model). results.md records what each stage really took.
RL_S_PER_ROLLOUT = 4.3
BC_S_PER_SAMPLE = 1.2
EVAL_S_PER_PROMPT = 1.4
LOAD_S = 20  # starting a subprocess and loading the model


def title(arm: str) -> str:
    """'ifpo-refined' -> 'IFPO from refined BC'."""
    return TITLES[arm.split("-")[0]] + (" from refined BC" if arm.endswith("-refined") else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=7, help="RL steps per run")
    p.add_argument("--prompts_per_step", type=int, default=2, help="× --group_size rollouts per RL step")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=30, help="eval prompts per bundled set (0 = all, 100+)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument(
        "--refined_bc",
        default=None,
        help="a second BC JSONL file (e.g. DGR-refined); its checkpoint gets --refined_arms",
    )
    p.add_argument("--refined_arms", nargs="+", default=["ifpo"], choices=list(ARMS))
    p.add_argument("--bc_epochs", type=int, default=2)
    p.add_argument("--model", default=None, help="base model for BC (default: the embedded SmolLM2-135M)")
    p.add_argument(
        "--train_args",
        default="",
        help="extra train.py flags for every BC and RL run, e.g. '--judge Qwen/Qwen3Guard-Gen-0.6B'",
    )
    p.add_argument(
        "--eval_args", default="", help="extra eval.py flags, e.g. '--data strongreject xstest-safe gsm8k'"
    )
    p.add_argument("--out", default="runs/grpo_vs_ifpo")
    p.add_argument("--results", default=str(HERE), help="folder for results.md and the plots")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the time estimate; run nothing")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the plan
def bc_flags(a) -> list[str]:
    return [
        "--stage",
        "bc",
        "--bc_epochs",
        str(a.bc_epochs),
        "--bc_lr",
        "1e-4",
        "--bc_batch_size",
        "8",
        "--max_total_tokens",
        "768",
        "--fast",
        *([] if a.model is None else ["--model", a.model]),
        *shlex.split(a.train_args),
    ]


def rl_flags(a) -> list[str]:
    return [
        "--stage",
        "rl",
        "--group_size",
        str(a.group_size),
        "--prompts_per_step",
        str(a.prompts_per_step),
        "--micro_batch_size",
        "8",
        "--max_new_tokens",
        "160",
        "--max_total_tokens",
        "768",
        "--max_tool_calls",
        "2",
        # 1e-5 moved nothing beyond the runs' spread in 12 steps, 1e-4 undid BC (experiments/README.md)
        "--lr",
        "3e-5",
        "--warmup",
        "0.1",
        "--max_steps",
        str(a.steps),
        "--save_every",
        "5",
        "--fast",
        *shlex.split(a.train_args),
    ]


def eval_flags(a) -> list[str]:
    return [
        *(["--limit", str(a.limit)] if a.limit else []),
        "--max_new_tokens",
        "128",
        "--max_total_tokens",
        "768",
        "--batch_size",
        "20",
        "--fast",
        *shlex.split(a.eval_args),
    ]


def plan(a) -> tuple[dict, dict]:
    """Training runs, BC first: name -> {"cmd", "done" (its output), "resume_from" (RL: its folder)};
    and the models to evaluate: label -> model path."""
    out = ROOT / a.out
    runs, models = {}, {"base": a.model or "embedded"}
    bcs = {"bc": str(ROOT / "data/bc_seed.jsonl")}
    if a.refined_bc:
        bcs["bc-refined"] = str(Path(a.refined_bc).resolve())
    for name, data in bcs.items():
        folder = out / name
        runs[name] = {
            "cmd": ["train.py", *bc_flags(a), "--bc_data", data, "--output_dir", str(folder)],
            "resume_from": None,
            "done": folder / "final",
        }
        models[name] = str(folder / "final")
    for bc, arms in (("bc", a.arms), ("bc-refined", a.refined_arms if a.refined_bc else [])):
        for seed in a.seeds:
            for arm in arms:
                name = f"{arm}-seed{seed}" if bc == "bc" else f"{arm}-refined-seed{seed}"
                folder = out / name
                runs[name] = {
                    "cmd": [
                        "train.py",
                        *rl_flags(a),
                        *ARMS[arm],
                        "--seed",
                        str(seed),
                        "--model",
                        str(out / bc / "final"),
                        "--output_dir",
                        str(folder),
                    ],
                    "resume_from": folder,
                    "done": folder / "final",
                }
                models[name] = str(folder / "final")
    return runs, models


def estimate_minutes(a) -> dict[str, float]:
    """Wall-clock estimate per stage on the 2-core CPU, from the per-unit costs above.

    BC samples: one per model turn, so a retrieval row gives two (see data/README.md).
    """
    rows = [
        json.loads(line) for line in (ROOT / "data/bc_seed.jsonl").read_text().splitlines() if line.strip()
    ]
    bc_samples = sum(2 if r.get("query") else 1 for r in rows)
    n_bc = 1 + bool(a.refined_bc)
    n_rl = len(a.seeds) * (len(a.arms) + (len(a.refined_arms) if a.refined_bc else 0))
    n_models = 1 + n_bc + n_rl
    per_set = a.limit or 110
    return {
        "BC": n_bc * (bc_samples * a.bc_epochs * BC_S_PER_SAMPLE + LOAD_S) / 60,
        "RL": n_rl * (a.steps * a.prompts_per_step * a.group_size * RL_S_PER_ROLLOUT + LOAD_S) / 60,
        "eval": (n_models * 3 * per_set * EVAL_S_PER_PROMPT + n_models * LOAD_S) / 60,
    }


def run(cmd: list[str], done: Path, folder: Path | None, timings: dict, name: str, dry: bool):
    """Run one stage unless its output exists; an RL run cut off after a checkpoint resumes from it."""
    if done.exists():
        print(f"[skip] {name}: {done.relative_to(ROOT) if done.is_relative_to(ROOT) else done} exists")
        return
    if folder is not None and any(folder.glob("checkpoint-*/trainer_state.pt")):
        cmd = [*cmd, "--resume", "auto"]
    print(f"[{'plan' if dry else 'run'}] {name}: python {' '.join(cmd)}", flush=True)
    if dry:
        return
    t0 = time.time()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    timings[name] = timings.get(name, 0) + time.time() - t0


# ----------------------------------------------------------------------------- results
def evaluated(folder: Path) -> dict:
    """model path -> its eval.py results, from every complete results.json written under folder."""
    found = {}
    for f in sorted(folder.glob("**/results.json")):
        results = json.loads(f.read_text())
        if results.get("complete", True):  # eval.py writes partial results as it goes
            found.update(results["models"])
    return found


def read_log(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if r["stage"] == "rl"]


def by_label(result: dict, label: str, key: str) -> float | None:
    """The mean of `key` over the benchmarks of one kind (harmful | benign | math)."""
    values = [b[key] for b in result["benchmarks"].values() if b["label"] == label]
    return statistics.mean(values) if values else None


def cell(results: list[dict], label: str, key: str) -> str:
    """Mean over seeds [Wilson 95% interval] (each seed's value): 'mean [lo, hi] (s0 / s1)'.

    The interval treats the seeds' rollouts of a prompt as repeated measures of that prompt (as
    eval.py does for avg@k): n = the set's prompts, not prompts × seeds.
    """
    values = [by_label(r, label, key) for r in results]
    if any(v is None for v in values):
        return "n/a"
    n = min(b["n"] for r in results for b in r["benchmarks"].values() if b["label"] == label)
    m = statistics.mean(values)
    text = format_cell(m, [100 * x for x in wilson(m / 100 * n, n)])
    return text + (f" ({' / '.join(f'{v:.0f}' for v in values)})" if len(values) > 1 else "")


def table(results: dict, groups: dict[str, list[str]]) -> list[str]:
    head = [
        "model",
        "safety % ↑",
        "over-refusal % ↓",
        "reasoning % ↑",
        "H-avg ↑",
        "tool % harmful",
        "tool % benign",
        "tool % math",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, names in groups.items():
        rs = [results[n] for n in names]
        h = [r["h_avg"] for r in rs]
        row = [
            kind,
            cell(rs, "harmful", "safety_rate"),
            cell(rs, "benign", "over_refusal_rate"),
            cell(rs, "math", "accuracy"),
            "n/a"
            if None in h
            else f"{statistics.mean(h):.1f}" + (f" ± {statistics.stdev(h):.1f}" if len(h) > 1 else ""),
        ]
        row += [cell(rs, label, "tool_call_rate") for label in ("harmful", "benign", "math")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def window_mean(log: list[dict], key: str, first: bool, n: int = 3) -> float:
    """Mean of `key` over the first or last n steps, skipping steps that had no such prompts (nan)."""
    values = [v for r in (log[:n] if first else log[-n:]) if (v := r.get(key, math.nan)) == v]
    return statistics.mean(values) if values else math.nan


def curves_table(logs: dict[str, list[list[dict]]]) -> list[str]:
    """Per arm: mean over seeds of the first and of the last 3 steps, then each seed's last value."""
    lines = [
        "| arm | reward harmful, first → last 3 steps | reward sensitive, first → last "
        "| tool rate harmful, first → last | tool rate sensitive, first → last |",
        "|---|---|---|---|---|",
    ]
    for arm, runs in logs.items():
        row = [title(arm)]
        for key in ("reward_harmful", "reward_sensitive", "tool_rate_harmful", "tool_rate_sensitive"):
            first = statistics.mean(window_mean(log, key, True) for log in runs)
            last = [window_mean(log, key, False) for log in runs]
            seeds = f" ({' / '.join(f'{x:.2f}' for x in last)})" if len(last) > 1 else ""
            row.append(f"{first:.2f} → {statistics.mean(last):.2f}{seeds}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def smooth(xs: list[float], k: int = 3) -> list[float]:
    """Trailing mean over k steps, nan-aware (a step with no harmful prompts has no harmful rate)."""
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1) : i + 1] if x == x]
        out.append(statistics.mean(w) if w else math.nan)
    return out


def plot(logs: dict[str, list[list[dict]]], folder: Path):
    """tool_call_rate.png (harmful | benign panels, every arm), reward.png, ifpo_weights.png.

    Lines are the mean over seeds of a 3-step trailing mean; the band spans the seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, arm, runs, key, style=None, label=None):
        steps = [r["step"] for r in runs[0]]
        series = [smooth([r.get(key, math.nan) for r in log]) for log in runs]
        mid = [
            statistics.mean(v) if (v := [s[i] for s in series if s[i] == s[i]]) else math.nan
            for i in range(len(steps))
        ]
        color = COLORS[arm]
        ax.plot(
            steps,
            mid,
            color=color,
            marker="o",
            markersize=3,
            linestyle=style or ("--" if arm.endswith("-refined") else "-"),
            label=label or title(arm),
        )
        if len(series) > 1:
            lo = [min((s[i] for s in series if s[i] == s[i]), default=math.nan) for i in range(len(steps))]
            hi = [max((s[i] for s in series if s[i] == s[i]), default=math.nan) for i in range(len(steps))]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15)

    def by_label(what: str, keys: tuple[str, str], filename: str, ylabel: str | None = None, ylim=None):
        """Two panels, harmful and benign prompts, every arm on each."""
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, key, prompts in zip(axes, keys, ("harmful prompts", "benign (sensitive) prompts")):
            for arm, runs in logs.items():
                draw(ax, arm, runs, key)
            ax.set_title(f"{what}, {prompts}", fontsize=10)
            ax.set_xlabel("RL step")
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
        if ylabel:
            axes[0].set_ylabel(ylabel)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=110)
        plt.close(fig)

    by_label(
        "tool-call rate",
        ("tool_rate_harmful", "tool_rate_sensitive"),
        "tool_call_rate.png",
        "share of rollouts that called the tool",
        (-0.03, 1.03),
    )
    by_label("mean reward (Eq. 1)", ("reward_harmful", "reward_sensitive"), "reward.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, runs in logs.items():
        if arm.startswith("ifpo"):
            draw(ax, arm, runs, "ifpo_weight_tool", "-", f"{title(arm)}: tool rollouts")
            draw(ax, arm, runs, "ifpo_weight_direct", ":", f"{title(arm)}: direct rollouts")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="RL step", ylabel="mean IFPO weight w_i (Eq. 3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "ifpo_weights.png", dpi=110)
    plt.close(fig)


def write_results(a, argv: list[str], runs: dict, models: dict, results: dict, timings: dict):
    out = ROOT / a.out
    rl_arms = [(arm, False) for arm in a.arms] + [
        (arm, True) for arm in (a.refined_arms if a.refined_bc else [])
    ]
    groups = {"base": ["base"], "BC": ["bc"]}
    if a.refined_bc:
        groups["BC (refined data)"] = ["bc-refined"]
    logs = {}
    for arm, refined in rl_arms:
        tag = f"{arm}-refined" if refined else arm
        groups[title(tag)] = [f"{tag}-seed{s}" for s in a.seeds]
        logs[tag] = [read_log(out / f"{tag}-seed{s}") for s in a.seeds]
    results = {label: results[models[label]] for names in groups.values() for label in names}
    results_dir = Path(a.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    plot(logs, results_dir)

    n = {
        label: min(b["n"] for r in results.values() for b in r["benchmarks"].values() if b["label"] == label)
        for label in ("harmful", "benign", "math")
    }
    arm_flags = "; ".join(f"{TITLES[k]}: `{' '.join(ARMS[k])}`" for k in ARMS)
    command = " ".join(["python experiments/grpo_vs_ifpo.py", *map(shlex.quote, argv)])
    lines = [
        f"Command: `{command}`",
        "",
        f"BC: `{' '.join(bc_flags(a))}`; RL: `{' '.join(rl_flags(a))}` + the arm's flags ({arm_flags}); "
        f"seeds {', '.join(map(str, a.seeds))}; eval: `{' '.join(eval_flags(a))}` "
        f"({n['harmful']} harmful, {n['benign']} benign, {n['math']} math prompts).",
        "",
        "Each cell: mean over seeds [Wilson 95% interval, n = the set's prompts] (each seed's value). "
        "Safety and over-refusal by the offline judge unless --eval_args says otherwise; tool % = share of "
        "eval rollouts that called the tool.",
        "",
        *table(results, groups),
        "",
        "RL training curves (log.jsonl; mean over seeds of the first and of the last 3 steps, "
        "then each seed's last):",
        "",
        *curves_table(logs),
        "",
        "Wall-clock per stage in minutes (a stage is timed when it runs; reruns skip finished stages): "
        + (", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) or "none timed")
        + "; the estimate was "
        + ", ".join(f"{k} {v:.0f}" for k, v in estimate_minutes(a).items())
        + ".",
    ]
    (results_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    runs, models = plan(a)
    est = estimate_minutes(a)
    print(
        "estimate on a 2-core CPU: "
        + ", ".join(f"{k} {v:.0f} min" for k, v in est.items())
        + f"; total {sum(est.values()):.0f} min",
        flush=True,
    )
    out = ROOT / a.out
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    for name, r in runs.items():  # BC runs come first in the plan, then RL
        run(r["cmd"], r["done"], r["resume_from"], timings, name, a.dry_run)
        if not a.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            timings_file.write_text(json.dumps(timings, indent=1))

    eval_dir = out / f"eval-limit{a.limit or 'all'}"  # results of one --limit are never mixed with another's
    for (
        label,
        path,
    ) in models.items():  # one eval.py per model, so an interrupted evaluation loses one model at most
        folder = eval_dir / label
        run(
            ["eval.py", *eval_flags(a), "--output_dir", str(folder), "--model", path],
            folder / "results.json",
            None,
            timings,
            f"eval {label}",
            a.dry_run,
        )
        if not a.dry_run:
            timings_file.write_text(json.dumps(timings, indent=1))
    if not a.dry_run:
        write_results(a, argv, runs, models, evaluated(eval_dir), timings)


if __name__ == "__main__":
    main()
