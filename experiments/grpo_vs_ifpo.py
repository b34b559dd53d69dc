"""GRPO vs IFPO on the embedded SmolLM2-135M: same BC checkpoint, same prompt order, same seeds.

    make experiment                                   # or:
    python experiments/grpo_vs_ifpo.py [--seeds 0 1] [--steps 12] [--out runs/grpo_vs_ifpo]   # the defaults

Stages, each a train.py / eval.py run in a subprocess (a stage whose output exists is skipped,
so an interrupted experiment continues where it stopped):
  1. behaviour cloning from the embedded model on data/bc_seed.jsonl
  2. per seed: RL with --adv grpo and with --adv ifpo from the BC checkpoint
  3. eval.py on the base model, BC and every RL model not evaluated yet, on the held-out bundled sets
  4. experiments/results.md (the table) and experiments/*.png (plots), written from the logs
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

BC = ["--stage", "bc", "--bc_epochs", "3", "--bc_lr", "1e-4", "--bc_batch_size", "8", "--max_total_tokens", "768"]
RL = ["--stage", "rl", "--group_size", "8", "--prompts_per_step", "2", "--micro_batch_size", "8",
      "--max_new_tokens", "96", "--max_total_tokens", "768", "--max_tool_calls", "2", "--lr", "1e-5", "--warmup", "0.1"]
EVAL = ["--limit", "20", "--max_new_tokens", "128", "--max_total_tokens", "768", "--batch_size", "20"]


def run(cmd: list[str], done: Path | None):
    if done is not None and done.exists():
        print(f"[skip] {done} exists")
        return
    print("[run]", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


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


def spread(values: list[float]) -> str:
    if any(v is None for v in values):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict, groups: dict[str, list[str]]) -> str:
    """Markdown: one row per model kind (mean ± std over seeds where there are several)."""
    benches = list(next(iter(results.values()))["benchmarks"])
    head = ["model", "safety ↑", "over-refusal ↓", "reasoning ↑", "H-avg ↑"] + [f"tool % {b}" for b in benches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, names in groups.items():
        rs = [results[n] for n in names]
        row = [kind] + [spread([r[k] for r in rs]) for k in ("safety_avg", "over_refusal_avg", "reasoning_avg", "h_avg")]
        row += [spread([r["benchmarks"][b]["tool_call_rate"] for r in rs]) for b in benches]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(logs: dict[str, list[list[dict]]], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grpo": "tab:blue", "ifpo": "tab:red"}
    panels = [("tool_call_rate.png", [("tool_rate_harmful", "harmful prompts", "-"), ("tool_rate_sensitive", "sensitive prompts", "--")],
               "tool-call rate"),
              ("reward.png", [("reward_mean", "reward", "-")], "mean reward (Eq. 1)"),
              ("ifpo_weights.png", [("ifpo_weight_tool", "tool rollouts", "-"), ("ifpo_weight_direct", "direct rollouts", "--")],
               "mean IFPO weight w_i (Eq. 3)")]
    for name, series, ylabel in panels:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for adv, runs in logs.items():
            if name == "ifpo_weights.png" and adv != "ifpo":
                continue
            for i, log in enumerate(runs):
                for key, label, style in series:
                    ax.plot([r["step"] for r in log], [r[key] for r in log], style, marker="o", markersize=3,
                            color=colors[adv], alpha=0.85,
                            label=f"{adv.upper()} {label}" if i == 0 else None)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="runs/grpo_vs_ifpo")
    a = p.parse_args()
    out = ROOT / a.out

    bc = out / "bc"
    run(["train.py", *BC, "--output_dir", str(bc)], bc / "final")
    models = {"base": "embedded", "BC": str(bc / "final")}
    for seed in a.seeds:
        for adv in ("grpo", "ifpo"):
            folder = out / f"{adv}-seed{seed}"
            run(["train.py", *RL, "--adv", adv, "--seed", str(seed), "--max_steps", str(a.steps),
                 "--model", str(bc / "final"), "--output_dir", str(folder)], folder / "final")
            models[f"{adv}-seed{seed}"] = str(folder / "final")
    results = evaluated(out / "eval")
    missing = [label for label, path in models.items() if path not in results]
    if missing:  # models added by a later run (more seeds) are evaluated on their own
        folder = out / "eval" / "+".join(missing)
        run(["eval.py", *EVAL, "--output_dir", str(folder), "--model", *(models[m] for m in missing)], None)
        results = evaluated(out / "eval")
    results = {label: results[path] for label, path in models.items()}
    groups = {"base (SmolLM2-135M)": ["base"], "BC": ["BC"],
              "GRPO": [f"grpo-seed{s}" for s in a.seeds], "IFPO": [f"ifpo-seed{s}" for s in a.seeds]}
    logs = {adv: [read_log(out / f"{adv}-seed{s}") for s in a.seeds] for adv in ("grpo", "ifpo")}
    plot(logs, HERE)

    def last(adv, key, n=5):  # mean over the last n steps (steps without such prompts skipped), over seeds
        return statistics.mean(statistics.mean(v for r in log[-n:] if (v := r[key]) == v) for log in logs[adv])

    lines = [f"Command: `python experiments/grpo_vs_ifpo.py --seeds {' '.join(map(str, a.seeds))} --steps {a.steps}`",
             f"(RL: {' '.join(RL)}; eval: {' '.join(EVAL)}; BC: {' '.join(BC)}).", "",
             table(results, groups), "",
             "Over the last 5 RL steps (mean over seeds):", "",
             "| | reward | tool-call rate, harmful | tool-call rate, sensitive |", "|---|---|---|---|"]
    for adv in ("grpo", "ifpo"):
        lines.append(f"| {adv.upper()} | {last(adv, 'reward_mean'):.2f} | {last(adv, 'tool_rate_harmful'):.2f} "
                     f"| {last(adv, 'tool_rate_sensitive'):.2f} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
