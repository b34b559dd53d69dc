"""Evaluate models on safety, over-refusal and reasoning benchmarks (METHOD.md section 6).

    python eval.py                                     # embedded SmolLM2-135M on the bundled offline sets
    python eval.py --model embedded --model outputs/run/final --limit 20
    python eval.py --model M --data strongreject xstest-safe gsm8k --judge Qwen/Qwen3Guard-Gen-8B
    python eval.py --data oktest=OKTest.csv            # a benchmark's mapping applied to a local copy

Every model answers every prompt with the retrieve_policy tool available (ascl.rollout). Then:
  harmful prompts  -> safety rate %        (judge: answer safe; greedy decoding)
  benign prompts   -> over-refusal rate %  (judge: answer refused; greedy decoding)
  math problems    -> accuracy %           (the extracted answer vs the gold answer; avg@k when k > 1)
plus, per set, the tool-call rate %, the mean response length (tokens the model wrote) and the share
of rollouts with no final answer (truncated, or </think> never closed; those are judged on the last text
the model wrote, so a format error cannot hide an unsafe answer).
Every rate comes with its Wilson 95% confidence interval over the set's prompts (`<rate>_ci` in
results.json, [lo, hi] in the table).
Summary: H-avg = harmonic mean of (safety avg, 100 - over-refusal avg, reasoning avg).

Math answers (final_text, extract_answer): take the final text the model wrote, i.e. its answer after
</think>, or, if it has none (</think> never closed, or cut off), its last turn with the <think> tags
and any tool call removed; the answer is the value on the last 'Answer:' line of that text, else its
last number. The paper asks for a final 'Answer:' line (METHOD.md section 6); the fallback keeps a
small model that works a problem out but skips the line (or the think tags) from scoring 0.

--data takes names from BENCHMARKS (loaded with `datasets` from the hub), NAME=FILE (a local file
with the same columns as the hub set), or a local file in the bundled schema, one JSON object a line:
    {"prompt": str, "label": "harmful" | "benign" | "math", "answer": str (math only: the gold answer)}
One label per file. .csv and .tsv files with the same columns work too.

Outputs: OUTPUT_DIR/results.json (the table) and OUTPUT_DIR/samples-<model>.jsonl (every rollout).
"""
from __future__ import annotations

import csv
import gc
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import ascl

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = [str(HERE / f"data/eval_{kind}.jsonl") for kind in ("harmful", "benign", "math")]


@dataclass
class Args:
    model: list[str] = field(default_factory=list, metadata={
        "action": "extend",  # both --model A B and --model A --model B
        "help": "hub ids, local folders or .gguf files; 'embedded' = SmolLM2-135M (the default)"})
    data: list[str] = field(default_factory=list, metadata={
        "action": "extend",
        "help": "benchmark names (see BENCHMARKS), NAME=FILE, or local .jsonl files; default: data/eval_*.jsonl"})
    output_dir: str = "outputs/eval"
    judge: str = field(default="offline", metadata={"help": "offline | a Qwen3Guard-Gen hub id (paper: Qwen/Qwen3Guard-Gen-8B)"})
    max_new_tokens: int = field(default=256, metadata={"help": "per model turn"})
    max_tool_calls: int = 2
    max_total_tokens: int = 2048
    batch_size: int = 16
    limit: int | None = field(default=None, metadata={"help": "first N rows of each benchmark; default: all"})
    math_samples: int = field(default=1, metadata={"help": "k of avg@k on math sets; 1 = greedy (paper: 16 MATH-500, 8 GSM8K)"})
    temperature: float = field(default=0.6, metadata={"help": "math sampling, used when math_samples > 1"})
    top_p: float = 0.95
    seed: int = 0


# ----------------------------------------------------------------------------- benchmarks
LABELS = ("harmful", "benign", "math")
METRIC = {"harmful": "safety_rate", "benign": "over_refusal_rate", "math": "accuracy"}


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K's worked solution -> its final number: 'She pays 2*3=6.\\n#### 1,206' -> '1206'."""
    return solution.split("####")[-1].strip().replace(",", "")


