"""Rollout time: ascl.rollout on the plain path (HF generate per round) and with --fast (fast.generate_turns).

    python benchmarks/bench_rollout.py [--model M] [--prompts 8] [--group-size 2] [--max-new-tokens 64]
        [--repeats 3] [--greedy]

Both paths get the same workload: the first --prompts bundled RL prompts (half harmful), rendered
with the same chat template, --group-size rollouts each, the retrieve_policy tool, --max-new-tokens
per turn. Each path runs in its own process (so that its peak RSS is its own), the two alternating,
each timing --repeats rollouts after one warm-up. Sampled rollouts write different tokens on the two
paths; --greedy makes them write the same ones (then use --group-size 1: greedy rollouts of one prompt
are all alike). Reported per path: seconds per rollout call, tokens the model wrote, tokens per
second, the tool-call rate, peak RSS; then the medians and the ratio fast / plain. Prints figures,
asserts nothing.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = "BENCH_RESULT "


def workload(a, chat) -> tuple[list[str], list[str]]:
    lines = (ROOT / "data/rl_prompts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    harmful = [r for r in rows if r["label"] == "harmful"][: a.prompts // 2]
    rows = harmful + [r for r in rows if r["label"] != "harmful"][: a.prompts - len(harmful)]
    return [r["prompt"] for r in rows], [r["label"] for r in rows]


def worker(a) -> dict:
    """Time --repeats rollouts on one path (a.worker: plain or fast), after one warm-up."""
    import torch

    import ascl
    import fast
    import plumbing

    torch.manual_seed(a.seed)
    model, tokenizer = plumbing.load_policy(a.model)
    chat, book = ascl.ChatFormat(tokenizer), ascl.RuleBook.from_json()
    prompts, labels = workload(a, chat)
    generate = fast.generate_turns if a.worker == "fast" else None
    runs = []
    for rep in range(a.repeats + 1):  # the first one warms up and is not counted
        t0 = time.perf_counter()
        trajs = ascl.rollout(
            model,
            chat,
            book,
            prompts,
            labels,
            group_size=a.group_size,
            max_new_tokens=a.max_new_tokens,
            do_sample=not a.greedy,
            generate=generate,
        )
        seconds = time.perf_counter() - t0
        if rep:
            runs.append(
                {
                    "seconds": seconds,
                    "tokens": sum(sum(t.action_mask) for t in trajs),
                    "tool_rate": statistics.mean(t.used_tool for t in trajs),
                    "rounds": max(len(t.turns) for t in trajs),
                }
            )
    return {
        "runs": runs,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "prompt_tokens": statistics.mean(len(chat.prompt_ids(p)) for p in prompts),
    }


def run_worker(path: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", path] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("worker", "greedy", "model")
    ]
    cmd += ["--greedy"] * a.greedy + (["--model", a.model] if a.model else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise SystemExit(f"the {path} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--greedy", action="store_true", help="greedy rollouts: the same tokens on both paths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("plain", "fast"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(RESULT + json.dumps(worker(a)), flush=True)
        return

    import torch

    results = {"plain": [], "fast": []}
    peaks = {"plain": [], "fast": []}
    for _ in range(2 if a.repeats > 1 else 1):  # each path's process twice, alternating
        for path in results:
            r = run_worker(path, a)
            results[path] += r["runs"]
            peaks[path].append(r["peak_mib"])
            for run in r["runs"]:
                print(
                    f"{path:>5}: {run['seconds']:6.2f} s, {run['tokens']} tokens "
                    f"({run['tokens'] / run['seconds']:.1f} tok/s), tool-call rate {run['tool_rate']:.2f}, "
                    f"{run['rounds']} round(s); peak RSS {r['peak_mib']:.0f} MiB",
                    flush=True,
                )
    print(
        f"workload: {a.prompts} prompts x {a.group_size} rollouts ({r['prompt_tokens']:.0f} prompt tokens "
        f"on average), max {a.max_new_tokens} new tokens per turn, {'greedy' if a.greedy else 'sampled'}; "
        f"CPU, {torch.get_num_threads()} threads; model {a.model or 'embedded SmolLM2-135M'}"
    )
    med = {path: statistics.median(x["seconds"] for x in runs) for path, runs in results.items()}
    tps = {
        path: statistics.median(x["tokens"] / x["seconds"] for x in runs) for path, runs in results.items()
    }
    for path in results:
        print(
            f"  {path:>5}: median {med[path]:.2f} s per rollout call, {tps[path]:.1f} tok/s, peak RSS "
            f"{max(peaks[path]):.0f} MiB"
        )
    print(
        f"  fast / plain: time {med['fast'] / med['plain']:.3f}, tokens per second "
        f"{tps['fast'] / tps['plain']:.3f}, peak RSS {max(peaks['fast']) / max(peaks['plain']):.3f}"
    )


if __name__ == "__main__":
    main()
