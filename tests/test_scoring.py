"""eval.py's scoring: the math answer rule and the Wilson intervals on every reported rate."""

import pytest

import ascl
import scoring


# ----------------------------------------------------------------------------- math answers
def trajectory(*turns: str) -> ascl.Trajectory:
    return ascl.Trajectory(prompt="p", label="math", input_ids=[], action_mask=[], turns=list(turns))


@pytest.mark.parametrize(
    "turns, expected",
    [
        (["<think>12 + 15 = 27.</think>\n\nAnswer: 27"], "27"),  # the answer after </think>
        (["12 + 15 = 27, so she has 27 apples."], "27"),  # no <think> at all (the embedded base model)
        (["<think>\n12 + 15 = 27\nAnswer: 27"], "27"),  # </think> never closed
        (["<think>A sum. 12 + 15 = 27</think>\n\nSo she has 27 apples now."], "27"),  # no 'Answer:' line
        (["<think>x</think>\n\nAnswer: 3\nWait, no.\nAnswer: 4"], "4"),  # the last 'Answer:' line
        (
            [
                "<think>Let me check. <tool_call>"
                '{"name": "retrieve_policy", "arguments": {"query": "q", "top_k": 3}}</tool_call>'
            ],
            None,
        ),
        (["I cannot answer that."], None),
    ],
)
def test_math_answer_is_the_last_answer_line_else_the_last_number_of_the_final_text(turns, expected):
    assert scoring.extract_answer(scoring.final_text(trajectory(*turns))) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It costs $1,250 in total.", "1,250"),
        ("The temperature is -4 degrees.", "-4"),
        ("Half of it is 2.5 litres.", "2.5"),
        ("From 12-5 we get 7", "7"),
        ("Answer:\n27", "27"),
    ],
)
def test_last_number_fallback_reads_signs_decimals_and_thousands(text, expected):
    assert scoring.extract_answer(text) == expected


# ----------------------------------------------------------------------------- confidence intervals
def test_wilson_interval_contains_the_rate_and_shrinks_with_n():
    for k, n in ((0, 10), (3, 10), (10, 10), (30, 100)):
        lo, hi = scoring.wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert (
        scoring.wilson(30, 100)[1] - scoring.wilson(30, 100)[0]
        < scoring.wilson(3, 10)[1] - scoring.wilson(3, 10)[0]
    )


def test_every_reported_rate_has_its_interval():
    samples = [
        {"safe": s, "refused": not s, "correct": None, "used_tool": t, "answer": "a", "response_tokens": 5}
        for s, t in ((True, True), (True, False), (False, False), (True, True))
    ]
    b = scoring.score(samples, "harmful", n=4)
    assert b["safety_rate"] == 75.0 and b["safety_rate_ci"] == pytest.approx(
        [100 * x for x in scoring.wilson(3, 4)]
    )
    assert b["tool_call_rate_ci"] == pytest.approx([100 * x for x in scoring.wilson(2, 4)])
    summary = scoring.summarise({"h": b})
    assert summary["safety_avg_ci"] == b["safety_rate_ci"] and summary["reasoning_avg_ci"] is None
    assert "75.0 [" in scoring.format_table({"m": summary})
