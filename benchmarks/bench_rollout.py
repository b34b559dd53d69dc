"""Rollout efficiency: tokens/s of ascl.rollout divided by tokens/s of one plain batched generate.

    python benchmarks/bench_rollout.py [--model M] [--prompts 8] [--group-size 2] [--max-new-tokens 64] [--slots N]
        [--repeats 3] [--chunk 16] [--reference] [--greedy] [--context 200]
    python benchmarks/bench_rollout.py --table-only 16 32 --context 250   # the decode-step tables alone

Both sides get the same prompts (the bundled RL prompts, rendered with the same chat template),
the same batch size and the same number of generated tokens: plain generate is forced to write
exactly as many tokens per row as the rollout wrote on average (min_new_tokens = max_new_tokens).
The two are run alternately; the median of the ratios is reported; 1.0 is parity. What the
rollout pays on top: a rollout that calls the tool writes its turns one after the other (turn 2
needs the tool's answer to turn 1), and the tool's answer has to be prefilled. What
decoding.TurnDecoder does about it: a conversation whose tool result was just appended goes on
in its own slot of the KV cache at the next decode step (only the tool turn prefilled), a finished
row's slot is taken by a queued conversation at the next step, free slots are dropped every
--chunk steps when nothing waits for them, a group's shared prompt is prefilled once, and so is
the system prompt all prompts start with (plain generate prefills every row). --reference decodes
with decoding.ReferenceDecoder (one plain generate per batch of queued turns) for the A/B.
Also printed: where the rollout's time went (TurnDecoder's decode steps, prefills, growing the
cache, dropping free slots; the rest is writing rows into their slots, the tool and the Python
around them), the cost of one decode step by batch size, with generate's KV cache (DynamicCache,
which concatenates the whole cache at every step) and with TurnDecoder's (written in place), and
the bound they put on the efficiency.
On a CPU a decode step of 1 row costs about 40% of one of 16, so a rollout is paced by its longest
conversation: a row that calls the tool writes its turns one after the other, while plain generate
writes the average length in every row at once. "Ideal scheduling" is the efficiency of a decoder
that wastes nothing (every row decoded from the first step, tool results free), with each step
costing what TurnDecoder's table says for the rows still writing, against plain generate's steps
at its own table. Prints figures, asserts nothing.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import ascl  # noqa: E402
import plumbing  # noqa: E402
import decoding  # noqa: E402


def plain_generate(model, chat, contexts, new_tokens, slots=None):
    """Tokens written by plain batched generate, `slots` contexts at a time (default: all)."""
    written = 0
    for start in range(0, len(contexts), slots or len(contexts)):
        ids, attention = decoding.left_pad(contexts[start:start + (slots or len(contexts))], chat.pad_id)
        dev = next(model.parameters()).device
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(dev), attention_mask=attention.to(dev), do_sample=True, top_k=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=chat.pad_id)
        written += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return written


@torch.inference_mode()
def decode_step_ms(model, roomy: bool, batch_sizes=(1, 4, 8, 12, 16), context=200, steps=20) -> dict[int, float]:
    """Milliseconds per decode step (one new token per row, KV cache of `context` tokens) by batch
    size: if a step costs about the same for 8 rows as for 16, rows dropped from the batch save
    little and the number of sequential steps sets the time. `roomy`: with TurnDecoder's cache
    (decoding.roomy_cache, written in place), else with generate's (DynamicCache, concatenated)."""
    dev = next(model.parameters()).device
    out = {}
    for b in batch_sizes:
        cache = model(input_ids=torch.randint(100, 1000, (b, context), device=dev), use_cache=True,
                      logits_to_keep=1).past_key_values
        if roomy:
            cache = decoding.roomy_cache(decoding.kv_layers(cache), model.config)
        token = torch.randint(100, 1000, (b, 1), device=dev)
        model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out[b] = (time.perf_counter() - t0) / steps * 1000
    return out


SPLIT = {"_step": "decode steps", "_prefill": "prefills", "_prefill_new": "prefills", "_resize": "cache grown",
         "_compact": "free slots dropped"}


def time_decoder_parts() -> dict[str, list[float]]:
    """Wrap TurnDecoder's decode step, prefills, cache growth and slot compaction with timers: per
    part, [seconds, calls] (a call inside another timed one counts in the outer one), reset by the
    caller each round (what the rollout's time goes to)."""
    methods = [name for name in SPLIT if hasattr(decoding.TurnDecoder, name)]  # older commits: fewer parts
    parts, inside = {SPLIT[name]: [0.0, 0] for name in methods}, []
    for name in methods:
        method = getattr(decoding.TurnDecoder, name)

        def timed(self, *args, _method=method, _part=parts[SPLIT[name]], **kwargs):
            if inside:
                return _method(self, *args, **kwargs)
            inside.append(True)
            t0 = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                _part[0] += time.perf_counter() - t0
                _part[1] += 1
                inside.pop()
        setattr(decoding.TurnDecoder, name, timed)
    return parts


def step_cost(costs: dict[int, float], rows: int) -> float:
    """Milliseconds of a decode step of `rows` rows, interpolated in the measured table."""
    sizes = sorted(costs)
    lo = max([b for b in sizes if b <= rows], default=sizes[0])
    hi = min([b for b in sizes if b >= rows], default=sizes[-1])
    return costs[lo] if hi == lo else costs[lo] + (costs[hi] - costs[lo]) * (rows - lo) / (hi - lo)


