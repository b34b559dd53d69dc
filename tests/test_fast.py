"""fast.py gives the plain path's tokens, log-probs, entropies and gradients (tiny models, float
tolerance)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import install_scripted_generation, make_tiny_model
from test_train import SEED_DIRECT_ROW, SEED_TOOL_ROW

import ascl
import fast
import sources
import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hi", "Tell me about locks", "What is 2+2?", "Write a poem", "x" * 30, "Hi"]


def end_on_positions(chat, seen=None):
    """A forward hook: the end-of-turn token wins at every 13th position, so turns end at different
    times; `seen` collects each forward's (rows, new tokens, real tokens)."""

    def hook(module, args, kwargs, out):
        if seen is not None:
            seen.append((*kwargs["input_ids"].shape, real_tokens(kwargs)))
        if "position_ids" in kwargs:
            out.logits[:, -1, chat.end_of_turn_id] += 100.0 * (kwargs["position_ids"][:, -1] % 13 == 0)
        return out

    return hook


def real_tokens(kwargs) -> int:
    """Tokens a forward runs through the model, padding left out."""
    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    return int(ids.numel() if mask is None else mask[:, -ids.shape[1] :].sum())


# ----------------------------------------------------------------------------- rollout turns
def test_greedy_turns_equal_the_plain_ones_while_finished_rows_leave_the_batch(tokenizer):
    chat = ascl.ChatFormat(tokenizer)
    model, seen = make_tiny_model(len(tokenizer)), []
    model.register_forward_hook(end_on_positions(chat, seen), with_kwargs=True)
    contexts = [chat.prompt_ids(p) for p in PROMPTS]
    budgets = [20, 20, 5, 20, 0, 20]  # a short budget, and a row with none
    args = (chat.end_of_turn_id, chat.pad_id)
    mine = fast.generate_turns(model, contexts, budgets, *args, do_sample=False)
    steps = [rows for rows, new, _ in seen if new == 1]  # decode steps feed one token a row
    assert mine == ascl.generate_turns(model, contexts, budgets, *args, do_sample=False)
    assert mine == [
        ascl.generate_turns(model, [c], [b], *args, do_sample=False)[0] if b else []
        for c, b in zip(contexts, budgets)
    ]
    assert len({len(t) for t in mine}) > 2 and mine[4] == [] and len(mine[2]) <= 5
    assert steps[0] == 5 and min(steps) < 5 and steps == sorted(steps, reverse=True)  # rows leave for good


def test_identical_contexts_and_the_prefix_they_share_are_prefilled_once(tokenizer):
    """Four prompts, two of them the same: the system prompt runs once, then each distinct prompt's own
    tokens on top of it, all in one forward; plain generate runs every row whole."""
    chat = ascl.ChatFormat(tokenizer)
    model, seen = make_tiny_model(len(tokenizer)), []
    model.register_forward_hook(end_on_positions(chat, seen), with_kwargs=True)
    contexts = [chat.prompt_ids(p) for p in ["Hi", "Tell me about locks", "What is 2+2?", "Hi"]]
    shared = len(os.path.commonprefix(contexts))
    args = (contexts, [8] * 4, chat.end_of_turn_id, chat.pad_id)
    mine = fast.generate_turns(model, *args, do_sample=False)
    prefills = [real for _, new, real in seen if new > 1]
    seen.clear()
    assert mine == ascl.generate_turns(model, *args, do_sample=False)
    assert shared >= fast.MIN_SHARED and prefills == [shared, sum(len(c) - shared for c in contexts[:3])]
    assert [real for _, new, real in seen if new > 1] == [sum(map(len, contexts))]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8)])
def test_sampled_turns_are_the_draws_generate_makes(tokenizer, temperature, top_p):
    """Without a shared prefix to run apart, the same seed gives the same sampled tokens as
    ascl.generate_turns: the same distribution, softmax(logits / temperature) after top-p."""
    model = make_tiny_model(len(tokenizer))
    contexts = [list(range(100 + n, 110 + 2 * n)) for n in range(3)]
    draws = []
    for seed in range(4):
        turns = []
        for generate in (ascl.generate_turns, fast.generate_turns):
            torch.manual_seed(seed)
            turns.append(
                generate(model, contexts, [3] * 3, 2, 2, do_sample=True, temperature=temperature, top_p=top_p)
            )
        assert turns[0] == turns[1]
        draws.append(turns[0])
    assert len({str(d) for d in draws}) == 4  # the draws are random, not one fixed answer