@dataclass
class Benchmark:
    """Where a benchmark lives and how its rows map to {"prompt", "label", "answer"}."""

    path: str  # hub id, or a `datasets` loader such as "csv"
    label: str  # harmful | benign | math
    column: str = "prompt"  # the prompt column
    config: str | None = None
    split: str = "train"
    keep: tuple[str, str] | None = None  # keep only rows where row[keep[0]] == keep[1]
    answer_column: str | None = None  # math: the gold answer
    answer_fn: Callable[[str], str] | None = None  # answer column -> final answer
    load_kwargs: dict = field(default_factory=dict)


WILDJAILBREAK_TSV = {"delimiter": "\t", "keep_default_na": False}
OKTEST_URL = "https://raw.githubusercontent.com/InvokerStark/OverKill/main/data/OKTest.csv"

BENCHMARKS = {  # name -> spec; the sizes are the full sets
    # safety: harmful prompts
    "strongreject": Benchmark("walledai/StrongREJECT", "harmful"),  # 313, gated
    "wildjailbreak-harmful": Benchmark("allenai/wildjailbreak", "harmful", "adversarial", "eval",  # 2000, gated
                                       keep=("data_type", "adversarial_harmful"), load_kwargs=WILDJAILBREAK_TSV),
    "jbb-harmful": Benchmark("JailbreakBench/JBB-Behaviors", "harmful", "Goal", "behaviors", split="harmful"),  # 100
    "wildguardtest-harmful": Benchmark("allenai/wildguardmix", "harmful", config="wildguardtest", split="test",
                                       keep=("prompt_harm_label", "harmful")),  # 754, gated
    "xstest-unsafe": Benchmark("Paul/XSTest", "harmful", keep=("label", "unsafe")),  # 200
    # over-refusal: benign prompts
    "xstest-safe": Benchmark("Paul/XSTest", "benign", keep=("label", "safe")),  # 250
    "wildjailbreak-benign": Benchmark("allenai/wildjailbreak", "benign", "adversarial", "eval",  # 210, gated
                                      keep=("data_type", "adversarial_benign"), load_kwargs=WILDJAILBREAK_TSV),
    "wildguardtest-benign": Benchmark("allenai/wildguardmix", "benign", config="wildguardtest", split="test",
                                      keep=("prompt_harm_label", "unharmful")),  # 945, gated
    "jbb-benign": Benchmark("JailbreakBench/JBB-Behaviors", "benign", "Goal", "behaviors", split="benign"),  # 100
    "oktest": Benchmark("csv", "benign", load_kwargs={"data_files": OKTEST_URL}),  # 300, not on the hub
    "or-bench-hard-1k": Benchmark("bench-llm/or-bench", "benign", config="or-bench-hard-1k"),  # 1319
    # reasoning
    "gsm8k": Benchmark("openai/gsm8k", "math", "question", "main", "test",
                       answer_column="answer", answer_fn=gsm8k_final_answer),  # 1319
    "math-500": Benchmark("HuggingFaceH4/MATH-500", "math", "problem", split="test", answer_column="answer"),  # 500
}


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl / .json / .csv / .tsv file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"data file not found: {path}")
    if path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    return ascl.read_jsonl(path)


def load_from_hub(name: str, spec: Benchmark) -> list[dict]:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.path, spec.config, split=spec.split, **spec.load_kwargs)
    except Exception as e:  # offline, gated, renamed: say which set and how to get around it
        raise SystemExit(
            f"could not load benchmark {name!r} ({spec.path}) with `datasets`: {type(e).__name__}: {e}\n"
            f"Gated sets need `hf auth login` and accepted terms; offline, pass a local copy as {name}=FILE."
        ) from e
    return ds.to_list()


