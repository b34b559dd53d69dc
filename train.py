"""Teach a model to consult safety rules as a tool: behaviour cloning, then GRPO / IFPO.

    accelerate launch train.py                      # embedded SmolLM2-135M, bundled data, BC then RL
    accelerate launch train.py --stage rl --adv grpo --model outputs/run/bc

One RL step (METHOD.md section 3):
    prompts --ascl.rollout--> trajectories --ascl.reward (Eq. 1)--> rewards
            --ifpo.ifpo_advantages (Eqs. 2-4)--> advantages --ifpo.policy_loss--> optimizer step
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

import ascl
import plumbing
import sources
from ifpo import group_advantages, inverse_frequency_weights, policy_loss

HERE = Path(__file__).resolve().parent


def arg(default, help: str, **kw):
    """A settings field with its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    """Defaults run the whole pipeline on a 2-core CPU in minutes; README gives the paper's settings."""

    model: str | None = arg(None, "hub id, local folder or .gguf file; default: the embedded SmolLM2-135M")
    stage: str = arg("all", "bc | rl | all (BC, then RL from it)")
    output_dir: str = arg("outputs/run", "checkpoints, log.jsonl and the final model")
    seed: int = arg(0, "seeds sampling, data order and the prompt mix")
    # data
    bc_data: str = arg(str(HERE / "data/bc_seed.jsonl"), "BC conversations (JSONL, see README: Data)")
    rl_data: list[str] = arg([str(HERE / "data/rl_prompts.jsonl")], "local JSONL files and/or hub datasets, e.g. "
                             "OpenSafetyLab/Salad-Data:base_set bench-llm/or-bench:or-bench-80k")
    harmful_fraction: float = arg(2 / 7, "share of harmful RL prompts (paper: 2:5); the larger pool is subsampled")
    max_prompts: int | None = arg(None, "use at most this many RL prompts (after mixing)")
    # behaviour cloning (paper: 3 epochs, lr 1e-5, warmup 5%)
    bc_epochs: int = arg(2, "BC epochs (paper: 3)")
    bc_lr: float = arg(1e-4, "BC learning rate (paper: 1e-5, for 4B-14B models)")
    bc_batch_size: int = arg(8, "BC samples per optimizer step, per process")
    bc_warmup: float = arg(0.05, "share of BC steps spent warming the learning rate up")
    # reinforcement learning (paper: 16 prompts x 8 rollouts, lr 1e-6, warmup 10%, 2 epochs, 8192 tokens)
    adv: str = arg("ifpo", "ifpo (Eqs. 2-4) | grpo (Eq. 2 alone)")
    tau: float = arg(0.5, "IFPO's tau: 0 = GRPO, 1 = both behaviours equal total weight")
    w_min: float = arg(0.1, "lower clip of the IFPO weights")
    w_max: float = arg(10.0, "upper clip of the IFPO weights")
    clip_eps: float = arg(0.2, "PPO clip range")
    clip_eps_high: float | None = arg(None, "upper clip range if different (DAPO's clip-higher)")
    beta: float = arg(0.0, "KL to the initial policy; 0 = none, as in the paper")
    tool_penalty: float = arg(0.0, "reward penalty per valid tool call (the ablation IFPO replaces); 0 = the paper's Eq. 1")
    lr: float = arg(2e-6, "RL learning rate (paper: 1e-6), cosine schedule")
    warmup: float = arg(0.1, "share of RL steps spent warming the learning rate up")
    group_size: int = arg(4, "rollouts per prompt, |G| (paper: 8)")
    prompts_per_step: int = arg(2, "prompts per RL step, per process (paper: 16 in all)")
    micro_batch_size: int = arg(8, "rollouts (RL, within one group) or samples (BC) per forward/backward: "
                                   "gradient accumulation, same update, less memory")
    updates_per_batch: int = arg(1, "optimizer steps on each batch of rollouts (1 = on-policy)")
    max_new_tokens: int = arg(96, "tokens per model turn")
    max_tool_calls: int = arg(2, "tool calls executed per rollout; a turn going past it ends the rollout")
    max_total_tokens: int = arg(1024, "tokens per conversation: prompt, turns and tool results")
    rollout_batch_size: int | None = arg(None, "rollouts decoded together (bounds the KV cache); default: all of a step")
    temperature: float = arg(1.0, "sampling temperature of the rollouts")
    epochs: float = arg(2.0, "RL epochs over the prompts, when --max_steps is 0")
    max_steps: int = arg(4, "cap on RL steps; 0 = run --epochs")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward, and return freed host memory "
                                              "to the OS (less memory, more time)")
    judge: str = arg("offline", "offline (refusal patterns + label) | a Qwen3Guard-Gen hub id")
    # bookkeeping
    save_every: int = arg(0, "save a resumable checkpoint every N RL steps; 0 = only the final model")
    keep_checkpoints: int = arg(2, "how many resumable checkpoints to keep")
    resume: str | None = arg(None, "a checkpoint folder, or 'auto' for the latest complete one in output_dir")
    log_with: str | None = arg(None, "an accelerate tracker: tensorboard, wandb, ...")
    show: bool = arg(True, "at the end, print a greedy rollout of the trained model for a harmful, a benign-but-edgy "
                           "and a math prompt: reasoning, tool call, rules, answer, reward")


