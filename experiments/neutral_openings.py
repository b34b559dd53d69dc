"""Write a copy of the BC data whose retrieval rows open their reasoning alike, whatever the label.

    git show 10f359c:data/bc_seed.jsonl > runs/bc_seed_270.jsonl     # the 270 rows it was run on
    python experiments/neutral_openings.py runs/bc_seed_270.jsonl runs/bc_neutral.jsonl
    python train.py --stage bc --fast --bc_data runs/bc_neutral.jsonl --output_dir runs/bc_neutral

In those 270 rows the refusals' first turn opens "This asks ..." and the consult-then-answer
rows' "This is about ...", and their second turn opens "The rule book prohibits ..." against "The
rules cover ...": the verdict is in the first words. Here each retrieval row's first turn is one of
four sentences that only say the rules will be checked, picked by the prompt's hash, and its second
turn opens "The rules prohibit <rule>." before the verdict. Prompts, queries and answers are kept.
"""

import json
import re
import sys
import zlib
from pathlib import Path

NEUTRAL = [
    "Let me check the rule book before answering.",
    "I'll look up the safety rules first.",
    "Before I answer, I'll check what the rules say.",
    "Let me see whether any safety rule applies here.",
]
OPENING = re.compile(
    r"^(The retrieved rules? (?:forbids?|prohibits?|concerns?|covers?|are about|is about)"
    r"|The rule book (?:forbids|prohibits)"
    r"|The rules (?:forbid|prohibit|cover|concern)"
    r"|The rules (?:about|on) [\w-]+ (?:concern|cover)"
    r"|The weapons rules concern"
    r"|The closest rule is about) "
)


def neutral(row: dict) -> dict:
    if not row["kind"].endswith("_tool"):
        return row
    think_after, n = OPENING.subn("The rules prohibit ", row["think_after"], count=1)
    if n == 0:
        raise ValueError(f"unexpected opening: {row['think_after'][:60]!r}")
    think = NEUTRAL[zlib.crc32(row["prompt"].encode()) % len(NEUTRAL)]
    return {**row, "think": think, "think_after": think_after}


def main(source: Path, target: Path) -> None:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [json.dumps(neutral(row), ensure_ascii=False) for row in rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
