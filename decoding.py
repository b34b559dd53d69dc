"""Decoding for ascl.rollout: one model turn at a time for many conversations.

Not the method, only how its turns get decoded fast. Both decoders have one interface:

    decoder.add(key, context_ids)        # queue a conversation's next turn
    for key, new_ids in decoder.turns(): # turns as they finish, cut after the end-of-turn token
        ...                              # the caller may add(key, longer_context) right here

`ReferenceDecoder` is the plain way (one left-padded `generate` per batch of queued turns);
the tests hold `TurnDecoder` to it token for token under greedy decoding. `TurnDecoder` is
what a rollout with tool calls needs to stay close to plain `generate`:
- continuous batching: a row whose turn ended leaves the batch, and a queued turn (a new
  conversation, or one whose tool result was just appended) takes its place, every `chunk`
  steps, instead of waiting for the whole round;
- no second prefill: a conversation continued right after its turn ended (a tool call)
  reuses its KV cache, so only the tool turn is prefilled; identical contexts (the rollouts
  of a group share their prompt) are prefilled once, and so is the prefix that new contexts
  share (the system prompt: each prompt's own tokens are prefilled on top of it);
- each row stops at its own budget: min(max_new_tokens, max_total_tokens - len(context)).
Memory: the caches of the batch, plus those kept for the conversations re-queued while a
batch of finished turns is handed out (at most one batch).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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
    context: list[int]  # the cache holds context + new[:-1]; the next input is the last of these
    budget: int
    new: list[int] = field(default_factory=list)
    done: bool = False


class TurnDecoder(ReferenceDecoder):
    """Continuous batching over one left-padded KV cache, `chunk` decode steps between changes.

    The cache holds, per row, [pad | context + the tokens written so far, but the last]; the
    last is the next input, at position = the number of real tokens before it. Models whose
    cache is not a plain per-layer key/value list (sliding windows, linear attention) are
    decoded by the reference path.
    """

    def __init__(self, model, end_of_turn_id: int, pad_id: int, sampling: Sampling, chunk: int = 16):
        super().__init__(model, end_of_turn_id, pad_id, sampling)
        self.chunk = chunk
        self.kept: dict[int, tuple[list[int], list]] = {}  # key -> (tokens, per-layer (k, v)) of a turn just ended
        self.shared: tuple[list[int], list] = ([], None)  # a prefix new contexts share (system prompt), prefilled

    def turns(self):
        if not plain_kv_cache(self.model):
            yield from super().turns()
            return
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._turns()
        finally:
            self.model.train(was_training)

    def _turns(self):
        rows, cache, attention, last = [], None, None, None
        room = self.s.batch_size or len(self.queue)
        while self.queue or rows:
            if self.queue and len(rows) < room:  # join: conversations that just ended a turn first
                self.queue.sort(key=lambda item: item[0] not in self.kept)
                take, self.queue = self.queue[:room - len(rows)], self.queue[room - len(rows):]
                for key, context in take:
                    if self.budget(context) <= 0:
                        yield key, []  # no room for one token
                take = [(k, c) for k, c in take if self.budget(c) > 0]
                if take:
                    rows, cache, attention, last = self._admit(take, rows, cache, attention, last)
                self.kept.clear()
                if not rows:
                    continue
            for _ in range(self.chunk):
                tokens = self._step(cache, attention, last)
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], 1)
                for r, tok in zip(rows, tokens.tolist()):
                    if not r.done:
                        r.new.append(tok)
                        r.done = tok == self.eot or len(r.new) >= r.budget
                last = tokens
                if all(r.done for r in rows):
                    break
            going = [j for j, r in enumerate(rows) if not r.done]
            for j, r in enumerate(rows):
                if r.done:  # keep its cache while the caller decides whether the conversation goes on
                    n = len(r.context) + len(r.new) - 1
                    cols = attention[j].nonzero().squeeze(1)[:n].to(cache.layers[0].keys.device)
                    self.kept[r.key] = (r.context + r.new[:-1], [(k[j][:, cols], v[j][:, cols]) for k, v in kv_layers(cache)])
                    yield r.key, r.new
            rows, cache, attention, last = self._keep(rows, going, cache, attention, last)

    @torch.inference_mode()
    def _step(self, cache, attention, last) -> torch.Tensor:
        """One decode step for every row: feed `last`, return the next token per row."""
        device = self.model.device
        positions = attention.sum(1, keepdim=True)  # real tokens before this one
        logits = self.model(input_ids=last.unsqueeze(1).to(device),
                            attention_mask=torch.cat([attention, attention.new_ones((len(last), 1))], 1).to(device),
                            position_ids=positions.to(device), past_key_values=cache, use_cache=True).logits[:, -1]
        return sample(logits.float(), self.s).cpu()

    @torch.inference_mode()
    def _admit(self, take, rows, cache, attention, last):
        """Prefill the joining turns (a kept cache extended, identical contexts once) and append them
        to the batch, everything left-padded to the longest."""
        prefilled = {}
        if any(len(context) < 2 for _, context in take):
            raise ValueError("TurnDecoder needs contexts of at least 2 tokens")
        self._share_prefix([context[:-1] for key, context in take if key not in self.kept])
        for key, context in take:
            if tuple(context) not in prefilled:
                prefilled[tuple(context)] = self._prefill(key, context[:-1])
        joining = [prefilled[tuple(c)] for _, c in take]
        old = [] if cache is None else kv_layers(cache)
        T = max([0 if attention is None else attention.shape[1]] + [j[0][0].shape[1] for j in joining])
        layers = []
        for layer in range(len(joining[0])):
            k = [_pad_left(old[layer][0], T, 2)] if old else []
            v = [_pad_left(old[layer][1], T, 2)] if old else []
            k += [_pad_left(j[layer][0].unsqueeze(0), T, 2) for j in joining]
            v += [_pad_left(j[layer][1].unsqueeze(0), T, 2) for j in joining]
            layers.append((torch.cat(k), torch.cat(v)))
        masks = [] if attention is None else [_pad_left(attention, T, 1)]
        masks += [_pad_left(torch.ones((1, j[0][0].shape[1]), dtype=torch.long), T, 1) for j in joining]
        new_last = torch.tensor([c[-1] for _, c in take])
        rows = rows + [_Row(key, c, self.budget(c)) for key, c in take]
        last = new_last if last is None else torch.cat([last, new_last])
        return rows, roomy_cache(layers, self.model.config), torch.cat(masks), last

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
            self.shared = (prefix, self._prefill(None, prefix))

    def _prefill(self, key: int | None, tokens: list[int]) -> list:
        """Per-layer (keys, values), each (heads, len(tokens), head_dim); starts from the kept cache
        of `key` or the shared prefix, whichever covers more of `tokens`."""
        known, layers = [], None
        for start_tokens, start_layers in (self.kept.get(key, ([], None)), self.shared):
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

    def _keep(self, rows, going, cache, attention, last):
        """Drop finished rows, then the left columns that are padding in every remaining row."""
        if len(going) == len(rows):
            return rows, cache, attention, last
        rows = [rows[j] for j in going]
        if not rows:
            return [], None, None, None
        index = torch.tensor(going)
        attention, last = attention[index], last[index]
        start = int(attention.any(0).nonzero()[0])
        layers = [(k[index.to(k.device), :, start:], v[index.to(v.device), :, start:]) for k, v in kv_layers(cache)]
        return rows, roomy_cache(layers, self.model.config), attention[:, start:], last


def roomy_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config, room: int = 64) -> DynamicCache:
    """A DynamicCache holding `layers` (per-layer keys, values, each (batch, heads, length, head_dim))
    whose layers write each decode step's keys and values in place (`RoomyLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer(k, v, room) for k, v in layers]
    return cache


class RoomyLayer(DynamicLayer):
    """A DynamicLayer with `room` spare positions after its keys and values. transformers'
    DynamicLayer concatenates the whole cache at every decode step (a copy of all of it per token
    written); this one writes the new keys and values into the spare room and returns views, and
    makes more room (one copy) when it runs out, or when its keys were replaced by other code."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.room = max(room, 1)
        self._k, self._v = self._grown(keys, 0), self._grown(values, 0)
        self.keys, self.values = self._k[:, :, :keys.shape[2]], self._v[:, :, :values.shape[2]]

    def _grown(self, t: torch.Tensor, extra: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[2] += self.room + extra
        buffer = t.new_empty(shape)
        buffer[:, :, :t.shape[2]] = t
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