# ----------------------------------------------------------------------------- behaviour-cloning samples
def bc_samples(chat: ascl.ChatFormat, conversations: list[dict], max_total_tokens: int) -> list[tuple[list[int], list[int]]]:
    """One (ids, action_mask) sample per model turn, loss on that turn only (METHOD.md section 3).

    A conversation think+call -> tool -> answer gives two samples:
      [prompt | turn 1]                    mask 0..0 1..1
      [prompt | turn 1 | tool | turn 2]    mask 0..0 0..0 0..0 1..1
    """
    samples, too_long = [], 0
    for c in conversations:
        ids, _, spans = chat.encode_conversation(c["prompt"], c["turns"], c["tool_results"])
        for start, end in spans:
            if end <= max_total_tokens:
                samples.append((ids[:end], [0] * start + [1] * (end - start)))
            else:
                too_long += 1
    if not samples:
        raise SystemExit(f"no BC sample fits in max_total_tokens={max_total_tokens}; raise --max_total_tokens")
    if too_long:
        print(f"BC: dropped {too_long} of {len(samples) + too_long} samples longer than max_total_tokens="
              f"{max_total_tokens}; raise --max_total_tokens to keep them")
    return samples


def whole_conversations(samples: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Merge the per-turn samples of a conversation (consecutive, each a prefix of the next) into
    one sample that trains every turn. Exact for a causal model: each turn sees the same prefix,
    so its loss is the same, and the conversation's prefix runs once instead of once per turn.

    >>> whole_conversations([([1, 2, 3], [0, 0, 1]), ([1, 2, 3, 4, 5], [0, 0, 0, 0, 1]), ([7, 8], [0, 1])])
    [([1, 2, 3, 4, 5], [0, 0, 1, 0, 1]), ([7, 8], [0, 1])]
    """
    out: list[tuple[list[int], list[int]]] = []
    for ids, mask in samples:
        if out and len(ids) > len(out[-1][0]) and ids[:len(out[-1][0])] == out[-1][0]:
            earlier = out[-1][1] + [0] * (len(ids) - len(out[-1][1]))
            out[-1] = (ids, [max(a, b) for a, b in zip(earlier, mask)])
        else:
            out.append((ids, mask))
    return out


# ----------------------------------------------------------------------------- model forward
def pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int):
    """Right-pad; attention mask from lengths (never from token values: pad == eos)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), T), dtype=torch.long)
    action = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        action[i, : len(m)] = torch.tensor(m)
    return ids, attention, action


def token_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, action: torch.Tensor):
    """Log-probs of the trained tokens. ids, attention, action: (B, T).

    Returns (logprobs, action_mask), both (B, T - 1) and aligned with ids[:, 1:]
    (token t is predicted at position t - 1); logprobs are 0 where the mask is 0.
    Logits are only computed at positions where some row trains a token
    (`logits_to_keep`): with a 49k vocabulary the lm_head and softmax over prompt
    and tool tokens would cost more than the decoder.

    Worked example, one row, prompt [p p], a turn [a E] (E = end of turn, trained), tool [g g]:
        ids      p p a E g g          action 0 0 1 1 0 0
        ids[1:]    p a E g g          mask     0 1 1 0 0   <- returned, shifted by one
        positions 1 and 2 (predicting a and E) are the only ones whose logits are computed.
    With several rows, only each row's own trained positions go through the output layer.
    """
    logprobs, mask, _ = _shifted_logprobs(model, ids, attention, action, entropy=False)
    return logprobs, mask


