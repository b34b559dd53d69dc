"""Run a short RL job with scripted generation; `accelerate launch --num_processes 2` or plain python.

    python tests/ddp_check.py MODEL_DIR OUT_DIR PROMPTS_PER_STEP [ARG=VALUE ...]

ARG=VALUE pairs override train.Args fields (values read as JSON where they parse, e.g. beta=0.1).
"""

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from conftest import install_scripted_generation  # noqa: E402

import ascl  # noqa: E402
import fast  # noqa: E402
import train  # noqa: E402

if __name__ == "__main__":
    model_dir, out_dir, per_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = {}
    for pair in sys.argv[4:]:
        key, value = pair.split("=", 1)
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    from transformers import AutoTokenizer

    mp = pytest.MonkeyPatch()
    install_scripted_generation(mp, AutoTokenizer.from_pretrained(model_dir), deterministic=True)
    mp.setattr(fast, "generate_turns", ascl.generate_turns)  # fast=true: the same scripted turns
    train.main(
        train.Args(
            **{
                **dict(
                    model=model_dir,
                    stage="rl",
                    output_dir=out_dir,
                    prompts_per_step=per_step,
                    group_size=4,
                    micro_batch_size=3,
                    max_steps=2,
                    lr=1e-3,
                    warmup=0.0,
                ),
                **extra,
            }
        )
    )