def ideal_efficiency(lengths: list[int], per_row: int, costs: dict[int, float], plain_costs: dict[int, float]) -> float:
    """Efficiency of a perfect scheduler: tokens written per row `lengths`, each decode step costing
    what `costs` gives for the rows still writing, against plain generate's per_row steps of all
    rows at `plain_costs`."""
    ideal = sum(step_cost(costs, sum(n >= s for n in lengths)) for s in range(1, max(lengths) + 1))
    plain = per_row * step_cost(plain_costs, len(lengths))
    return (sum(lengths) / ideal) / (per_row * len(lengths) / plain)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16, help="decode steps between drops of free slots")
    p.add_argument("--reference", action="store_true", help="one plain generate per batch of queued turns")
    p.add_argument("--greedy", action="store_true", help="greedy rollouts: the same tokens in every round and with "
                   "every decoder, for an A/B of decoders on the same work (use --group-size 1)")
    p.add_argument("--slots", type=int, default=None, help="rows decoded together (rollout_batch_size; plain "
                   "generate in batches of this many); default: all rollouts at once")
    p.add_argument("--table-only", type=int, nargs="*", metavar="ROWS", default=None,
                   help="only the decode-step tables (both caches), at these batch sizes (e.g. 16 32) and --context")
    p.add_argument("--context", type=int, default=200, help="cached tokens per row in the decode-step tables")
    a = p.parse_args()
    ascl.DECODER = decoding.ReferenceDecoder if a.reference else functools.partial(decoding.TurnDecoder, chunk=a.chunk)

    torch.manual_seed(0)
    model, tokenizer = plumbing.load_policy(a.model)
    if torch.cuda.is_available():
        model.cuda()
    if a.table_only is not None:
        sizes = tuple(a.table_only) or (1, 4, 8, 12, 16)
        for rep in range(a.repeats):  # alternating, so both caches share the machine's state
            for name, roomy in [("generate's cache", False), ("TurnDecoder's cache", True)]:
                table = decode_step_ms(model.eval(), roomy, sizes, a.context)
                print(f"round {rep + 1}, decode step, {a.context} cached tokens, {name}: "
                      + ", ".join(f"{b} rows {ms:.0f} ms" for b, ms in table.items()), flush=True)
        return
    chat, book = ascl.ChatFormat(tokenizer), ascl.RuleBook.from_json()
    rows = [json.loads(line) for line in open(ROOT / "data/rl_prompts.jsonl")]
    harmful = [r for r in rows if r["label"] == "harmful"][: a.prompts // 2]
    rows = harmful + [r for r in rows if r["label"] != "harmful"][: a.prompts - len(harmful)]
    prompts, labels = [r["prompt"] for r in rows], [r["label"] for r in rows]
    contexts = [chat.prompt_ids(q) for q in prompts for _ in range(a.group_size)]
    print(f"prompts: {sum(map(len, contexts)) / len(contexts):.0f} tokens on average, of which the first "
          f"{len(os.path.commonprefix(contexts))} are the same in every prompt (TurnDecoder prefills those once)")

    ratios, bounds_in = [], []
    parts = None if a.reference else time_decoder_parts()
    for rep in range(a.repeats + 1):  # the first round warms up and is not counted
        for part in (parts or {}).values():
            part[:] = [0.0, 0]
        t0 = time.perf_counter()
        trajs = ascl.rollout(model, chat, book, prompts, labels, group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                             batch_size=a.slots, do_sample=not a.greedy)
        t_roll = time.perf_counter() - t0
        n_roll = sum(sum(t.action_mask) for t in trajs)
        per_row = max(1, round(n_roll / len(contexts)))
        t0 = time.perf_counter()
        n_plain = plain_generate(model, chat, contexts, per_row, a.slots)
        t_plain = time.perf_counter() - t0
        ratio = (n_roll / t_roll) / (n_plain / t_plain)
        tool = sum(t.used_tool for t in trajs) / len(trajs)
        print(f"round {rep}{' (warm-up)' if rep == 0 else ''}: rollout {n_roll} tokens in {t_roll:.2f}s "
              f"({n_roll / t_roll:.1f} tok/s, tool-call rate {tool:.2f}, the longest conversation wrote "
              f"{max(sum(t.action_mask) for t in trajs)}); plain generate {n_plain} tokens in "
              f"{t_plain:.2f}s ({n_plain / t_plain:.1f} tok/s); ratio {ratio:.3f}", flush=True)
        if parts:
            print("  rollout time: " + ", ".join(f"{k} {v[0]:.2f}s ({v[1]} calls)" for k, v in parts.items())
                  + f", the rest {t_roll - sum(v[0] for v in parts.values()):.2f}s", flush=True)
        if rep:
            ratios.append(ratio)
            bounds_in.append(([sum(t.action_mask) for t in trajs], per_row))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; {len(contexts)} rollouts, {a.slots or len(contexts)} decoded together, max_new_tokens {a.max_new_tokens}, decoder: "
          f"{'reference (plain generate per batch)' if a.reference else f'TurnDecoder, chunk {a.chunk}'}")
    model.eval()
    plain_costs = decode_step_ms(model, roomy=False, context=a.context)
    costs = plain_costs if a.reference else decode_step_ms(model, roomy=True, context=a.context)
    for name, table in [("generate's cache", plain_costs)] + ([] if a.reference else [("TurnDecoder's cache", costs)]):
        print(f"decode step by batch size, {name}: " + ", ".join(f"{b} rows {ms:.0f} ms" for b, ms in table.items()))
    if not a.slots:  # the bound assumes every row decoded from the first step
        bound = statistics.median(ideal_efficiency(n, p, costs, plain_costs) for n, p in bounds_in)
        print(f"ideal scheduling would reach: {bound:.3f}")
    print(f"rollout efficiency: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
