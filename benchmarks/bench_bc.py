"""Behaviour cloning: wall time and peak memory of `train.py --stage bc`, plain and --fast, or another commit.

    python benchmarks/bench_bc.py [--model M] [--rows N] [--epochs 3] [--against COMMIT] [--repeats 1]
        [--gradient-checkpointing] [--micro-batch-size K]

Each run is `train.py --stage bc` in its own process (the experiment's BC settings: batch 8,
lr 1e-4, max_total_tokens 768, on data/bc_seed.jsonl or its first --rows rows), and reports
its wall time (model loading included), its peak RSS and its final loss: on the plain path
(the default) and with --fast, the same workload, alternating so that both share the machine's
state. With --against, the same command runs from a checkout of that commit too (a temporary
git worktree, its default path). Prints figures, asserts nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = "BENCH_PEAK_KIB "
# runs train.py as `python train.py ...` would, then prints the process's peak RSS
RUNNER = (
    "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
    "runpy.run_path('train.py', run_name='__main__'); "
    f"print('{PEAK}' + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))"
)


def run_bc(tree: Path, data: Path, a, out: Path, fast: bool = False) -> dict:
    cmd = (
        [
            sys.executable,
            "-c",
            RUNNER,
            "train.py",
            "--stage",
            "bc",
            "--bc_data",
            str(data),
            "--bc_epochs",
            str(a.epochs),
            "--bc_lr",
            "1e-4",
            "--bc_batch_size",
            "8",
            "--max_total_tokens",
            "768",
            "--output_dir",
            str(out),
        ]
        + (["--model", a.model] if a.model else [])
        + (["--gradient_checkpointing", "true"] if a.gradient_checkpointing else [])
        + (["--micro_batch_size", str(a.micro_batch_size)] if a.micro_batch_size else [])
        + (["--fast", "true"] if fast else [])
        + ["--show", "false"]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"BC failed in {tree}:\n{done.stderr[-3000:]}")
    peak = next(int(line[len(PEAK) :]) for line in done.stdout.splitlines() if line.startswith(PEAK))
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "peak_gib": peak / 2**20, "final_loss": losses[-1], "steps": len(losses)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--rows", type=int, default=None, help="first N rows of data/bc_seed.jsonl; default: all")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--against", default=None, help="a commit to compare with, e.g. HEAD~5")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="BC with --gradient_checkpointing true"
    )
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="samples per forward/backward (default: the batch)"
    )
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "bc.jsonl"
        lines = (ROOT / "data/bc_seed.jsonl").read_text().splitlines(keepends=True)
        data.write_text("".join(lines[: a.rows] if a.rows else lines))
        runs = {"plain": (ROOT, False), "--fast": (ROOT, True)}  # name: (tree, --fast)
        if a.against:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "against"), a.against],
                check=True,
                capture_output=True,
            )
            runs[a.against] = (tmp / "against", False)
        results: dict[str, list[dict]] = {name: [] for name in runs}
        try:
            for rep in range(a.repeats):
                for name, (tree, fast) in runs.items():
                    r = run_bc(tree, data, a, tmp / f"out-{rep}-{len(results[name])}-{name.strip('-')}", fast)
                    results[name].append(r)
                    print(
                        f"{name}: {r['seconds']:.0f} s, peak RSS {r['peak_gib']:.2f} "
                        f"GiB ({r['peak_gib'] * 2**30 / 1e9:.2f} GB), "
                        f"{r['steps']} steps, "
                        f"final loss {r['final_loss']:.3f}",
                        flush=True,
                    )
        finally:
            if a.against:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "against")],
                    capture_output=True,
                )
    print(
        f"BC of {len(lines[: a.rows] if a.rows else lines)} rows x {a.epochs} epochs, batch 8 (micro-batch "
        f"{a.micro_batch_size or 8}), gradient checkpointing "
        f"{a.gradient_checkpointing}, {os.cpu_count()} CPUs:"
    )
    for name, rs in results.items():
        print(
            f"  {name:>12}: median {statistics.median(r['seconds'] for r in rs):.0f} s, "
            f"peak RSS {max(r['peak_gib'] for r in rs):.2f} GiB "
            f"({max(r['peak_gib'] for r in rs) * 2**30 / 1e9:.2f} GB)"
        )
    seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in results.items()}
    peak = {name: max(r["peak_gib"] for r in rs) for name, rs in results.items()}
    print(
        f"  --fast / plain: time {seconds['--fast'] / seconds['plain']:.3f}, "
        f"peak RSS {peak['--fast'] / peak['plain']:.3f}"
    )
    if a.against:
        print(f"  plain, speed-up over {a.against}: {seconds[a.against] / seconds['plain']:.2f}x")


if __name__ == "__main__":
    main()