def map_rows(rows: list[dict], spec: Benchmark, source: str) -> list[dict]:
    """Hub-shaped rows -> {"prompt", "label", "answer"?}: filter, pick the prompt column, extract the gold."""
    needed = [spec.column]
    if spec.keep:
        needed.append(spec.keep[0])
    if spec.answer_column:
        needed.append(spec.answer_column)
    for n, row in enumerate(rows, 1):
        missing = [c for c in needed if c not in row]
        if missing:
            raise SystemExit(f"{source}: row {n} has no column(s) {missing}; it has {sorted(row)}")
    if spec.keep:
        column, value = spec.keep
        rows = [r for r in rows if r[column] == value]
    out = []
    for r in rows:
        item = {"prompt": r[spec.column], "label": spec.label}
        if spec.answer_column:
            gold = str(r[spec.answer_column])
            item["answer"] = spec.answer_fn(gold) if spec.answer_fn else gold
        out.append(item)
    return out


def check_rows(rows: list[dict], source: str) -> list[dict]:
    """Every row well-formed and of one label; prompts stripped (OKTest's end in a newline)."""
    if not rows:
        raise SystemExit(f"{source} holds no rows (after filtering)")
    for n, r in enumerate(rows, 1):
        for column in ("prompt", "label") + (("answer",) if r.get("label") == "math" else ()):
            if column not in r:
                raise SystemExit(f"{source}: row {n} has no column {column!r}; each row needs prompt, label "
                                 f"(and answer when the label is math)")
        if r["label"] not in LABELS:
            raise SystemExit(f"{source}: row {n} has label {r['label']!r}; labels must be one of {list(LABELS)}")
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise SystemExit(f"{source}: row {n} has an empty prompt")
        r["prompt"] = r["prompt"].strip()
        if r["label"] == "math":
            r["answer"] = str(r["answer"]).strip()
    labels = sorted({r["label"] for r in rows})
    if len(labels) > 1:
        raise SystemExit(f"{source} mixes labels {labels}; give one file per label (each is scored differently)")
    return rows


def load_benchmark(name_or_path: str, limit: int | None = None, data_files: str | None = None) -> list[dict]:
    """A benchmark as rows {"prompt", "label", "answer" (math only)}, first `limit` rows.

    name_or_path: a BENCHMARKS name (from the hub, or from `data_files`, a local file with the hub
    set's columns) or a local file in the bundled schema.
    """
    if name_or_path in BENCHMARKS:
        spec = BENCHMARKS[name_or_path]
        source = data_files or f"{name_or_path} ({spec.path})"
        rows = read_rows(data_files) if data_files else load_from_hub(name_or_path, spec)
        rows = map_rows(rows, spec, source)
    elif data_files is not None:
        raise SystemExit(f"unknown benchmark {name_or_path!r}: known names are {sorted(BENCHMARKS)}")
    elif Path(name_or_path).suffix in (".jsonl", ".json", ".csv", ".tsv") or Path(name_or_path).exists():
        source = name_or_path
        rows = read_rows(name_or_path)
    else:
        raise SystemExit(f"unknown benchmark {name_or_path!r}: give a local .jsonl file or one of {sorted(BENCHMARKS)}")
    rows = check_rows(rows, source)
    return rows[:limit] if limit else rows


def load_benchmarks(sources: list[str], limit: int | None) -> dict[str, list[dict]]:
    """--data entries -> {display name: rows}. NAME=FILE applies NAME's mapping to a local file."""
    out = {}
    for src in sources:
        name, _, data_files = src.partition("=") if "=" in src and not Path(src).exists() else (src, "", "")
        display = name if name in BENCHMARKS else Path(name).stem
        if display in out:
            raise SystemExit(f"benchmark {display!r} given twice in --data")
        out[display] = load_benchmark(name, limit, data_files or None)
    return out


# ----------------------------------------------------------------------------- math answers
MATH_INSTRUCTION = "\n\nSolve the problem. End your reply with a final line of the form 'Answer: <number>'."
_ANSWER_LINE = re.compile(r"^[ \t*#>_]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(.*?)[ \t*_]*$", re.IGNORECASE | re.MULTILINE)


_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_TOOL_CALL = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)


def final_text(trajectory: ascl.Trajectory) -> str:
    """The last text the model wrote: its answer, or else (no </think>, or cut off) its last turn
    with the <think> tags and any tool call removed.

    A small model often answers without closing </think>; its reply is still its reply.
    turns ['<think>12 + 15 = 27</think>\\n\\nAnswer: 27'] -> 'Answer: 27'
    turns ['<think>12 + 15 = 27, so 27 apples.']          -> '12 + 15 = 27, so 27 apples.'
    """
    if trajectory.answer is not None:
        return trajectory.answer
    last = trajectory.turns[-1] if trajectory.turns else ""
    return _TOOL_CALL.sub("", last).replace("<think>", "").replace("</think>", "").strip()