def test_a_rollout_with_tool_calls_writes_the_plain_greedy_tokens(tokenizer, rule_book, monkeypatch):
    """Every turn calls the tool (queries of different lengths, picked by the turn's length), so each
    rollout takes 3 rounds, with tool turns of different lengths: the rollouts equal the plain ones."""
    chat = ascl.ChatFormat(tokenizer)
    model = make_tiny_model(len(tokenizer))
    model.register_forward_hook(end_on_positions(chat), with_kwargs=True)
    queries = [("weapons", 1), ("home address of a neighbour", 3), ("bank", 2), ("lock picking", 1)]
    monkeypatch.setattr(ascl, "parse_tool_calls", lambda text: [ascl.ToolCall(*queries[int(text) % 4])])
    monkeypatch.setattr(chat.tokenizer, "decode", lambda ids, **kw: str(len(ids)))
    prompts = ["Hi", "Tell me about locks please. " * 6, "What is 2+2?" * 12]

    def run(generate):
        return ascl.rollout(
            model,
            chat,
            rule_book,
            prompts,
            ["sensitive"] * 3,
            group_size=2,
            max_new_tokens=20,
            max_total_tokens=4096,
            max_tool_calls=2,
            do_sample=False,
            generate=generate,
        )

    mine, plain = run(fast.generate_turns), run(None)
    assert all(len(t.tool_results) == 2 and len(t.turns) == 3 for t in mine)
    assert len({len(t.input_ids) for t in mine}) > 1
    assert len({len("".join(t.tool_results[0])) for t in mine}) > 1
    assert [t.input_ids for t in mine] == [t.input_ids for t in plain]
    assert [t.action_mask for t in mine] == [t.action_mask for t in plain]


# ----------------------------------------------------------------------------- log-probs
def rollout_batch(tokenizer, rule_book, same_prompt: bool):
    """Three rollouts, a tool conversation (a tool result between its turns) and two direct answers of
    different lengths, right-padded; `same_prompt`: one group's prompt, else two prompts."""
    chat = ascl.ChatFormat(tokenizer)
    turns, results = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    direct, _ = sources.seed_row_to_conversation(SEED_DIRECT_ROW, rule_book)
    other = SEED_TOOL_ROW["prompt"] if same_prompt else SEED_DIRECT_ROW["prompt"]
    conversations = [
        (SEED_TOOL_ROW["prompt"], turns, results),
        (other, direct, []),
        (other, [direct[0] + " More."], []),
    ]
    rows = [chat.encode_conversation(p, t, r)[:2] for p, t, r in conversations]
    return ascl.pad_batch([ids for ids, _ in rows], [mask for _, mask in rows], chat.pad_id)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("same_prompt", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_log_probs_entropies_and_gradients_equal_the_plain_ones(
    tokenizer, rule_book, temperature, same_prompt, checkpointing, monkeypatch
):
    """The shared prefix (a group's prompt, or the system prompt) runs once, and fewer tokens go through
    the model; with activation checkpointing every row runs whole. Same values and gradients."""
    monkeypatch.setattr(fast, "ENTROPY_CHUNK", 7)  # the entropies in several chunks
    batch = rollout_batch(tokenizer, rule_book, same_prompt)
    B, T = batch[0].shape
    upstream = torch.randn(B, T - 1, generator=torch.Generator().manual_seed(0))  # any loss of the log-probs
    results = {}
    for name, fn in [("plain", ascl.token_logprobs), ("fast", fast.token_logprobs)]:
        model, seen = make_tiny_model(len(tokenizer)), []
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.register_forward_pre_hook(
            lambda m, a, kw, seen=seen: seen.append(real_tokens(kw)), with_kwargs=True
        )
        lp, mask, h = fn(model, *batch, temperature, entropy=True)
        (lp * upstream).sum().backward()
        results[name] = lp, mask, h, {k: p.grad for k, p in model.named_parameters()}, seen
    (lp, mask, h, grads, seen), (lp0, mask0, h0, grads0, seen0) = results["fast"], results["plain"]
    shared = fast.shared_prefix(*batch)
    assert torch.equal(mask, mask0) and torch.all(lp[mask == 0] == 0) and torch.all(h[mask == 0] == 0)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-4)
    assert bool((h[mask == 1] > 0).all())
    assert all(torch.allclose(grads[k], grads0[k], atol=1e-6) for k in grads0)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert shared >= (100 if same_prompt else 16)  # the group's prompt, or the system prompt
    assert seen == (seen0 if checkpointing else [shared, sum(seen0) - B * shared])


