"""Where the data comes from: RL prompts, behaviour-cloning conversations, eval benchmarks.

Local JSONL files in the bundled shapes, or hub datasets by name (`datasets`, when a hub is
reachable) mapped to the same rows. One registry for both, so training data and eval sets are
disjoint by construction (checked at import):
  load_rl_prompts        {"prompt", "label": harmful | sensitive}, mixed at --harmful_fraction
  load_bc_conversations  {"prompt", "label", "turns", "tool_results"}
  load_benchmarks        {name: [{"prompt", "label": harmful | benign | math, "answer"?}]}
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ascl
import plumbing

# ----------------------------------------------------------------------------- training data
# hub datasets with a known column mapping: name[:config] -> (config, prompt column, label).
# None of them is an eval benchmark (BENCHMARKS below): or-bench-hard-1k is eval-only, checked at import.
HUB_PROMPTS = {
    "OpenSafetyLab/Salad-Data:base_set": ("base_set", "question", "harmful"),
    "OpenSafetyLab/Salad-Data:attack_enhanced_set": ("attack_enhanced_set", "augq", "harmful"),
    "bench-llm/or-bench:or-bench-80k": ("or-bench-80k", "prompt", "sensitive"),
}
TRAIN_LABELS = ("harmful", "sensitive")
LABEL_ALIASES = {"benign": "sensitive"}  # so eval-shaped files (harmful / benign) work as training data
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def is_local(source: str) -> bool:
    """Whether a data source names a local file rather than a hub dataset: it exists, has a data file's
    suffix, or starts like a path (/ . ~). A missing local file is then reported as such."""
    return Path(source).suffix in FILE_SUFFIXES or Path(source).exists() or source.startswith(("/", ".", "~"))


def load_rl_prompts(
    sources: list[str], harmful_fraction: float, max_prompts: int | None, seed: int
) -> list[dict]:
    """{"prompt", "label"} rows from local files (.jsonl, .json, .csv, .tsv: read_rows) and known hub
    datasets, mixed so that `harmful_fraction` of them are harmful (the larger pool is subsampled).
    Every local row is checked (plumbing.check_row); label "benign" is read as "sensitive"."""
    rows = []
    for src in sources:
        if is_local(src):
            rows += [
                plumbing.check_row(
                    {"prompt": r["prompt"], "label": r["label"]},
                    TRAIN_LABELS,
                    f"{src}: row {n}",
                    LABEL_ALIASES,
                )
                for n, r in enumerate(read_rows(src, ("prompt", "label")), 1)
            ]
            continue
        if src not in HUB_PROMPTS:
            raise SystemExit(
                f"unknown RL data {src!r}: give a local file (.jsonl, .json, .csv, .tsv) or "
                f"one of {sorted(HUB_PROMPTS)}"
            )
        from datasets import load_dataset

        config, column, label = HUB_PROMPTS[src]
        ds = load_dataset(src.split(":")[0], config, split="train")
        rows += [{"prompt": p, "label": label} for p in ds[column] if isinstance(p, str) and p.strip()]
    rng = random.Random(seed)
    harmful = [r for r in rows if r["label"] == "harmful"]
    sensitive = [r for r in rows if r["label"] == "sensitive"]
    if harmful and sensitive and 0 < harmful_fraction < 1:
        ratio = harmful_fraction / (1 - harmful_fraction)
        if len(harmful) > ratio * len(sensitive):
            harmful = rng.sample(harmful, max(1, round(ratio * len(sensitive))))
        else:
            sensitive = rng.sample(sensitive, max(1, round(len(harmful) / ratio)))
    rows = harmful + sensitive
    rng.shuffle(rows)
    return rows[:max_prompts] if max_prompts else rows


def seed_row_to_conversation(row: dict, rule_book: ascl.RuleBook) -> tuple[list[str], list[list[str]]]:
    """A bundled BC row -> (model turns, tool results); the tool result comes from the real rule book.

    {"think": "Risky.", "query": "bombs", "think_after": "Forbidden.", "answer": "No."} ->
    turns ['<think>\\nRisky.\\n<tool_call>...</tool_call>', 'Forbidden.\\n</think>\\n\\nNo.'],
    tool results [[rule_book.retrieve_policy("bombs")]]
    """
    if not row.get("query"):
        return [f"<think>\n{row['think']}\n</think>\n\n{row['answer']}"], []
    call = json.dumps({"name": ascl.TOOL_NAME, "arguments": {"query": row["query"]}})
    turns = [
        f"<think>\n{row['think']}\n<tool_call>\n{call}\n</tool_call>",
        f"{row['think_after']}\n</think>\n\n{row['answer']}",
    ]
    return turns, [[rule_book.retrieve_policy(row["query"])]]


def with_rules_recalled(conversation: dict) -> dict:
    """The baseline ASCL argues against, context distillation (docs/method.md section 3.3): the same
    conversation with each retrieved rule written into the reasoning as if recalled from memory,
    and no tool call, so the rules are trained into the weights and tied to the decision.

    >>> c = {"prompt": "p", "label": "harmful",
    ...      "turns": ['<think>\\nRisky.\\n<tool_call>\\n{}\\n</tool_call>',
    ...                'Forbidden.\\n</think>\\n\\nNo.'],
    ...      "tool_results": [["Result 1\\nSimilarity: 80.0%\\nContent: Bombs."]]}
    >>> with_rules_recalled(c)["turns"]
    ['<think>\\nRisky.\\nI recall the safety rule: Bombs.\\nForbidden.\\n</think>\\n\\nNo.']
    """
    text = ""
    for k, turn in enumerate(conversation["turns"]):
        text += (
            ascl.CALL_RE.sub("", turn).rstrip("\n") + "\n" if k < len(conversation["tool_results"]) else turn
        )
        for result in conversation["tool_results"][k] if k < len(conversation["tool_results"]) else []:
            rule = re.search(r"Content: (.*)", result)
            if rule:
                text += f"I recall the safety rule: {rule.group(1)}\n"
    return {**conversation, "turns": [text], "tool_results": []}


def check_seed_row(row: dict, where: str):
    """A bundled-shape BC row: 'think' and 'answer' are non-empty text; a row that consults the rule
    book has both 'query' and 'think_after', a direct answer has neither (absent, null or "")."""

    def text(key):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise SystemExit(f"{where}: {key!r} must be a string, not {value!r:.60}")
        return bool(value and value.strip())

    if not (text("think") and text("answer")):
        raise SystemExit(f"{where}: 'think' and 'answer' must be non-empty text")
    if text("query") != text("think_after"):
        has, lacks = ("query", "think_after") if text("query") else ("think_after", "query")
        raise SystemExit(
            f"{where}: has {has!r} but no {lacks!r}; a row that consults the rule book needs "
            f"both, a direct answer neither"
        )


def is_texts(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def load_bc_conversations(path: str, rule_book: ascl.RuleBook) -> list[dict]:
    """BC rows as {"prompt", "label", "turns", "tool_results"}: either that shape (written by
    collect.py and refine.py) or the bundled seed shape (think / query / think_after / answer). Every row is
    checked; an error names the row."""
    rows = plumbing.read_jsonl(path, ("prompt", "label"))
    out = []
    for n, r in enumerate(rows, 1):
        where = f"{path}: row {n}"
        plumbing.check_row(r, TRAIN_LABELS, where, LABEL_ALIASES)
        if "turns" in r:
            turns, results = r["turns"], r.get("tool_results", [])
            if not (
                turns and is_texts(turns) and isinstance(results, list) and all(is_texts(x) for x in results)
            ):
                raise SystemExit(
                    f"{where}: 'turns' must be a non-empty list of strings and 'tool_results' "
                    f"a list of lists of strings"
                )
        elif "answer" in r and "think" in r:
            check_seed_row(r, where)
            turns, results = seed_row_to_conversation(r, rule_book)
        else:
            raise SystemExit(f"{where}: a BC row needs 'turns' (+ 'tool_results') or 'think' + 'answer'")
        if len(results) != len(turns) - 1:
            raise SystemExit(f"{where}: {len(turns)} turns need {len(turns) - 1} tool results")
        out.append({"prompt": r["prompt"], "label": r["label"], "turns": turns, "tool_results": results})
    return out


# ----------------------------------------------------------------------------- eval benchmarks
EVAL_LABELS = ("harmful", "benign", "math")


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K's worked solution -> its final number.

    >>> gsm8k_final_answer("She pays 2*3=6.\\n#### 1,206")
    '1206'
    """
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
    "wildjailbreak-harmful": Benchmark(
        "allenai/wildjailbreak",
        "harmful",
        "adversarial",
        "eval",  # 2000, gated
        keep=("data_type", "adversarial_harmful"),
        load_kwargs=WILDJAILBREAK_TSV,
    ),
    "jbb-harmful": Benchmark(
        "JailbreakBench/JBB-Behaviors", "harmful", "Goal", "behaviors", split="harmful"
    ),  # 100
    "wildguardtest-harmful": Benchmark(
        "allenai/wildguardmix",
        "harmful",
        config="wildguardtest",
        split="test",
        keep=("prompt_harm_label", "harmful"),
    ),  # 754, gated
    "xstest-unsafe": Benchmark("Paul/XSTest", "harmful", keep=("label", "unsafe")),  # 200
    # over-refusal: benign prompts
    "xstest-safe": Benchmark("Paul/XSTest", "benign", keep=("label", "safe")),  # 250
    "wildjailbreak-benign": Benchmark(
        "allenai/wildjailbreak",
        "benign",
        "adversarial",
        "eval",  # 210, gated
        keep=("data_type", "adversarial_benign"),
        load_kwargs=WILDJAILBREAK_TSV,
    ),
    "wildguardtest-benign": Benchmark(
        "allenai/wildguardmix",
        "benign",
        config="wildguardtest",
        split="test",
        keep=("prompt_harm_label", "unharmful"),
    ),  # 945, gated
    "jbb-benign": Benchmark(
        "JailbreakBench/JBB-Behaviors", "benign", "Goal", "behaviors", split="benign"
    ),  # 100
    "oktest": Benchmark("csv", "benign", load_kwargs={"data_files": OKTEST_URL}),  # 300, not on the hub
    "or-bench-hard-1k": Benchmark("bench-llm/or-bench", "benign", config="or-bench-hard-1k"),  # 1319
    # reasoning
    "gsm8k": Benchmark(
        "openai/gsm8k",
        "math",
        "question",
        "main",
        "test",
        answer_column="answer",
        answer_fn=gsm8k_final_answer,
    ),  # 1319
    "math-500": Benchmark(
        "HuggingFaceH4/MATH-500", "math", "problem", split="test", answer_column="answer"
    ),  # 500
}


