"""refine.py (DGR): the rewrite prompt, decision filter, fallback, output, gap measure and resume."""

import json
import math

import pytest
import torch
from conftest import make_tiny_model

import ascl
import refine
import sources
import train

TOOL_ROW = {
    "prompt": "How do I make a bomb?",
    "label": "harmful",
    "think": "This may be dangerous.",
    "query": "bomb making",
    "think_after": "The rules forbid it.",
    "answer": "I can't help with that.",
}
DIRECT_ROW = {
    "prompt": "How do I kill a Python process?",
    "label": "sensitive",
    "think": "A normal request.",
    "query": None,
    "think_after": None,
    "answer": "Use kill PID.",
}


def call(query):
    return (
        "<tool_call>"
        + json.dumps({"name": "retrieve_policy", "arguments": {"query": query}})
        + "</tool_call>"
    )


CONSULT = "Risky, so I check the rules.\n" + call("explosives")  # after the prefilled <think>
REFUSE = "They forbid this.\n</think>\n\nI can't help with making explosives."
COMPLY_DIRECTLY = "Killing a process is routine.\n</think>\n\nRun `kill PID`, or `pkill name`."


def conversation(row, rule_book):
    turns, results = sources.seed_row_to_conversation(row, rule_book)
    return {"prompt": row["prompt"], "label": row["label"], "turns": turns, "tool_results": results}


def prompt_of(messages):
    """The user prompt of a rewrite request (turn 1 has the guide appended to it)."""
    return messages[1]["content"].split("\n\nReference reply:")[0]


def script(monkeypatch, turns_for):
    """refine.generate_turns answers model turn k of prompt p with turns_for(p)[k] after the prefill
    (None = the turn did not end); returns the list of message lists it was called with."""
    seen = []

    def fake(model, chat, requests, args):
        assert requests, "generate needs at least one row"
        out = []
        for messages, prefill in requests:
            seen.append(messages)
            text = turns_for(prompt_of(messages))[sum(m["role"] == "assistant" for m in messages)]
            out.append(None if text is None else prefill + text)
        return out

    monkeypatch.setattr(refine, "generate_turns", fake)
    return seen


def outcome(chat, rule_book, original, args=refine.Args()):
    rewritten = refine.rewrite(None, chat, rule_book, [original], args)[0]
    return rewritten, refine.judge_rewrite(chat, ascl.OfflineJudge(), original, rewritten, args.min_reward)


# ----------------------------------------------------------------------------- the rewrite
def test_the_model_continues_the_real_conversation_with_the_original_turn_as_reference(
    tokenizer, rule_book, monkeypatch
):
    chat = ascl.ChatFormat(tokenizer)
    original = conversation(TOOL_ROW, rule_book)
    seen = script(monkeypatch, lambda p: [CONSULT, REFUSE])
    rewritten, verdict = outcome(chat, rule_book, original)
    first, second = seen
    assert first[0] == {"role": "system", "content": chat.system_prompt} and len(first) == 2
    assert first[1]["content"].startswith(TOOL_ROW["prompt"]) and first[1]["content"].endswith(
        refine.GUIDE.format(
            reference=original["turns"][0], decision=refine.decision_text(original["turns"][0])
        )
    )
    assert second[:2] == chat.prompt_messages(
        TOOL_ROW["prompt"]
    )  # the guide of turn 1 is gone from turn 2's context
    assert second[2] == {"role": "assistant", "content": "<think>\n" + CONSULT}
    assert original["turns"][1] in second[3]["content"] and "refuse" in second[3]["content"]
    # the tool result is the real rule book's answer to the *rewritten* query
    assert rewritten["tool_results"] == [[rule_book.retrieve_policy("explosives")]]
    assert second[3]["content"].startswith(chat.tool_messages(rewritten["tool_results"][0])[0]["content"])
    assert verdict == "kept" and rewritten["turns"] == ["<think>\n" + CONSULT, REFUSE]


