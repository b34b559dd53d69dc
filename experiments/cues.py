"""Safety and over-refusal of eval.py's samples, split by a surface cue.

    python experiments/cues.py runs/eval_bc/samples-*.jsonl [more samples files ...]
    python experiments/cues.py --by opening runs/eval_bc/samples-*.jsonl
    python experiments/cues.py --by verdict runs/eval_bc/samples-*.jsonl
    python experiments/cues.py --by lookup runs/eval_bc/samples-*.jsonl
    python experiments/cues.py --by length runs/eval_bc/samples-*.jsonl

--by form (the default): the prompt's sentence form. A question ends with "?"; anything else
("Write a ...", "Give me ...") is a command. A model that learnt the form instead of the request
refuses one form far more often than the other: BC on training data whose refusals were mostly
commands was safe on 73% of the harmful commands and 26% of the harmful questions of the same set.

--by opening: the first two words of the model's first reasoning turn ("This asks", "This is").
If the rates differ far more between openings than between harmful and benign prompts, the
verdict was taken with the first words, before any reasoning about the request.

--by verdict: the first sentence of each of the model's turns, joined by " / " ("This request may be
harmful. / The rule applies."): with the bundled data, the verdict before and after a look-up.

--by lookup: whether the model consulted the rule book. A model that reads the retrieved rule
refuses harmful prompts after a look-up and answers benign ones; one that refuses whatever comes
back refuses both.

--by length: the prompt's length, up to 10 words or longer. BC data whose refusals are long
requests and whose direct answers are short could teach that a short request needs no look-up
(shortening 41 refusal prompts did not raise look-ups: experiments/README.md).

Rates in %, with Wilson 95% intervals over the prompts in each part.
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scoring  # noqa: E402

KEYS = {"harmful": "safe", "benign": "refused"}


def form(sample: dict) -> str:
    return "question" if sample["prompt"].rstrip().endswith("?") else "command"


def opening(sample: dict) -> str:
    first_turn = next(m["content"] for m in sample["messages"] if m["role"] == "assistant")
    return " ".join(first_turn.replace("<think>", " ").split()[:2])


def verdict(sample: dict) -> str:
    turns = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
    firsts = [re.split(r"(?<=[.!?])\s", t.replace("<think>", " ").strip(), maxsplit=1)[0] for t in turns]
    return " / ".join(firsts)


def lookup(sample: dict) -> str:
    return "consulted" if sample["used_tool"] else "no look-up"


def length(sample: dict) -> str:
    return "up to 10 words" if len(sample["prompt"].split()) <= 10 else "over 10 words"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", nargs="+", help="eval.py's samples-*.jsonl files")
    parser.add_argument("--by", choices=("form", "opening", "verdict", "lookup", "length"), default="form")
    parser.add_argument("--min_count", type=int, default=5, help="show parts with at least this many prompts")
    args = parser.parse_args()
    cue = {"form": form, "opening": opening, "verdict": verdict, "lookup": lookup, "length": length}[args.by]
    for path in args.samples:
        parts = defaultdict(list)
        for line in open(path):
            sample = json.loads(line)
            if sample["label"] in KEYS:
                parts[sample["label"], cue(sample)].append(sample)
        print(path)
        width = max(len(value) for _, value in parts)
        for (label, value), rows in sorted(parts.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            if len(rows) < args.min_count:
                continue
            key = KEYS[label]
            rate, (lo, hi) = scoring.rate([bool(s[key]) for s in rows], len(rows))
            tool = 100 * scoring.mean(bool(s["used_tool"]) for s in rows)
            print(
                f"  {label:8} {value:{width}} n={len(rows):3}  {key} {rate:5.1f} [{lo:4.1f}, {hi:5.1f}]"
                f"  tool calls {tool:5.1f}"
            )


if __name__ == "__main__":
    main()
