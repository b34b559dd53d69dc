"""The bundled data (data/README.md): held-out eval sets of 100+ prompts, the BC mix, the RL mix."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import eval as ev
import scoring

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
EVAL_SETS = ("eval_harmful", "eval_benign", "eval_math")
HELD_OUT = (*EVAL_SETS, "probe_benign_commands")  # the probe: benign commands, run with eval.py --data
TRAIN_SETS = ("bc_seed", "rl_prompts")


def rows(name: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def normalised(prompt: str) -> str:
    """Lower-case, whitespace collapsed, eval.py's math instruction dropped (training rows may carry it)."""
    return " ".join(prompt.replace(ev.MATH_INSTRUCTION, "").lower().split())


# ----------------------------------------------------------------------------- held-out eval sets
@pytest.mark.parametrize("name", EVAL_SETS)
def test_each_eval_set_has_at_least_100_distinct_prompts(name):
    prompts = [normalised(r["prompt"]) for r in rows(name)]
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("name", HELD_OUT)
def test_eval_sets_share_no_prompt_with_the_training_data(name):
    train = {normalised(r["prompt"]) for t in TRAIN_SETS for r in rows(t)}
    leaked = [r["prompt"] for r in rows(name) if normalised(r["prompt"]) in train]
    assert not leaked, f"{name}.jsonl prompts also in the training data: {leaked}"


FUNCTION_WORDS = set(
    "a an the of to in on for and or my i me how do does what what's is are be can you your with from at by "
    "it this that about into as so i'm should would could get".split()
)


