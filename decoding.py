"""Decoding for ascl.rollout: one model turn at a time for many conversations.

Not the method, only how its turns get decoded fast. Both decoders have one interface:

    decoder.add(key, context_ids)        # queue a conversation's next turn
    for key, new_ids in decoder.turns(): # turns as they finish, cut after the end-of-turn token
        ...                              # the caller may add(key, longer_context) right here

`ReferenceDecoder` is the plain way (one left-padded `generate` per batch of queued turns);
the tests hold `TurnDecoder` to it token for token under greedy decoding. `TurnDecoder` is
what a rollout with tool calls needs to stay close to plain `generate`:
- continuous batching: each row has a slot in one KV cache; between any two decode steps a
  row whose turn ended frees its slot and a queued turn (a new conversation) takes it,
  instead of waiting for the whole round;
- no second prefill: a conversation continued right after its turn ended (a tool call) goes
  on in its own slot, from its KV cache there, so only the tool turn is prefilled; identical contexts (the rollouts
  of a group share their prompt) are prefilled once, and so is the prefix that new contexts
  share (the system prompt: the prompts' own tokens then go through the model together on top of it);
- each row stops at its own budget: min(max_new_tokens, max_total_tokens - len(context)).
Memory: the cache of the batch (a conversation continued goes on in its own slot), and the
shared prefix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import plumbing


@dataclass
class Sampling:
    max_new_tokens: int = 256  # per turn
    max_total_tokens: int = 2048  # per conversation
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int | None = None  # rows decoded together; None = all queued turns


class ReferenceDecoder:
    """One left-padded `generate` over the queued turns (batch_size at a time), until none is queued."""

    def __init__(self, model, end_of_turn_id: int, pad_id: int, sampling: Sampling):
        self.model, self.eot, self.pad, self.s = model, end_of_turn_id, pad_id, sampling
        self.queue: list[tuple[int, list[int]]] = []

    def add(self, key: int, context: list[int]):
        self.queue.append((key, list(context)))

    def budget(self, context: list[int]) -> int:
        return min(self.s.max_new_tokens, self.s.max_total_tokens - len(context))

    def turns(self):
        while self.queue:
            n = self.s.batch_size or len(self.queue)
            batch, self.queue = self.queue[:n], self.queue[n:]
            yield from zip([key for key, _ in batch], self._generate([c for _, c in batch]))

    @torch.inference_mode()
    def _generate(self, contexts: list[list[int]]) -> list[list[int]]:
        budgets = [self.budget(c) for c in contexts]
        if max(budgets) <= 0:
            return [[] for _ in contexts]
        ids, attention = left_pad(contexts, self.pad)
        s, was_training = self.s, self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=attention.to(self.model.device),
            max_new_tokens=max(budgets), do_sample=s.do_sample, temperature=s.temperature if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None, top_k=0 if s.do_sample else None,
            eos_token_id=self.eot, pad_token_id=self.pad)
        self.model.train(was_training)
        return [cut(row, b, self.eot) for row, b in zip(out[:, ids.shape[1]:].tolist(), budgets)]


def left_pad(contexts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention), both (B, T): contexts right-aligned, the attention mask from lengths.

    >>> left_pad([[5, 6, 7], [8]], pad_id=0)
    (tensor([[5, 6, 7],
            [0, 0, 8]]), tensor([[1, 1, 1],
            [0, 0, 1]]))
    """
    T = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(contexts), T), dtype=torch.long)
    for row, c in enumerate(contexts):
        if c:
            ids[row, T - len(c):], attention[row, T - len(c):] = torch.tensor(c), 1
    return ids, attention


def cut(new: list[int], budget: int, end_of_turn_id: int) -> list[int]:
    """A turn's ids: at most `budget`, ending at the first end-of-turn token.

    >>> cut([4, 5, 2, 2, 2], budget=10, end_of_turn_id=2), cut([4, 5, 6], budget=2, end_of_turn_id=2)
    ([4, 5, 2], [4, 5])
    """
    new = new[:max(budget, 0)]
    return new[: new.index(end_of_turn_id) + 1] if end_of_turn_id in new else new


@dataclass
class _Row:
    key: int
    context: list[int]
    budget: int
    new: list[int] = field(default_factory=list)
    done: bool = False  # its turn ended; its slot keeps the cache while the caller decides

    @property
    def tokens(self) -> list[int]:  # the slot caches all but the last, which is the next input
        return self.context + self.new