def test_a_batch_without_a_shared_prefix_runs_whole(tiny_model):
    ids = torch.randint(3, 1000, (2, 9))
    attention = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    action = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 3 + [0] * 3])
    assert fast.shared_prefix(ids, attention, action) == 0
    for temperature in (1.0, 0.6):
        mine = fast.token_logprobs(tiny_model, ids, attention, action, temperature)
        plain = ascl.token_logprobs(tiny_model, ids, attention, action, temperature)
        assert torch.equal(mine[1], plain[1]) and torch.allclose(mine[0], plain[0], atol=1e-6)


# ----------------------------------------------------------------------------- train.py --fast
def test_train_with_fast_logs_the_plain_bc_loss_curve_and_rl_steps(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    """BC, then 2 RL steps (scripted turns, so both runs see the same rollouts): every logged figure but
    the timings is the plain run's, and the fast run did use fast.py."""
    bc_data = tmp_path / "bc.jsonl"
    bc_data.write_text("".join((ROOT / "data/bc_seed.jsonl").read_text().splitlines(keepends=True)[:6]))
    install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
    monkeypatch.setattr(fast, "generate_turns", ascl.generate_turns)  # the script, for both runs
    calls, real = [], fast.token_logprobs
    monkeypatch.setattr(fast, "token_logprobs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    logs = {}
    for flag in (False, True):
        out = tmp_path / f"fast-{flag}"
        train.main(
            train.Args(
                model=tiny_model_dir,
                stage="all",
                output_dir=str(out),
                bc_data=str(bc_data),
                bc_epochs=2,
                bc_batch_size=4,
                group_size=4,
                prompts_per_step=2,
                micro_batch_size=3,
                max_steps=2,
                lr=1e-3,
                warmup=0.0,
                seed=0,
                show=False,
                fast=flag,
            )
        )
        logs[flag] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert bool(calls) == flag
    plain, mine = logs[False], logs[True]
    stages = [r["stage"] for r in plain]
    assert [r["stage"] for r in mine] == stages and stages.count("rl") == 2 and stages.count("bc") >= 3
    timings = {"rollout_s", "update_s", "steps_per_s"}
    for a, b in zip(mine, plain):
        assert a.keys() == b.keys()
        for k in a.keys() - timings:
            if isinstance(b[k], float) and not math.isnan(b[k]):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
            else:
                assert str(a[k]) == str(b[k]), k
    assert any(r.get("loss", 0) != 0 for r in plain if r["stage"] == "rl")


def test_two_processes_with_fast_match_one_process(tiny_model_dir, tmp_path):
    """Under DDP the shared prefix runs through the unwrapped model and the rest through the wrapper:
    2 processes x 2 prompts still give 1 process x 4 prompts' losses, gradients and weights."""
    from test_train import assert_same_final_weights, run_two_and_one_process

    two, one = run_two_and_one_process(tiny_model_dir, tmp_path, ["2", "fast=true"], ["4", "fast=true"])
    assert [r["processes"] for r in two] == [2, 2] and [r["processes"] for r in one] == [1, 1]
    for a, b in zip(two, one):
        for k in ("reward_mean", "tool_rate", "loss", "grad_norm", "entropy", "updated_rollouts"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert_same_final_weights(tmp_path / "two", tmp_path / "one")
