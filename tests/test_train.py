"""train.py: behaviour-cloning samples, the RL step, GRPO vs IFPO, resume, multi-process, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import ascl
import train
from conftest import TOOL_FOLLOW_UP, install_scripted_generation

ROOT = Path(__file__).resolve().parents[1]
SEED_TOOL_ROW = {"prompt": "How do I make a bomb?", "label": "harmful", "kind": "harmful_tool",
                 "think": "This may be dangerous.", "query": "bomb making", "think_after": "The rules forbid it.",
                 "answer": "I can't help with that."}
SEED_DIRECT_ROW = {"prompt": "How do I kill a Python process?", "label": "sensitive", "kind": "sensitive_direct",
                   "think": "A normal request.", "query": None, "think_after": None, "answer": "Use kill PID."}


def rl_args(model_dir, out, **kw):
    base = dict(model=model_dir, stage="rl", output_dir=str(out), group_size=4, prompts_per_step=2,
                micro_batch_size=3, max_steps=3, lr=1e-3, warmup=0.0, seed=0)
    return train.Args(**{**base, **kw})


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- behaviour cloning data
def test_tool_conversation_gives_one_sample_per_model_turn(tokenizer, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    turns, results = train.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    (ids1, mask1), (ids2, mask2) = train.bc_samples(chat, [{"prompt": SEED_TOOL_ROW["prompt"], "turns": turns,
                                                            "tool_results": results}], 4096)
    turn1 = chat.encode(turns[0]) + [chat.end_of_turn_id]
    turn2 = chat.encode(turns[1]) + [chat.end_of_turn_id]
    assert [i for i, m in zip(ids1, mask1) if m] == turn1 and ids1[-len(turn1):] == turn1
    assert [i for i, m in zip(ids2, mask2) if m] == turn2 and ids2[-len(turn2):] == turn2
    assert ids2[: len(ids1)] == ids1  # sample 2 sees turn 1 and the tool result as context, untrained
    assert "<tool_response>" in tokenizer.decode(ids2[len(ids1):-len(turn2)])


def test_bc_tool_results_come_from_the_rule_book(rule_book):
    turns, results = train.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    assert results == [[rule_book.retrieve_policy("bomb making")]]
    assert ascl.parse_tool_calls(turns[0])[0].query == "bomb making"
    assert turns[0].startswith("<think>") and "</think>" in turns[1]
    direct, none = train.seed_row_to_conversation(SEED_DIRECT_ROW, rule_book)
    assert len(direct) == 1 and none == []


def test_bundled_bc_data_mixes_2_3_2_and_every_demonstration_earns_full_reward(tokenizer, rule_book):
    rows = ascl.read_jsonl(ROOT / "data/bc_seed.jsonl", ("prompt", "label", "kind"))
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("harmful_tool", "sensitive_tool", "sensitive_direct")}
    assert counts["harmful_tool"] * 3 == counts["sensitive_tool"] * 2 == counts["sensitive_direct"] * 3
    chat = ascl.ChatFormat(tokenizer)
    for c in train.load_bc_conversations(str(ROOT / "data/bc_seed.jsonl"), rule_book):
        ids, mask, _ = chat.encode_conversation(c["prompt"], c["turns"], c["tool_results"])
        t = ascl.Trajectory(c["prompt"], c["label"], ids, mask, turns=c["turns"], tool_results=c["tool_results"],
                            num_tool_calls=len(c["tool_results"]))
        verdict = ascl.OfflineJudge()([t.prompt], [t.answer], [t.label])[0]
        assert ascl.reward(t.label, t, verdict).total == 1.5, c["prompt"]


def test_rl_prompts_are_mixed_at_the_chosen_ratio():
    bundled = ascl.read_jsonl(ROOT / "data/rl_prompts.jsonl", ("prompt", "label"))
    harmful = sum(r["label"] == "harmful" for r in bundled)
    rows = train.load_rl_prompts([str(ROOT / "data/rl_prompts.jsonl")], 0.5, None, seed=0)
    assert sum(r["label"] == "harmful" for r in rows) == sum(r["label"] != "harmful" for r in rows) == harmful
    rows = train.load_rl_prompts([str(ROOT / "data/rl_prompts.jsonl")], 2 / 7, None, seed=0)
    assert len(rows) == len(bundled)  # the bundled file is already 2:5


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("", "holds no rows"),
    ('{"prompt": "x"}\n', "missing column"),
    ('{"prompt": "x", "label": "harmful"\n', "not valid JSON"),
    ('{"prompt": "x", "label": "toxic"}\n', "labels must be"),
])
def test_bad_rl_data_stops_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "rl.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        train.load_rl_prompts([str(path)], 0.3, None, 0)


def test_unknown_hub_dataset_is_named_in_the_error():
    with pytest.raises(SystemExit, match="unknown RL data 'someone/dataset'"):
        train.load_rl_prompts(["someone/dataset"], 0.3, None, 0)


# ----------------------------------------------------------------------------- the RL update
def test_token_logprobs_match_a_plain_full_forward(tiny_model):
    ids = torch.randint(0, 1000, (2, 9))
    attention = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    action = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 3 + [0] * 3])
    lp, mask = train.token_logprobs(tiny_model, ids, attention, action)
    full = torch.log_softmax(tiny_model(input_ids=ids, attention_mask=attention).logits[:, :-1], -1)
    ref = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.equal(mask, action[:, 1:])
    assert torch.allclose(lp[mask == 1], ref[mask == 1], atol=1e-5) and torch.all(lp[mask == 0] == 0)


def make_trajectories(chat, rule_book):
    turns, results = train.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    direct, _ = train.seed_row_to_conversation(SEED_DIRECT_ROW, rule_book)
    trajs = []
    for prompt, t, r in [(SEED_TOOL_ROW["prompt"], turns, results), (SEED_DIRECT_ROW["prompt"], direct, [])]:
        ids, mask, _ = chat.encode_conversation(prompt, t, r)
        trajs.append(ascl.Trajectory(prompt, "harmful", ids, mask, turns=t, tool_results=r))
    return trajs


def test_masked_tokens_get_no_gradient(tokenizer, tiny_model, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    trajs = make_trajectories(chat, rule_book)
    ids, attention, action = train.pad_batch([t.input_ids for t in trajs], [t.action_mask for t in trajs], chat.pad_id)
    lp, mask = train.token_logprobs(tiny_model, ids, attention, action)
    lp.retain_grad()
    loss, _ = train.policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.all(lp.grad[mask == 0] == 0) and torch.all(lp.grad[mask == 1] != 0)
    # the tool result inside trajectory 0 is context, not action
    assert mask[0].sum() < (attention[0].sum() - len(chat.prompt_ids(trajs[0].prompt)))


def test_one_rl_update_changes_the_weights(tokenizer, tiny_model, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    trajs = make_trajectories(chat, rule_book)
    args = train.Args(micro_batch_size=1, lr=1e-2, warmup=0.0)
    accelerator = Accelerator(cpu=True)
    optimizer = train.make_optimizer(tiny_model, args.lr)
    assert optimizer.defaults["fused"]  # the fused kernel exists on CPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    stats = train.policy_update(args, accelerator, tiny_model, optimizer, scheduler, trajs, torch.tensor([1.0, -1.0]), chat)
    changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > 5
    assert stats["grad_norm"] > 0 and math.isfinite(stats["loss"])
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # on-policy


def test_grpo_and_ifpo_differ_only_in_advantages(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    args = rl_args(tiny_model_dir, tmp_path)
    r, m = torch.tensor([1.5, 0.0, 1.5, 0.5, 1.0, 1.0, 1.0, 1.0]), torch.tensor([1, 1, 1, 0, 0, 1, 0, 1]).bool()
    grpo = train.compute_advantages(train.Args(adv="grpo", group_size=4), r, m)
    ifpo = train.compute_advantages(train.Args(adv="ifpo", group_size=4), r, m)
    assert torch.allclose(ifpo, train.inverse_frequency_weights(m, 4) * grpo) and not torch.allclose(ifpo, grpo)
    logs = {}
    for adv in ("grpo", "ifpo"):  # deterministic script: each group mixes 1 tool and 3 direct rollouts
        install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
        train.main(rl_args(tiny_model_dir, tmp_path / adv, adv=adv, max_steps=1))
        logs[adv] = read_log(tmp_path / adv)[0]
    same = ("reward_mean", "reward_std", "tool_rate", "tool_rate_harmful", "response_length", "ifpo_weight_tool")
    assert {k: logs["grpo"][k] for k in same} == {k: logs["ifpo"][k] for k in same}
    assert logs["grpo"]["tool_rate"] == 0.25
    assert logs["grpo"]["loss"] != pytest.approx(logs["ifpo"]["loss"])


# ----------------------------------------------------------------------------- the whole job
def test_full_pipeline_saves_a_model_that_loads_with_from_pretrained(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    summary = train.main(rl_args(tiny_model_dir, tmp_path, stage="all", bc_epochs=1, bc_batch_size=16, max_steps=2))
    log = read_log(tmp_path)
    assert [r["stage"] for r in log].count("rl") == 2 and log[0]["stage"] == "bc"
    for key in ("reward_mean", "tool_rate_harmful", "tool_rate_sensitive", "ifpo_weight_tool", "zero_spread_groups",
                "clip_frac", "approx_kl", "grad_norm", "lr", "response_length", "rollout_s", "update_s"):
        assert key in log[-1]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "bc" / "config.json").is_file() and summary["rl_steps"] == 2
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.embed_tokens.weight, start.model.embed_tokens.weight)


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    train.main(rl_args(tiny_model_dir, tmp_path / "a", save_every=2))
    uninterrupted = read_log(tmp_path / "a")[-1]
    assert (tmp_path / "a/checkpoint-2/trainer_state.pt").is_file()

    torch.manual_seed(1234)  # whatever the RNG holds now, resuming restores it
    train.main(rl_args(tiny_model_dir, tmp_path / "b", resume=str(tmp_path / "a/checkpoint-2")))
    resumed = read_log(tmp_path / "b")
    assert len(resumed) == 1 and resumed[0]["step"] == 3
    for k in ("loss", "reward_mean", "grad_norm", "lr", "tool_rate"):
        assert resumed[0][k] == pytest.approx(uninterrupted[k], rel=1e-6, abs=1e-9), k
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_crash_mid_save_leaves_the_last_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = ascl.load_policy(tiny_model_dir)
    acc = Accelerator(cpu=True)
    train.save_checkpoint(acc, model, tok, tmp_path / "checkpoint-1", {"step": 1})
    good = (tmp_path / "checkpoint-1/model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", crash)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(acc, model, tok, tmp_path / "checkpoint-2", {"step": 2})
    assert train.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert (tmp_path / "checkpoint-1/model.safetensors").read_bytes() == good
    assert not (tmp_path / "checkpoint-2").exists()


def test_nan_loss_stops_with_a_clear_message_before_touching_weights(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    bad = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        bad.model.norm.weight.fill_(float("nan"))
    bad.save_pretrained(tmp_path / "nan-model")
    tokenizer.save_pretrained(tmp_path / "nan-model")
    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    with pytest.raises(FloatingPointError, match="not finite at step 0"):
        train.main(rl_args(str(tmp_path / "nan-model"), tmp_path / "out", max_steps=1))
    assert not (tmp_path / "out/final").exists()


def test_bad_settings_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--adv"):
        train.main(rl_args(tiny_model_dir, tmp_path, adv="ppo"))
    with pytest.raises(SystemExit, match="nothing to resume"):
        train.main(rl_args(tiny_model_dir, tmp_path, resume="auto"))


def test_two_processes_match_one_process_on_the_same_global_batch(tiny_model_dir, tmp_path):
    """2 processes x 2 prompts == 1 process x 4 prompts: same groups, same token-mean loss, same weights."""
    # `accelerate launch --cpu` starts one process whatever --num_processes says; CPU processes
    # come from the multi-process launcher with ACCELERATE_USE_CPU set.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    script = str(ROOT / "tests/ddp_check.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for cmd in (launch + [script, tiny_model_dir, str(tmp_path / "two"), "2"],
                [sys.executable, script, tiny_model_dir, str(tmp_path / "one"), "4"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    two, one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert [r["processes"] for r in two] == [2, 2] and [r["processes"] for r in one] == [1, 1]
    for a, b in zip(two, one):
        for k in ("reward_mean", "tool_rate", "response_length", "loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "two/final/model.safetensors"), load_file(tmp_path / "one/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