class TurnDecoder(ReferenceDecoder):
    """Continuous batching over one KV cache with a slot per row; rows join between any two decode steps.

    A slot holds [pad | its row's tokens but the last], right-aligned; the last is the next input,
    at position = the number of real tokens before it. A free slot holds stale values the attention
    mask hides until a joining row overwrites it; free slots are dropped every `chunk` steps when
    nothing waits for them. Models whose cache is not a plain per-layer key/value list (sliding
    windows, linear attention) are decoded by the reference path.
    """

    def __init__(self, model, end_of_turn_id: int, pad_id: int, sampling: Sampling, chunk: int = 16):
        super().__init__(model, end_of_turn_id, pad_id, sampling)
        self.chunk = chunk
        self.shared: tuple[list[int], list] = ([], None)  # a prefix new contexts share (system prompt), prefilled
        self.rows: list[_Row | None] = []  # one per slot of the cache; None: a free slot
        self.cache, self.mask, self.last = None, None, None  # DynamicCache, (slots, T) attention, (slots,) next inputs

    def turns(self):
        if not plain_kv_cache(self.model):
            yield from super().turns()
            return
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._turns()
        finally:
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            self.model.train(was_training)

    def _turns(self):
        room, steps = self.s.batch_size or len(self.queue), 0
        while self.queue or any(self.rows):
            yield from self._fill(room)
            if not any(self.rows):
                continue
            tokens = self._step().tolist()
            steps += 1
            ended = []
            for r, token in zip(self.rows, tokens):
                if r is not None:
                    r.new.append(token)
                    if token == self.eot or len(r.new) >= r.budget:
                        r.done = True
                        ended.append(r)
            for r in ended:
                yield r.key, r.new  # the caller may add(key, longer context) right here: it goes on in this slot
            going_on = {key for key, _ in self.queue}
            self.rows = [None if r is not None and r.done and r.key not in going_on else r for r in self.rows]
            if steps % self.chunk == 0 and not self.queue:
                self._compact()

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        """One decode step for every slot: feed `last`, return the next token per slot."""
        device = self.model.device
        positions = self.mask.sum(1, keepdim=True)  # real tokens before this one
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], 1)
        logits = self.model(input_ids=self.last.unsqueeze(1).to(device), attention_mask=self.mask.to(device),
                            position_ids=positions.to(device), past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.last = sample(logits.float(), self.s).cpu()
        return self.last

    @torch.inference_mode()
    def _fill(self, room: int):
        """Queued turns join: a conversation whose turn just ended goes on in its own slot (only its new
        tokens prefilled, on top of the slot's cache); new contexts take free slots, identical ones
        prefilled once, each on top of the prefix new contexts share. A turn with no budget comes back empty."""
        if not self.queue:
            return
        queue, self.queue = self.queue, []
        if any(len(context) < 2 for _, context in queue):
            raise ValueError("TurnDecoder needs contexts of at least 2 tokens")
        parked = {r.key: j for j, r in enumerate(self.rows) if r is not None and r.done}
        going_on, new, empty = [], [], []
        for key, context in queue:
            j = parked.pop(key, None)
            if j is not None and self.budget(context) > 0 and context[:len(self.rows[j].tokens)] == self.rows[j].tokens:
                going_on.append((j, key, context))
                continue
            if j is not None:  # re-queued with no budget, or with a context that does not extend its row's
                self.rows[j] = None
            (new if self.budget(context) > 0 else empty).append((key, context))
        for key, _ in empty:
            yield key, []  # no room for one token
        free = [j for j, r in enumerate(self.rows) if r is None] + list(range(len(self.rows), room))
        new, self.queue = new[:len(free)], new[len(free):] + self.queue
        self._share_prefix([context[:-1] for _, context in new])
        joining = []
        for j, key, context in going_on:
            n = len(self.rows[j].tokens) - 1
            slot = [(k[j, :, k.shape[2] - n:], v[j, :, v.shape[2] - n:]) for k, v in kv_layers(self.cache)]
            joining.append((j, key, context, self._prefill(context[:-1], (context[:n], slot))))
        distinct = list({tuple(context[:-1]): context[:-1] for _, context in new}.values())
        prefilled = dict(zip(map(tuple, distinct), self._prefill_new(distinct))) if distinct else {}
        for j, (key, context) in zip(free, new):
            joining.append((j, key, context, prefilled[tuple(context[:-1])]))
        if joining:
            self._resize(max([len(self.rows)] + [j + 1 for j, *_ in joining]),
                         max([0 if self.mask is None else self.mask.shape[1]] + [len(c) - 1 for _, _, c, _ in joining]),
                         joining[0][3])
            for j, key, context, layers in joining:
                self._place(j, layers)
                self.rows[j] = _Row(key, context, self.budget(context))
                self.last[j] = context[-1]

    def _share_prefix(self, contexts: list[list[int]]):
        """Prefill once the prefix that distinct new contexts share, if longer than the one kept:
        the system prompt (and chat template) every prompt starts with, about 140 of 160 tokens
        per prompt with the default system prompt and SmolLM2's template."""
        distinct = list({tuple(c): c for c in contexts}.values())
        if len(distinct) < 2:
            return
        prefix = os.path.commonprefix(distinct)  # a list: commonprefix compares item by item
        # below 16 tokens, a prefix is not worth a forward of its own; _prefill starts from the old one if it fits
        if len(prefix) >= 16 and (len(prefix) > len(self.shared[0]) or prefix[:len(self.shared[0])] != self.shared[0]):
            self.shared = (prefix, self._prefill(prefix))

    def _prefill(self, tokens: list[int], start: tuple[list[int], list] = ([], None)) -> list:
        """Per-layer (keys, values), each (heads, len(tokens), head_dim); starts from `start` (tokens,
        their per-layer cache: a slot's) or the shared prefix, whichever covers more of `tokens`."""
        known, layers = [], None
        for start_tokens, start_layers in (start, self.shared):
            if start_layers is not None and len(start_tokens) > len(known) and tokens[:len(start_tokens)] == start_tokens:
                known, layers = start_tokens, start_layers
        rest = tokens[len(known):]
        if not rest:
            return layers
        cache = DynamicCache([(k.unsqueeze(0), v.unsqueeze(0)) for k, v in layers] if layers else None,
                             config=self.model.config)
        device = self.model.device
        out = self.model(input_ids=torch.tensor([rest], device=device),
                         position_ids=torch.arange(len(known), len(tokens), device=device).unsqueeze(0),
                         past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
        return [(k[0], v[0]) for k, v in kv_layers(out)]

    def _prefill_new(self, contexts: list[list[int]]) -> list[list]:
        """`_prefill` for each of several contexts; those that start with the shared prefix go through
        the model together, their rests after it left-padded (the padding masked), in runs of similar
        length (plumbing.length_runs), so each run reads the weights once instead of once per context."""
        shared, layers = self.shared
        on_top = [i for i, c in enumerate(contexts) if layers is not None and len(c) > len(shared) and c[:len(shared)] == shared]
        out = {i: self._prefill(c) for i, c in enumerate(contexts) if i not in on_top}
        P, device = len(shared), self.model.device
        for run in plumbing.length_runs([len(contexts[i]) - P for i in on_top], device.type):
            rows, R = [on_top[r] for r in run], max(len(contexts[on_top[r]]) - P for r in run)
            ids, mask = torch.full((len(rows), R), self.pad), torch.ones((len(rows), P + R), dtype=torch.long)
            positions = torch.full((len(rows), R), P)
            for b, i in enumerate(rows):
                rest = contexts[i][P:]
                ids[b, R - len(rest):], positions[b, R - len(rest):] = torch.tensor(rest), torch.arange(P, P + len(rest))
                mask[b, P:P + R - len(rest)] = 0
            cache = DynamicCache([(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1)) for k, v in layers],
                                 config=self.model.config)  # (heads, P, dim) seen as (rows, heads, P, dim), no copy
            cache = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                               past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
            for b, i in enumerate(rows):
                start = P + R - (len(contexts[i]) - P)  # where its rest starts, after the padding
                out[i] = [(torch.cat([k[b, :, :P], k[b, :, start:]], 1), torch.cat([v[b, :, :P], v[b, :, start:]], 1))
                          for k, v in kv_layers(cache)]
        return [out[i] for i in range(len(contexts))]

    def _resize(self, slots: int, width: int, like: list):
        """Make the cache `slots` rows by `width` columns (one copy, only if it grows): old slots keep
        their rows, right-aligned; what is new is zeros, masked. `like`: a row's per-layer cache."""
        if self.cache is None:  # nothing yet: an empty cache with `like`'s heads and head size
            layers = [(k.new_zeros((0, k.shape[0], 0, k.shape[2])), v.new_zeros((0, v.shape[0], 0, v.shape[2])))
                      for k, v in like]
            self.mask, self.last = torch.zeros((0, 0), dtype=torch.long), torch.zeros(0, dtype=torch.long)
        else:
            layers = kv_layers(self.cache)
        rows, T = self.mask.shape
        if slots == rows and width == T:
            return
        self.cache = roomy_cache(layers, self.model.config, slots=slots, left=width - T)
        mask = self.mask.new_zeros((slots, width))
        mask[:rows, width - T:] = self.mask
        self.mask, self.last = mask, torch.cat([self.last, self.last.new_zeros(slots - rows)])
        self.rows += [None] * (slots - rows)

    def _place(self, j: int, layers: list):
        """Write a row's per-layer cache, each (heads, L, head_dim), right-aligned into slot j."""
        for (keys, values), (k, v) in zip(kv_layers(self.cache), layers):
            if k.data_ptr() != keys[j, :, keys.shape[2] - k.shape[1]:].data_ptr():  # not already there
                keys[j, :, keys.shape[2] - k.shape[1]:], values[j, :, values.shape[2] - v.shape[1]:] = k, v
        self.mask[j] = 0
        self.mask[j, self.mask.shape[1] - layers[0][0].shape[1]:] = 1

    def _compact(self):
        """Drop free slots, then the left columns that are padding in every slot left (one copy)."""
        keep = [j for j, r in enumerate(self.rows) if r is not None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            return
        index = torch.tensor(keep)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])
        layers = [(k[index.to(k.device), :, start:], v[index.to(v.device), :, start:]) for k, v in kv_layers(self.cache)]
        self.rows, self.cache = [self.rows[j] for j in keep], roomy_cache(layers, self.model.config)
        self.mask, self.last = mask[:, start:], self.last[index]


