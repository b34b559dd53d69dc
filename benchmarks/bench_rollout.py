"""Rollout efficiency: tokens/s of ascl.rollout divided by tokens/s of one plain batched generate.

    python benchmarks/bench_rollout.py [--model M] [--prompts 8] [--group-size 2] [--max-new-tokens 64]
        [--repeats 3] [--chunk 16] [--no-reuse-kv]

Both sides get the same prompts (the bundled RL prompts, rendered with the same chat template),
the same batch size and the same number of generated tokens: plain generate is forced to write
exactly as many tokens per row as the rollout wrote on average (min_new_tokens = max_new_tokens).
The two are run alternately; the median of the ratios is reported. 1.0 is the limit. What the
rollout pays on top: a rollout that calls the tool writes its turns one after the other (turn 2
needs the tool's answer to turn 1), so it takes more sequential decode steps than plain generate
spreading the same tokens evenly over all rows; and the tool's answer has to be prefilled.
What it saves: the rollouts of a group share their prompt, which ascl prefills once per group
(plain generate prefills every row). --chunk 1000 --no-reuse-kv switch off ascl's remedies
(dropping finished rows; reusing the KV cache of the prompt and of earlier turns) for comparison. Also printed: the cost of one decode step by batch size.
Prints figures, asserts nothing.
"""
import argparse
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


def plain_generate(model, chat, contexts, new_tokens):
    longest = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), longest), chat.pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, longest - len(c):] = torch.tensor(c)
        attention[i, longest - len(c):] = 1
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(dev), attention_mask=attention.to(dev), do_sample=True, top_k=0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=chat.pad_id)
    return (out.shape[1] - longest) * len(contexts)


def turns(t) -> list[tuple[int, int]]:
    """(start, length) of the model's turns: the runs of 1s in the action mask."""
    runs, start = [], None
    for i, m in enumerate(t.action_mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def waste(trajs, chunk: int) -> tuple[int, int, int]:
    """(row-steps generate computed, tokens kept, context tokens prefilled again for later turns).
    One generate call decodes every row of a batch until its longest row ends, so a batch with turns
    of lengths [5, 60] computes 2 x 60 row-steps for 65 kept tokens; with ascl's chunked decoding a
    row leaves the batch at the end of the chunk in which it ended (16 + 60 row-steps, chunk 16)."""
    rounds: dict[int, list[int]] = {}
    reprefill = 0
    for t in trajs:
        for r, (start, n) in enumerate(turns(t)):
            rounds.setdefault(r, []).append(n)
            reprefill += start if r else 0  # a later turn starts with a prefill of everything before it
    computed = sum(min(-(-n // chunk) * chunk, max(v)) for v in rounds.values() for n in v)
    kept = sum(sum(v) for v in rounds.values())
    return computed, kept, reprefill


@torch.inference_mode()
def decode_step_ms(model, batch_sizes=(1, 4, 8, 12, 16), context=200, steps=10) -> dict[int, float]:
    """Milliseconds per decode step (one new token per row, KV cache of `context` tokens) by batch
    size: if a step costs about the same for 8 rows as for 16, rows dropped from the batch save
    little and the number of sequential steps sets the time."""
    dev = next(model.parameters()).device
    out = {}
    for b in batch_sizes:
        cache = model(input_ids=torch.randint(100, 1000, (b, context), device=dev), use_cache=True,
                      logits_to_keep=1).past_key_values
        token = torch.randint(100, 1000, (b, 1), device=dev)
        model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out[b] = (time.perf_counter() - t0) / steps * 1000
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=ascl.DECODE_CHUNK,
                   help="tokens per generate call before finished rows leave the batch (>= max-new-tokens: one call)")
    p.add_argument("--no-reuse-kv", action="store_true", help="prefill the whole conversation again for each later turn")
    a = p.parse_args()
    ascl.DECODE_CHUNK, ascl.REUSE_KV = a.chunk, not a.no_reuse_kv

    torch.manual_seed(0)
    model, tokenizer = ascl.load_policy(a.model)
    if torch.cuda.is_available():
        model.cuda()
    chat, book = ascl.ChatFormat(tokenizer), ascl.RuleBook.from_json()
    rows = [json.loads(line) for line in open(ROOT / "data/rl_prompts.jsonl")]
    harmful = [r for r in rows if r["label"] == "harmful"][: a.prompts // 2]
    rows = harmful + [r for r in rows if r["label"] != "harmful"][: a.prompts - len(harmful)]
    prompts, labels = [r["prompt"] for r in rows], [r["label"] for r in rows]
    contexts = [chat.prompt_ids(q) for q in prompts for _ in range(a.group_size)]

    ratios = []
    for rep in range(a.repeats + 1):  # the first round warms up and is not counted
        t0 = time.perf_counter()
        trajs = ascl.rollout(model, chat, book, prompts, labels, group_size=a.group_size, max_new_tokens=a.max_new_tokens)
        t_roll = time.perf_counter() - t0
        n_roll = sum(sum(t.action_mask) for t in trajs)
        per_row = max(1, round(n_roll / len(contexts)))
        t0 = time.perf_counter()
        n_plain = plain_generate(model, chat, contexts, per_row)
        t_plain = time.perf_counter() - t0
        ratio = (n_roll / t_roll) / (n_plain / t_plain)
        tool = sum(t.used_tool for t in trajs) / len(trajs)
        print(f"round {rep}{' (warm-up)' if rep == 0 else ''}: rollout {n_roll} tokens in {t_roll:.2f}s "
              f"({n_roll / t_roll:.1f} tok/s, tool-call rate {tool:.2f}); plain generate {n_plain} tokens in "
              f"{t_plain:.2f}s ({n_plain / t_plain:.1f} tok/s); ratio {ratio:.3f}", flush=True)
        computed, kept, reprefill = waste(trajs, a.chunk)
        print(f"    rollout: generate computed {computed} row-steps for {kept} kept tokens ({kept / computed:.2f}); "
              f"later turns {'reused the KV cache of' if ascl.REUSE_KV else 'prefilled again'} {reprefill} context tokens",
              flush=True)
        if rep:
            ratios.append(ratio)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; batch {len(contexts)} rollouts, max_new_tokens {a.max_new_tokens}, decode chunk {a.chunk}, "
          f"KV cache reused across turns: {ascl.REUSE_KV}")
    model.eval()
    print("decode step by batch size: " + ", ".join(f"{b} rows {ms:.0f} ms" for b, ms in decode_step_ms(model).items()))
    print(f"rollout efficiency: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
