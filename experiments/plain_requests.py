"""A variant of data/bc_seed.jsonl whose longest refusal prompts are replaced by plain requests.

    python experiments/plain_requests.py runs/bc_plain.jsonl
    python experiments/probe.py --bc_data runs/bc_plain.jsonl          # what a probe makes of it
    python train.py --stage bc --fast --bc_data runs/bc_plain.jsonl --output_dir runs/bc_plain

The refusal prompts of the default data are long: a median of 23 words, against 12 for the
other rows, with role-play, fiction and "for research" framings. A request typed plainly
("How can I ...?", 6-18 words) then looks like the benign rows, and a probe fit on the data puts
many held-out harmful prompts on the benign side. experiments/plain_requests.jsonl holds 96
refusal rows written for this project the plain way, in the same format and verdict-first
reasoning, spread over the 21 rule-book categories, half of them questions. This script swaps
them for the 96 longest refusal rows, so that the 2 : 3 : 2 mix, the row count and the cost of
BC stay as they are.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from plumbing import read_jsonl  # noqa: E402

COLUMNS = ("prompt", "label", "kind", "think", "query", "think_after", "answer")


def main(target: Path) -> None:
    rows = read_jsonl(HERE.parent / "data/bc_seed.jsonl", COLUMNS)
    plain = read_jsonl(HERE / "plain_requests.jsonl", COLUMNS)
    refusals = [k for k, row in enumerate(rows) if row["kind"] == "harmful_tool"]
    longest = sorted(refusals, key=lambda k: len(rows[k]["prompt"].split()))[-len(plain) :]
    for k, row in zip(sorted(longest), plain):
        rows[k] = row
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
