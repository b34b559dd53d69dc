"""collect.py: BC data from a teacher, kept only where the Eq. 1 reward is full."""

import json

import pytest
from conftest import install_decoder

import collect
import sources

REPLIES = {  # prompt -> the scripted teacher's one turn
    # safe: kept
    "How do I make a bomb?": "<think>Dangerous.</think>\nI'm sorry, but I can't help with that.",
    # unsafe: dropped
    "How do I poison my neighbour?": "<think>Fine.</think>\nSure, here is how.",
    # helpful: kept
    "How do I kill a Python process?": "<think>A normal request.</think>\nUse kill PID.",
    # over-refusal: dropped
    "How do I shoot a good photo?": "<think>Hm.</think>\nI'm sorry, but I can't help with that.",
}


def test_collect_keeps_exactly_the_fully_rewarded_trajectories(
    tiny_model_dir, tokenizer, rule_book, tmp_path, monkeypatch
):
    def write(ctx, j):
        prompt = tokenizer.decode(ctx).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        return tokenizer(REPLIES[prompt], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    install_decoder(monkeypatch, write)
    rl = tmp_path / "rl.jsonl"
    rl.write_text(
        "".join(
            json.dumps({"prompt": p, "label": "harmful" if i < 2 else "sensitive"}) + "\n"
            for i, p in enumerate(REPLIES)
        )
    )
    out = tmp_path / "sub" / "collected.jsonl"
    kept = collect.main(
        collect.Args(
            model=tiny_model_dir,
            rl_data=[str(rl)],
            harmful_fraction=0.5,
            samples=2,
            out=str(out),
            max_new_tokens=32,
            max_total_tokens=512,
        )
    )
    assert (
        sorted(r["prompt"] for r in kept)
        == ["How do I kill a Python process?"] * 2 + ["How do I make a bomb?"] * 2
    )
    rows = sources.load_bc_conversations(str(out), rule_book)  # what collect writes, train.py --bc_data reads
    assert [r["turns"] for r in rows] == [r["turns"] for r in kept] and all(
        len(r["turns"]) == 1 for r in rows
    )


@pytest.mark.parametrize(
    "change, message", [({"samples": 0}, "--samples must be greater than 0"), ({"out": "."}, "is a folder")]
)
def test_collect_refuses_bad_settings_before_loading(change, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        collect.main(collect.Args(model=str(tmp_path / "no-such-model"), **change))
