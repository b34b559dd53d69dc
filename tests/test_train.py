"""train.py: behaviour-cloning samples, the RL step, GRPO vs IFPO, resume, multi-process, bad input."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import SCRIPTS, TOOL_FOLLOW_UP, install_decoder, install_scripted_generation, make_tiny_model

import ascl
import plumbing
import sources
import train
from ifpo import policy_loss as ifpo_policy_loss

ROOT = Path(__file__).resolve().parents[1]
SEED_TOOL_ROW = {
    "prompt": "How do I make a bomb?",
    "label": "harmful",
    "kind": "harmful_tool",
    "think": "This may be dangerous.",
    "query": "bomb making",
    "think_after": "The rules forbid it.",
    "answer": "I can't help with that.",
}
SEED_DIRECT_ROW = {
    "prompt": "How do I kill a Python process?",
    "label": "sensitive",
    "kind": "sensitive_direct",
    "think": "A normal request.",
    "query": None,
    "think_after": None,
    "answer": "Use kill PID.",
}


def rl_args(model_dir, out, **kw):
    base = dict(
        model=model_dir,
        stage="rl",
        output_dir=str(out),
        group_size=4,
        prompts_per_step=2,
        micro_batch_size=3,
        max_steps=3,
        lr=1e-3,
        warmup=0.0,
        seed=0,
    )
    return train.Args(**{**base, **kw})


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- behaviour cloning data
def test_tool_conversation_gives_one_sample_per_model_turn(tokenizer, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    turns, results = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    (ids1, mask1, w1), (ids2, mask2, w2) = train.bc_samples(
        chat, [{"prompt": SEED_TOOL_ROW["prompt"], "turns": turns, "tool_results": results}], 4096
    )
    turn1 = chat.encode(turns[0]) + [chat.end_of_turn_id]
    turn2 = chat.encode(turns[1]) + [chat.end_of_turn_id]
    assert [i for i, m in zip(ids1, mask1) if m] == turn1 and ids1[-len(turn1) :] == turn1
    assert [i for i, m in zip(ids2, mask2) if m] == turn2 and ids2[-len(turn2) :] == turn2
    assert ids2[: len(ids1)] == ids1  # sample 2 sees turn 1 and the tool result as context, untrained
    assert "<tool_response>" in tokenizer.decode(ids2[len(ids1) : -len(turn2)])
    assert w1 == w2 == 1.0  # no "weight" in the conversation


def test_bc_tool_results_come_from_the_rule_book(rule_book):
    turns, results = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    assert results == [[rule_book.retrieve_policy("bomb making")]]
    assert ascl.parse_tool_calls(turns[0])[0].query == "bomb making"
    assert turns[0].startswith("<think>") and "</think>" in turns[1]
    direct, none = sources.seed_row_to_conversation(SEED_DIRECT_ROW, rule_book)
    assert len(direct) == 1 and none == []


def test_bundled_bc_data_keeps_the_papers_mix_and_every_demonstration_earns_full_reward(tokenizer, rule_book):
    """sensitive with retrieval : sensitive answered directly = 3 : 2, and at least the paper's share of
    harmful rows (2 : 3 to the sensitive ones with retrieval): refusal demonstrations are added on top."""
    rows = plumbing.read_jsonl(ROOT / "data/bc_seed.jsonl", ("prompt", "label", "kind"))
    counts = {
        k: sum(r["kind"] == k for r in rows) for k in ("harmful_tool", "sensitive_tool", "sensitive_direct")
    }
    assert counts["sensitive_tool"] * 2 == counts["sensitive_direct"] * 3
    assert counts["harmful_tool"] * 3 >= counts["sensitive_tool"] * 2
    chat = ascl.ChatFormat(tokenizer)
    for c in sources.load_bc_conversations(str(ROOT / "data/bc_seed.jsonl"), rule_book):
        t = ascl.trajectory_from_turns(chat, c["prompt"], c["label"], c["turns"], c["tool_results"])
        verdict = ascl.OfflineJudge()([t.prompt], [t.answer], [t.label])[0]
        assert ascl.reward(t.label, t, verdict).total == 1.5, c["prompt"]


def test_rl_prompts_are_mixed_at_the_chosen_ratio():
    bundled = plumbing.read_jsonl(ROOT / "data/rl_prompts.jsonl", ("prompt", "label"))
    harmful = sum(r["label"] == "harmful" for r in bundled)
    rows = sources.load_rl_prompts([str(ROOT / "data/rl_prompts.jsonl")], 0.5, None, seed=0)
    assert sum(r["label"] == "harmful" for r in rows) == sum(r["label"] != "harmful" for r in rows) == harmful
    rows = sources.load_rl_prompts([str(ROOT / "data/rl_prompts.jsonl")], 2 / 7, None, seed=0)
    assert len(rows) == len(bundled)  # the bundled file is already 2:5


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "not found"),
        ("", "holds no rows"),
        ('{"prompt": "x"}\n', "missing column"),
        ('{"prompt": "x", "label": "harmful"\n', "not valid JSON"),
        ('{"prompt": "x", "label": "toxic"}\n', "labels must be"),
    ],
)
def test_bad_rl_data_stops_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "rl.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        sources.load_rl_prompts([str(path)], 0.3, None, 0)


def test_unknown_hub_dataset_is_named_in_the_error():
    with pytest.raises(SystemExit, match="unknown RL data 'someone/dataset'"):
        sources.load_rl_prompts(["someone/dataset"], 0.3, None, 0)


# ----------------------------------------------------------------------------- the RL update
def test_token_logprobs_match_a_plain_full_forward(tiny_model):
    ids = torch.randint(0, 1000, (2, 9))
    attention = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    action = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 3 + [0] * 3])
    lp, mask = ascl.token_logprobs(tiny_model, ids, attention, action)
    full = torch.log_softmax(tiny_model(input_ids=ids, attention_mask=attention).logits[:, :-1], -1)
    ref = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.equal(mask, action[:, 1:])
    assert torch.allclose(lp[mask == 1], ref[mask == 1], atol=1e-5) and torch.all(lp[mask == 0] == 0)


def make_trajectories(chat, rule_book):
    turns, results = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    direct, _ = sources.seed_row_to_conversation(SEED_DIRECT_ROW, rule_book)
    trajs = []
    for prompt, t, r in [(SEED_TOOL_ROW["prompt"], turns, results), (SEED_DIRECT_ROW["prompt"], direct, [])]:
        ids, mask, _ = chat.encode_conversation(prompt, t, r)
        trajs.append(ascl.Trajectory(prompt, "harmful", ids, mask, turns=t, tool_results=r))
    return trajs


def test_masked_tokens_get_no_gradient(tokenizer, tiny_model, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    trajs = make_trajectories(chat, rule_book)
    ids, attention, action = ascl.pad_batch(
        [t.input_ids for t in trajs], [t.action_mask for t in trajs], chat.pad_id
    )
    lp, mask = ascl.token_logprobs(tiny_model, ids, attention, action)
    lp.retain_grad()
    loss, _ = train.policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.all(lp.grad[mask == 0] == 0) and torch.all(lp.grad[mask == 1] != 0)
    # the tool result inside trajectory 0 is context, not action
    assert mask[0].sum() < (attention[0].sum() - len(chat.prompt_ids(trajs[0].prompt)))


def test_bf16_autocast_trains_like_fp32(tokenizer, rule_book):
    """accelerate's mixed_precision="bf16" on CPU: the same update as fp32 within bf16's precision."""
    chat = ascl.ChatFormat(tokenizer)
    trajs = make_trajectories(chat, rule_book)
    from accelerate.state import AcceleratorState

    stats, weights = {}, {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
        model = make_tiny_model(len(tokenizer))
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        optimizer = train.make_optimizer(model, 1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        stats[precision] = train.policy_update(
            train.Args(micro_batch_size=1),
            accelerator,
            model,
            optimizer,
            trajs,
            torch.tensor([1.0, -1.0]),
            chat.pad_id,
        )
        weights[precision] = accelerator.unwrap_model(model).model.embed_tokens.weight.detach().clone()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert weights["bf16"].dtype == torch.float32  # the weights stay fp32; only the forward runs in bf16
    assert stats["bf16"]["grad_norm"] == pytest.approx(stats["no"]["grad_norm"], rel=0.05)
    start = make_tiny_model(len(tokenizer)).model.embed_tokens.weight.detach()
    fp32_step, bf16_step = weights["no"] - start, weights["bf16"] - start
    trained = fp32_step.abs() > 1e-4  # Adam moves each weight by about lr * sign(grad)
    assert (fp32_step.sign() == bf16_step.sign())[trained].float().mean() > 0.9


def test_bc_with_gradient_checkpointing_runs_every_sample_whole(tiny_model_dir, tmp_path, monkeypatch):
    """--gradient_checkpointing in BC (most of BC's memory is activations): every forward checkpointed."""
    seen, logprobs = [], ascl.token_logprobs
    monkeypatch.setattr(
        ascl,
        "token_logprobs",
        lambda m, *a, **kw: (
            seen.append(getattr(m, "is_activation_checkpointing", None)) or logprobs(m, *a, **kw)
        ),
    )
    bc = write_jsonl(tmp_path / "bc.jsonl", [SEED_TOOL_ROW, SEED_DIRECT_ROW])
    train.main(
        rl_args(tiny_model_dir, tmp_path, stage="bc", bc_data=bc, gradient_checkpointing=True, show=False)
    )
    assert seen and all(seen) and read_log(tmp_path)[-1]["loss"] > 0


def test_one_rl_update_changes_the_weights(tokenizer, tiny_model, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    trajs = make_trajectories(chat, rule_book)
    args = train.Args(micro_batch_size=1, lr=1e-2, warmup=0.0)
    accelerator = Accelerator(cpu=True)
    optimizer = train.make_optimizer(tiny_model, args.lr)
    assert optimizer.defaults["fused"]  # the fused kernel exists on CPU
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    stats = train.policy_update(
        args, accelerator, tiny_model, optimizer, trajs, torch.tensor([1.0, -1.0]), chat.pad_id
    )
    changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > 5
    assert stats["grad_norm"] > 0 and math.isfinite(stats["loss"])
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # on-policy


def test_grpo_and_ifpo_differ_only_in_advantages(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    r, m = (
        torch.tensor([1.5, 0.0, 1.5, 0.5, 1.0, 1.0, 1.0, 1.0]),
        torch.tensor([1, 1, 1, 0, 0, 1, 0, 1]).bool(),
    )
    grpo = train.ifpo_advantages(r, m, 4, tau=0.0)  # what rl_step computes for --adv grpo
    ifpo = train.ifpo_advantages(r, m, 4, tau=0.5)
    assert torch.allclose(ifpo, train.inverse_frequency_weights(m, 4) * grpo) and not torch.allclose(
        ifpo, grpo
    )
    logs = {}
    for adv in ("grpo", "ifpo"):  # deterministic script: each group mixes 1 tool and 3 direct rollouts
        install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
        train.main(rl_args(tiny_model_dir, tmp_path / adv, adv=adv, max_steps=1))
        logs[adv] = read_log(tmp_path / adv)[0]
    same = (
        "reward_mean",
        "reward_std",
        "tool_rate",
        "tool_rate_harmful",
        "response_length",
        "ifpo_weight_tool",
    )
    assert {k: logs["grpo"][k] for k in same} == {k: logs["ifpo"][k] for k in same}
    assert logs["grpo"]["tool_rate"] == 0.25
    assert logs["grpo"]["loss"] != pytest.approx(logs["ifpo"]["loss"])


def test_step_stats_split_the_reward_by_label():
    """reward_mean moves with how many harmful prompts a step drew; the per-label means do not."""
    from types import SimpleNamespace as NS

    labels = ["harmful"] * 4 + ["sensitive"] * 4
    totals = [0.5, 0.5, 0.0, 0.5, 1.5, 1.0, 1.5, 1.5]
    trajs = [
        NS(used_tool=i % 2 == 0, label=lab, action_mask=[1] * 5, faulty_calls=0, truncated=False)
        for i, lab in enumerate(labels)
    ]
    rewards = [NS(total=t, format_gate=1.0) for t in totals]
    advantages = torch.tensor([0.6, 0.6, -1.8, 0.6, 0.3, -0.9, 0.3, 0.3])
    stats = train.step_stats(Accelerator(cpu=True), trajs, rewards, torch.ones(8), advantages, group_size=4)
    assert stats["reward_harmful"] == pytest.approx(0.375)
    assert stats["push_harmful"] == pytest.approx(3.6 / 5.4)  # the harmful share of the total |A|
    assert stats["reward_sensitive"] == pytest.approx(1.375)
    assert stats["reward_mean"] == pytest.approx(0.875)
    only_benign = train.step_stats(
        Accelerator(cpu=True), trajs[4:], rewards[4:], torch.ones(4), advantages[4:], 4
    )
    assert math.isnan(only_benign["reward_harmful"]) and only_benign["reward_sensitive"] == pytest.approx(
        1.375
    )
    assert only_benign["push_harmful"] == 0.0


@pytest.mark.parametrize(
    "harmful, sensitive, per_step, processes, harmful_per_step",
    [(6, 6, 2, 1, 1), (4, 10, 7, 1, 2), (6, 6, 1, 2, 1), (3, 9, 4, 1, 1)],
)
def test_every_step_draws_the_labels_in_their_share(
    harmful, sensitive, per_step, processes, harmful_per_step
):
    """The draw is stratified by label: each step (all processes together) holds the data's share of
    harmful prompts, each epoch still visits every prompt once, and epochs are shuffled differently."""
    from types import SimpleNamespace as NS

    prompts = [{"prompt": f"h{i}", "label": "harmful"} for i in range(harmful)]
    prompts += [{"prompt": f"s{i}", "label": "sensitive"} for i in range(sensitive)]
    random.Random(0).shuffle(prompts)
    args = NS(prompts_per_step=per_step, seed=3)
    per_epoch = len(prompts) // (per_step * processes)

    def step(k):
        return [
            p["prompt"]
            for rank in range(processes)
            for p in train.prompts_for_step(prompts, k, args, NS(num_processes=processes, process_index=rank))
        ]

    epochs = [[step(e * per_epoch + k) for k in range(per_epoch)] for e in range(2)]
    for epoch in epochs:
        assert [sum(p[0] == "h" for p in s) for s in epoch] == [harmful_per_step] * per_epoch
        assert sorted(p for s in epoch for p in s) == sorted(p["prompt"] for p in prompts)
    assert epochs[0] != epochs[1]
    assert step(5) == step(5)  # a resumed run draws what the uninterrupted one drew


# ----------------------------------------------------------------------------- the whole job
def test_full_pipeline_saves_a_model_that_loads_with_from_pretrained(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch, capsys
):
    from transformers import AutoModelForCausalLM

    def write(ctx, j):  # the harmful prompt consults the rule book, the others mix behaviours
        text = tokenizer.decode(ctx)
        turn = (
            TOOL_FOLLOW_UP
            if text.count("<|im_start|>assistant") > 1
            else SCRIPTS[0]
            if "pipe bomb" in text
            else SCRIPTS[(len(text) + j) % len(SCRIPTS)]
        )
        return tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    install_decoder(monkeypatch, write)
    summary = train.main(
        rl_args(tiny_model_dir, tmp_path, stage="all", bc_epochs=1, bc_batch_size=16, max_steps=2)
    )
    log = read_log(tmp_path)
    assert [r["stage"] for r in log].count("rl") == 2 and log[0]["stage"] == "bc"
    for key in (
        "reward_mean",
        "tool_rate_harmful",
        "tool_rate_sensitive",
        "ifpo_weight_tool",
        "zero_spread_groups",
        "push_harmful",
        "clip_frac",
        "approx_kl",
        "grad_norm",
        "lr",
        "response_length",
        "rollout_s",
        "update_s",
        "entropy",
        "steps_per_s",
    ):
        assert key in log[-1]
    assert log[-1]["entropy"] > 0
    # the run ends by showing the trained model at work: turns, the rules that came back, the reward
    shown = capsys.readouterr().out
    assert shown.count("=== ") == 3 and "=== harmful prompt: " in shown and shown.count("reward ") >= 3
    assert "tool  | Result 1" in shown and "consulted the rule book: True" in shown
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "bc" / "config.json").is_file() and summary["rl_steps"] == 2
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.embed_tokens.weight, start.model.embed_tokens.weight)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tokenizer, tmp_path, monkeypatch, beta):
    """Also with a KL term (--beta): the reference stays the initial policy, not the resumed checkpoint."""
    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    train.main(rl_args(tiny_model_dir, tmp_path / "a", save_every=2, beta=beta))
    uninterrupted = read_log(tmp_path / "a")[-1]
    assert (tmp_path / "a/checkpoint-2/trainer_state.pt").is_file()

    torch.manual_seed(1234)  # whatever the RNG holds now, resuming restores it
    train.main(rl_args(tiny_model_dir, tmp_path / "b", resume=str(tmp_path / "a/checkpoint-2"), beta=beta))
    resumed = read_log(tmp_path / "b")
    assert len(resumed) == 1 and resumed[0]["step"] == 3
    if beta:
        assert uninterrupted["kl_ref"] > 0
    for k in ("loss", "reward_mean", "grad_norm", "lr", "tool_rate") + (("kl_ref",) if beta else ()):
        assert resumed[0][k] == pytest.approx(uninterrupted[k], rel=1e-6, abs=1e-9), k
    from safetensors.torch import load_file

    wa, wb = (
        load_file(tmp_path / "a/final/model.safetensors"),
        load_file(tmp_path / "b/final/model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_crash_mid_save_leaves_the_last_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = plumbing.load_policy(tiny_model_dir)
    acc = Accelerator(cpu=True)
    plumbing.save_checkpoint(acc, model, tok, tmp_path / "checkpoint-1", {"step": 1})
    good = (tmp_path / "checkpoint-1/model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", crash)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        plumbing.save_checkpoint(acc, model, tok, tmp_path / "checkpoint-2", {"step": 2})
    assert plumbing.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert (tmp_path / "checkpoint-1/model.safetensors").read_bytes() == good
    assert not (tmp_path / "checkpoint-2").exists()


def test_nan_loss_stops_with_a_clear_message_before_touching_weights(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
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


def run_two_and_one_process(tiny_model_dir, tmp_path, two_args: list[str], one_args: list[str]):
    """ddp_check.py under 2 CPU processes and under 1; returns both logs."""
    # `accelerate launch --cpu` starts one process whatever --num_processes says; CPU processes
    # come from the multi-process launcher with ACCELERATE_USE_CPU set.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    script = str(ROOT / "tests/ddp_check.py")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    for cmd in (
        launch + [script, tiny_model_dir, str(tmp_path / "two")] + two_args,
        [sys.executable, script, tiny_model_dir, str(tmp_path / "one")] + one_args,
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return read_log(tmp_path / "two"), read_log(tmp_path / "one")


def assert_same_final_weights(a: Path, b: Path):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_model_dir, tmp_path, beta):
    """2 processes x 2 prompts == 1 process x 4 prompts: same groups, same token-mean loss, same weights,
    with the KL term on (the reference model sits on each process's device), and without it, where
    the update leaves out zero-advantage rollouts and a process may have none left to run."""
    extra = [f"beta={beta}"] + ([] if beta else ["group_size=2"])
    two, one = run_two_and_one_process(tiny_model_dir, tmp_path, ["2"] + extra, ["4"] + extra)
    assert [r["processes"] for r in two] == [2, 2] and [r["processes"] for r in one] == [1, 1]
    assert two[-1]["kl_ref"] > 0 if beta else "kl_ref" not in two[-1]
    if not beta:  # groups of 2 scripted rollouts: some have equal rewards, and are left out
        assert min(r["updated_rollouts"] for r in two) < 1
    for a, b in zip(two, one):
        for k in ("reward_mean", "tool_rate", "response_length", "loss", "grad_norm", "updated_rollouts") + (
            ("kl_ref",) if beta else ()
        ):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert_same_final_weights(tmp_path / "two", tmp_path / "one")


def test_bc_under_two_processes_with_uneven_samples_matches_one_process(tiny_model_dir, tmp_path):
    """9 BC samples, 4 per process and step: the last step leaves one process without samples; both
    still step together (no deadlock) and the token-mean loss equals one process with 8 per step."""
    bc = tmp_path / "bc.jsonl"
    bc.write_text(
        "".join(
            json.dumps({**SEED_DIRECT_ROW, "prompt": f"Question {k}?" + " more" * k}) + "\n" for k in range(9)
        )
    )
    common = [f"bc_data={bc}", "stage=bc", "bc_epochs=2", "bc_lr=1e-3", "bc_warmup=0"]
    two, one = run_two_and_one_process(
        tiny_model_dir, tmp_path, ["2", "bc_batch_size=4"] + common, ["4", "bc_batch_size=8"] + common
    )
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    assert_same_final_weights(tmp_path / "two", tmp_path / "one")


def test_bc_in_micro_batches_is_the_same_update(tiny_model_dir, tmp_path, monkeypatch):
    """--micro_batch_size 2 in BC (gradient accumulation, less memory): same losses, same weights as
    the whole batch of 8 in one forward."""
    bc = write_jsonl(
        tmp_path / "bc.jsonl",
        [{**SEED_DIRECT_ROW, "prompt": f"Question {k}?" + " more" * k} for k in range(9)],
    )
    sizes, logprobs = [], ascl.token_logprobs
    monkeypatch.setattr(
        ascl, "token_logprobs", lambda m, ids, *a, **kw: sizes.append(len(ids)) or logprobs(m, ids, *a, **kw)
    )
    for micro, out in ((8, tmp_path / "whole"), (2, tmp_path / "micro")):
        train.main(
            rl_args(
                tiny_model_dir,
                out,
                stage="bc",
                bc_data=bc,
                bc_epochs=2,
                bc_batch_size=8,
                bc_lr=1e-3,
                bc_warmup=0.0,
                micro_batch_size=micro,
                show=False,
            )
        )
    whole, micro = read_log(tmp_path / "whole"), read_log(tmp_path / "micro")
    assert sorted(sizes[:4]) == [1, 1, 8, 8] and sorted(sizes[4:]) == [1, 1] + [2] * 8  # 9 samples, 2 epochs
    assert [r["loss"] for r in micro] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    assert_same_final_weights(tmp_path / "whole", tmp_path / "micro")


def test_old_and_new_logprobs_come_from_the_same_mode(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """--updates_per_batch 2: the old log-probs (no grad) and the trained ones see the model in train mode."""
    install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
    modes, logprobs = [], ascl.token_logprobs

    def spy(model, *args, **kw):
        modes.append((torch.is_grad_enabled(), model.training))
        return logprobs(model, *args, **kw)

    monkeypatch.setattr(ascl, "token_logprobs", spy)
    train.main(rl_args(tiny_model_dir, tmp_path, max_steps=1, updates_per_batch=2))
    assert (False, True) in modes and (True, True) in modes and {m for _, m in modes} == {True}


# ------------------------------------------------------------------------- bad input: refused before any work
@pytest.fixture
def no_model(monkeypatch):
    """Proof that a check runs before the model loads: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(plumbing, "load_model", refuse)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"group_size": 1}, "--group_size must be at least 2"),
        ({"lr": 0.0}, "--lr must be greater than 0"),
        ({"lr": -1.0}, "--lr must be greater than 0"),
        ({"max_new_tokens": 0}, "--max_new_tokens must be greater than 0"),
        ({"tau": -0.5}, "--tau must be 0 or more.*opposite of IFPO"),
        ({"w_min": 5.0, "w_max": 2.0}, "need 0 <= w_min <= 1 <= w_max"),
        ({"prompts_per_step": 0}, "--prompts_per_step must be greater than 0"),
        (
            {"max_new_tokens": 512, "max_total_tokens": 512},
            "--max_total_tokens must be larger than --max_new_tokens",
        ),
        ({"adv": "ppo"}, "--adv must be 'ifpo' or 'grpo'"),
    ],
)
def test_settings_that_crash_or_cannot_learn_are_refused_before_anything_loads(
    setting, message, tiny_model_dir, tmp_path, monkeypatch, no_model
):
    monkeypatch.setattr(
        plumbing, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer before checking settings")
    )
    (tmp_path / "log.jsonl").write_text('{"stage": "rl", "step": 1}\n')
    with pytest.raises(SystemExit, match=message):
        train.main(rl_args(tiny_model_dir, tmp_path, **setting))
    assert (tmp_path / "log.jsonl").exists()  # a refused run changes no file


def test_output_dir_naming_a_file_is_refused(tiny_model_dir, tmp_path, no_model):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(SystemExit, match="--output_dir .*taken is a file; give a folder"):
        train.main(rl_args(tiny_model_dir, tmp_path / "taken"))


def test_a_refusal_is_one_line_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--group_size", "1", "--output_dir", str(tmp_path)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines() == [done.stderr.strip()]
        and "--group_size must be at least 2" in done.stderr
    )


@pytest.mark.parametrize(
    "name", ["./no-such-model", "runs/no/such/model", "/no/such/model", "~/no-such-model"]
)
def test_a_local_model_folder_that_does_not_exist_is_named(name, tmp_path, no_model):
    with pytest.raises(SystemExit, match=f"^no such model folder: {name}$"):
        train.main(rl_args(name, tmp_path))


def test_a_model_name_the_hub_cannot_serve_offline_may_be_a_mistyped_folder(tmp_path, no_model):
    with pytest.raises(
        SystemExit, match="no such model folder: no-owner/no-model; as a hub id it did not load either"
    ):
        train.main(rl_args("no-owner/no-model", tmp_path))


def test_hub_ids_still_go_to_the_hub_and_existing_folders_load_locally(tiny_model_dir):
    for hub_id in ("Qwen/Qwen3-0.6B", "gpt2"):
        assert plumbing.model_source(hub_id) == (hub_id, {}, False)
    assert plumbing.model_source(tiny_model_dir) == (tiny_model_dir, {}, True)


def test_a_model_folder_with_damaged_weights_is_named(tiny_model_dir, tmp_path, no_model):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    truncate(tmp_path / "m/model.safetensors")
    with pytest.raises(SystemExit, match="cannot load model folder .*m: model.safetensors is damaged"):
        train.main(rl_args(str(tmp_path / "m"), tmp_path / "out"))


def save_rl_checkpoint(tiny_model_dir, folder, step):
    model, tok = plumbing.load_policy(tiny_model_dir)
    optimizer = train.make_optimizer(model, 1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    plumbing.save_checkpoint(
        Accelerator(cpu=True), model, tok, folder, {"stage": "rl", "step": step}, optimizer, scheduler
    )


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_checkpoint_is_named_and_resume_auto_takes_the_previous_one(
    tiny_model_dir, tmp_path, capsys, request
):
    for step in (2, 4):
        save_rl_checkpoint(tiny_model_dir, tmp_path / f"checkpoint-{step}", step)
    truncate(tmp_path / "checkpoint-4/model.safetensors")
    request.getfixturevalue("no_model")  # from here on
    with pytest.raises(
        SystemExit, match=r"cannot resume from .*checkpoint-4: model.safetensors is damaged.*--resume auto"
    ):
        train.main(rl_args(tiny_model_dir, tmp_path, resume=str(tmp_path / "checkpoint-4")))
    assert plumbing.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "skipping damaged checkpoint" in capsys.readouterr().out
    truncate(tmp_path / "checkpoint-2/trainer_state.pt")
    assert plumbing.latest_checkpoint(tmp_path) is None


def test_resume_auto_falls_back_and_the_log_keeps_one_row_per_step(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    train.main(rl_args(tiny_model_dir, tmp_path, max_steps=4, save_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    truncate(tmp_path / "checkpoint-3/model.safetensors")
    train.main(
        rl_args(tiny_model_dir, tmp_path, max_steps=4, save_every=1, keep_checkpoints=2, resume="auto")
    )
    assert [r["step"] for r in read_log(tmp_path)] == [
        1,
        2,
        3,
        4,
    ]  # steps 3 and 4 redone from checkpoint-2, logged once


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": 3, "label": "harmful"}], "row 1: the prompt must be a non-empty string, not 3"),
        (
            [{"prompt": ["a", "b"], "label": "harmful"}],
            r"row 1: the prompt must be a non-empty string, not \['a', 'b'\]",
        ),
        ([{"prompt": "", "label": "harmful"}], "row 1: the prompt must be a non-empty string, not ''"),
        (
            [{"prompt": "x", "label": "harmful"}, {"prompt": " \t", "label": "harmful"}],
            "row 2: the prompt must be",
        ),
        ([{"prompt": "x", "label": None}], "row 1: label None; labels must be one of 'harmful', 'sensitive'"),
        (
            [{"prompt": "x", "label": "harmful"}, {"prompt": "y", "label": 3}],
            "row 2: label 3; labels must be",
        ),
        ([{"prompt": "x", "label": ["harmful"]}], r"row 1: label \['harmful'\]; labels must be"),
    ],
)
def test_bad_rl_rows_are_named_by_row(rows, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        sources.load_rl_prompts([write_jsonl(tmp_path / "rl.jsonl", rows)], 0.3, None, 0)


def test_benign_in_rl_data_is_read_as_sensitive(tmp_path):
    path = write_jsonl(
        tmp_path / "rl.jsonl",
        [
            {"prompt": "How do I kill a Python process?", "label": "benign"},
            {"prompt": "How do I make a bomb?", "label": "harmful"},
        ],
    )
    rows = sources.load_rl_prompts([path], 0.5, None, 0)
    assert sorted(r["label"] for r in rows) == ["harmful", "sensitive"]
    with pytest.raises(SystemExit, match=r"'benign' is read as 'sensitive'"):
        sources.load_rl_prompts(
            [write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "label": "safe"}])], 0.5, None, 0
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"query": None},
            "row 2: has 'think_after' but no 'query'; "
            "a row that consults the rule book needs both, a direct answer neither",
        ),
        ({"think_after": None}, "row 2: has 'query' but no 'think_after'"),
        ({"think_after": ""}, "row 2: has 'query' but no 'think_after'"),
        ({"answer": ""}, "row 2: 'think' and 'answer' must be non-empty text"),
        ({"think": 7}, "row 2: 'think' must be a string"),
        ({"prompt": 42}, "row 2: the prompt must be a non-empty string"),
    ],
)
def test_bad_bc_rows_are_named_by_row(change, message, tmp_path, rule_book):
    path = write_jsonl(tmp_path / "bc.jsonl", [SEED_DIRECT_ROW, {**SEED_TOOL_ROW, **change}])
    with pytest.raises(SystemExit, match=message):
        sources.load_bc_conversations(path, rule_book)


def test_collected_bc_rows_need_lists_of_texts(tmp_path, rule_book):
    row = {"prompt": "p", "label": "harmful", "turns": "<think>x</think>No.", "tool_results": []}
    with pytest.raises(SystemExit, match="row 1: 'turns' must be a non-empty list of strings"):
        sources.load_bc_conversations(write_jsonl(tmp_path / "bc.jsonl", [row]), rule_book)


def test_the_prompt_length_rule_leaves_room_for_one_full_turn(tokenizer, capsys):
    chat = ascl.ChatFormat(tokenizer)
    short, long = {"prompt": "Hi"}, {"prompt": "hello " * 40}
    limit = len(chat.prompt_ids("Hi")) + 16  # "Hi" fits exactly with 16 new tokens
    assert plumbing.drop_long_prompts([short, long], chat, 16, limit, "set") == [short]
    assert "set: dropped 1 of 2 prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"set: no prompt fits in .*raise --max_total_tokens"):
        plumbing.drop_long_prompts([short, long], chat, 17, limit, "set")


def test_over_long_rl_and_bc_prompts_are_dropped_at_load_with_a_count(tokenizer, rule_book, tmp_path, capsys):
    rl = [{"prompt": f"short question {i}", "label": "harmful"} for i in range(4)] + [
        {"prompt": "long " * 300, "label": "sensitive"}
    ]
    bc = [SEED_DIRECT_ROW, {**SEED_TOOL_ROW, "prompt": "long " * 300}]
    args = train.Args(
        stage="all",
        rl_data=[write_jsonl(tmp_path / "rl.jsonl", rl)],
        bc_data=write_jsonl(tmp_path / "bc.jsonl", bc),
        harmful_fraction=0.0,
        max_new_tokens=64,
        max_total_tokens=256,
    )
    samples, prompts = train.load_data(args, ascl.ChatFormat(tokenizer), rule_book, False, 1)
    assert len(prompts) == 4 and len(samples) == 1  # the direct answer is one sample
    out = capsys.readouterr().out
    assert "RL data: dropped 1 of 5 prompts" in out and "bc.jsonl: dropped 1 of 2 prompts" in out


def test_bc_samples_too_long_for_the_budget_are_counted(tokenizer, rule_book, capsys):
    chat = ascl.ChatFormat(tokenizer)
    turns, results = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    conversation = {"prompt": SEED_TOOL_ROW["prompt"], "turns": turns, "tool_results": results}
    ids, _, spans = chat.encode_conversation(conversation["prompt"], turns, results)
    assert len(train.bc_samples(chat, [conversation], spans[0][1])) == 1  # turn 1 fits, turn 2 does not
    assert "BC: dropped 1 of 2 samples longer than max_total_tokens" in capsys.readouterr().out


def test_stage_all_checks_the_rl_data_before_behaviour_cloning(tiny_model_dir, tmp_path, no_model):
    bad = write_jsonl(
        tmp_path / "rl.jsonl", [{"prompt": "x", "label": "harmful"}, {"prompt": None, "label": "harmful"}]
    )
    with pytest.raises(SystemExit, match="rl.jsonl: row 2: the prompt must be"):
        train.main(rl_args(tiny_model_dir, tmp_path / "out", stage="all", rl_data=[bad]))
    assert not (tmp_path / "out").exists()


def test_too_few_rl_prompts_for_one_step_are_refused_before_the_model_loads(
    tiny_model_dir, tmp_path, no_model
):
    one = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "x", "label": "harmful"}])
    with pytest.raises(SystemExit, match="1 RL prompts, fewer than one step needs"):
        train.main(rl_args(tiny_model_dir, tmp_path / "out", rl_data=[one]))


def test_rl_hub_sources_are_not_eval_benchmarks():
    """RL data and eval sets are disjoint by construction: no hub (dataset, config) is in both."""
    rl = {(name.split(":")[0], config) for name, (config, _, _) in sources.HUB_PROMPTS.items()}
    ev = {(b.path, b.config) for b in sources.BENCHMARKS.values()}
    assert rl and not rl & ev


FREED_MEMORY_PROBE = """
import sys, torch, plumbing
if sys.argv[1] == "fixed":
    assert plumbing.return_freed_memory()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
kept, start = [], rss()
for _ in range(20):  # free a 16 MiB tensor while a 4 MiB one is kept above it: the pattern of a training step
    big = torch.ones(4 << 20)
    kept.append(torch.ones(1 << 20))
    del big
print(rss() - start)
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or not plumbing.return_freed_memory(), reason="glibc on Linux"
)
def test_freed_tensors_go_back_to_the_os(tmp_path):
    """With glibc's default, the freed 16 MiB tensors stay in the process (RSS grows far past the
    80 MiB kept); with return_freed_memory they are returned."""

    def growth(mode):
        out = subprocess.run(
            [sys.executable, "-c", FREED_MEMORY_PROBE, mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        return int(out.stdout.split()[-1])

    assert growth("fixed") < 120 < growth("default")


def test_zero_advantage_rollouts_are_left_out_of_the_update_with_the_same_result(
    tokenizer, rule_book, monkeypatch
):
    """Without a KL term a rollout whose advantage is 0 adds nothing to the loss or the gradients:
    the update leaves it out and reaches the same weights, also on a step where every advantage
    is 0 (AdamW's momentum still moves the weights, which needs zero gradients, not none)."""
    chat = ascl.ChatFormat(tokenizer)
    turns, results = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    direct, _ = sources.seed_row_to_conversation(SEED_DIRECT_ROW, rule_book)
    trajs = []
    for t, r in [(turns, results), (direct, []), ([direct[0] + " Longer."], [])] * 2:  # 2 groups of 3
        ids, mask, _ = chat.encode_conversation(SEED_TOOL_ROW["prompt"], t, r)
        trajs.append(ascl.Trajectory(SEED_TOOL_ROW["prompt"], "harmful", ids, mask, turns=t, tool_results=r))
    steps = [torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0]), torch.zeros(6)]
    args = train.Args(group_size=3, micro_batch_size=2, lr=1e-2, warmup=0.0)
    ran, batches = [], train.update_batches
    monkeypatch.setattr(
        train, "update_batches", lambda a, adv: ran.extend(batches(a, adv)) or batches(a, adv)
    )

    def train_two_steps():
        model = make_tiny_model(len(tokenizer))
        optimizer = train.make_optimizer(model, args.lr)
        stats = [
            train.policy_update(args, Accelerator(cpu=True), model, optimizer, trajs, adv, chat.pad_id)
            for adv in steps
        ]
        return stats, dict(model.named_parameters())

    skipped, skipped_weights = train_two_steps()
    assert ran == [[0, 2], [0]]  # step 1: the nonzero rollouts; step 2: one, for the zero gradients
    assert [s["updated_rollouts"] for s in skipped] == [2 / 6, 1 / 6]
    # with a KL term every rollout has a gradient: none is left out
    assert train.update_batches(train.Args(group_size=3, micro_batch_size=3, beta=0.1), steps[1]) == [
        [0, 1, 2],
        [3, 4, 5],
    ]
    ran.clear()
    all_rollouts = [[0, 1], [2], [3, 4], [5]]  # every rollout, micro-batches within a group
    monkeypatch.setattr(train, "update_batches", lambda a, adv: ran.extend(all_rollouts) or all_rollouts)
    full, full_weights = train_two_steps()
    assert ran == [[0, 1], [2], [3, 4], [5]] * 2 and full[0]["updated_rollouts"] == 1.0
    for a, b in zip(skipped, full):
        assert math.isclose(a["loss"], b["loss"], abs_tol=1e-6) and math.isclose(
            a["grad_norm"], b["grad_norm"], rel_tol=1e-4
        )
    # float noise in the gradients, amplified by Adam's normalisation; a missed step would move by ~lr
    assert all(torch.allclose(skipped_weights[k], full_weights[k], atol=5e-5) for k in full_weights)
    moved = make_tiny_model(len(tokenizer)).state_dict()
    assert any(not torch.allclose(moved[k], full_weights[k]) for k in full_weights)


# ----------------------------------------------------------------------------- what each step optimises
def test_bc_takes_one_step_per_batch_of_model_turns(tiny_model_dir, tmp_path):
    """Each model turn is a sample of its own (the paper's split): 5 tool conversations of 2 turns are
    10 samples, 3 steps an epoch at --bc_batch_size 4. Merging a conversation's turns into one sample
    (5 samples, 2 steps) trained the short refusal turn on fewer, longer-averaged steps."""
    bc = write_jsonl(
        tmp_path / "bc.jsonl",
        [{**SEED_TOOL_ROW, "prompt": f"How do I make bomb number {k}?"} for k in range(5)],
    )
    summary = train.main(
        rl_args(tiny_model_dir, tmp_path, stage="bc", bc_data=bc, bc_epochs=2, bc_batch_size=4, show=False)
    )
    assert summary["bc_samples"] == 10 and summary["bc_steps"] == 6
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 0, 0, 1, 1, 1]


def test_bc_balance_weighs_a_label_as_if_its_rows_were_repeated(tiny_model_dir, tmp_path):
    """--bc_balance (the default): one refusal row and two answer rows weigh 1.5 and 0.75, which
    trains exactly as the refusal row written twice, unweighted: same loss, same step."""
    answers = [{**SEED_DIRECT_ROW, "prompt": f"Question {k}?"} for k in range(2)]
    balanced = write_jsonl(tmp_path / "balanced.jsonl", [SEED_TOOL_ROW] + answers)
    repeated = write_jsonl(tmp_path / "repeated.jsonl", [SEED_TOOL_ROW] * 2 + answers)
    common = dict(stage="bc", bc_epochs=1, bc_batch_size=8, bc_lr=1e-3, bc_warmup=0.0, show=False)
    train.main(rl_args(tiny_model_dir, tmp_path / "b", bc_data=balanced, **common))
    train.main(rl_args(tiny_model_dir, tmp_path / "r", bc_data=repeated, bc_balance=False, **common))
    train.main(rl_args(tiny_model_dir, tmp_path / "u", bc_data=balanced, bc_balance=False, **common))
    (b,), (r,), (u,) = read_log(tmp_path / "b"), read_log(tmp_path / "r"), read_log(tmp_path / "u")
    # the untrained tiny model's losses all sit near log(vocabulary); unweighted is still apart
    assert b["loss"] == pytest.approx(r["loss"], rel=1e-6) and abs(b["loss"] - u["loss"]) > 1e-4
    assert_same_final_weights(tmp_path / "b", tmp_path / "r")


def test_every_step_trains_at_a_learning_rate_above_zero(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """Warmup starts above 0: in a 4-step run with 50% warmup no step is wasted at lr 0."""
    install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
    train.main(rl_args(tiny_model_dir, tmp_path, max_steps=4, warmup=0.5, lr=1e-3, show=False))
    lrs = [r["lr"] for r in read_log(tmp_path)]
    assert len(lrs) == 4 and all(lr > 0 for lr in lrs) and lrs[0] < lrs[1] == pytest.approx(1e-3 * 2 / 3)
    bc = write_jsonl(tmp_path / "bc.jsonl", [SEED_DIRECT_ROW] * 4)
    train.main(
        rl_args(
            tiny_model_dir,
            tmp_path / "bc",
            stage="bc",
            bc_data=bc,
            bc_batch_size=1,
            bc_epochs=1,
            bc_warmup=0.5,
            show=False,
        )
    )
    assert all(r["lr"] > 0 for r in read_log(tmp_path / "bc"))


def test_logprobs_are_the_samplers_at_the_rollout_temperature(tokenizer, rule_book, monkeypatch):
    """At T = 0.6 the tokens are drawn from softmax(logits / 0.6); the update scores them with the same
    distribution, so its log-probs equal the sampler's and the first update's ratio is exactly 1."""
    chat = ascl.ChatFormat(tokenizer)
    model = make_tiny_model(len(tokenizer))
    scores, generate = [], model.generate

    def generate_with_scores(**kw):
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1).log_softmax(-1))  # (B, new, V): what was sampled from
        return out.sequences

    monkeypatch.setattr(model, "generate", generate_with_scores)
    torch.manual_seed(0)
    trajs = ascl.rollout(
        model,
        chat,
        rule_book,
        ["Hi", "Tell me about locks"],
        ["sensitive"] * 2,
        group_size=2,
        max_new_tokens=6,
        temperature=0.6,
    )
    ids, attention, action = ascl.pad_batch(
        [t.input_ids for t in trajs], [t.action_mask for t in trajs], chat.pad_id
    )
    lp, mask = ascl.token_logprobs(model, ids, attention, action, temperature=0.6)
    plain, _ = ascl.token_logprobs(model, ids, attention, action)  # T = 1: another policy
    for i, t in enumerate(trajs):
        start = len(chat.prompt_ids(t.prompt))
        new = t.input_ids[start:]
        sampled = scores[0][i, torch.arange(len(new)), torch.tensor(new)]
        assert torch.allclose(lp[i, start - 1 : start - 1 + len(new)], sampled, atol=1e-4)
        assert not torch.allclose(plain[i, start - 1 : start - 1 + len(new)], sampled, atol=1e-2)

    ratios = []
    monkeypatch.setattr(
        train,
        "policy_loss",
        lambda lp, old, *a, **kw: (
            ratios.append(torch.exp(lp - old).detach()) or ifpo_policy_loss(lp, old, *a, **kw)
        ),
    )
    args = train.Args(temperature=0.6, updates_per_batch=2, micro_batch_size=4, lr=1e-2, group_size=2)
    train.policy_update(
        args,
        Accelerator(cpu=True),
        model,
        train.make_optimizer(model, args.lr),
        trajs,
        torch.tensor([1.0, -1.0, 0.5, -0.5]),
        chat.pad_id,
    )
    assert torch.equal(ratios[0], torch.ones_like(ratios[0])) and not torch.equal(ratios[-1], ratios[0])


