"""How the verdict sentences of data/bc_seed.jsonl were written: each row's reasoning opens with its verdict.

    git show 39aa349:data/bc_seed.jsonl > runs/bc_seed_732.jsonl     # the rows without verdicts
    python experiments/verdict_first.py runs/bc_seed_732.jsonl runs/bc_verdict.jsonl   # = data/bc_seed.jsonl

A linear probe on the untrained model's state at the end of the prompt already tells the held-out
harmful prompts from the benign ones (experiments/probe.py), but the demonstrations spread that
decision over many words. Here the first sentence of each first turn is the decision, "This
request may be harmful." or "This request seems fine.", and the first sentence after a look-up is
"The rule applies." or "The rule does not apply.": one place, a few tokens, the same words in
every row. The rest of the reasoning, the queries and the answers are kept.
"""

import json
import sys
from pathlib import Path

FIRST = {"harmful": "This request may be harmful.", "sensitive": "This request seems fine."}
AFTER = {"harmful": "The rule applies.", "sensitive": "The rule does not apply."}


def verdict_first(row: dict) -> dict:
    out = {**row, "think": f"{FIRST[row['label']]} {row['think']}"}
    if row["think_after"]:
        out["think_after"] = f"{AFTER[row['label']]} {row['think_after']}"
    return out


def main(source: Path, target: Path) -> None:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [json.dumps(verdict_first(row), ensure_ascii=False) for row in rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
