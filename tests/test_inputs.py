"""Every input a run reads is checked before any work. Each entry point (train.py, eval.py, refine.py,
collect.py) refuses a bad data file, model, judge, checkpoint or output path with one line that names
it, before a model loads: a refusal never costs a model load, a BC stage or a traceback."""

import json
from pathlib import Path

import pytest

import collect
import eval as ev
import guard
import plumbing
import refine
import sources
import train

ROWS = [
    {"prompt": "How do I make a bomb?", "label": "harmful"},
    {"prompt": "How do I bake bread?", "label": "benign"},
]


@pytest.fixture
def no_model(monkeypatch):
    """Proof that a refusal comes first: loading the policy or the judge fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the input was checked")

    monkeypatch.setattr(plumbing, "load_model", refuse)
    monkeypatch.setattr(guard, "make_judge", refuse)


def refused(run, *parts: str) -> str:
    """run() stops with SystemExit, in one line that contains every part; returns the line."""
    with pytest.raises(SystemExit) as stop:
        run()
    message = str(stop.value.code)
    assert "\n" not in message and all(str(p) in message for p in parts), message
    return message


# ----------------------------------------------------------------------------- bad files, made on demand
def not_utf8(path: Path) -> Path:
    """A valid first row, then a row saved as Latin-1 (é is byte 0xe9): line 2 is not UTF-8."""
    first = json.dumps({**ROWS[0], "think": "Risky.", "answer": "No."})
    second = '{"prompt": "Caf\xe9 bomb?", "label": "harmful", "think": "Risky.", "answer": "No."}'
    path.write_bytes((first + "\n").encode() + second.encode("latin-1") + b"\n")
    return path


def csv_not_utf8(path: Path) -> Path:
    path.write_bytes(b"prompt,label\nHow do I bake bread?,safe\nCaf\xe9 au lait?,safe\n")
    return path


def a_folder(path: Path) -> Path:
    path.mkdir()
    return path


def a_file(path: Path) -> Path:
    path.write_text("not a model\n")
    return path


# ----------------------------------------------------------------------------- train.py
# case name -> t (a temporary folder) -> (the settings that differ, what the refusal must say)
TRAIN_CASES = {
    "bc data not UTF-8": lambda t: (
        {"stage": "bc", "bc_data": str(not_utf8(t / "bc.jsonl"))},
        [f"{t / 'bc.jsonl'}:2: not UTF-8 text (byte 0xe9)"],
    ),
    "RL data not UTF-8": lambda t: (
        {"rl_data": [str(not_utf8(t / "rl.jsonl"))]},
        [f"{t / 'rl.jsonl'}:2: not UTF-8"],
    ),
    "RL data, a CSV not UTF-8": lambda t: (
        {"rl_data": [str(csv_not_utf8(t / "rl.csv"))]},
        [f"{t / 'rl.csv'}:3: not UTF-8"],
    ),
    "bc data, a folder": lambda t: (
        {"stage": "bc", "bc_data": str(a_folder(t / "bc"))},
        [t / "bc", "is a folder; give a file"],
    ),
    "RL data, a missing path": lambda t: (
        {"rl_data": [str(t / "prompts")]},
        [f"data file not found: {t / 'prompts'}"],
    ),
    "judge, a missing folder": lambda t: ({"judge": "/no/such/dir"}, ["no such judge folder: /no/such/dir"]),
    "judge, not a name": lambda t: ({"judge": "not a model!"}, ["--judge 'not a model!': give 'offline'"]),
    "judge, a typo of offline": lambda t: ({"judge": "ofline"}, ["--judge 'ofline'"]),
    "judge, a missing .gguf": lambda t: ({"judge": str(t / "guard.gguf")}, [t / "guard.gguf"]),
    "model, a file": lambda t: ({"model": str(a_file(t / "model.txt"))}, [t / "model.txt", "is a file"]),
    "model, an empty folder": lambda t: (
        {"model": str(a_folder(t / "m"))},
        [t / "m", "holds no config.json"],
    ),
    "resume, a missing folder": lambda t: (
        {"resume": str(t / "checkpoint-9")},
        [f"cannot resume from {t / 'checkpoint-9'}: no such folder"],
    ),
    "resume, a file": lambda t: (
        {"resume": str(a_file(t / "ckpt"))},
        [t / "ckpt", "a file, not a checkpoint"],
    ),
    "output below a file": lambda t: (
        {"output_dir": str(a_file(t / "taken") / "run")},
        [t / "taken", "is a file, not a folder"],
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_a_bad_input_in_one_line_before_loading(case, tiny_model_dir, tmp_path, no_model):
    settings, says = TRAIN_CASES[case](tmp_path)
    base = dict(model=tiny_model_dir, stage="rl", output_dir=str(tmp_path / "out"), max_steps=1)
    refused(lambda: train.main(train.Args(**{**base, **settings})), *says)
    assert not (tmp_path / "out").exists()  # nothing written either


# ----------------------------------------------------------------------------- eval.py
def big_field_csv(path: Path) -> Path:
    path.write_text("prompt,label\n" + "x" * 200_000 + ",safe\n")
    return path


EVAL_CASES = {
    "data not UTF-8": lambda t: (
        {"data": [str(not_utf8(t / "set.jsonl"))]},
        [f"{t / 'set.jsonl'}:2: not UTF-8"],
    ),
    "NAME=FILE, a CSV not UTF-8": lambda t: (
        {"data": [f"xstest-safe={csv_not_utf8(t / 'x.csv')}"]},
        [f"{t / 'x.csv'}:3: not UTF-8"],
    ),
    "a CSV field over csv's limit": lambda t: (
        {"data": [f"xstest-safe={big_field_csv(t / 'x.csv')}"]},
        [f"{t / 'x.csv'}:2: not valid CSV", "field limit"],
    ),
    "data, a folder": lambda t: ({"data": [str(a_folder(t / "sets"))]}, [t / "sets", "is a folder"]),
    "data, a missing path": lambda t: (
        {"data": [str(t / "harmful")]},
        [f"data file not found: {t / 'harmful'}"],
    ),
    "model, a file": lambda t: ({"model": [str(a_file(t / "model.txt"))]}, [t / "model.txt", "is a file"]),
    "model, an empty folder": lambda t: ({"model": [str(a_folder(t / "m"))]}, [t / "m", "no config.json"]),
    "judge, a missing folder": lambda t: ({"judge": "/no/such/dir"}, ["no such judge folder: /no/such/dir"]),
    "judge, not a name": lambda t: ({"judge": "not a model!"}, ["--judge 'not a model!': give 'offline'"]),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_refuses_a_bad_input_in_one_line_before_loading(case, tiny_model_dir, tmp_path, no_model):
    settings, says = EVAL_CASES[case](tmp_path)
    base = dict(model=[tiny_model_dir], output_dir=str(tmp_path / "out"), limit=2)
    refused(lambda: ev.main(ev.Args(**{**base, **settings})), *says)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- refine.py
def bc_rows(path: Path) -> Path:
    path.write_text(json.dumps({**ROWS[0], "think": "Risky.", "answer": "No."}) + "\n")
    return path


REFINE_CASES = {
    "bc data not UTF-8": lambda t: (
        {"bc_data": str(not_utf8(t / "in.jsonl"))},
        [f"{t / 'in.jsonl'}:2: not UTF-8"],
    ),
    "bc data, a missing file": lambda t: (
        {"bc_data": str(t / "gone.jsonl")},
        [f"not found: {t / 'gone.jsonl'}"],
    ),
    "model, a missing folder": lambda t: ({"model": str(t / "m")}, [f"no such model folder: {t / 'm'}"]),
    "judge, a missing folder": lambda t: ({"judge": "/no/such/dir"}, ["no such judge folder: /no/such/dir"]),
    "out, a folder": lambda t: ({"out": str(a_folder(t / "refined"))}, [t / "refined", "is a folder"]),
    "out, the input itself": lambda t: ({"out": str(t / "bc.jsonl")}, ["is the --bc_data file"]),
    "out, a file refine did not write": lambda t: (
        {"out": str(bc_rows(t / "other.jsonl"))},
        [f"{t / 'other.jsonl'}:1: not a line refine.py writes"],
    ),
}


@pytest.mark.parametrize("case", REFINE_CASES)
def test_refine_refuses_a_bad_input_in_one_line_before_loading(case, tiny_model_dir, tmp_path, no_model):
    settings, says = REFINE_CASES[case](tmp_path)
    args = refine.Args(
        **{
            "model": tiny_model_dir,
            "bc_data": str(bc_rows(tmp_path / "bc.jsonl")),
            "out": str(tmp_path / "refined.jsonl"),
            **settings,
        }
    )
    out = Path(args.out)
    before = out.read_bytes() if out.is_file() else None
    refused(lambda: refine.main(args), *says)
    assert (out.read_bytes() if out.is_file() else None) == before  # --out unchanged


# ----------------------------------------------------------------------------- collect.py
COLLECT_CASES = {
    "RL data not UTF-8": lambda t: (
        {"rl_data": [str(not_utf8(t / "rl.jsonl"))]},
        [f"{t / 'rl.jsonl'}:2: not UTF-8"],
    ),
    "model, an empty folder": lambda t: ({"model": str(a_folder(t / "m"))}, [t / "m", "no config.json"]),
    "judge, a missing folder": lambda t: ({"judge": "/no/such/dir"}, ["no such judge folder: /no/such/dir"]),
    "out below a file": lambda t: (
        {"out": str(a_file(t / "taken") / "bc.jsonl")},
        [t / "taken", "is a file, not a folder"],
    ),
}


@pytest.mark.parametrize("case", COLLECT_CASES)
def test_collect_refuses_a_bad_input_in_one_line_before_loading(case, tiny_model_dir, tmp_path, no_model):
    settings, says = COLLECT_CASES[case](tmp_path)
    base = dict(model=tiny_model_dir, out=str(tmp_path / "collected.jsonl"))
    refused(lambda: collect.main(collect.Args(**{**base, **settings})), *says)


# ----------------------------------------------------------------------------- names: local or hub
def test_a_path_below_an_existing_folder_is_local_so_a_typo_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    refused(lambda: plumbing.check_model("outputs/finl"), "no such model folder: outputs/finl")


def test_hub_ids_that_look_valid_pass_the_offline_check():
    assert plumbing.model_source("Qwen/Qwen3-0.6B", "judge") == ("Qwen/Qwen3-0.6B", {}, False)
    plumbing.check_judge("Qwen/Qwen3Guard-Gen-8B")
    plumbing.check_judge("offline")


# ----------------------------------------------------------------------------- files that do read
def test_a_json_array_and_a_csv_with_a_byte_order_mark_read_like_jsonl(tmp_path):
    (tmp_path / "set.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "set.csv").write_bytes(
        b"\xef\xbb\xbfprompt,label\n" + "".join(f"{r['prompt']},{r['label']}\n" for r in ROWS).encode()
    )
    for name in ("set.json", "set.csv"):
        assert sources.read_rows(tmp_path / name, ("prompt", "label")) == ROWS
    rows = sources.load_rl_prompts([str(tmp_path / "set.csv")], 0.5, None, 0)  # RL data takes them too
    assert sorted((r["prompt"], r["label"]) for r in rows) == [
        (ROWS[1]["prompt"], "sensitive"),
        (ROWS[0]["prompt"], "harmful"),
    ]