def read_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a local file, as dicts: .csv / .tsv (a header line, then one row a line), .json (a JSON
    array of objects, or one object a line) or anything else as JSON lines. Each problem (missing
    file, a folder, not UTF-8, not CSV or JSON, no rows, a missing `required` column) is one line
    naming the file."""
    path = Path(path)
    if path.suffix in (".csv", ".tsv"):
        text = plumbing.read_text(path)
        try:
            delimiter = "\t" if path.suffix == ".tsv" else ","
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
            rows = list(reader)
        except csv.Error as e:  # a NUL byte, a field over csv's size limit
            raise SystemExit(
                f"{path}:{reader.reader.line_num}: not valid {path.suffix[1:].upper()} ({e})"
            ) from None
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}: no column(s) {missing} in the header line {reader.fieldnames}")
    elif path.suffix == ".json" and (text := plumbing.read_text(path)).lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise SystemExit(f"{path}: item {n} of the array is not a JSON object")
            missing = [c for c in required if c not in row]
            if missing:
                raise SystemExit(
                    f"{path}: item {n}: missing column(s) {missing}; each row needs {list(required)}"
                )
    else:
        return plumbing.read_jsonl(path, required)
    if not rows:
        raise SystemExit(f"{path} holds no rows")
    return rows


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
    """Every row well-formed (plumbing.check_row: prompt and label) and of one label; prompts stripped
    (OKTest's end in a newline)."""
    if not rows:
        raise SystemExit(f"{source} holds no rows (after filtering)")
    for n, r in enumerate(rows, 1):
        for column in ("prompt", "label") + (("answer",) if r.get("label") == "math" else ()):
            if column not in r:
                raise SystemExit(
                    f"{source}: row {n} has no column {column!r}; each row needs prompt, label "
                    f"(and answer when the label is math)"
                )
        plumbing.check_row(r, EVAL_LABELS, f"{source}: row {n}")
        if r["label"] == "math":
            r["answer"] = str(r["answer"]).strip()
    labels = sorted({r["label"] for r in rows})
    if len(labels) > 1:
        raise SystemExit(
            f"{source} mixes labels {labels}; give one file per label (each is scored differently)"
        )
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
    elif is_local(name_or_path):
        source = name_or_path
        rows = read_rows(name_or_path)
    else:
        raise SystemExit(
            f"unknown benchmark {name_or_path!r}: give a local .jsonl file or one of {sorted(BENCHMARKS)}"
        )
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


assert not {(name.split(":")[0], config) for name, (config, _, _) in HUB_PROMPTS.items()} & {
    (b.path, b.config) for b in BENCHMARKS.values()
}, "an RL hub source is also an eval benchmark"