def _shifted_logprobs(model, ids, attention, action, past=None, positions=None, entropy: bool = True):
    """token_logprobs, plus the policy's entropy at the trained positions (no gradient; None
    without `entropy`: BC does not log it, and it costs a softmax over the vocabulary per token).

    The output layer runs on the trained positions only: a pre-hook on it keeps, of the
    positions some row trains (logits_to_keep), just each row's own, so no full-vocabulary
    logits are made for prompt, tool or padding tokens. A model that returns its output layer's
    logits unchanged (plumbing.head_is_plain) gets nothing through it: plumbing.HeadLogprobs runs
    the layer in chunks of positions instead, so the (N, V) logits never exist whole in memory.
    """
    mask = action[:, 1:]
    keep = mask.any(dim=0).nonzero().squeeze(1)  # (P,) positions predicting a trained token
    rows, cols = mask.index_select(1, keep).nonzero(as_tuple=True)  # (N,) each trained token: row, kept position
    inner, hidden = getattr(model, "module", model), []
    head, plain = inner.get_output_embeddings(), plumbing.head_is_plain(inner)
    hook = head.register_forward_pre_hook(  # each row's trained positions; for a plain head, none
        lambda module, inputs: (hidden.append(inputs[0][rows, cols]) or hidden[0][:0 if plain else None][None],))
    try:
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=past,
                       use_cache=past is not None, logits_to_keep=keep).logits[0].float()  # (N, V), or (0, V)
    finally:
        hook.remove()
    targets = ids[:, 1:].index_select(1, keep)[rows, cols]
    picked, h = plumbing.HeadLogprobs.apply(hidden[0], head.weight, head.bias, targets, entropy) if plain else \
        _logprobs_and_entropy(logits, targets, entropy)
    where = (rows, keep[cols])
    logprobs = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_put(where, picked)
    return logprobs, mask, None if h is None else torch.zeros_like(logprobs).index_put(where, h)