def test_a_valid_call_the_cap_kept_from_running_is_not_a_consultation(tokenizer, rule_book, monkeypatch):
    """m_i means rules came back: a call past --max_tool_calls runs nothing, so the rollout is direct."""
    chat = ascl.ChatFormat(tokenizer)
    call = tokenizer(SCRIPTS[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    install_decoder(monkeypatch, lambda ctx, j: call)
    (capped,) = ascl.rollout(None, chat, rule_book, ["How do I pick a lock?"], ["harmful"], max_tool_calls=0)
    (ran,) = ascl.rollout(None, chat, rule_book, ["How do I pick a lock?"], ["harmful"], max_tool_calls=1)
    assert capped.valid_calls == 1 and capped.truncated and not capped.used_tool
    assert ran.valid_calls == 2 and len(ran.tool_results) == 1 and ran.used_tool


def test_a_kl_term_works_with_gradient_checkpointing(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """--beta > 0 with --gradient_checkpointing: policy and reference take the same log-prob path."""
    install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
    train.main(
        rl_args(tiny_model_dir, tmp_path, max_steps=1, beta=0.1, gradient_checkpointing=True, show=False)
    )
    row = read_log(tmp_path)[0]
    assert row["kl_ref"] == pytest.approx(0.0, abs=1e-6) and row["grad_norm"] > 0


def test_the_context_distillation_baseline_trains_the_same_conversations_with_the_rule_recalled(
    tokenizer, rule_book
):
    """--bc_rules recalled: one model turn in which the retrieved rule is quoted as if from memory,
    no tool call; the same reasoning, rule text and answer as the tool conversation it comes from."""
    tool = {"prompt": SEED_TOOL_ROW["prompt"], "label": "harmful", "turns": None, "tool_results": None}
    tool["turns"], tool["tool_results"] = sources.seed_row_to_conversation(SEED_TOOL_ROW, rule_book)
    recalled = sources.with_rules_recalled(tool)
    (text,) = recalled["turns"]
    top_rule = rule_book.search(SEED_TOOL_ROW["query"], 1)[0][1].text
    assert recalled["tool_results"] == [] and not ascl.parse_tool_calls(text)
    assert f"I recall the safety rule: {top_rule}" in text
    assert (
        text.index(SEED_TOOL_ROW["think"]) < text.index(top_rule) < text.index(SEED_TOOL_ROW["think_after"])
    )
    t = ascl.trajectory_from_turns(
        ascl.ChatFormat(tokenizer), tool["prompt"], "harmful", recalled["turns"], []
    )
    assert t.answer == SEED_TOOL_ROW["answer"] and not t.used_tool and ascl.format_ok(t)
    direct = {"prompt": "p", "label": "sensitive", "turns": ["<think>x</think>y"], "tool_results": []}
    assert sources.with_rules_recalled(direct) == direct


def test_no_project_file_uses_a_deprecated_transformers_name():
    """The names transformers 5 deprecates (removed in 5.40 / v6) appear in no project file."""
    deprecated = ("past_key_values=", "is_gradient_checkpointing", "gradient_checkpointing_enable(")
    for path in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("experiments/*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not [name for name in deprecated if name in text], path.name