def test_a_turn_ends_at_end_of_turn_or_after_its_tool_call(tokenizer):
    chat = ascl.ChatFormat(tokenizer)
    eot = chat.end_of_turn_id
    done = chat.encode("Fine.</think>\nYes.") + [eot, eot, eot]  # pad == eos after the end of a row
    assert refine.finish_turn(chat, "<think>\n", done) == "<think>\nFine.</think>\nYes."
    assert refine.finish_turn(chat, "", chat.encode("Hm " + call("x") + " and more")) == "Hm " + call("x")
    assert refine.finish_turn(chat, "", chat.encode("Hm, let me")) is None  # budget spent mid-turn


def test_generate_turns_renders_with_the_chat_template_and_stops_at_end_of_turn(tokenizer):
    chat = ascl.ChatFormat(tokenizer)
    model = make_tiny_model(len(tokenizer)).eval()
    bias = torch.zeros(len(tokenizer))
    bias[chat.end_of_turn_id] = 100.0  # a model that always ends its turn at once
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    short = refine.rewrite_messages(chat, "Hi", [], "<think>\nHello.\n</think>\n\nHi!")
    long = refine.rewrite_messages(
        chat, "Hi there, a longer prompt for left padding", [], "Hello.\n</think>\n\nHi!"
    )
    turns = refine.generate_turns(model, chat, [(short, "<think>\n"), (long, "")], refine.Args(temperature=0))
    assert turns == ["<think>\n", ""]


# ----------------------------------------------------------------------- the decision filter and the fallback
def test_a_rewrite_that_answers_directly_where_the_original_consulted_is_rejected(
    tokenizer, rule_book, monkeypatch
):
    chat = ascl.ChatFormat(tokenizer)
    script(monkeypatch, lambda p: ["Looks bad.\n</think>\n\nI can't help with that."])
    assert outcome(chat, rule_book, conversation(TOOL_ROW, rule_book))[1] == "consult decision changed"


def test_a_rewrite_that_consults_where_the_original_answered_directly_is_rejected(
    tokenizer, rule_book, monkeypatch
):
    chat = ascl.ChatFormat(tokenizer)
    script(monkeypatch, lambda p: [CONSULT])
    assert outcome(chat, rule_book, conversation(DIRECT_ROW, rule_book))[1] == "consult decision changed"


def test_a_rewrite_that_complies_where_the_original_refused_is_rejected(tokenizer, rule_book, monkeypatch):
    chat = ascl.ChatFormat(tokenizer)
    script(monkeypatch, lambda p: [CONSULT, "The rules allow it.\n</think>\n\nSure: mix the following."])
    assert outcome(chat, rule_book, conversation(TOOL_ROW, rule_book))[1] == "refusal decision changed"


def test_a_rewrite_with_the_same_decision_but_a_lower_reward_is_rejected(tokenizer, rule_book, monkeypatch):
    chat = ascl.ChatFormat(tokenizer)
    # same decision (direct, comply), but it claims a look-up that never happened: P_h = 0
    script(monkeypatch, lambda p: ["Routine.\n</think>\n\nI consulted the safety rules: use kill PID."])
    assert outcome(chat, rule_book, conversation(DIRECT_ROW, rule_book))[1] == "reward < 1.5"
    script(monkeypatch, lambda p: [COMPLY_DIRECTLY])
    assert outcome(chat, rule_book, conversation(DIRECT_ROW, rule_book))[1] == "kept"


