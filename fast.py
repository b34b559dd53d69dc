"""Speed-ups behind `train.py --fast`: the plain path's tokens, log-probs and gradients, in less time.

train.py picks the functions once: `fast.generate_turns` for ascl.generate_turns (one round of
model turns in a rollout) and `fast.token_logprobs` for ascl.token_logprobs (BC and the RL
update). Same arguments, same results (tests/test_fast.py: the same greedy tokens, the same draws
as `generate` when sampling, log-probs, entropies and gradients to float precision). The method
files never import this one.

What each speed-up does, and what it saved on the 2-core CPU with SmolLM2-135M (fp32):

1. Log-probs: the prefix every row shares runs once (`shared_prefix`, `token_logprobs`). The rows
   of a BC batch or an RL micro-batch start with the same system prompt (140 tokens with SmolLM2's
   template; the whole prompt for rollouts of one group), and that is most of each row. It goes
   through the model once; its keys and values are expanded to every row, the rest of the rows run
   on top, and gradients flow back through the expansion into the one prefix forward.
   Measured (forward + backward of one batch of 8, median of 3): RL micro-batch (2 prompts x 4
   rollouts, 258 positions, 508 trained tokens) 12.5 s -> 6.6 s; BC batch (431 positions)
   18.3 s -> 12.4 s.
2. Log-probs: the output layer runs only at positions where some row trains a token
   (`logits_to_keep`), so no full-vocabulary logits are made for prompts, tool results or padding;
   alone it saved little time (12.5 s -> 12.3 s above) but keeps the (B, T, V) logits out of memory.
   With 1., peak RSS of the same forward + backward: RL 6,125 -> 3,645 MiB, BC 8,807 -> 6,593 MiB.
   The entropies (logged, no gradient) are taken ENTROPY_CHUNK trained tokens at a time: one RL
   step's peak RSS 3,798 -> 3,638 MiB (benchmarks/bench_rl_step.py, medians of 2).
3. Rollout turns: one prefill per distinct context, on top of a prefix prefilled once (`prefill`):
   a group's rollouts share their prompt, and every prompt starts with the system prompt, so plain
   `generate`, which prefills every row whole, runs about 16 times the prompt tokens it needs.
   Decoding is a plain loop over the model's forward, and a row leaves the batch (and its cache) as
   soon as its turn ends, instead of being decoded until the longest turn of the round ends. Measured
   (one round, medians of 2): 4 prompts x 8 sampled rollouts, up to 96 tokens: plain 25.8 s, fast
   16.9 s, of which the shared prefill saves 7.9 s and rows leaving 1.3 s; 16 prompts, 96 greedy
   tokens each (no row ends early): plain 19.7 s, fast 14.1 s, 18.2 s without the shared prefill.
   Rows leaving saves less than 10% of a step, but finished rows need handling either way, and
   leaving takes no more code than decoding them on.

Dropped, because a benchmark showed they did not pay (< 10% of an RL or BC step) on this CPU:
- the output layer on each row's own trained positions only (a pre-hook on the layer) instead of
  on the positions any row trains: 7.1 s -> 6.6 s for the RL micro-batch above and 12.7 s -> 12.4 s
  for BC, a few percent of a step, for a hook on the model's internals;
- the output layer in chunks with a custom backward (log p(target) from hidden states, 170
  positions at a time): it saves memory only, and little of it once 1. and 2. are in (peak RSS
  3,630 vs 3,645 MiB for the RL micro-batch above, 6,531 vs 6,593 MiB for BC), and runs the
  layer's matmul again in the backward;
- an in-place KV cache (a subclass of transformers' DynamicLayer writing each decode step into
  spare room): measured before this module, 15% of a decode step at 16 rows (156 vs 183 ms, 250
  cached tokens a row) and nothing at 8 (143 vs 140 ms), so a few percent of a step;
- transformers' own continuous batching (`model.generate_batch`): it runs on this CPU and writes
  the same greedy tokens, but took 31 s where `generate` took 12 s (16 rows, 64 tokens);
- keeping a conversation's KV cache across rounds (a turn after a tool call prefilling only the
  tool turn): the round interface hands over token lists, and untrained models rarely call the tool.
"""

from __future__ import annotations

import os

import torch
from transformers import DynamicCache, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

import ascl

MIN_SHARED = 16  # a shared prefix shorter than this is not worth a forward of its own
ENTROPY_CHUNK = 256  # trained tokens whose entropy is taken at once (each a vocabulary-wide row)


