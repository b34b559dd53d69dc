"""LoRA (--lora_r): only the adapters train, the reference is the base with them off, resume is exact,
bc/ and final/ are merged models, and 2 processes match 1."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import install_scripted_generation, make_tiny_model
from peft.tuners.lora import LoraModel
from test_train import (
    SEED_DIRECT_ROW,
    SEED_TOOL_ROW,
    assert_same_final_weights,
    make_trajectories,
    read_log,
    rl_args,
    run_two_and_one_process,
    write_jsonl,
)
from transformers import AutoModelForCausalLM

import ascl
import plumbing
import train


def adapted_tiny_model(tokenizer):
    """A tiny model with rank-4 adapters whose B is random, not 0: they change the policy."""
    model = train.with_lora(make_tiny_model(len(tokenizer)), train.Args(lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_only_the_adapters_reach_the_optimizer_and_the_base_stays_frozen(tokenizer, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    args = train.Args(micro_batch_size=1, lr=1e-2, lora_r=4)
    model = train.with_lora(make_tiny_model(len(tokenizer)), args)
    optimizer = train.make_optimizer(model, args.lr)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
    assert all("lora_" in n for n in trained) and len(trained) == 2 * 7 * 2  # A, B x 7 projections x 2 layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trajs = make_trajectories(chat, rule_book)
    advantages = torch.tensor([1.0, -1.0])
    stats = train.policy_update(args, Accelerator(cpu=True), model, optimizer, trajs, advantages, chat.pad_id)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # some adapters moved (B; A's gradient waits for B != 0), and no base weight did
    assert stats["grad_norm"] > 0 and changed and changed <= trained


def test_the_reference_logprobs_are_the_base_models(tokenizer, rule_book):
    chat = ascl.ChatFormat(tokenizer)
    trajs = make_trajectories(chat, rule_book)
    batch = ascl.pad_batch([t.input_ids for t in trajs], [t.action_mask for t in trajs], chat.pad_id)
    model, base = adapted_tiny_model(tokenizer), make_tiny_model(len(tokenizer))  # same seed, same base
    with torch.no_grad():
        (ref,) = train.reference_logprobs(model, None, [batch], 0.7, ascl.token_logprobs)
        assert torch.allclose(ref, ascl.token_logprobs(base, *batch, 0.7)[0], atol=1e-6)
        # and after it the adapters are back on: the policy is not the reference
        assert not torch.allclose(ref, ascl.token_logprobs(model, *batch, 0.7)[0], atol=1e-3)


def test_a_kl_run_keeps_one_copy_of_the_weights(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
    loads, load = [], plumbing.load_model
    monkeypatch.setattr(plumbing, "load_model", lambda *a, **kw: loads.append(a) or load(*a, **kw))

    def no_copy(*a, **kw):
        raise AssertionError("a second copy of the model was made for the reference")

    monkeypatch.setattr(train, "copy", SimpleNamespace(deepcopy=no_copy))
    train.main(rl_args(tiny_model_dir, tmp_path, max_steps=2, beta=0.5, lora_r=4, show=False))
    log = read_log(tmp_path)
    assert len(loads) == 1
    # the reference is where RL started: fresh adapters (B = 0) have no KL to it, trained ones do
    assert log[0]["kl_ref"] == pytest.approx(0.0, abs=1e-7) and log[1]["kl_ref"] > 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_lora_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tokenizer, tmp_path, monkeypatch, beta):
    """The checkpoint holds the adapters and the optimizer state, and names its base: the resumed run
    gives no --model and still continues exactly."""
    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    train.main(rl_args(tiny_model_dir, tmp_path / "a", save_every=2, beta=beta, lora_r=4, show=False))
    uninterrupted = read_log(tmp_path / "a")[-1]
    checkpoint = tmp_path / "a/checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the adapters alone
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert state["initial_policy"] == tiny_model_dir and len(state["optimizer"]["state"]) == 2 * 7 * 2

    torch.manual_seed(1234)  # whatever the RNG holds now, resuming restores it
    train.main(rl_args(None, tmp_path / "b", resume=str(checkpoint), beta=beta, lora_r=4, show=False))
    resumed = read_log(tmp_path / "b")
    assert len(resumed) == 1 and resumed[0]["step"] == 3
    for k in ("loss", "reward_mean", "grad_norm", "lr") + (("kl_ref",) if beta else ()):
        assert resumed[0][k] == pytest.approx(uninterrupted[k], rel=1e-6, abs=1e-9), k
    assert_same_final_weights(tmp_path / "a", tmp_path / "b")


def test_bc_and_final_are_merged_models_with_the_trained_logits(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    """--stage all: bc/ and final/ load with from_pretrained alone and give the logits of base + adapters."""
    install_scripted_generation(monkeypatch, tokenizer, deterministic=False)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with_adapters, merge = [], LoraModel.merge_and_unload

    def spy(self, *a, **kw):  # the logits of base + adapters, just before they are merged
        with torch.no_grad():
            with_adapters.append(self(input_ids=ids).logits)
        return merge(self, *a, **kw)

    monkeypatch.setattr(LoraModel, "merge_and_unload", spy)
    bc = write_jsonl(tmp_path / "bc.jsonl", [SEED_TOOL_ROW, SEED_DIRECT_ROW])
    train.main(
        rl_args(
            tiny_model_dir,
            tmp_path,
            stage="all",
            bc_data=bc,
            bc_epochs=1,
            bc_lr=1e-2,
            max_steps=2,
            lora_r=4,
            show=False,
        )
    )
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        start_logits = start(input_ids=ids).logits
    assert len(with_adapters) == 2  # bc/, then final/
    for folder, expected in zip(("bc", "final"), with_adapters):
        assert not (tmp_path / folder / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.allclose(logits, expected, atol=1e-5), folder
        assert not torch.allclose(logits, start_logits, atol=1e-4), folder  # the adapters learned something
        assert torch.equal(model.model.embed_tokens.weight, start.model.embed_tokens.weight)  # no adapter


def test_under_bf16_the_base_is_kept_in_bf16_and_the_adapters_in_fp32(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
    dtypes, make_optimizer = set(), train.make_optimizer

    def spy(model, lr):
        dtypes.update(("adapter" if "lora_" in n else "base", p.dtype) for n, p in model.named_parameters())
        return make_optimizer(model, lr)

    monkeypatch.setattr(train, "make_optimizer", spy)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
    try:
        train.main(rl_args(tiny_model_dir, tmp_path, max_steps=1, lora_r=4, show=False))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert dtypes == {("adapter", torch.float32), ("base", torch.bfloat16)}
    assert read_log(tmp_path)[0]["grad_norm"] > 0
    assert {w.dtype for w in load_file(tmp_path / "final/model.safetensors").values()} == {torch.bfloat16}


def test_gradient_checkpointing_with_lora_takes_the_same_steps(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    logs = {}
    for checkpointing in (False, True):
        install_scripted_generation(monkeypatch, tokenizer, deterministic=True)
        train.main(
            rl_args(
                tiny_model_dir,
                tmp_path / str(checkpointing),
                max_steps=2,
                beta=0.1,
                lora_r=4,
                gradient_checkpointing=checkpointing,
                show=False,
            )
        )
        logs[checkpointing] = read_log(tmp_path / str(checkpointing))
    assert logs[True][-1]["grad_norm"] > 0 and logs[True][-1]["kl_ref"] > 0
    for a, b in zip(logs[False], logs[True]):
        for k in ("loss", "grad_norm", "kl_ref"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), k


def test_lora_under_two_processes_matches_one_process(tiny_model_dir, tmp_path):
    """2 processes x 2 prompts == 1 process x 4 prompts, with adapters and a KL term: the same steps
    and the same merged model."""
    extra = ["lora_r=4", "beta=0.5"]
    two, one = run_two_and_one_process(tiny_model_dir, tmp_path, ["2"] + extra, ["4"] + extra)
    assert [r["processes"] for r in two] == [2, 2] and two[-1]["kl_ref"] > 0
    for a, b in zip(two, one):
        for k in ("reward_mean", "loss", "grad_norm", "kl_ref"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert_same_final_weights(tmp_path / "two", tmp_path / "one")


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"lora_r": -1}, "--lora_r must be 0 or more"),
        ({"lora_r": 4, "lora_alpha": 0.0}, "--lora_alpha must be greater than 0"),
        ({"lora_r": 4, "lora_dropout": 1.0}, "--lora_dropout must be at least 0 and below 1"),
        ({"lora_r": 4, "lora_targets": []}, "--lora_targets needs at least one module name"),
    ],
)
def test_bad_lora_settings_are_refused(setting, message, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(rl_args(tiny_model_dir, tmp_path, **setting))


def test_resuming_with_and_without_lora_across_checkpoints_is_refused(tiny_model_dir, tokenizer, tmp_path):
    accelerator = Accelerator(cpu=True)
    plain, lora = tmp_path / "plain/checkpoint-1", tmp_path / "lora/checkpoint-1"
    plumbing.save_checkpoint(accelerator, make_tiny_model(len(tokenizer)), tokenizer, plain, {"step": 1})
    model = train.with_lora(make_tiny_model(len(tokenizer)), train.Args(lora_r=4))
    plumbing.save_checkpoint(accelerator, model, tokenizer, lora, {"step": 1, "initial_policy": None})
    with pytest.raises(SystemExit, match="a whole model, trained without LoRA; leave out --lora_r"):
        train.main(rl_args(tiny_model_dir, tmp_path / "out", resume=str(plain), lora_r=4))
    with pytest.raises(SystemExit, match="LoRA adapters; give --lora_r"):
        train.main(rl_args(tiny_model_dir, tmp_path / "out", resume=str(lora)))