def extract_answer(text: str | None) -> str | None:
    """A math reply's final answer: the value on its last 'Answer:' line, else the last number in it.

    The 'Answer:' line is the paper's protocol (METHOD.md section 6); the last-number fallback
    (GSM8K-style) is for small models that work a problem out but skip the line. None when the
    text has neither.

    >>> extract_answer("12 + 15 = 27.\\nAnswer: 27")
    '27'
    >>> extract_answer("**Answer:** $1,234."), extract_answer("So she has 12 + 15 = 27 apples.")
    ('$1,234.', '27')
    >>> extract_answer("No idea.") is None
    True
    """
    text = text or ""
    found = [v.strip() for v in _ANSWER_LINE.findall(text)]
    if found and found[-1]:
        return found[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _unbox(s: str) -> str:
    """'\\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}' (braces balanced)."""
    start = s.find("\\boxed{")
    if start < 0:
        return s
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j]
    return s


def normalize_answer(s: str) -> str:
    """Strip the wrapping that does not change an answer's value.

    '\\boxed{\\dfrac{3}{4}}' -> '\\frac{3}{4}';  '$1,234.' -> '1234';  '\\left( 3, \\pi \\right)' -> '(3,\\pi)'
    """
    s = _unbox(s.strip())
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\[!,;: ]|\^\{?\\circ\}?|\\\$|\$", "", s)
    s = s.replace("\u2212", "-")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    return re.sub(r"\s+", "", s).rstrip(".")


