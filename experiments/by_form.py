"""Safety and over-refusal of eval.py's samples, split by the prompt's sentence form.

    python experiments/by_form.py runs/eval_bc/samples-*.jsonl [more samples files ...]

A question ends with "?"; anything else ("Write a ...", "Give me ...") is a command. A model that
learnt the form instead of the request refuses one form far more often than the other: BC on
training data whose refusals were mostly commands was safe on 73% of the harmful commands and 26%
of the harmful questions of the same set. Rates in %, with Wilson 95% intervals.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scoring  # noqa: E402

KEYS = {"harmful": "safe", "benign": "refused"}


def main(paths: list[str]) -> None:
    for path in paths:
        samples = [json.loads(line) for line in open(path)]
        print(path)
        for label, key in KEYS.items():
            for form, is_question in (("questions", True), ("commands", False)):
                rows = [
                    s
                    for s in samples
                    if s["label"] == label and s["prompt"].rstrip().endswith("?") == is_question
                ]
                if not rows:
                    continue
                value, (lo, hi) = scoring.rate([bool(s[key]) for s in rows], len(rows))
                tool = 100 * scoring.mean(bool(s["used_tool"]) for s in rows)
                print(
                    f"  {label:8} {form:9} n={len(rows):3}  {key} {value:5.1f} [{lo:4.1f}, {hi:5.1f}]"
                    f"  tool calls {tool:5.1f}"
                )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