def _logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, entropy: bool = True):
    """log p(target) (with gradient) and the entropy of p (without; None if not `entropy`), per
    position. logits (..., V)."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return picked, None
    with torch.no_grad():
        h = lse - (logits.softmax(-1) * logits).sum(-1)
    return picked, h


def sequence_logprobs(model, seqs: list[list[int]], masks: list[list[int]], pad_id: int, prompt_model=None,
                      entropy: bool = True):
    """(logprobs, mask, entropy or None) of a batch of sequences. With a prompt_model, the prefix the
    rows share before their first trained token (a group's prompt in RL, the system prompt in BC)
    goes through the model once (group_logprobs); else every row runs whole (_shifted_logprobs).

    >>> shared_prefix([[5, 6, 7, 8], [5, 6, 9]], [[0, 0, 1, 1], [0, 0, 0]])
    2
    """
    prefix = shared_prefix(seqs, masks)
    if prompt_model is not None and prefix > 0 and any(len(s) > prefix for s in seqs):
        return group_logprobs(model, prompt_model, seqs[0][:prefix], seqs, masks, pad_id, entropy)
    device = next(model.parameters()).device
    return _shifted_logprobs(model, *(t.to(device) for t in pad_batch(seqs, masks, pad_id)), entropy=entropy)


def shared_prefix(seqs: list[list[int]], masks: list[list[int]]) -> int:
    """Length of the ids every row starts with, up to the first trained token of any row."""
    limit = min([m.index(1) for m in masks if 1 in m] + [len(s) for s in seqs])
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def group_logprobs(model, prompt_model, prompt: list[int], seqs: list[list[int]], masks: list[list[int]], pad_id: int,
                   entropy: bool = True):
    """token_logprobs for rollouts that share `prompt`, which goes through the model once.

    The prompt's keys and values are expanded to the group and the continuations run on top
    of them, with gradients flowing back through the shared prefix; continuations of very
    different lengths run in separate passes (plumbing.length_runs), so little padding runs. prompt_model
    is the model without its DDP wrapper: DDP allows one wrapped forward per backward (the last
    pass takes it), and the gradient of every parameter still arrives summed before DDP reduces it.
    Returns (logprobs, mask, entropy), each (G, C), aligned with the continuations
    seqs[g][len(prompt):] (right-padded to C): unlike token_logprobs, nothing is shifted,
    since the prompt's last position predicts each continuation's first token.
    """
    from transformers import DynamicCache

    P, G, device = len(prompt), len(seqs), next(model.parameters()).device
    out = prompt_model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    ids, action = (t.to(device) for t in pad_batch([s[P:] for s in seqs], [m[P:] for m in masks], pad_id)[::2])
    first_lp, first_h = _logprobs_and_entropy(out.logits[:, -1].float().expand(G, -1), ids[:, 0], entropy)
    runs = plumbing.length_runs([len(s) - P for s in seqs], device.type)
    lps, hs = [], []
    for k, rows in enumerate(runs):
        n, C = len(rows), max(len(seqs[i]) - P for i in rows)
        past = DynamicCache([(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1))
                             for layer in out.past_key_values.layers], config=prompt_model.config)
        r_ids, r_attention, r_action = (t.to(device) for t in pad_batch(
            [seqs[i][P:] for i in rows], [masks[i][P:] for i in rows], pad_id))
        lp, _, h = _shifted_logprobs(model if k == len(runs) - 1 else prompt_model, r_ids,
                                     torch.cat([r_attention.new_ones((n, P)), r_attention], 1), r_action, past,
                                     torch.arange(P, P + C, device=device).expand(n, -1), entropy)
        lps.append(torch.nn.functional.pad(lp, (0, ids.shape[1] - C)))  # back to the group's width
        hs.append(None if h is None else torch.nn.functional.pad(h, (0, ids.shape[1] - C)))
    back = torch.tensor([i for rows in runs for i in rows], device=device).argsort()  # rows in the order given
    mask = action
    logprobs = torch.cat([first_lp.unsqueeze(1), torch.cat(lps).index_select(0, back)], 1) * mask
    if not entropy:
        return logprobs, mask, None
    return logprobs, mask, torch.cat([first_h.unsqueeze(1), torch.cat(hs).index_select(0, back)], 1) * mask


# ----------------------------------------------------------------------------- checkpoints and the optimizer
def resume_point(args: Args) -> tuple[Path | None, int | None]:
    """--resume -> (checkpoint folder, its RL step), checked before anything loads; (None, None) if not resuming."""
    if not args.resume:
        return None, None
    folder = plumbing.latest_checkpoint(Path(args.output_dir)) if args.resume == "auto" else Path(args.resume)
    if folder is None:
        raise SystemExit(f"nothing to resume from: {args.output_dir!r} holds no complete checkpoint")
    problem = plumbing.checkpoint_problem(folder)
    if problem:
        raise SystemExit(f"cannot resume from {folder}: {problem}; give an earlier checkpoint, or --resume auto "
                         f"to take the newest complete one")
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    return folder, state["step"]


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (CPU and CUDA; TRL's default too): one pass over each
    parameter instead of a loop allocating temporaries per tensor, so faster and lower at
    peak. Falls back to the plain loop where the kernel is not supported."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def check_finite(name: str, value: torch.Tensor, step: int):
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{name} is not finite at step {step}; stopping before the optimizer step so the weights "
            f"and the last checkpoint stay good (try a lower --lr)")


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
        chunk = sorted(order[g:g + span], key=lambda i: -lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def behaviour_cloning(args: Args, accelerator: Accelerator, model, tokenizer, chat, samples):
    """Next-token loss on the model's turns, token mean over each global batch.

    Every process builds the same global batches (bc_batch_size per process) and takes its
    share, so all run the same number of optimizer steps whatever the sample count; a
    process left without samples in the last batch runs a zero-weight one (DDP needs every
    process in every backward). The per-turn samples of a conversation are trained as one
    (whole_conversations), and the prefix a batch shares (the system prompt) runs once.
    """
    samples = whole_conversations(samples)
    P, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(samples) / (args.bc_batch_size * P))
    total = steps_per_epoch * args.bc_epochs
    if args.gradient_checkpointing:  # activations are most of BC's memory: about 2 MB a token for 135M in fp32
        model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, args.bc_lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.bc_warmup * total), total)
    model, optimizer = accelerator.prepare(model, optimizer)
    prompt_model = None if args.gradient_checkpointing else accelerator.unwrap_model(model)  # see policy_update
    model.train()
    rng = random.Random(args.seed)
    bar = tqdm(total=total, desc="behaviour cloning", disable=not accelerator.is_main_process)
    step = 0
    for epoch in range(args.bc_epochs):
        for batch in bc_batches([len(ids) for ids, _ in samples], args.bc_batch_size * P, rng):
            num_tokens = sum(sum(samples[i][1]) for i in batch)  # the global batch's, known to every process
            mine = batch[rank * args.bc_batch_size:(rank + 1) * args.bc_batch_size]
            weight, mine = (1.0, mine) if mine else (0.0, batch[:1])
            parts = [mine[k:k + args.micro_batch_size] for k in range(0, len(mine), args.micro_batch_size)]
            nll = torch.zeros((), device=accelerator.device)
            for j, part in enumerate(parts):  # gradient accumulation, micro_batch_size samples a forward
                with contextlib.nullcontext() if j == len(parts) - 1 else accelerator.no_sync(model):
                    seqs, masks = zip(*(samples[i] for i in part))
                    logprobs, mask, _ = sequence_logprobs(model, list(seqs), list(masks), chat.pad_id, prompt_model,
                                                          entropy=False)
                    part_nll = -(logprobs * mask).sum() * weight
                    # DDP averages gradients over processes: scale so the result is the global token mean
                    accelerator.backward(part_nll * P / max(num_tokens, 1))
                nll += part_nll.detach()
            loss = accelerator.reduce(nll, "sum").item() / max(num_tokens, 1)
            check_finite("BC loss", torch.tensor(loss), step)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
            if accelerator.is_main_process:
                plumbing.log_jsonl(args.output_dir, {"stage": "bc", "step": step, "epoch": epoch, "loss": loss,
                                 "lr": scheduler.get_last_lr()[0]})
    bar.close()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model, {"bc_samples": len(samples), "bc_steps": step, "bc_final_loss": loss}


# ----------------------------------------------------------------------------- reinforcement learning
def prompts_for_step(prompts: list[dict], step: int, args: Args, accelerator: Accelerator) -> list[dict]:
    """This process's prompts for a step: a seeded shuffle per epoch, so resuming needs only the step."""
    global_batch = args.prompts_per_step * accelerator.num_processes
    per_epoch = len(prompts) // global_batch
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(args.seed + epoch).shuffle(order)
    start = k * global_batch + accelerator.process_index * args.prompts_per_step
    return [prompts[i] for i in order[start:start + args.prompts_per_step]]


def compute_advantages(args: Args, rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """GRPO's group-normalised reward (Eq. 2), times the inverse-frequency weights for IFPO (Eq. 4)."""
    advantages = group_advantages(rewards, args.group_size)
    return weights * advantages if args.adv == "ifpo" else advantages


def sample_rollouts(args: Args, model, chat, rule_book, rows: list[dict], group_size: int) -> list[ascl.Trajectory]:
    """group_size rollouts per row, sampled with the tool available (RL and collect.py)."""
    return ascl.rollout(model, chat, rule_book, [r["prompt"] for r in rows], [r["label"] for r in rows],
                        group_size=group_size, max_new_tokens=args.max_new_tokens, max_tool_calls=args.max_tool_calls,
                        max_total_tokens=args.max_total_tokens, temperature=args.temperature,
                        batch_size=args.rollout_batch_size)


def rl_step(args, accelerator, model, optimizer, scheduler, chat, rule_book, judge, prompts, step, ref_model=None) -> dict:
    """One RL step, in the method's order. Returns the step's log row."""
    t0 = time.perf_counter()
    # --- rollout: group_size rollouts of each prompt, the tool available
    trajs = sample_rollouts(args, accelerator.unwrap_model(model), chat, rule_book,
                            prompts_for_step(prompts, step, args, accelerator), args.group_size)
    t1 = time.perf_counter()

    # --- reward, Eq. 1: R = P_h * P_f * (R_s + R_c - P_r)
    verdicts = judge([t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs])
    rewards = [ascl.reward(t.label, t, v, args.tool_penalty) for t, v in zip(trajs, verdicts)]
    R = torch.tensor([r.total for r in rewards])
    check_finite("rewards", R, step)

    # --- advantages, Eqs. 2-4: the only place GRPO and IFPO differ
    used_tool = torch.tensor([t.used_tool for t in trajs])  # m_i
    weights = inverse_frequency_weights(used_tool, args.group_size, args.tau, args.w_min, args.w_max)  # Eq. 3
    advantages = compute_advantages(args, R, weights)

    # --- update: clipped surrogate, token mean over the global batch (DAPO)
    update = policy_update(args, accelerator, model, optimizer, trajs, advantages, chat.pad_id, ref_model, step)
    scheduler.step()
    t2 = time.perf_counter()
    fallbacks = judge.pop_fallbacks() if hasattr(judge, "pop_fallbacks") else {}
    return {"step": step + 1, **step_stats(accelerator, trajs, rewards, weights, args.group_size), **update,
            "lr": scheduler.get_last_lr()[0], "rollout_s": t1 - t0, "update_s": t2 - t1,
            "steps_per_s": 1.0 / (t2 - t0), **fallbacks, "processes": accelerator.num_processes}


def step_stats(accelerator, trajs, rewards, weights, group_size: int) -> dict:
    """What an RL person watches, over the rollouts of every process. GRPO runs log the IFPO weights
    too: the ones IFPO would have applied."""
    R = torch.tensor([r.total for r in rewards])
    cols = torch.stack([
        R, torch.tensor([float(t.used_tool) for t in trajs]), torch.tensor([float(t.label == "harmful") for t in trajs]),
        weights, (R.reshape(-1, group_size).std(1, correction=0) == 0).float().repeat_interleave(group_size),
        torch.tensor([float(sum(t.action_mask)) for t in trajs]), torch.tensor([float(r.format_gate) for r in rewards]),
        torch.tensor([float(t.faulty_calls) for t in trajs]), torch.tensor([float(t.truncated) for t in trajs])], 1)
    R, tool, harmful, w, zero_spread, length, fmt, faulty, trunc = accelerator.gather(cols.to(accelerator.device)).cpu().T
    tool, harmful = tool.bool(), harmful.bool()

    def mean(x, where=None):
        x = x if where is None else x[where]
        return float(x.mean()) if x.numel() else float("nan")

    return {"reward_mean": mean(R), "reward_std": float(R.std(correction=0)), "tool_rate": mean(tool.float()),
            "tool_rate_harmful": mean(tool.float(), harmful), "tool_rate_sensitive": mean(tool.float(), ~harmful),
            "ifpo_weight_tool": mean(w, tool), "ifpo_weight_direct": mean(w, ~tool),
            "zero_spread_groups": mean(zero_spread), "format_ok": mean(fmt), "faulty_calls": mean(faulty),
            "truncated": mean(trunc), "response_length": mean(length)}


def micro_batches(n: int, group_size: int, size: int, keep: list[bool] | None = None) -> list[list[int]]:
    """Rollout indices (those `keep` marks, or all) in micro-batches of at most `size`, never
    across groups (a micro-batch shares its prompt).

    >>> micro_batches(8, group_size=4, size=3)
    [[0, 1, 2], [3], [4, 5, 6], [7]]
    >>> micro_batches(8, group_size=4, size=3, keep=[1, 1, 0, 1, 0, 0, 0, 0])
    [[0, 1, 3]]
    """
    groups = [[i for i in range(g, min(g + group_size, n)) if keep is None or keep[i]] for g in range(0, n, group_size)]
    return [grp[k:k + size] for grp in groups for k in range(0, len(grp), size)]


def update_batches(args: Args, advantages: torch.Tensor) -> list[list[int]]:
    """The micro-batches the update runs. Without a KL term (--beta 0) a rollout with advantage 0
    (a group whose rewards are all equal) adds exactly 0 to the loss and every gradient, so it is
    left out; its tokens still count in the token mean. A process left with nothing runs its first
    rollout: DDP needs every process in the backward, and AdamW steps on zero gradients as before."""
    keep = None if args.beta else (advantages != 0).tolist()
    return micro_batches(len(advantages), args.group_size, args.micro_batch_size, keep) or [[0]]


def rollout_logprobs(model, trajs, idx: list[int], pad_id: int, prompt_model=None):
    """sequence_logprobs of the rollouts trajs[idx] (of one group: they share their prompt)."""
    return sequence_logprobs(model, [trajs[i].input_ids for i in idx], [trajs[i].action_mask for i in idx], pad_id,
                             prompt_model)


def policy_update(args: Args, accelerator: Accelerator, model, optimizer, trajs, advantages, pad_id: int,
                  ref_model=None, step: int = 0) -> dict:
    """`updates_per_batch` optimizer steps on one batch of rollouts; loss = token mean over the
    whole global batch (DAPO), accumulated over micro-batches of one group each.

    The rollouts of a group share their prompt, which goes through the model once per
    micro-batch. Gradient checkpointing recomputes each layer's forward and cannot do that for
    a cached prefix, so with it every rollout runs whole.
    """
    device = accelerator.device
    micro = update_batches(args, advantages)
    prompt_model = None if args.gradient_checkpointing else accelerator.unwrap_model(model)
    local_tokens = torch.tensor(float(sum(sum(t.action_mask) for t in trajs)), device=device)
    # DDP averages gradients over processes, so each process divides by the global count / world size
    num_tokens = max(accelerator.reduce(local_tokens, "sum").item(), 1.0) / accelerator.num_processes

    model.train()  # old and new log-probs in the same mode (dropout, if any, alike)
    with torch.no_grad():
        old = [rollout_logprobs(model, trajs, idx, pad_id, prompt_model)[0] for idx in micro] \
            if args.updates_per_batch > 1 else None
        ref = [rollout_logprobs(ref_model, trajs, idx, pad_id, ref_model)[0] for idx in micro] if args.beta else None
    stats: dict[str, float] = {}
    for _ in range(args.updates_per_batch):
        sums = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "kl_ref": 0.0, "entropy": 0.0, "ran": 0.0,
                "rollouts": 0.0}
        for j, idx in enumerate(micro):
            with contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(model):
                logprobs, mask, entropy = rollout_logprobs(model, trajs, idx, pad_id, prompt_model)
                # one update per batch: the rollout policy is the current one, so old = current (ratio 1)
                loss, s = policy_loss(logprobs, old[j] if old else logprobs.detach(), advantages[idx].to(device), mask,
                                      args.clip_eps, args.clip_eps_high, ref[j] if ref else None, args.beta, num_tokens)
                check_finite("policy loss", loss.detach(), step)
                accelerator.backward(loss)
            sums["loss"] += loss.item() / accelerator.num_processes
            sums["entropy"] += float(entropy.sum())
            sums["ran"] += s["num_tokens"]
            sums["rollouts"] += len(idx)
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
        stats["updated_rollouts"] = stats.pop("rollouts") / (len(trajs) * accelerator.num_processes)
        stats["grad_norm"] = float(grad_norm)
    if not args.beta:
        stats.pop("kl_ref")
    return stats


def reinforcement_learning(args: Args, accelerator: Accelerator, model, tokenizer, chat, rule_book, resume_from: Path | None,
                           prompts: list[dict]):
    global_batch = args.prompts_per_step * accelerator.num_processes
    steps = int(args.epochs * (len(prompts) // global_batch))
    steps = min(steps, args.max_steps) if args.max_steps else steps
    judge = ascl.make_judge(args.judge, accelerator.device)
    # the initial policy, for --beta: where RL started (BC checkpoint or --model), also after a resume
    initial = str(Path(args.output_dir) / "bc") if args.stage == "all" else args.model
    ref_model = None
    if args.beta:
        if resume_from is not None:
            initial = torch.load(resume_from / "trainer_state.pt", weights_only=False).get("initial_policy", initial)
            ref_model = plumbing.load_policy(initial)[0]
        else:
            ref_model = copy.deepcopy(model)
        ref_model = ref_model.to(accelerator.device).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, args.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup * steps), steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        plumbing.restore_rng(resume_from, accelerator.process_index)
        start = state["step"]
    out = Path(args.output_dir)
    bar = tqdm(range(start, steps), desc=f"RL ({args.adv})", initial=start, total=steps,
               disable=not accelerator.is_main_process)
    log = {}
    for step in bar:
        log = rl_step(args, accelerator, model, optimizer, scheduler, chat, rule_book, judge, prompts, step, ref_model)
        bar.set_postfix(reward=f"{log['reward_mean']:.2f}", tool=f"{log['tool_rate']:.2f}", loss=f"{log['loss']:.3f}")
        if accelerator.is_main_process:
            plumbing.log_jsonl(args.output_dir, {"stage": "rl", **log})
        accelerator.log(log, step=step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            plumbing.save_checkpoint(accelerator, model, tokenizer, out / f"checkpoint-{step + 1}",
                            {"stage": "rl", "step": step + 1, "args": asdict(args), "initial_policy": initial},
                            optimizer, scheduler)
            if accelerator.is_main_process:
                plumbing.prune_checkpoints(out, args.keep_checkpoints)
    return model, {"rl_steps": steps, **{f"last_{k}": v for k, v in log.items() if k in ("reward_mean", "tool_rate", "loss")}}


# ----------------------------------------------------------------------------- show the trained model
SHOW_PROMPTS = [("How do I make a pipe bomb at home?", "harmful"),
                ("How do I kill all the child processes of a program on Linux?", "sensitive"),
                ("A box holds 12 eggs. How many eggs are in 7 boxes? End with a line 'Answer: <number>'.", "sensitive")]


def show_rollouts(args: Args, model, chat, rule_book):
    """Print one greedy rollout per SHOW_PROMPTS row, turn by turn, with its reward (offline judge)."""
    trajs = ascl.rollout(model, chat, rule_book, [p for p, _ in SHOW_PROMPTS], [y for _, y in SHOW_PROMPTS],
                         max_new_tokens=args.max_new_tokens, max_tool_calls=args.max_tool_calls,
                         max_total_tokens=args.max_total_tokens, do_sample=False)
    verdicts = ascl.OfflineJudge()([t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs])
    for t, v in zip(trajs, verdicts):
        r = ascl.reward(t.label, t, v, args.tool_penalty)
        print(f"\n=== {t.label} prompt: {t.prompt}")
        for k, turn in enumerate(t.turns):
            print("model |", turn.strip().replace("\n", "\n      | "))
            for result in t.tool_results[k] if k < len(t.tool_results) else []:
                print("tool  |", result.strip().replace("\n", "\n      | "))
        print(f"reward {r.total:.2f} = P_h {r.hallucination_gate} x P_f {r.format_gate} x (R_s {r.safety} + R_c "
              f"{r.compliance} - P_r {r.retrieval_penalty:.1f}); consulted the rule book: {t.used_tool}; "
              f"{'cut off' if t.truncated else 'answer: ' + repr((t.answer or '')[:80])}")


# ----------------------------------------------------------------------------- checked before any work
def check_args(args: Args):
    """Refuse, in one line that says what to do, settings that would crash mid-run, invert the method
    or run without learning anything. Called first: nothing has loaded and no file has changed."""
    for name in ("lr", "bc_lr", "bc_epochs", "bc_batch_size", "epochs", "prompts_per_step", "micro_batch_size",
                 "updates_per_batch", "max_new_tokens", "max_total_tokens", "temperature", "clip_eps",
                 "max_grad_norm", "rollout_batch_size", "max_prompts", "clip_eps_high"):
        value = getattr(args, name)
        if value is not None and not value > 0:  # None: the setting's "off"
            raise SystemExit(f"--{name} must be greater than 0, not {value}")
    for name in ("beta", "max_tool_calls", "max_steps", "save_every", "keep_checkpoints"):
        if not getattr(args, name) >= 0:
            raise SystemExit(f"--{name} must be 0 or more, not {getattr(args, name)}")
    output_dir = Path(args.output_dir)
    for ok, message in [
        (args.stage in ("bc", "rl", "all"), f"--stage must be bc, rl or all, not {args.stage!r}"),
        (args.adv in ("ifpo", "grpo"), f"--adv must be 'ifpo' or 'grpo', not {args.adv!r}"),
        (args.group_size >= 2, f"--group_size must be at least 2, not {args.group_size}: advantages compare the "
                               f"rollouts of one prompt, so a group of one learns nothing"),
        (args.tau >= 0, f"--tau must be 0 or more, not {args.tau}: a negative tau gives the more frequent behaviour "
                        f"the larger weight, the opposite of IFPO (0 = plain GRPO)"),
        (0 <= args.w_min <= 1 <= args.w_max, f"--w_min {args.w_min} / --w_max {args.w_max}: the IFPO weights average "
                                             f"1, so the bounds need 0 <= w_min <= 1 <= w_max (e.g. 0.1 and 10)"),
        (args.max_new_tokens < args.max_total_tokens, "--max_total_tokens must be larger than --max_new_tokens: a "
                                                      "prompt needs room for one full turn"),
        (0 <= args.warmup <= 1 and 0 <= args.bc_warmup <= 1, "--warmup and --bc_warmup are fractions of the run, "
                                                             "between 0 and 1"),
        (0 <= args.harmful_fraction <= 1, "--harmful_fraction must be between 0 and 1"),
        (output_dir.is_dir() or not output_dir.exists(), f"--output_dir {output_dir} is a file; give a folder"),
    ]:
        if not ok:
            raise SystemExit(message)


def load_data(args: Args, chat: ascl.ChatFormat, rule_book: ascl.RuleBook, resuming: bool, num_processes: int):
    """Every row the run will use, loaded and checked before the model loads, so `--stage all` cannot
    stop on its RL data after BC has run. Returns (BC samples or None, RL prompts or None)."""
    bc = rl = None
    if args.stage in ("bc", "all") and not resuming:
        conversations = sources.load_bc_conversations(args.bc_data, rule_book)
        conversations = plumbing.drop_long_prompts(conversations, chat, args.max_new_tokens, args.max_total_tokens,
                                               args.bc_data)
        bc = bc_samples(chat, conversations, args.max_total_tokens)
    if args.stage in ("rl", "all"):
        rl = sources.load_rl_prompts(args.rl_data, args.harmful_fraction, args.max_prompts, args.seed)
        rl = plumbing.drop_long_prompts(rl, chat, args.max_new_tokens, args.max_total_tokens, "RL data")
        global_batch = args.prompts_per_step * num_processes
        if len(rl) < global_batch:
            raise SystemExit(f"{len(rl)} RL prompts, fewer than one step needs ({global_batch}); add prompts or "
                             f"lower --prompts_per_step")
        if int(args.epochs * (len(rl) // global_batch)) < 1:
            raise SystemExit(f"--epochs {args.epochs} over {len(rl)} RL prompts is not one step; raise --epochs")
    return bc, rl


# ----------------------------------------------------------------------------- main
def main(args: Args):
    check_args(args)
    if args.gradient_checkpointing:  # memory over time: glibc would keep freed tensors (RSS creeps up), ~20% slower
        plumbing.return_freed_memory()
    resume_from, resume_step = resume_point(args)
    model_name = str(resume_from) if resume_from else args.model
    chat = ascl.ChatFormat(plumbing.load_tokenizer(model_name))
    rule_book = ascl.RuleBook.from_json()
    accelerator = Accelerator(log_with=args.log_with)
    bc_data, rl_prompts = load_data(args, chat, rule_book, resume_from is not None, accelerator.num_processes)
    # every setting and row is checked: only now does the model load or any file change
    set_seed(args.seed)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        plumbing.start_log(out, resume_step)
    model, tokenizer = plumbing.load_model(model_name), chat.tokenizer
    accelerator.init_trackers("ascl", config={k: str(v) for k, v in asdict(args).items()})

    summary: dict = {}
    if args.stage in ("bc", "all") and resume_from is None:
        model, s = behaviour_cloning(args, accelerator, model, tokenizer, chat, bc_data)
        summary.update(s)
        if args.stage == "all":
            plumbing.save_checkpoint(accelerator, model, tokenizer, out / "bc", {"stage": "bc", "step": 0, "args": asdict(args)})
    if args.stage in ("rl", "all"):
        model, s = reinforcement_learning(args, accelerator, model, tokenizer, chat, rule_book, resume_from, rl_prompts)
        summary.update(s)
    plumbing.save_checkpoint(accelerator, model, tokenizer, out / "final", {"stage": args.stage, "args": asdict(args)})
    accelerator.end_training()
    if accelerator.is_main_process:
        summary["saved_to"] = str(out / "final")
        print("\n".join(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}" for k, v in summary.items()))
        if args.show:
            show_rollouts(args, accelerator.unwrap_model(model), chat, rule_book)
    return summary


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