def to_number(s: str) -> Fraction | None:
    """A normalised answer as an exact number: '27', '-0.5', '3/4', '\\frac{3}{4}'; None otherwise."""
    s = re.sub(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", r"\1/\2", s)
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(/[+-]?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str) -> bool:
    """Numbers compare by value, anything else as strings after normalize_answer.

    >>> answers_match("$1,234.", "1234"), answers_match("\\\\frac{1}{2}", "0.5"), answers_match("27 apples", "27")
    (True, True, False)
    """
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    pn, gn = to_number(p), to_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    return bool(p) and p == g


# ----------------------------------------------------------------------------- scores
def h_avg(safety: float | None, over_refusal: float | None, reasoning: float | None) -> float | None:
    """Harmonic mean of (safety, 100 - over_refusal, reasoning) over the components given (not None).

    Paper, IFPO on Qwen3-4B: h_avg(98.9, 6.0, 79.1) = 3 / (1/98.9 + 1/94.0 + 1/79.1) = 89.8.
    A component at 0 makes it 0; no component gives None.
    """
    parts = [x for x in (safety, None if over_refusal is None else 100 - over_refusal, reasoning) if x is not None]
    if not parts:
        return None
    if min(parts) <= 0:
        return 0.0
    return len(parts) / sum(1 / x for x in parts)


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a rate of k successes in n trials (95% at z = 1.96), as fractions.

    Unlike p ± z·se it stays inside [0, 1] and is not empty at k = 0 or k = n, which matters
    for the small sets and extreme rates (0% tool calls, 100% safe) this project reports.

    >>> [round(x, 3) for x in wilson(8, 10)]
    [0.49, 0.943]
    >>> [round(x, 3) for x in wilson(0, 20)]
    [0.0, 0.161]
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(flags, n: int) -> tuple[float, list[float]]:
    """A rate in % over rollouts and its Wilson 95% interval in %, with n = the number of prompts.

    With k rollouts per prompt (avg@k) the rollouts of one prompt are not independent, so the
    interval counts prompts, not rollouts: wider, never falsely narrow.
    """
    p = mean(flags)
    return 100 * p, [100 * x for x in wilson(p * n, n)]


def score(samples: list[dict], label: str, n: int) -> dict:
    """One benchmark's row of the table; rates in %, each with its Wilson 95% interval (`<rate>_ci`)."""
    key = {"harmful": "safe", "benign": "refused", "math": "correct"}[label]
    metric, metric_ci = rate([s[key] for s in samples], n)
    tool, tool_ci = rate([s["used_tool"] for s in samples], n)
    return {"label": label, "n": n, "samples": len(samples),
            METRIC[label]: metric, f"{METRIC[label]}_ci": metric_ci,
            "tool_call_rate": tool, "tool_call_rate_ci": tool_ci,
            # no final answer (truncated, or </think> never closed): judged on the last text it wrote
            "missing_answer_rate": 100 * mean(s["answer"] is None for s in samples),
            "mean_response_length": mean(s["response_tokens"] for s in samples)}


AVERAGES = {"harmful": "safety_avg", "benign": "over_refusal_avg", "math": "reasoning_avg"}


def summarise(benchmarks: dict[str, dict]) -> dict:
    """Averages over benchmarks of each kind, and H-avg.

    An average's interval (`<avg>_ci`) averages its benchmarks' interval bounds: exact for one
    benchmark, conservative (wider than needed) for several independent ones. H-avg has none.
    """
    out = {"benchmarks": benchmarks}
    for label, key in AVERAGES.items():
        rows = [b for b in benchmarks.values() if b["label"] == label]
        out[key] = mean(b[METRIC[label]] for b in rows)
        out[f"{key}_ci"] = [mean(b[f"{METRIC[label]}_ci"][i] for b in rows) for i in (0, 1)] if rows else None
    out["h_avg"] = h_avg(out["safety_avg"], out["over_refusal_avg"], out["reasoning_avg"])
    return out


def format_cell(value: float | None, ci: list[float] | None = None) -> str:
    """'41.7 [33.2, 50.7]': a rate with its 95% interval; 'n/a' when there is no value."""
    if value is None:
        return "n/a"
    return f"{value:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def format_table(results: dict[str, dict]) -> str:
    """Models as columns; per benchmark its metric and tool-call rate (with 95% intervals), response
    length and share of rollouts with no answer; then the averages and H-avg."""
    models = list(results)
    first = results[models[0]]["benchmarks"]
    names = {"harmful": "safety %", "benign": "over-refusal %", "math": "accuracy %"}
    lines = []
    for bench, b in first.items():
        m = METRIC[b["label"]]
        rs = [r["benchmarks"][bench] for r in results.values()]
        lines.append((f"{bench} (n={b['n']}) {names[b['label']]}", [format_cell(x[m], x.get(f"{m}_ci")) for x in rs]))
        lines.append(("  tool calls %", [format_cell(x["tool_call_rate"], x.get("tool_call_rate_ci")) for x in rs]))
        lines.append(("  response length", [format_cell(x["mean_response_length"]) for x in rs]))
        lines.append(("  no answer %", [format_cell(x["missing_answer_rate"]) for x in rs]))
    for key, title in (("safety_avg", "safety avg ↑"), ("over_refusal_avg", "over-refusal avg ↓"),
                       ("reasoning_avg", "reasoning avg ↑")):
        lines.append((title, [format_cell(r[key], r.get(f"{key}_ci")) for r in results.values()]))
    lines.append(("H-avg ↑", [format_cell(r["h_avg"]) for r in results.values()]))
    width = max(len(t) for t, _ in lines)
    cols = [max(8, len(m), *(len(v[i]) for _, v in lines)) for i, m in enumerate(models)]
    out = [" " * width + "".join(f"  {m:>{w}}" for m, w in zip(models, cols))]
    for title, values in lines:
        out.append(f"{title:<{width}}" + "".join(f"  {v:>{w}}" for v, w in zip(values, cols)))
    out.append("[a, b] = Wilson 95% confidence interval over the set's prompts")
    return "\n".join(out)


# ----------------------------------------------------------------------------- rollouts
def evaluate(model, chat, rule_book, judge, bench: str, rows: list[dict], args: Args, bar) -> list[dict]:
    """Roll out every prompt of one benchmark and score each rollout: one sample dict per rollout."""
    label = rows[0]["label"]
    is_math = label == "math"
    k = args.math_samples if is_math else 1
    sampled = k > 1  # greedy for safety and over-refusal, and for math at k = 1
    samples = []
    for s in range(0, len(rows), args.batch_size):
        chunk = rows[s:s + args.batch_size]
        prompts = [r["prompt"] + MATH_INSTRUCTION if is_math else r["prompt"] for r in chunk]
        trajs = ascl.rollout(model, chat, rule_book, prompts, [label] * len(chunk), group_size=k,
                             max_new_tokens=args.max_new_tokens, max_tool_calls=args.max_tool_calls,
                             max_total_tokens=args.max_total_tokens, do_sample=sampled,
                             temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size)
        rows_k = [r for r in chunk for _ in range(k)]  # trajectories are grouped by prompt
        if is_math:
            verdicts = [None] * len(trajs)  # reasoning is scored by its answer, not by the judge
        else:
            # a rollout with no clean answer (cut off, </think> never closed) is judged on what it
            # last wrote: counting it as a refusal would hide unsafe text behind a format error
            shown = [t.answer if t.answer is not None else (t.turns[-1] if t.turns else None) for t in trajs]
            verdicts = judge([r["prompt"] for r in rows_k], shown, [label] * len(trajs))
        for r, t, v in zip(rows_k, trajs, verdicts):
            extracted = extract_answer(final_text(t)) if is_math else None
            samples.append({
                "benchmark": bench, "prompt": r["prompt"], "label": label, "answer": t.answer,
                "safe": v.safe if v else None, "refused": v.refused if v else None,
                "gold": r.get("answer"), "extracted": extracted,
                "correct": answers_match(extracted, r["answer"]) if is_math else None,
                "used_tool": t.used_tool, "num_tool_calls": t.num_tool_calls, "truncated": t.truncated,
                "response_tokens": sum(t.action_mask), "messages": t.messages(chat.system_prompt),
            })
        bar.update(len(chunk))
    return samples


def make_judge(name: str, args: Args, device):
    return ascl.OfflineJudge() if name == "offline" else ascl.GuardJudge(name, strict=True, batch_size=args.batch_size, device=device)


def model_tag(name: str) -> str:
    """A file-name-safe tag: 'Qwen/Qwen3-4B' -> 'Qwen_Qwen3-4B'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def check_settings(args: Args):
    if args.math_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise SystemExit("--math_samples, --batch_size and --limit must be at least 1")
    if args.math_samples > 1 and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise SystemExit("sampling math answers needs --temperature > 0 and 0 < --top_p <= 1")
    tags = [model_tag(m) for m in args.model]
    if len(set(tags)) < len(tags):
        raise SystemExit(f"two --model entries share an output name: {args.model}")


# ----------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args.model = args.model or ["embedded"]
    args.data = args.data or DEFAULT_DATA
    check_settings(args)
    benchmarks = load_benchmarks(args.data, args.limit)  # bad data stops us before any model loads
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = make_judge(args.judge, args, device)
    rule_book = ascl.RuleBook.from_json()

    results = {}
    for name in args.model:
        tqdm.write(f"loading {name}")
        model, tokenizer = ascl.load_policy(None if name == "embedded" else name,
                                            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.to(device)
        chat = ascl.ChatFormat(tokenizer)
        set_seed(args.seed)  # every model sees the same sampling randomness
        scores, samples = {}, []
        for bench, rows in benchmarks.items():
            with tqdm(total=len(rows), desc=f"{name} | {bench}") as bar:
                s = evaluate(model, chat, rule_book, judge, bench, rows, args, bar)
            scores[bench] = score(s, rows[0]["label"], len(rows))
            samples += s
        results[name] = summarise(scores)
        with open(out / f"samples-{model_tag(name)}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    (out / "results.json").write_text(json.dumps({"settings": asdict(args), "models": results}, indent=2))
    print(format_table(results))
    print(f"results -> {out / 'results.json'}, samples -> {out}/samples-*.jsonl")
    return results


def parse_args(argv: list[str] | None = None) -> Args:
    return HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)[0]


if __name__ == "__main__":
    main(parse_args())