def plain_kv_cache(model) -> bool:
    """Whether the model keeps a plain per-layer key/value cache, which both speed-ups slice, expand
    and extend. Sliding windows and linear attention do not: those models take the plain path."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


# ----------------------------------------------------------------------------- rollout turns
@torch.inference_mode()
def generate_turns(
    model,
    contexts: list[list[int]],
    budgets: list[int],
    end_of_turn_id: int,
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """ascl.generate_turns: each row's new ids, cut after its first end-of-turn token and at its budget.

    The contexts are prefilled by `prefill`; then one decode step at a time for the rows still
    writing: a row whose turn ended (end of turn, or its budget) leaves the batch and its cache.
    """
    if not plain_kv_cache(model):
        return ascl.generate_turns(
            model, contexts, budgets, end_of_turn_id, pad_id, do_sample, temperature, top_p
        )
    new = [[] for _ in contexts]
    rows = [i for i, budget in enumerate(budgets) if budget > 0]  # a row without budget writes nothing
    if not rows:
        return new
    top_p_filter = TopPLogitsWarper(top_p) if do_sample and top_p < 1.0 else None
    was_training = model.training
    model.eval()
    try:
        cache, attention, positions, logits = prefill(model, [contexts[i] for i in rows], pad_id)
        while True:
            tokens = next_tokens(logits, do_sample, temperature, top_p_filter)
            for i, token in zip(rows, tokens.tolist()):
                new[i].append(token)
            going_on = [
                j for j, i in enumerate(rows) if new[i][-1] != end_of_turn_id and len(new[i]) < budgets[i]
            ]
            if not going_on:
                return new
            if len(going_on) < len(rows):  # finished rows leave the batch
                keep = torch.tensor(going_on, device=attention.device)
                cache.batch_select_indices(keep)
                rows = [rows[j] for j in going_on]
                tokens, attention, positions = tokens[keep], attention[keep], positions[keep]
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], 1)
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=attention,
                position_ids=positions[:, None],
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
            positions = positions + 1
    finally:
        model.train(was_training)


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p_filter=None) -> torch.Tensor:
    """The next token of each row from (B, V) logits, drawn as `generate` draws it: the argmax, or a
    draw from softmax(logits / temperature), after transformers' own top-p filter if one is given.

    >>> next_tokens(torch.tensor([[0.0, 3.0, 1.0]]), do_sample=False, temperature=1.0)
    tensor([1])
    >>> next_tokens(torch.tensor([[0.0, 9.0, 1.0]]), True, 1.0, TopPLogitsWarper(0.5))  # only token 1 is left
    tensor([1])
    """
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_p_filter is not None:
        scores = top_p_filter(None, scores)  # the input ids are not read
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def prefill(model, contexts: list[list[int]], pad_id: int):
    """Every context through the model once: (cache, attention mask, next positions, last logits), one
    row per context.

    Identical contexts (a group's rollouts share their prompt) run once, and so does the prefix the
    distinct ones share (the system prompt), at least MIN_SHARED tokens: it runs alone, and the rest
    of each context runs on top of it, left-padded, all in one forward. A cache row is then
        [shared prefix | pad pad | rest of the context]      attention  1 .. 1  0 0  1 .. 1
    and positions count real tokens only, as in `generate`'s left-padded rows.
    """
    device = model.device
    distinct = list(dict.fromkeys(map(tuple, contexts)))
    shared = len(os.path.commonprefix(distinct)) if len(distinct) > 1 else 0
    shared = min(shared, min(map(len, distinct)) - 1)  # every context keeps a token to run on top
    cache = None
    if shared >= MIN_SHARED:
        prefix = model(
            input_ids=torch.tensor([distinct[0][:shared]], device=device),
            position_ids=torch.arange(shared, device=device)[None],
            use_cache=True,
            logits_to_keep=1,
        ).cache
        cache = expanded(prefix, len(distinct), model.config)
    else:
        shared = 0
    rests = [c[shared:] for c in distinct]
    width = max(map(len, rests))
    ids = torch.full((len(rests), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rests), shared + width), dtype=torch.long)
    positions = torch.zeros((len(rests), width), dtype=torch.long)
    attention[:, :shared] = 1
    for d, rest in enumerate(rests):
        ids[d, width - len(rest) :] = torch.tensor(rest)
        attention[d, shared + width - len(rest) :] = 1
        positions[d, width - len(rest) :] = torch.arange(shared, shared + len(rest))
    attention = attention.to(device)
    out = model(
        input_ids=ids.to(device),
        attention_mask=attention,
        position_ids=positions.to(device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.cache, out.logits[:, -1]
    lengths = torch.tensor([len(c) for c in distinct], device=device)
    if len(distinct) < len(contexts):  # each row gets its context's cache, mask and logits
        index = {c: d for d, c in enumerate(distinct)}
        rows = torch.tensor([index[tuple(c)] for c in contexts], device=device)
        cache.batch_select_indices(rows)
        attention, lengths, logits = attention[rows], lengths[rows], logits[rows]
    return cache, attention, lengths, logits


def expanded(cache, rows: int, config) -> DynamicCache:
    """A new cache holding a one-row cache's keys and values for `rows` rows (gradients, if any, flow
    back through the expansion to the one row)."""
    out = DynamicCache(config=config)
    for k, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), k)
    return out


# ----------------------------------------------------------------------------- log-probs
def token_logprobs(model, ids, attention, action, temperature: float = 1.0, entropy: bool = False):
    """ascl.token_logprobs: (logprobs, mask[, entropy]), each (B, T - 1), aligned with ids[:, 1:].

    The prefix all rows share runs once (`shared_prefix`), the rows' rest on top of its expanded
    keys and values; the output layer runs only at positions where some row trains a token, and
    each trained token's logits go through logits / temperature -> log-softmax -> gather, as in the
    plain path. Worked example, two rows sharing a 3-token prefix S (shared_prefix = 2, so that the
    position before the first trained token a runs in the second forward, which scores it):
        ids     S S S a E         action 0 0 0 1 1      first forward: S S
        ids     S S S b b E       action 0 0 0 1 1 1    second forward: S a E / S b b E, on top of it
    """
    inner = getattr(model, "module", model)  # under DDP only the last forward may go through the wrapper
    if not plain_kv_cache(inner) or not action[:, 1:].any():
        return ascl.token_logprobs(model, ids, attention, action, temperature, entropy)
    B, T = ids.shape
    mask = action[:, 1:]
    # checkpointing recomputes each layer's forward in the backward, which cannot recompute a cached prefix
    checkpointing = getattr(inner, "is_activation_checkpointing", False)
    shared = 0 if checkpointing else shared_prefix(ids, attention, action)
    extra = {}
    if shared:
        prefix = inner(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1).cache
        extra = dict(
            cache=expanded(prefix, B, inner.config),
            use_cache=True,
            position_ids=torch.arange(shared, T, device=ids.device).expand(B, -1),
        )
    trained = mask[:, shared:]  # column j: the token at shared + j + 1, scored by the forward's position j
    keep = trained.any(0).nonzero().squeeze(1)  # positions where some row trains
    rows, cols = trained[:, keep].nonzero(as_tuple=True)  # each trained token: its row and kept position
    logits = model(input_ids=ids[:, shared:], attention_mask=attention, logits_to_keep=keep, **extra).logits
    logp = (logits[rows, cols].float() / temperature).log_softmax(-1)  # (N, V): the trained tokens only
    where = (rows, shared + keep[cols])
    picked = logp.gather(1, ids[:, 1:][where][:, None]).squeeze(1)
    logprobs = logp.new_zeros(mask.shape).index_put(where, picked)
    if not entropy:
        return logprobs, mask
    with torch.no_grad():  # in chunks: exp(logp) of every trained token at once is the step's largest tensor
        h = torch.cat([-(chunk.exp() * chunk).sum(-1) for chunk in logp.split(ENTROPY_CHUNK)])
        return logprobs, mask, logp.new_zeros(mask.shape).index_put(where, h)


def shared_prefix(ids, attention, action) -> int:
    """How many leading ids all rows share and can run once: the system prompt in BC, a group's prompt
    in RL. It stops one token before the first trained token, whose score needs the position before
    it in the second forward; 0 if under MIN_SHARED or a single row.

    >>> ids = torch.tensor([list(range(20)) + [7, 8], list(range(20)) + [9, 0]])
    >>> shared_prefix(ids, torch.ones_like(ids), torch.tensor([[0] * 20 + [1, 1], [0] * 20 + [1, 0]]))
    19
    """
    if ids.shape[0] < 2:
        return 0
    first = int(action.any(0).nonzero()[0])
    same = ((ids == ids[:1]) & (attention == 1)).all(0).long().cumprod(0)
    n = min(int(same.sum()), first - 1)
    return n if n >= MIN_SHARED else 0