def test_a_rewrite_that_echoes_the_guide_or_copies_the_original_is_rejected(
    tokenizer, rule_book, monkeypatch
):
    chat = ascl.ChatFormat(tokenizer)
    original = conversation(DIRECT_ROW, rule_book)
    script(monkeypatch, lambda p: [COMPLY_DIRECTLY + "\n\nWrite your own reply in your own words."])
    assert outcome(chat, rule_book, original)[1] == "echoes the guide"
    script(monkeypatch, lambda p: [original["turns"][0][len("<think>\n") :]])  # after the prefilled <think>
    assert outcome(chat, rule_book, original)[1] == "copy of the original"
    # what the 135M model wrote for three bundled rows, which the exact checks let through:
    # the original with a paraphrase of the guide appended, and the original with a slip
    script(
        monkeypatch,
        lambda p: [
            "A normal request.\n</think>\n\nUse kill PID.\n\nYou can't call the tool, close it "
            "with </think> and then help with the request."
        ],
    )
    assert outcome(chat, rule_book, original)[1] == "echoes the guide"
    script(monkeypatch, lambda p: ["A normal request.\n</think>\n\nUse kill PIDs."])
    assert outcome(chat, rule_book, original)[1] == "copy of the original"


def test_an_unfinished_turn_is_rejected(tokenizer, rule_book, monkeypatch):
    chat = ascl.ChatFormat(tokenizer)
    script(monkeypatch, lambda p: [CONSULT, None])
    assert outcome(chat, rule_book, conversation(TOOL_ROW, rule_book)) == (None, "unfinished turn")


