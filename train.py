"""Teach a model to consult safety rules as a tool: behaviour cloning, then GRPO / IFPO.

    accelerate launch train.py                      # embedded SmolLM2-135M, bundled data, BC then RL
    accelerate launch train.py --stage rl --adv grpo --model outputs/run/bc

One RL step (rl_step; docs/method.md sections 3-5):
    prompts --ascl.rollout--> trajectories --ascl.reward (Eq. 1)--> rewards
            --ifpo.ifpo_advantages (Eqs. 2-4)--> advantages --ifpo.policy_loss--> optimizer step
The plain path (HF generate for turns, logits -> log-softmax -> gather for log-probs) is the
default; --fast swaps in fast.py's equal functions, chosen once in main() and handed down.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import HfArgumentParser

import ascl
import guard
import plumbing
import sources
from ifpo import ifpo_advantages, inverse_frequency_weights, policy_loss
from plumbing import arg

HERE = Path(__file__).resolve().parent


@dataclass
class Args:
    """Defaults run the whole pipeline on a 2-core CPU in minutes; README gives the paper's settings."""

    model: str | None = arg(None, "hub id, local folder or .gguf file; default: the embedded SmolLM2-135M")
    stage: str = arg("all", "bc | rl | all (BC, then RL from it)")
    output_dir: str = arg("outputs/run", "checkpoints, log.jsonl and the final model")
    seed: int = arg(0, "seeds sampling, data order and the prompt mix")
    # data
    bc_data: str = arg(str(HERE / "data/bc_seed.jsonl"), "BC conversations (JSONL, see README: Data)")
    bc_rules: str = arg(
        "tool",
        "tool (ASCL: rules come back from retrieve_policy) | recalled (the context-distillation "
        "baseline: the same BC conversations, each retrieved rule written into the reasoning)",
    )
    rl_data: list[str] = arg(
        [str(HERE / "data/rl_prompts.jsonl")],
        "local JSONL files and/or hub datasets, e.g. "
        "OpenSafetyLab/Salad-Data:base_set bench-llm/or-bench:or-bench-80k",
    )
    harmful_fraction: float = arg(
        2 / 7, "share of harmful RL prompts (paper: 2:5); the larger pool is subsampled"
    )
    max_prompts: int | None = arg(None, "use at most this many RL prompts (after mixing)")
    # behaviour cloning (paper: 3 epochs, lr 1e-5, warmup 5%)
    bc_epochs: int = arg(2, "BC epochs (paper: 3)")
    bc_lr: float = arg(1e-4, "BC learning rate (paper: 1e-5, for 4B-14B models)")
    bc_batch_size: int = arg(8, "BC samples per optimizer step, per process")
    bc_warmup: float = arg(0.05, "share of BC steps spent warming the learning rate up")
    bc_balance: bool = arg(
        True,
        "weigh each BC conversation by n / (labels x its label's count), so that the refusals "
        "(harmful) and the answers (benign) count equally in the loss however many rows each has",
    )
    # reinforcement learning (paper: 16 prompts x 8 rollouts, lr 1e-6, warmup 10%, 2 epochs, 8192 tokens)
    adv: str = arg("ifpo", "ifpo (Eqs. 2-4) | grpo (Eq. 2 alone)")
    tau: float = arg(0.5, "IFPO's tau: 0 = GRPO, 1 = both behaviours equal total weight")
    w_min: float = arg(0.1, "lower clip of the IFPO weights")
    w_max: float = arg(10.0, "upper clip of the IFPO weights")
    clip_eps: float = arg(0.2, "PPO clip range")
    clip_eps_high: float | None = arg(None, "upper clip range if different (DAPO's clip-higher)")
    beta: float = arg(0.0, "KL to the initial policy; 0 = none, as in the paper")
    tool_penalty: float = arg(
        0.0, "reward penalty per valid tool call (the ablation IFPO replaces); 0 = the paper's Eq. 1"
    )
    lr: float = arg(2e-6, "RL learning rate (paper: 1e-6), cosine schedule")
    warmup: float = arg(0.1, "share of RL steps spent warming the learning rate up")
    group_size: int = arg(4, "rollouts per prompt, |G| (paper: 8)")
    prompts_per_step: int = arg(2, "prompts per RL step, per process (paper: 16 in all)")
    micro_batch_size: int = arg(
        8,
        "rollouts (RL, within one group) or samples (BC) per forward/backward: "
        "gradient accumulation, same update, less memory",
    )
    updates_per_batch: int = arg(1, "optimizer steps on each batch of rollouts (1 = on-policy)")
    max_new_tokens: int = arg(
        160, "tokens per model turn; above the longest demonstrated turn (135), or answers are cut off"
    )
    max_tool_calls: int = arg(2, "tool calls executed per rollout; a turn going past it ends the rollout")
    max_total_tokens: int = arg(1024, "tokens per conversation: prompt, turns and tool results")
    temperature: float = arg(1.0, "sampling temperature of the rollouts")
    epochs: float = arg(2.0, "RL epochs over the prompts, when --max_steps is 0")
    max_steps: int = arg(4, "cap on RL steps; 0 = run --epochs")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    fast: bool = arg(
        False, "the speed-ups of fast.py: same tokens, log-probs and gradients as the plain path"
    )
    gradient_checkpointing: bool = arg(
        False,
        "recompute activations in the backward, and return freed host memory "
        "to the OS (less memory, more time)",
    )
    lora_r: int = arg(
        0, "LoRA rank: train peft LoRA adapters of this rank, every base weight frozen; 0 = full fine-tuning"
    )
    lora_alpha: float = arg(32.0, "LoRA scale: the adapters' product is multiplied by lora_alpha / lora_r")
    lora_dropout: float = arg(
        0.0, "dropout on the adapters' input (0: the policy that samples is the one trained)"
    )
    lora_targets: list[str] = arg(
        "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split(),
        "modules that get adapters: the attention and MLP projections (Llama and Qwen names)",
    )
    judge: str = arg("offline", "offline (refusal patterns + label) | a Qwen3Guard-Gen hub id")
    # bookkeeping
    save_every: int = arg(0, "save a resumable checkpoint every N RL steps; 0 = only the final model")
    keep_checkpoints: int = arg(2, "how many resumable checkpoints to keep")
    resume: str | None = arg(None, "a checkpoint folder, or 'auto' for the latest complete one in output_dir")
    log_with: str | None = arg(None, "an accelerate tracker: tensorboard, wandb, ...")
    show: bool = arg(
        True,
        "at the end, print a greedy rollout of the trained model for a harmful, a benign-but-edgy "
        "and a math prompt: reasoning, tool call, rules, answer, reward",
    )


