"""Evaluate models on safety, over-refusal and reasoning benchmarks (docs/method.md section 6).

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

Math answers are read by scoring.extract_answer (the rule is in scoring.py): the value on the last
'Answer:' line of the final text the model wrote, else its last number.

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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import ascl
import guard
import plumbing
import sources
from scoring import answers_match, extract_answer, final_text, format_table, score, summarise

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = [str(HERE / f"data/eval_{kind}.jsonl") for kind in ("harmful", "benign", "math")]


@dataclass
class Args:
    model: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",  # both --model A B and --model A --model B
            "help": "hub ids, local folders or .gguf files; 'embedded' = SmolLM2-135M (the default)",
        },
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",
            "help": (
                "benchmark names (see BENCHMARKS), NAME=FILE, or local .jsonl files; "
                "default: data/eval_*.jsonl"
            ),
        },
    )
    output_dir: str = "outputs/eval"
    judge: str = field(
        default="offline",
        metadata={"help": "offline | a Qwen3Guard-Gen hub id (paper: Qwen/Qwen3Guard-Gen-8B)"},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "per model turn"})
    max_tool_calls: int = 2
    max_total_tokens: int = 2048
    batch_size: int = field(
        default=16, metadata={"help": "rollouts decoded together, answers judged together"}
    )
    limit: int | None = field(default=None, metadata={"help": "first N rows of each benchmark; default: all"})
    math_samples: int = field(
        default=1, metadata={"help": "k of avg@k on math sets; 1 = greedy (paper: 16 MATH-500, 8 GSM8K)"}
    )
    temperature: float = field(default=0.6, metadata={"help": "math sampling, used when math_samples > 1"})
    top_p: float = 0.95
    seed: int = 0
    fast: bool = field(
        default=False, metadata={"help": "fast.py's decoding: the same tokens as the plain path, sooner"}
    )


MATH_INSTRUCTION = "\n\nSolve the problem. End your reply with a final line of the form 'Answer: <number>'."


# ----------------------------------------------------------------------------- rollouts
def evaluate(
    model, chat, rule_book, judge, bench: str, rows: list[dict], args: Args, bar, generate=None
) -> list[dict]:
    """Roll out every prompt of one benchmark and score each rollout: one sample dict per rollout.

    generate: None for ascl.generate_turns (one batched model.generate), or an equal replacement
    (fast.generate_turns under --fast)."""
    label = rows[0]["label"]
    is_math = label == "math"
    k = args.math_samples if is_math else 1
    sampled = k > 1  # greedy for safety and over-refusal, and for math at k = 1
    samples = []
    per_call = max(1, args.batch_size // k)  # prompts per rollout call: at most batch_size rollouts at once
    for s in range(0, len(rows), per_call):
        chunk = rows[s : s + per_call]
        prompts = [r["prompt"] + MATH_INSTRUCTION if is_math else r["prompt"] for r in chunk]
        trajs = ascl.rollout(
            model,
            chat,
            rule_book,
            prompts,
            [label] * len(chunk),
            group_size=k,
            max_new_tokens=args.max_new_tokens,
            max_tool_calls=args.max_tool_calls,
            max_total_tokens=args.max_total_tokens,
            do_sample=sampled,
            temperature=args.temperature,
            top_p=args.top_p,
            generate=generate,
        )
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
            samples.append(
                {
                    "benchmark": bench,
                    "prompt": r["prompt"],
                    "label": label,
                    "answer": t.answer,
                    "safe": v.safe if v else None,
                    "refused": v.refused if v else None,
                    "gold": r.get("answer"),
                    "extracted": extracted,
                    "correct": answers_match(extracted, r["answer"]) if is_math else None,
                    "used_tool": t.used_tool,
                    "num_tool_calls": t.num_tool_calls,
                    "truncated": t.truncated,
                    "response_tokens": sum(t.action_mask),
                    "messages": chat.messages(t.prompt, t.turns, t.tool_results),
                }
            )
        bar.update(len(chunk))
    return samples


def model_tag(name: str) -> str:
    """A file-name-safe tag: 'Qwen/Qwen3-4B' -> 'Qwen_Qwen3-4B'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def check_settings(args: Args):
    """Refuse, in one line, settings that would crash mid-run and models that cannot load (a missing
    folder, a file given as a folder, a judge that is neither 'offline', a folder nor a hub id);
    before any data or model loads. The data files are checked next (sources.load_benchmarks)."""
    if args.math_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise SystemExit("--math_samples, --batch_size and --limit must be at least 1")
    if not 0 < args.max_new_tokens < args.max_total_tokens:
        raise SystemExit(
            "--max_new_tokens must be at least 1 and below --max_total_tokens (a prompt needs room "
            "for one full turn)"
        )
    if args.max_tool_calls < 0:
        raise SystemExit("--max_tool_calls must be 0 or more")
    plumbing.check_output(args.output_dir, "--output_dir", folder=True)
    if args.math_samples > 1 and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise SystemExit("sampling math answers needs --temperature > 0 and 0 < --top_p <= 1")
    tags = [model_tag(m) for m in args.model]
    if len(set(tags)) < len(tags):
        raise SystemExit(f"two --model entries share an output name: {args.model}")
    for name in args.model:
        plumbing.check_model(None if name == "embedded" else name)
    plumbing.check_judge(args.judge)


def fit_prompts(benchmarks: dict[str, list[dict]], chats: dict[str, ascl.ChatFormat], args: Args) -> dict:
    """Over-long prompts dropped (plumbing.drop_long_prompts, the rule train.py uses too) under every
    model's tokenizer, so that every model answers the same prompts."""
    for name, chat in chats.items():
        for bench, rows in benchmarks.items():
            suffix = MATH_INSTRUCTION if rows[0]["label"] == "math" else ""
            benchmarks[bench] = plumbing.drop_long_prompts(
                rows, chat, args.max_new_tokens, args.max_total_tokens, f"{bench} ({name})", suffix
            )
    return benchmarks


def save_results(out: Path, args: Args, results: dict, complete: bool):
    """results.json, rewritten atomically after every benchmark: a later failure loses nothing scored.
    "complete" is false until every model has answered every benchmark."""
    plumbing.write_atomic(
        out / "results.json",
        json.dumps({"settings": asdict(args), "complete": complete, "models": results}, indent=2),
    )


# ----------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args.model = args.model or ["embedded"]
    args.data = args.data or DEFAULT_DATA
    check_settings(args)
    benchmarks = sources.load_benchmarks(args.data, args.limit)  # bad data stops us before any model loads
    chats = {
        name: ascl.ChatFormat(plumbing.load_tokenizer(None if name == "embedded" else name))
        for name in args.model
    }
    benchmarks = fit_prompts(benchmarks, chats, args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = guard.make_judge(args.judge, device, args.batch_size)
    rule_book = ascl.RuleBook.from_json()
    generate = None
    if args.fast:
        import fast

        generate = fast.generate_turns

    results = {}
    for name, chat in chats.items():
        tqdm.write(f"loading {name}")
        model = plumbing.load_model(
            None if name == "embedded" else name,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
        model.to(device)
        set_seed(args.seed)  # every model sees the same sampling randomness
        scores, samples = {}, []
        for bench, rows in benchmarks.items():
            with tqdm(total=len(rows), desc=f"{name} | {bench}") as bar:
                s = evaluate(model, chat, rule_book, judge, bench, rows, args, bar, generate)
            scores[bench] = score(s, rows[0]["label"], len(rows))
            samples += s
            results[name] = summarise(scores)
            plumbing.write_atomic(
                out / f"samples-{model_tag(name)}.jsonl",
                "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples),
            )
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