def roomy_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config, room: int = 64, slots: int | None = None,
                left: int = 0) -> DynamicCache:
    """A DynamicCache holding `layers` (per-layer keys, values, each (batch, heads, length, head_dim))
    whose layers write each decode step's keys and values in place (`RoomyLayer`); `slots` rows
    (default: batch) and `left` columns before the old ones, the new ones zeros."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer(k, v, room, slots, left) for k, v in layers]
    return cache


class RoomyLayer(DynamicLayer):
    """A DynamicLayer with `room` spare positions after its keys and values. transformers'
    DynamicLayer concatenates the whole cache at every decode step (a copy of all of it per token
    written); this one writes the new keys and values into the spare room and returns views, and
    makes more room (one copy) when it runs out, or when its keys were replaced by other code."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int, slots: int | None = None, left: int = 0):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.room = max(room, 1)
        self._k, self._v = self._grown(keys, 0, slots, left), self._grown(values, 0, slots, left)
        self.keys, self.values = self._k[:, :, :left + keys.shape[2]], self._v[:, :, :left + values.shape[2]]

    def _grown(self, t: torch.Tensor, extra: int, slots: int | None = None, left: int = 0) -> torch.Tensor:
        """A copy of t with `room + extra` free columns after it; `slots` rows and `left` columns before it, zeros."""
        rows, heads, length, dim = t.shape
        buffer = t.new_empty((slots or rows, heads, left + length + self.room + extra, dim))
        buffer[:rows, :, left:left + length] = t
        buffer[:rows, :, :left], buffer[rows:, :, :left + length] = 0, 0
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        T, n = self.keys.shape[2], key_states.shape[2]
        moved = self.keys.data_ptr() != self._k.data_ptr() or self.keys.shape[0] != self._k.shape[0]
        if moved or T + n > self._k.shape[2]:  # no room, or keys replaced (e.g. batch_select_indices)
            self._k, self._v = self._grown(self.keys, n), self._grown(self.values, n)
        self._k[:, :, T:T + n], self._v[:, :, T:T + n] = key_states, value_states
        self.keys, self.values = self._k[:, :, :T + n], self._v[:, :, :T + n]
        return self.keys, self.values


def kv_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A DynamicCache's per-layer (keys, values), each (batch, heads, length, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def plain_kv_cache(model) -> bool:
    """Does the model keep a plain per-layer key/value cache (what TurnDecoder edits)?"""
    with torch.inference_mode():
        one = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        cache = model(input_ids=one, position_ids=one, use_cache=True, logits_to_keep=1).past_key_values
    return cache is not None and all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def sample(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or temperature + nucleus (top-p) sampling.

    >>> sample(torch.tensor([[0.0, 3.0, 1.0]]), Sampling(do_sample=False))
    tensor([1])
    """
    if not s.do_sample:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > s.top_p  # the mass before this token already exceeds top_p
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