# ----------------------------------------------------------------------------- behaviour-cloning samples
def balanced_weights(conversations: list[dict]) -> list[dict]:
    """The conversations, each with a loss weight n / (labels x count of its label): every label
    then weighs as much in all, as if the rarer ones were repeated (scikit-learn's "balanced").

    >>> rows = [{"label": "harmful"}] + [{"label": "sensitive"}] * 3
    >>> [c["weight"] for c in balanced_weights(rows)]
    [2.0, 0.6666666666666666, 0.6666666666666666, 0.6666666666666666]
    """
    counts = Counter(c["label"] for c in conversations)
    share = len(conversations) / len(counts)
    return [{**c, "weight": share / counts[c["label"]]} for c in conversations]


def bc_samples(
    chat: ascl.ChatFormat, conversations: list[dict], max_total_tokens: int
) -> list[tuple[list[int], list[int], float]]:
    """One (ids, action_mask, weight) sample per model turn, loss on that turn only (docs/method.md
    section 3); the weight is its conversation's ("weight", 1 if none).

    A conversation think+call -> tool -> answer gives two samples:
      [prompt | turn 1]                    mask 0..0 1..1
      [prompt | turn 1 | tool | turn 2]    mask 0..0 0..0 0..0 1..1
    Each is a sample of its own: an epoch takes one step per bc_batch_size model turns, and a
    short turn (the refusal after the rules came back) is as many samples as a long one.
    """
    samples, too_long = [], 0
    for c in conversations:
        ids, _, spans = chat.encode_conversation(c["prompt"], c["turns"], c["tool_results"])
        for start, end in spans:
            if end <= max_total_tokens:
                samples.append((ids[:end], [0] * start + [1] * (end - start), c.get("weight", 1.0)))
            else:
                too_long += 1
    if not samples:
        raise SystemExit(
            f"no BC sample fits in max_total_tokens={max_total_tokens}; raise --max_total_tokens"
        )
    if too_long:
        print(
            f"BC: dropped {too_long} of {len(samples) + too_long} samples longer than max_total_tokens="
            f"{max_total_tokens}; raise --max_total_tokens to keep them"
        )
    return samples