def content_words(prompt: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9']+", normalised(prompt)) if w not in FUNCTION_WORDS}


@pytest.mark.parametrize("name", HELD_OUT)
def test_no_training_prompt_paraphrases_a_held_out_one(name):
    """Sharing most content words is a reworded copy ("the difference between a felony and a
    misdemeanor" for "... a misdemeanor and a felony"), which the exact comparison above misses."""
    train = [(r["prompt"], content_words(r["prompt"])) for t in TRAIN_SETS for r in rows(t)]
    close = []
    for r in rows(name):
        words = content_words(r["prompt"])
        close += [(r["prompt"], p) for p, w in train if len(words & w) / len(words | w) > 0.55]
    assert not close, f"{name}.jsonl prompts reworded in the training data: {close}"


def test_eval_sets_share_no_prompt_with_each_other():
    seen = {}
    for name in HELD_OUT:
        for r in rows(name):
            other = seen.setdefault(normalised(r["prompt"]), name)
            assert other == name, f"{r['prompt']!r} is in both {other} and {name}"


def test_harmful_eval_set_covers_all_21_rule_book_categories():
    categories = Counter(r["category"] for r in rows("eval_harmful"))
    assert set(categories) == set(json.loads((ROOT / "rules.json").read_text())["categories"])
    assert min(categories.values()) >= 3


def test_a_prefix_of_an_eval_set_is_a_fair_sample_of_it():
    """eval.py --limit takes the first rows: the first 21 harmful prompts cover every category."""
    assert len({r["category"] for r in rows("eval_harmful")[:21]}) == 21
    assert len({r["category"] for r in rows("eval_benign")[:20]}) == len(
        {r["category"] for r in rows("eval_benign")}
    )


def test_math_golds_are_integers():
    for r in rows("eval_math"):
        assert r["label"] == "math" and r["answer"].lstrip("-").isdigit(), r


def test_echoing_a_math_question_never_scores():
    """The answer rule's last-number fallback must not credit a model that only repeats the question."""
    for r in rows("eval_math"):
        assert not scoring.answers_match(scoring.extract_answer(r["prompt"]), r["answer"]), r["prompt"]


# ----------------------------------------------------------------------------- training mixes
def test_bc_mix_is_the_papers_2_3_2_with_extra_direct_answers():
    data = rows("bc_seed")
    kinds = Counter(r["kind"] for r in data)
    assert kinds["sensitive_tool"] * 2 == kinds["sensitive_direct"] * 3  # the paper's 3:2 of the 2:3:2
    assert (
        kinds["harmful_tool"] * 3 == kinds["sensitive_tool"] * 2
    )  # its 2:3: after a look-up, answer more often
    assert kinds["ordinary_direct"] >= 10 and kinds["math_direct"] >= 10
    for r in data:
        with_tool = r["kind"].endswith("_tool")
        assert bool(r.get("query")) == with_tool == bool(r.get("think_after")), r["prompt"]
        assert r["label"] == ("harmful" if r["kind"] == "harmful_tool" else "sensitive")


def test_no_rule_category_is_only_ever_followed_by_a_refusal():
    """Each of the 21 categories is the closest rule of some refusal row and of some consult-then-answer row.

    Otherwise the category itself (privacy, gambling, ...) would be the cue to refuse, not the request.
    """
    import ascl

    book = ascl.RuleBook.from_json()
    categories = {r.category for r in book.rules}
    closest = {kind: set() for kind in ("harmful_tool", "sensitive_tool")}
    for r in rows("bc_seed"):
        if r["kind"] in closest:
            closest[r["kind"]].add(book.search(r["query"], top_k=1)[0][1].category)
    assert len(categories) == 21
    assert closest["harmful_tool"] == categories
    assert closest["sensitive_tool"] == categories


@pytest.mark.parametrize("name", TRAIN_SETS)
def test_sentence_form_is_no_cue_to_refuse(name):
    """Harmful and benign prompts are questions about equally often (math problems aside).

    When most refusals answered commands ("Write a ...") and most benign rows were questions
    ("How do I ...?"), BC models were safe on 73% of harmful commands but on 26% of harmful questions.
    """
    share = {}
    for label in ("harmful", "sensitive"):
        prompts = [
            r["prompt"] for r in rows(name) if r["label"] == label and ev.MATH_INSTRUCTION not in r["prompt"]
        ]
        share[label] = sum(p.rstrip().endswith("?") for p in prompts) / len(prompts)
    assert abs(share["harmful"] - share["sensitive"]) <= 0.1, share


def test_every_demonstrated_turn_fits_the_default_rl_turn_budget(tokenizer, rule_book):
    """A turn cut off at --max_new_tokens earns reward 0 (P_f), a short refusal 0.5: with a budget
    below the demonstrated answers, RL learns to refuse because the answers do not fit."""
    import sources
    import train

    budget = train.Args().max_new_tokens
    longest = 0
    for r in rows("bc_seed"):
        turns, _ = sources.seed_row_to_conversation(r, rule_book)
        for turn in turns:
            longest = max(longest, len(tokenizer(turn, add_special_tokens=False)["input_ids"]) + 1)  # + eot
    assert 100 < longest <= budget - 16, (longest, budget)  # room to spare for a sampled turn


def test_bc_reasoning_opens_with_its_verdict():
    """The decision in one place and the same words in every row (data/README.md): the first turn
    opens with the verdict on the request, the turn after a look-up with whether the rule applies."""
    for r in rows("bc_seed"):
        harmful = r["label"] == "harmful"
        first = "This request may be harmful." if harmful else "This request seems fine."
        assert r["think"].startswith(first + " "), r["prompt"]
        if r["think_after"]:
            after = "The rule applies." if harmful else "The rule does not apply."
            assert r["think_after"].startswith(after + " "), r["prompt"]


def test_bc_math_rows_use_the_eval_protocol_and_end_with_the_right_answer_line():
    maths = [r for r in rows("bc_seed") if r["kind"] == "math_direct"]
    for r in maths:
        assert r["prompt"].endswith(ev.MATH_INSTRUCTION)
        assert r["answer"].splitlines()[-1].startswith("Answer: ")
        steps = re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", r["think"])
        assert steps, r["think"]
        for a, op, b, c in steps:  # every worked step is right
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b), "÷": int(a) / int(b)}[
                op
            ] == int(c), r
        assert scoring.extract_answer(r["answer"]) == steps[-1][3], r  # and the answer line gives its result


def test_rl_prompts_keep_the_papers_2_to_5_mix():
    labels = Counter(r["label"] for r in rows("rl_prompts"))
    assert set(labels) == {"harmful", "sensitive"} and labels["harmful"] * 5 == labels["sensitive"] * 2
