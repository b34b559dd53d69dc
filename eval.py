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

Prompts that leave no room for one full turn (max_total_tokens - max_new_tokens tokens, with the system
prompt) are dropped with a printed count; the same prompts are kept for every model.

Outputs: OUTPUT_DIR/results.json (the table) and OUTPUT_DIR/samples-<model>.jsonl (every rollout), both
rewritten after each benchmark, so a failure later keeps what was scored ("complete": false until the end).
"""
from __future__ import annotations

import gc
import json
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import ascl
import plumbing
import sources

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


METRIC = {"harmful": "safety_rate", "benign": "over_refusal_rate", "math": "accuracy"}


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
                "response_tokens": sum(t.action_mask), "messages": chat.messages(t.prompt, t.turns, t.tool_results),
            })
        bar.update(len(chunk))
    return samples


def model_tag(name: str) -> str:
    """A file-name-safe tag: 'Qwen/Qwen3-4B' -> 'Qwen_Qwen3-4B'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def check_settings(args: Args):
    """Refuse, in one line, settings that would crash mid-run; before any data or model loads."""
    if args.math_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise SystemExit("--math_samples, --batch_size and --limit must be at least 1")
    if not 0 < args.max_new_tokens < args.max_total_tokens:
        raise SystemExit("--max_new_tokens must be at least 1 and below --max_total_tokens (a prompt needs room "
                         "for one full turn)")
    if args.max_tool_calls < 0:
        raise SystemExit("--max_tool_calls must be 0 or more")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise SystemExit(f"--output_dir {args.output_dir} is a file; give a folder")
    if args.math_samples > 1 and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise SystemExit("sampling math answers needs --temperature > 0 and 0 < --top_p <= 1")
    tags = [model_tag(m) for m in args.model]
    if len(set(tags)) < len(tags):
        raise SystemExit(f"two --model entries share an output name: {args.model}")


def fit_prompts(benchmarks: dict[str, list[dict]], chats: dict[str, ascl.ChatFormat], args: Args) -> dict:
    """Over-long prompts dropped (plumbing.drop_long_prompts, the rule train.py uses too) under every
    model's tokenizer, so that every model answers the same prompts."""
    for name, chat in chats.items():
        for bench, rows in benchmarks.items():
            suffix = MATH_INSTRUCTION if rows[0]["label"] == "math" else ""
            benchmarks[bench] = plumbing.drop_long_prompts(rows, chat, args.max_new_tokens, args.max_total_tokens,
                                                       f"{bench} ({name})", suffix)
    return benchmarks


def save_results(out: Path, args: Args, results: dict, complete: bool):
    """results.json, rewritten atomically after every benchmark: a later failure loses nothing scored.
    "complete" is false until every model has answered every benchmark."""
    plumbing.write_atomic(out / "results.json", json.dumps({"settings": asdict(args), "complete": complete,
                                                        "models": results}, indent=2))


# ----------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args.model = args.model or ["embedded"]
    args.data = args.data or DEFAULT_DATA
    check_settings(args)
    benchmarks = sources.load_benchmarks(args.data, args.limit)  # bad data stops us before any model loads
    chats = {name: ascl.ChatFormat(plumbing.load_tokenizer(None if name == "embedded" else name)) for name in args.model}
    benchmarks = fit_prompts(benchmarks, chats, args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = ascl.make_judge(args.judge, device, args.batch_size)
    rule_book = ascl.RuleBook.from_json()

    results = {}
    for name, chat in chats.items():
        tqdm.write(f"loading {name}")
        model = plumbing.load_model(None if name == "embedded" else name,
                                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.to(device)
        set_seed(args.seed)  # every model sees the same sampling randomness
        scores, samples = {}, []
        for bench, rows in benchmarks.items():
            with tqdm(total=len(rows), desc=f"{name} | {bench}") as bar:
                s = evaluate(model, chat, rule_book, judge, bench, rows, args, bar)
            scores[bench] = score(s, rows[0]["label"], len(rows))
            samples += s
            results[name] = summarise(scores)
            plumbing.write_atomic(out / f"samples-{model_tag(name)}.jsonl",
                              "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples))
            save_results(out, args, results, complete=False)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    save_results(out, args, results, complete=True)
    print(format_table(results))
    print(f"results -> {out / 'results.json'}, samples -> {out}/samples-*.jsonl")
    return results


def parse_args(argv: list[str] | None = None) -> Args:
    return HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)[0]


if __name__ == "__main__":
    main(parse_args())