# ----------------------------------------------------------------------------- optimizer and schedule
def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW over the parameters that train, with the fused kernel where there is one (CPU and CUDA;
    TRL's default too): one pass over each parameter instead of a loop of temporaries per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup, then cosine decay; every step trains at a learning rate above 0.

    Step s (from 0) runs at lr * f(s): f = (s + 1) / (warmup_steps + 1) while warming up, then
    0.5 * (1 + cos(pi * p)) with p = (s - warmup_steps) / (total_steps - warmup_steps) < 1.
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched, lrs = warmup_cosine(opt, warmup_steps=1, total_steps=4), []
    >>> for _ in range(4):
    ...     lrs.append(round(sched.get_last_lr()[0], 3)); opt.step(); sched.step()
    >>> lrs
    [0.5, 1.0, 0.75, 0.25]
    """

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (s - warmup_steps) / max(1, total_steps - warmup_steps)))

    return LambdaLR(optimizer, factor)


def check_finite(name: str, value: torch.Tensor, step: int):
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{name} is not finite at step {step}; stopping before the optimizer step so the weights "
            f"and the last checkpoint stay good (try a lower --lr)"
        )


def with_lora(model, args: Args, adapters: Path | None = None):
    """The model with peft LoRA adapters on args.lora_targets: fresh ones (B = 0, so the same outputs
    as the model), or, resuming, those saved in the checkpoint folder `adapters`. Only the adapters
    train; every base weight is frozen, so make_optimizer gets the adapters alone."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapters is not None:
        return PeftModel.from_pretrained(model, adapters, is_trainable=True)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def enable_checkpointing(model):
    """Recompute activations in the backward (less memory, more time)."""
    model.activation_checkpointing_enable({"use_reentrant": False})


# ----------------------------------------------------------------------------- behaviour cloning
def bc_batches(lengths: list[int], batch_size: int, rng: random.Random, group: int = 16) -> list[list[int]]:
    """One epoch's batches of sample indices, each of samples of similar length.

    Shuffle, cut into groups of `group` batches, sort each group by length and deal it into
    batches, then shuffle the batches: little padding, while every epoch sees a new order.
    >>> bc_batches([5, 1, 4, 2], 2, random.Random(0), group=2)
    [[0, 2], [3, 1]]
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for g in range(0, len(order), span):
        chunk = sorted(order[g : g + span], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def behaviour_cloning(args: Args, accelerator: Accelerator, model, chat, samples, logprobs_fn=None):
    """Next-token loss on the model's turns, token mean over each global batch of per-turn samples
    (each sample's tokens counted with its weight).

    Every process builds the same global batches (bc_batch_size per process) and takes its
    share, so all run the same number of optimizer steps whatever the sample count; a
    process left without samples in the last batch runs a zero-weight one (DDP needs every
    process in every backward).
    """
    logprobs_fn = logprobs_fn or ascl.token_logprobs
    P, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(samples) / (args.bc_batch_size * P))
    total = steps_per_epoch * args.bc_epochs
    if args.gradient_checkpointing:
        # activations are most of BC's memory: about 2 MB a token for 135M in fp32
        enable_checkpointing(model)
    optimizer = make_optimizer(model, args.bc_lr)
    scheduler = warmup_cosine(optimizer, math.ceil(args.bc_warmup * total), total)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    rng = random.Random(args.seed)
    bar = tqdm(total=total, desc="behaviour cloning", disable=not accelerator.is_main_process)
    step = 0
    for epoch in range(args.bc_epochs):
        for batch in bc_batches([len(ids) for ids, _, _ in samples], args.bc_batch_size * P, rng):
            # the global batch's weighted token count, known to every process
            num_tokens = sum(samples[i][2] * sum(samples[i][1]) for i in batch) or 1.0
            mine = batch[rank * args.bc_batch_size : (rank + 1) * args.bc_batch_size]
            weight, mine = (1.0, mine) if mine else (0.0, batch[:1])
            parts = [mine[k : k + args.micro_batch_size] for k in range(0, len(mine), args.micro_batch_size)]
            nll = torch.zeros((), device=accelerator.device)
            for j, part in enumerate(parts):  # gradient accumulation, micro_batch_size samples a forward
                with contextlib.nullcontext() if j == len(parts) - 1 else accelerator.no_sync(model):
                    seqs, masks, sample_weights = zip(*(samples[i] for i in part))
                    ids, attention, action = (
                        t.to(accelerator.device) for t in ascl.pad_batch(seqs, masks, chat.pad_id)
                    )
                    logprobs, _ = logprobs_fn(model, ids, attention, action)
                    sample_weights = torch.tensor(sample_weights, device=accelerator.device)
                    part_nll = -(logprobs.sum(1) * sample_weights).sum() * weight
                    # DDP averages gradients over processes: scale so the result is the global token mean
                    accelerator.backward(part_nll * P / num_tokens)
                nll += part_nll.detach()
            loss = accelerator.reduce(nll, "sum").item() / num_tokens
            check_finite("BC loss", torch.tensor(loss), step)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # this step's
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
            if accelerator.is_main_process:
                plumbing.log_jsonl(
                    args.output_dir, {"stage": "bc", "step": step, "epoch": epoch, "loss": loss, "lr": lr}
                )
    bar.close()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model, {"bc_samples": len(samples), "bc_steps": step, "bc_final_loss": loss}


# ----------------------------------------------------------------------------- reinforcement learning
def stratified_order(prompts: list[dict], seed: int) -> list[int]:
    """A seeded shuffle of the prompts' indices in which each label's prompts are spread evenly, so
    every run of consecutive prompts holds each label in about its share of the data: a step of
    2 prompts from a 1:1 mix holds one of each, where a plain shuffle gives half the steps one label.

    >>> rows = [{"label": "harmful"}] * 3 + [{"label": "sensitive"}] * 3
    >>> [rows[i]["label"][0] for i in stratified_order(rows, seed=0)]
    ['h', 's', 'h', 's', 'h', 's']
    """
    rng = random.Random(seed)
    keyed = []
    for label in sorted({p["label"] for p in prompts}):
        indices = [i for i, p in enumerate(prompts) if p["label"] == label]
        rng.shuffle(indices)
        offset = rng.random()
        keyed += [((n + offset) / len(indices), i) for n, i in enumerate(indices)]
    return [i for _, i in sorted(keyed)]


def prompts_for_step(prompts: list[dict], step: int, args: Args, accelerator: Accelerator) -> list[dict]:
    """This process's prompts for a step: a seeded, label-stratified shuffle per epoch, so each step
    holds harmful and benign prompts in about --harmful_fraction and resuming needs only the step."""
    global_batch = args.prompts_per_step * accelerator.num_processes
    per_epoch = len(prompts) // global_batch
    epoch, k = divmod(step, per_epoch)
    order = stratified_order(prompts, args.seed + epoch)
    start = k * global_batch + accelerator.process_index * args.prompts_per_step
    return [prompts[i] for i in order[start : start + args.prompts_per_step]]


def rl_step(
    args,
    accelerator,
    model,
    optimizer,
    scheduler,
    chat,
    rule_book,
    judge,
    prompts,
    step,
    ref_model=None,
    generate=None,
    logprobs_fn=None,
) -> dict:
    """One RL step, in the method's order. Returns the step's log row."""
    t0 = time.perf_counter()
    # 1. rollout: group_size rollouts of each prompt, the tool available
    rows = prompts_for_step(prompts, step, args, accelerator)
    trajs = ascl.rollout(
        accelerator.unwrap_model(model),
        chat,
        rule_book,
        [r["prompt"] for r in rows],
        [r["label"] for r in rows],
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        max_tool_calls=args.max_tool_calls,
        max_total_tokens=args.max_total_tokens,
        temperature=args.temperature,
        generate=generate,
    )
    t1 = time.perf_counter()

    # 2. reward, Eq. 1: R = P_h * P_f * (R_s + R_c - P_r)
    verdicts = judge([t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs])
    rewards = [ascl.reward(t.label, t, v, args.tool_penalty) for t, v in zip(trajs, verdicts)]
    R = torch.tensor([r.total for r in rewards])
    check_finite("rewards", R, step)

    # 3. advantages, Eqs. 2-4: the only place GRPO and IFPO differ (GRPO is IFPO with tau = 0)
    used_tool = torch.tensor([t.used_tool for t in trajs])  # m_i
    tau = args.tau if args.adv == "ifpo" else 0.0
    advantages = ifpo_advantages(R, used_tool, args.group_size, tau, args.w_min, args.w_max)

    # 4. update: clipped surrogate (ifpo.policy_loss), token mean over the global batch (DAPO)
    lr = scheduler.get_last_lr()[0]  # this step's
    update = policy_update(
        args, accelerator, model, optimizer, trajs, advantages, chat.pad_id, ref_model, step, logprobs_fn
    )
    scheduler.step()
    t2 = time.perf_counter()

    # 5. log: what an RL person watches
    weights = inverse_frequency_weights(used_tool, args.group_size, args.tau, args.w_min, args.w_max)
    fallbacks = judge.pop_fallbacks() if hasattr(judge, "pop_fallbacks") else {}
    return {
        "step": step + 1,
        **step_stats(accelerator, trajs, rewards, weights, advantages, args.group_size),
        **update,
        "lr": lr,
        "rollout_s": t1 - t0,
        "update_s": t2 - t1,
        "steps_per_s": 1.0 / (t2 - t0),
        **fallbacks,
        "processes": accelerator.num_processes,
    }


def step_stats(accelerator, trajs, rewards, weights, advantages, group_size: int) -> dict:
    """Rollout figures over every process's rollouts. GRPO runs log the IFPO weights too: the
    ones IFPO would have applied."""
    R = torch.tensor([r.total for r in rewards])
    groups = R.reshape(-1, group_size)
    tied = (groups.amax(1) == groups.amin(1)).repeat_interleave(group_size).tolist()
    rows = [  # one row per rollout; the rows of every process are gathered at once
        (r.total, t.used_tool, t.label == "harmful", w, z, sum(t.action_mask), r.format_gate)
        + (t.faulty_calls, t.truncated, abs(a))
        for t, r, w, z, a in zip(trajs, rewards, weights.tolist(), tied, advantages.tolist())
    ]
    cols = accelerator.gather(torch.tensor(rows, dtype=torch.float, device=accelerator.device))
    R, tool, harmful, w, zero_spread, length, fmt, faulty, trunc, push = cols.cpu().T
    tool, harmful = tool.bool(), harmful.bool()
    # the mean of an empty selection (no harmful prompt this step, say) is nan
    return {
        "reward_mean": R.mean().item(),
        "reward_std": R.std(correction=0).item(),
        # per label: reward_mean moves with the step's share of harmful prompts, these do not
        "reward_harmful": R[harmful].mean().item(),
        "reward_sensitive": R[~harmful].mean().item(),
        "tool_rate": tool.float().mean().item(),
        "tool_rate_harmful": tool[harmful].float().mean().item(),
        "tool_rate_sensitive": tool[~harmful].float().mean().item(),
        "ifpo_weight_tool": w[tool].mean().item(),
        "ifpo_weight_direct": w[~tool].mean().item(),
        "zero_spread_groups": zero_spread.mean().item(),
        # the harmful rollouts' share of the total |advantage|: how hard each label's groups push
        # on what both share, such as the opening verdict (nan when no group had a spread)
        "push_harmful": (push[harmful].sum() / push.sum()).item(),
        "format_ok": fmt.mean().item(),
        "faulty_calls": faulty.mean().item(),
        "truncated": trunc.mean().item(),
        "response_length": length.mean().item(),
    }


def update_batches(args: Args, advantages: torch.Tensor) -> list[list[int]]:
    """The rollouts the update runs, in micro-batches of at most micro_batch_size.

    Without a KL term (--beta 0) a rollout with advantage 0 (a group whose rewards are all equal)
    adds exactly 0 to the loss and every gradient, so it is left out; its tokens still count in
    the token mean. A process left with nothing runs its first rollout (advantage 0, so no
    gradient): DDP needs every process in the backward, and AdamW steps on zero gradients.
    >>> update_batches(Args(micro_batch_size=2), torch.tensor([0.5, 0.0, -0.5, 1.0]))
    [[0, 2], [3]]
    """
    run = [i for i, a in enumerate(advantages.tolist()) if a != 0 or args.beta] or [0]
    return [run[k : k + args.micro_batch_size] for k in range(0, len(run), args.micro_batch_size)]


def reference_logprobs(model, ref_model, batches, temperature: float, logprobs_fn) -> list[torch.Tensor]:
    """The reference policy's log-probs (--beta) on each micro-batch: ref_model's or, with LoRA
    (ref_model None), those of `model` (the unwrapped policy) with its adapters switched off: the
    initial policy, without a second copy of the weights."""
    if ref_model is not None:
        return [logprobs_fn(ref_model, *b, temperature)[0] for b in batches]
    with model.disable_adapter():
        return [logprobs_fn(model, *b, temperature)[0] for b in batches]


def policy_update(
    args: Args,
    accelerator: Accelerator,
    model,
    optimizer,
    trajs,
    advantages,
    pad_id: int,
    ref_model=None,
    step: int = 0,
    logprobs_fn=None,
) -> dict:
    """`updates_per_batch` optimizer steps on one batch of rollouts; loss = token mean over the
    whole global batch (DAPO), accumulated over micro-batches of micro_batch_size rollouts."""
    logprobs_fn = logprobs_fn or ascl.token_logprobs
    device = accelerator.device
    micro = update_batches(args, advantages)
    batches = []  # each micro-batch as padded (ids, attention, action) tensors
    for idx in micro:
        ids, masks = [trajs[i].input_ids for i in idx], [trajs[i].action_mask for i in idx]
        batches.append([t.to(device) for t in ascl.pad_batch(ids, masks, pad_id)])
    local_tokens = torch.tensor(float(sum(sum(t.action_mask) for t in trajs)), device=device)
    # DDP averages gradients over processes, so each process divides by the global count / world size
    num_tokens = max(accelerator.reduce(local_tokens, "sum").item(), 1.0) / accelerator.num_processes

    model.train()  # old and new log-probs in the same mode (dropout, if any, alike)
    old = ref = None
    with torch.no_grad():
        if args.updates_per_batch > 1:
            old = [logprobs_fn(model, *b, args.temperature)[0] for b in batches]
        if args.beta:
            policy = accelerator.unwrap_model(model)
            ref = reference_logprobs(policy, ref_model, batches, args.temperature, logprobs_fn)
    for _ in range(args.updates_per_batch):
        sums = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "kl_ref": 0.0, "entropy": 0.0, "ran": 0.0}
        for j, (idx, b) in enumerate(zip(micro, batches)):
            with contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(model):
                logprobs, mask, entropy = logprobs_fn(model, *b, args.temperature, entropy=True)
                # one update per batch: the rollout policy is the current one, so old = current (ratio 1)
                loss, s = policy_loss(
                    logprobs,
                    old[j] if old else logprobs.detach(),
                    advantages[idx].to(device),
                    mask,
                    args.clip_eps,
                    args.clip_eps_high,
                    ref[j] if ref else None,
                    args.beta,
                    num_tokens,
                )
                check_finite("policy loss", loss.detach(), step)
                accelerator.backward(loss)
            sums["loss"] += loss.item() / accelerator.num_processes
            sums["entropy"] += float(entropy.sum())
            sums["ran"] += s["num_tokens"]
            for k in ("clip_frac", "approx_kl", "kl_ref"):
                sums[k] += s.get(k, 0.0) * s["num_tokens"]
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        check_finite("gradient norm", torch.as_tensor(grad_norm), step)
        optimizer.step()
        optimizer.zero_grad()
    stats = {k: accelerator.reduce(torch.tensor(v, device=device), "sum").item() for k, v in sums.items()}
    ran = max(stats.pop("ran"), 1.0)  # per-token figures are over the rollouts the update ran
    for k in ("entropy", "clip_frac", "approx_kl", "kl_ref"):
        stats[k] /= ran
    updated = accelerator.reduce(torch.tensor(float(sum(map(len, micro))), device=device), "sum").item()
    stats["updated_rollouts"] = updated / (len(trajs) * accelerator.num_processes)
    stats["grad_norm"] = float(grad_norm)
    if not args.beta:
        stats.pop("kl_ref")
    return stats


def reinforcement_learning(
    args: Args,
    accelerator: Accelerator,
    model,
    tokenizer,
    chat,
    rule_book,
    resume_from: Path | None,
    prompts: list[dict],
    generate=None,
    logprobs_fn=None,
):
    global_batch = args.prompts_per_step * accelerator.num_processes
    steps = int(args.epochs * (len(prompts) // global_batch))
    steps = min(steps, args.max_steps) if args.max_steps else steps
    judge = guard.make_judge(args.judge, accelerator.device)
    state = torch.load(resume_from / "trainer_state.pt", weights_only=False) if resume_from else {}
    # the initial policy, where RL started (BC checkpoint or --model), also after a resume: the
    # reference for --beta, and with LoRA the base under the adapters (main loads it to resume)
    initial = str(Path(args.output_dir) / "bc") if args.stage == "all" else args.model
    initial = state.get("initial_policy", initial)
    ref_model = None
    if args.beta and not args.lora_r:  # LoRA's reference is the policy with its adapters off: no copy
        ref_model = plumbing.load_model(initial) if resume_from is not None else copy.deepcopy(model)
        ref_model = ref_model.to(accelerator.device).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = make_optimizer(model, args.lr)
    scheduler = warmup_cosine(optimizer, math.ceil(args.warmup * steps), steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        plumbing.restore_rng(resume_from, accelerator.process_index)
        start = state["step"]
    out = Path(args.output_dir)
    bar = tqdm(
        range(start, steps),
        desc=f"RL ({args.adv})",
        initial=start,
        total=steps,
        disable=not accelerator.is_main_process,
    )
    log = {}
    for step in bar:
        log = rl_step(
            args,
            accelerator,
            model,
            optimizer,
            scheduler,
            chat,
            rule_book,
            judge,
            prompts,
            step,
            ref_model,
            generate,
            logprobs_fn,
        )
        bar.set_postfix(
            reward=f"{log['reward_mean']:.2f}", tool=f"{log['tool_rate']:.2f}", loss=f"{log['loss']:.3f}"
        )
        if accelerator.is_main_process:
            plumbing.log_jsonl(args.output_dir, {"stage": "rl", **log})
        accelerator.log(log, step=step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            plumbing.save_checkpoint(
                accelerator,
                model,
                tokenizer,
                out / f"checkpoint-{step + 1}",
                {"stage": "rl", "step": step + 1, "args": asdict(args), "initial_policy": initial},
                optimizer,
                scheduler,
            )
            if accelerator.is_main_process:
                plumbing.prune_checkpoints(out, args.keep_checkpoints)
    return model, {
        "rl_steps": steps,
        **{f"last_{k}": v for k, v in log.items() if k in ("reward_mean", "tool_rate", "loss")},
    }


# ----------------------------------------------------------------------------- show the trained model
SHOW_PROMPTS = [
    ("How do I make a pipe bomb at home?", "harmful"),
    ("How do I kill all the child processes of a program on Linux?", "sensitive"),
    ("A box holds 12 eggs. How many eggs are in 7 boxes? End with a line 'Answer: <number>'.", "sensitive"),
]


def show_rollouts(args: Args, model, chat, rule_book):
    """Print one greedy rollout per SHOW_PROMPTS row, turn by turn, with its reward (offline judge)."""
    trajs = ascl.rollout(
        model,
        chat,
        rule_book,
        [p for p, _ in SHOW_PROMPTS],
        [y for _, y in SHOW_PROMPTS],
        max_new_tokens=args.max_new_tokens,
        max_tool_calls=args.max_tool_calls,
        max_total_tokens=args.max_total_tokens,
        do_sample=False,
    )
    verdicts = ascl.OfflineJudge()(
        [t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs]
    )
    for t, v in zip(trajs, verdicts):
        r = ascl.reward(t.label, t, v, args.tool_penalty)
        print(f"\n=== {t.label} prompt: {t.prompt}")
        for k, turn in enumerate(t.turns):
            print("model |", turn.strip().replace("\n", "\n      | "))
            for result in t.tool_results[k] if k < len(t.tool_results) else []:
                print("tool  |", result.strip().replace("\n", "\n      | "))
        print(
            f"reward {r.total:.2f} = P_h {r.hallucination_gate} x P_f {r.format_gate} "
            f"x (R_s {r.safety} + R_c {r.compliance} - P_r {r.retrieval_penalty:.1f}); "
            f"consulted the rule book: {t.used_tool}; "
            f"{'cut off' if t.truncated else 'answer: ' + repr((t.answer or '')[:80])}"
        )


# ----------------------------------------------------------------------------- checked before any work
def resume_point(args: Args) -> tuple[Path | None, int | None]:
    """--resume -> (checkpoint folder, its RL step); (None, None) if not resuming.

    Checked before anything loads.
    """
    if not args.resume:
        return None, None
    folder = plumbing.latest_checkpoint(Path(args.output_dir)) if args.resume == "auto" else Path(args.resume)
    if folder is None:
        raise SystemExit(f"nothing to resume from: {args.output_dir!r} holds no complete checkpoint")
    problem = plumbing.checkpoint_problem(folder)
    if problem:
        raise SystemExit(
            f"cannot resume from {folder}: {problem}; give an earlier checkpoint, or --resume auto "
            f"to take the newest complete one"
        )
    lora = (folder / "adapter_config.json").is_file()
    if lora != bool(args.lora_r):
        raise SystemExit(
            f"cannot resume from {folder}: it holds "
            + (
                "LoRA adapters; give --lora_r (any rank above 0: "
                "the adapters' settings come from the checkpoint)"
                if lora
                else "a whole model, trained without LoRA; leave out --lora_r"
            )
        )
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    return folder, state["step"]


def check_args(args: Args):
    """Refuse, in one line that says what to do, settings that would crash mid-run, invert the method
    or run without learning anything. Called first: nothing has loaded and no file has changed."""
    for name in (
        "lr",
        "bc_lr",
        "bc_epochs",
        "bc_batch_size",
        "epochs",
        "prompts_per_step",
        "micro_batch_size",
        "updates_per_batch",
        "max_new_tokens",
        "max_total_tokens",
        "temperature",
        "clip_eps",
        "max_grad_norm",
        "max_prompts",
        "clip_eps_high",
        "lora_alpha",
    ):
        value = getattr(args, name)
        if value is not None and not value > 0:  # None: the setting's "off"
            raise SystemExit(f"--{name} must be greater than 0, not {value}")
    for name in ("beta", "max_tool_calls", "max_steps", "save_every", "keep_checkpoints", "lora_r"):
        if not getattr(args, name) >= 0:
            raise SystemExit(f"--{name} must be 0 or more, not {getattr(args, name)}")
    output_dir = Path(args.output_dir)
    for ok, message in [
        (args.stage in ("bc", "rl", "all"), f"--stage must be bc, rl or all, not {args.stage!r}"),
        (args.adv in ("ifpo", "grpo"), f"--adv must be 'ifpo' or 'grpo', not {args.adv!r}"),
        (
            args.bc_rules in ("tool", "recalled"),
            f"--bc_rules must be 'tool' or 'recalled', not {args.bc_rules!r}",
        ),
        (
            args.group_size >= 2,
            f"--group_size must be at least 2, not {args.group_size}: advantages compare the "
            f"rollouts of one prompt, so a group of one learns nothing",
        ),
        (
            args.tau >= 0,
            f"--tau must be 0 or more, not {args.tau}: a negative tau gives the more frequent behaviour "
            f"the larger weight, the opposite of IFPO (0 = plain GRPO)",
        ),
        (
            0 <= args.w_min <= 1 <= args.w_max,
            f"--w_min {args.w_min} / --w_max {args.w_max}: the IFPO weights average "
            f"1, so the bounds need 0 <= w_min <= 1 <= w_max (e.g. 0.1 and 10)",
        ),
        (
            args.max_new_tokens < args.max_total_tokens,
            "--max_total_tokens must be larger than --max_new_tokens: a prompt needs room for one full turn",
        ),
        (
            0 <= args.warmup <= 1 and 0 <= args.bc_warmup <= 1,
            "--warmup and --bc_warmup are fractions of the run, between 0 and 1",
        ),
        (0 <= args.harmful_fraction <= 1, "--harmful_fraction must be between 0 and 1"),
        (
            0 <= args.lora_dropout < 1,
            f"--lora_dropout must be at least 0 and below 1, not {args.lora_dropout}",
        ),
        (
            args.lora_targets or not args.lora_r,
            "--lora_targets needs at least one module name, e.g. q_proj v_proj",
        ),
    ]:
        if not ok:
            raise SystemExit(message)
    # then the paths: the output folder and every model the run will load (the checkpoint to resume is
    # checked by resume_point, every data file and row by load_data, both before the model loads)
    plumbing.check_output(output_dir, "--output_dir", folder=True)
    plumbing.check_model(args.model)
    if args.stage in ("rl", "all"):
        plumbing.check_judge(args.judge)


def load_data(
    args: Args, chat: ascl.ChatFormat, rule_book: ascl.RuleBook, resuming: bool, num_processes: int
):
    """Every row the run will use, loaded and checked before the model loads, so `--stage all` cannot
    stop on its RL data after BC has run. Returns (BC samples or None, RL prompts or None)."""
    bc = rl = None
    if args.stage in ("bc", "all") and not resuming:
        conversations = sources.load_bc_conversations(args.bc_data, rule_book)
        if args.bc_rules == "recalled":
            conversations = [sources.with_rules_recalled(c) for c in conversations]
        conversations = plumbing.drop_long_prompts(
            conversations, chat, args.max_new_tokens, args.max_total_tokens, args.bc_data
        )
        if args.bc_balance:
            conversations = balanced_weights(conversations)
        bc = bc_samples(chat, conversations, args.max_total_tokens)
    if args.stage in ("rl", "all"):
        rl = sources.load_rl_prompts(args.rl_data, args.harmful_fraction, args.max_prompts, args.seed)
        rl = plumbing.drop_long_prompts(rl, chat, args.max_new_tokens, args.max_total_tokens, "RL data")
        global_batch = args.prompts_per_step * num_processes
        if len(rl) < global_batch:
            raise SystemExit(
                f"{len(rl)} RL prompts, fewer than one step needs ({global_batch}); add prompts or "
                f"lower --prompts_per_step"
            )
        if int(args.epochs * (len(rl) // global_batch)) < 1:
            raise SystemExit(
                f"--epochs {args.epochs} over {len(rl)} RL prompts is not one step; raise --epochs"
            )
    return bc, rl


# ----------------------------------------------------------------------------- main
def main(args: Args):
    check_args(args)
    if args.gradient_checkpointing:
        # memory over time: glibc would keep freed tensors (RSS creeps up), ~20% slower
        plumbing.return_freed_memory()
    resume_from, resume_step = resume_point(args)
    model_name = str(resume_from) if resume_from else args.model
    if resume_from and args.lora_r:  # a LoRA checkpoint holds adapters: load the base they sit on, then them
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False, mmap=True)
        model_name = state["initial_policy"]
    chat = ascl.ChatFormat(plumbing.load_tokenizer(model_name))
    rule_book = ascl.RuleBook.from_json()
    accelerator = Accelerator(log_with=args.log_with)
    bc_data, rl_prompts = load_data(args, chat, rule_book, resume_from is not None, accelerator.num_processes)
    # every setting and row is checked: only now does the model load or any file change
    set_seed(args.seed)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        plumbing.start_log(out, resume_step)
    # LoRA under bf16 mixed precision keeps the frozen base in bf16: it takes no optimizer step, so it
    # needs no fp32 copy (peft keeps the adapters in fp32); full fine-tuning keeps fp32 weights
    dtype = torch.bfloat16 if args.lora_r and accelerator.mixed_precision == "bf16" else torch.float32
    model, tokenizer = plumbing.load_model(model_name, dtype), chat.tokenizer
    if args.lora_r:
        model = with_lora(model, args, resume_from)
    accelerator.init_trackers("ascl", config={k: str(v) for k, v in asdict(args).items()})

    generate = logprobs_fn = None  # the plain ascl.generate_turns and ascl.token_logprobs
    if args.fast:
        import fast

        generate, logprobs_fn = fast.generate_turns, fast.token_logprobs

    summary: dict = {}
    if args.stage in ("bc", "all") and resume_from is None:
        model, s = behaviour_cloning(args, accelerator, model, chat, bc_data, logprobs_fn)
        summary.update(s)
        if args.stage == "all":  # bc/ is a plain model (LoRA: merged); RL trains fresh adapters on it
            model = model.merge_and_unload() if args.lora_r else model
            plumbing.save_checkpoint(
                accelerator, model, tokenizer, out / "bc", {"stage": "bc", "step": 0, "args": asdict(args)}
            )
            model = with_lora(model, args) if args.lora_r else model
    if args.stage in ("rl", "all"):
        model, s = reinforcement_learning(
            args,
            accelerator,
            model,
            tokenizer,
            chat,
            rule_book,
            resume_from,
            rl_prompts,
            generate,
            logprobs_fn,
        )
        summary.update(s)
    if args.lora_r:  # final/ is a plain model, the adapters merged into the base: any script loads it
        model = accelerator.unwrap_model(model).merge_and_unload()
    plumbing.save_checkpoint(
        accelerator, model, tokenizer, out / "final", {"stage": args.stage, "args": asdict(args)}
    )
    accelerator.end_training()
    if accelerator.is_main_process:
        summary["saved_to"] = str(out / "final")
        print(
            "\n".join(
                f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}" for k, v in summary.items()
            )
        )
        if args.show:
            show_rollouts(args, accelerator.unwrap_model(model), chat, rule_book)
    return summary


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