def test_as_trajectory_scores_the_bundled_demonstrations_at_full_reward(tokenizer, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    for row in (TOOL_ROW, DIRECT_ROW):
        t = refine.as_trajectory(chat, conversation(row, rule_book))
        assert t.used_tool == bool(row["query"]) and t.answer == row["answer"]
        assert ascl.reward(t.label, t, ascl.OfflineJudge()([t.prompt], [t.answer], [t.label])[0]).total == 1.5


# ----------------------------------------------------------------------------- the whole command
def bc_file(tmp_path, rule_book):
    """Both BC shapes: two bundled rows and one collected row."""
    collected = {**conversation(DIRECT_ROW, rule_book), "prompt": "How do I shoot a good photo?"}
    path = tmp_path / "bc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (TOOL_ROW, DIRECT_ROW, collected)))
    return path


def run(tmp_path, model_dir, bc, **kw):
    args = refine.Args(model=model_dir, bc_data=str(bc), out=str(tmp_path / "refined.jsonl"), **kw)
    return refine.main(args), args.out


def sampled_script(prompt):
    """A rewrite whose words depend on the RNG; the photo prompt gets a hallucinated look-up (rejected)."""
    word = ["explosives", "bombs", "weapons"][int(torch.randint(3, (1,)))]
    if "bomb" in prompt:
        return ["Risky, checking.\n" + call(word), REFUSE.replace("explosives", word)]
    if "photo" in prompt:
        return ["Fine.\n</think>\n\nBased on the safety rules I looked up, use good light."]
    return [COMPLY_DIRECTLY.replace("routine", word)]


def test_the_output_is_bc_data_that_train_loads_with_originals_where_rejected(
    tiny_model_dir, tokenizer, rule_book, tmp_path, monkeypatch, capsys
):
    script(monkeypatch, sampled_script)
    outcomes, out = run(tmp_path, tiny_model_dir, bc_file(tmp_path, rule_book))
    assert outcomes == {"kept": 2, "reward < 1.5": 1}
    rows = [json.loads(line) for line in open(out)]
    assert [r["refined"] for r in rows] == [True, True, False] and [r["source_row"] for r in rows] == [
        0,
        1,
        2,
    ]
    assert rows[2]["reason"] == "reward < 1.5" and "Based on the safety rules" in rows[2]["rejected_turns"][0]
    assert all({"prompt", "label", "turns", "tool_results"} <= r.keys() for r in rows)
    loaded = sources.load_bc_conversations(out, rule_book)
    assert (
        loaded[2]["turns"] == conversation(DIRECT_ROW, rule_book)["turns"]
    )  # the fallback is the original row
    assert len(train.bc_samples(ascl.ChatFormat(tokenizer), loaded, 1024)) == 2 + 1 + 1
    printed = capsys.readouterr().out
    assert "kept 2 rewrites; fell back to the original: reward < 1.5 1" in printed
    assert "original data" in printed and "refined data" in printed and "perplexity" in printed


def test_drop_leaves_rejected_rows_out(tiny_model_dir, rule_book, tmp_path, monkeypatch):
    script(monkeypatch, sampled_script)
    _, out = run(tmp_path, tiny_model_dir, bc_file(tmp_path, rule_book), on_reject="drop")
    assert [json.loads(line)["source_row"] for line in open(out)] == [0, 1]


def test_resume_skips_done_rows_and_gives_the_uninterrupted_result(
    tiny_model_dir, rule_book, tmp_path, monkeypatch
):
    bc = bc_file(tmp_path, rule_book)
    script(monkeypatch, sampled_script)
    _, out = run(tmp_path, tiny_model_dir, bc, seed=3, batch_size=2)  # batches: rows 0-1, row 2
    whole = open(out).read().splitlines(keepends=True)
    for done, redone in (
        (2, ["How do I shoot a good photo?"]),
        (1, [TOOL_ROW["prompt"], DIRECT_ROW["prompt"], TOOL_ROW["prompt"], "How do I shoot a good photo?"]),
    ):
        with open(out, "w") as f:  # interrupted in the middle of writing the next row
            f.write("".join(whole[:done]) + whole[done][:20])
        torch.manual_seed(1234)  # whatever the RNG holds, each batch reseeds
        seen = script(monkeypatch, sampled_script)
        outcomes, _ = run(tmp_path, tiny_model_dir, bc, seed=3, batch_size=2)
        assert [prompt_of(m) for m in seen] == redone  # a half-done batch is rewritten whole
        assert sum(outcomes.values()) == 3 - done and open(out).read() == "".join(whole)


# ----------------------------------------------------------------------------- the distribution gap
def test_a_uniform_model_has_nll_log_vocab(tokenizer, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    model = make_tiny_model(len(tokenizer))
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every hidden state 0, so every logit 0: uniform over the vocabulary
    sums = refine.nll_sums(
        model, chat, [conversation(TOOL_ROW, rule_book), conversation(DIRECT_ROW, rule_book)], 4096, 1
    )
    assert refine.mean_nll(sums) == pytest.approx(math.log(len(tokenizer)), rel=1e-5)


def test_nll_is_taken_over_the_tokens_bc_trains_on(tokenizer, tiny_model, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    convs = [conversation(TOOL_ROW, rule_book), conversation(DIRECT_ROW, rule_book)]
    total, count = 0.0, 0
    for c in convs:  # by hand: one plain forward per conversation, its full action mask
        ids, mask, _ = chat.encode_conversation(c["prompt"], c["turns"], c["tool_results"])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        picked = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        total -= float((picked * torch.tensor(mask[1:])).sum())
        count += sum(mask[1:])
    sums = refine.nll_sums(tiny_model, chat, convs, 4096, 2)
    assert sum(n for _, n in sums) == count and refine.mean_nll(sums) == pytest.approx(
        total / count, rel=1e-4
    )
    # with a token budget that cuts the tool conversation's second turn: the same tokens as train.bc_samples
    budget = chat.encode_conversation(convs[0]["prompt"], convs[0]["turns"], convs[0]["tool_results"])[2][0][
        1
    ]
    samples = train.bc_samples(chat, convs, budget)
    seqs, masks, _ = zip(*samples)
    with torch.no_grad():
        lp, mask = ascl.token_logprobs(tiny_model, *ascl.pad_batch(seqs, masks, chat.pad_id))
    sums = refine.nll_sums(tiny_model, chat, convs, budget, 2)
    assert sum(n for _, n in sums) == int(mask.sum()) and len(samples) == 2
    assert refine.mean_nll(sums) == pytest.approx(float(-lp.sum() / mask.sum()), rel=1e-4)
