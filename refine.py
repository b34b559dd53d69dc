"""DGR: rewrite the behaviour-cloning data into the target model's own words (docs/method.md section 3.2).

    python refine.py --bc_data data/bc_seed.jsonl --out outputs/bc_refined.jsonl
                     [--model M] [--seed 0] [--limit N]
    python train.py --stage bc --bc_data outputs/bc_refined.jsonl     # then clone the refined data

Distribution-Grounded Refinement (Xie et al., arXiv 2602.02136): safety data written by people
or by another model is far from the target model's own distribution, and that gap is what
costs reasoning (the safety tax). So the target model rewrites every model turn itself:
    for each BC conversation:
        for each model turn: the model continues the real conversation, the original turn shown
                             as a reference just before it writes; a rewritten call runs on the real rule book
        keep the rewrite if it ended, echoes no guide, makes the same decisions (consult or not,
                         refuse or comply), is no copy and its Eq. 1 reward reaches min_reward;
                         else keep the original (or drop the row)
    print the target model's NLL per model-written token on the original and the refined data
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import ascl
import guard
import plumbing
import sources

HERE = Path(__file__).resolve().parent


@dataclass
class Args:
    bc_data: str = field(
        default=str(HERE / "data/bc_seed.jsonl"), metadata={"help": "bundled or collected BC rows"}
    )
    out: str = "outputs/bc_refined.jsonl"
    model: str | None = field(
        default=None,
        metadata={"help": "the target model (the one BC will train); default: embedded SmolLM2-135M"},
    )
    seed: int = 0
    limit: int | None = field(default=None, metadata={"help": "refine only the first N rows"})
    temperature: float = field(
        default=0.0, metadata={"help": "0 = greedy (the model's most likely wording); > 0 samples, seeded"}
    )
    max_new_tokens: int = field(default=192, metadata={"help": "per rewritten turn"})
    judge: str = field(default="offline", metadata={"help": "offline | a Qwen3Guard-Gen hub id"})
    min_reward: float = field(
        default=1.5, metadata={"help": "Eq. 1 reward a rewrite must reach; 1.5 = the most any prompt earns"}
    )
    on_reject: str = field(default="original", metadata={"help": "original (keep the original row) | drop"})
    max_total_tokens: int = field(
        default=1024, metadata={"help": "as in train.py: longer BC samples are not scored"}
    )
    batch_size: int = field(
        default=8,
        metadata={
            "help": "rows rewritten together (keep it when resuming), and samples per forward of the gap"
        },
    )


# ----------------------------------------------------------------------------- the rewrite prompt
GUIDE = (
    "Reference reply:\n{reference}\n\nWrite your own reply in your own words, not a copy of the reference, "
    "with the same decision: {decision}"
)
THINK = "<think>\n"


def decision_text(reference: str) -> str:
    """What a reference turn decides, phrased for a small model to follow (the filter checks it).

    '<think>\\nRisky.\\n<tool_call>{...}</tool_call>'
        -> 'think inside <think>, then call the retrieve_policy ...'
    'Forbidden.\\n</think>\\n\\nI can't help.'
        -> 'finish your reasoning, close it with </think>, then politely refuse ...'
    """
    if ascl.parse_tool_calls(reference):
        return (
            "think inside <think>, then call the retrieve_policy tool with a query in your own words, "
            "and stop."
        )
    act = (
        "politely refuse the request"
        if ascl.is_refusal(reference.rsplit("</think>", 1)[-1])
        else "help with the request"
    )
    start = (
        "think inside <think> without calling the tool"
        if reference.startswith("<think>")
        else "finish your reasoning"
    )
    return f"{start}, close it with </think>, then {act}."


def rewrite_messages(chat: ascl.ChatFormat, prompt: str, history: list[dict], reference: str) -> list[dict]:
    """The real conversation so far (system prompt, user prompt, the model's rewritten turns and
    tool results), the guide for the next turn appended to its last message, so that a small
    model reads it just before it writes (for turn 1 the user prompt, for later turns the tool result)."""
    messages = chat.prompt_messages(prompt) + history
    last = messages[-1]
    guide = GUIDE.format(reference=reference, decision=decision_text(reference))
    return messages[:-1] + [{**last, "content": last["content"] + "\n\n" + guide}]


def finish_turn(chat: ascl.ChatFormat, prefill: str, new_ids: list[int]) -> str | None:
    """The turn's text from the generated ids (padding after the first end-of-turn ignored);
    None if the turn did not end. A turn ends at the end-of-turn token, or just after its
    first </tool_call> (the protocol: a call ends the turn).

    prefill '<think>\\n', ids of 'Fine.</think>\\nYes.' + [eot, pad] -> '<think>\\nFine.</think>\\nYes.'
    ids of 'Hm <tool_call>{...}</tool_call> more'              -> 'Hm <tool_call>{...}</tool_call>'
    ids of 'Hm, let me' (budget spent)                          -> None
    """
    eot = chat.end_of_turn_id
    ended = eot in new_ids
    text = prefill + chat.tokenizer.decode(
        new_ids[: new_ids.index(eot)] if ended else new_ids, skip_special_tokens=False
    )
    if "</tool_call>" in text:
        return text[: text.index("</tool_call>") + len("</tool_call>")]
    return text if ended else None


@torch.inference_mode()
def generate_turns(
    model, chat: ascl.ChatFormat, requests: list[tuple[list[dict], str]], args: Args
) -> list[str | None]:
    """One turn per (messages, prefill): the model's next turn after the messages, rendered by its
    own chat template, starting with the prefill. One batched generate call (ascl.generate_turns:
    left-padded, the attention mask built from lengths, pad == eos in SmolLM2); finish_turn cuts a
    turn after its tool call."""
    contexts = [
        chat.encode(chat.render(messages, add_generation_prompt=True) + prefill)
        for messages, prefill in requests
    ]
    sample = args.temperature > 0
    new = ascl.generate_turns(
        model,
        contexts,
        [args.max_new_tokens] * len(contexts),
        chat.end_of_turn_id,
        chat.pad_id,
        do_sample=sample,
        temperature=args.temperature if sample else 1.0,
    )
    return [finish_turn(chat, prefill, ids) for ids, (_, prefill) in zip(new, requests)]


def rewrite(
    model, chat: ascl.ChatFormat, rule_book: ascl.RuleBook, originals: list[dict], args: Args
) -> list[dict | None]:
    """The model's own version of each conversation, all rewritten together turn by turn; None
    where a turn did not end. A rewritten tool call gets the real rule book's answer; a turn that
    should have called the tool but did not ends its rewrite (the decision filter rejects it)."""
    out = [{"prompt": o["prompt"], "label": o["label"], "turns": [], "tool_results": []} for o in originals]
    history: list[list[dict]] = [[] for _ in originals]
    active = list(range(len(originals)))
    for k in range(max(len(o["turns"]) for o in originals)):
        active = [i for i in active if k < len(originals[i]["turns"])]
        if not active:
            break
        refs = {i: originals[i]["turns"][k] for i in active}
        texts = generate_turns(
            model,
            chat,
            [
                (
                    rewrite_messages(chat, originals[i]["prompt"], history[i], refs[i]),
                    THINK if refs[i].startswith("<think>") else "",
                )
                for i in active
            ],
            args,
        )
        going = []
        for i, text in zip(active, texts):
            if text is None:
                out[i] = None
                continue
            out[i]["turns"].append(text)
            calls = ascl.parse_tool_calls(text)
            if k < len(originals[i]["turns"]) - 1 and calls:
                out[i]["tool_results"].append(ascl.run_tool_calls(calls, rule_book))
                history[i] += [{"role": "assistant", "content": text}] + chat.tool_messages(
                    out[i]["tool_results"][-1]
                )
                going.append(i)
        active = going
    return out


# ----------------------------------------------------------------------------- the filter
def as_trajectory(chat: ascl.ChatFormat, c: dict) -> ascl.Trajectory:
    """A finished text conversation as the ascl.Trajectory that Eq. 1 scores."""
    return ascl.trajectory_from_turns(chat, c["prompt"], c["label"], c["turns"], c["tool_results"])


def consulted(c: dict) -> bool:
    """The consult decision: a valid retrieve_policy call in the first model turn."""
    return any(call.error is None for call in ascl.parse_tool_calls(c["turns"][0]))


GUIDE_ECHO_RE = re.compile(r"reference reply|your own (?:reply|words)|same decision", re.IGNORECASE)
COPY_SIMILARITY = (
    0.9  # a rewrite this close to the original (difflib ratio) is the original with a slip, not a rewrite
)


def echoes_guide(turn: str) -> bool:
    """The guide's words in a turn, or a second </think> (the protocol closes reasoning once a turn;
    a small model that paraphrases the guide writes "..., close it with </think> and then help").

    >>> echoes_guide("<think>\\nFine.\\n</think>\\n\\nHola. You can't call the tool, close it with </think>.")
    True
    >>> echoes_guide("<think>\\nFine.\\n</think>\\n\\nHola.")
    False
    """
    return bool(GUIDE_ECHO_RE.search(turn)) or turn.count("</think>") > 1


def near_copy(a: list[str], b: list[str]) -> bool:
    """Turns a and b are the same text up to small edits (difflib ratio >= COPY_SIMILARITY).

    >>> near_copy(["Tent, a stove and water."], ["Tent, a stove, and water."])
    True
    >>> near_copy(["Tent, a stove and water."], ["Bring a tent and a stove."])
    False
    """
    return (
        difflib.SequenceMatcher(
            None, "\n".join(t.strip() for t in a), "\n".join(t.strip() for t in b), autojunk=False
        ).ratio()
        >= COPY_SIMILARITY
    )


def judge_rewrite(chat, judge, original: dict, rewritten: dict | None, min_reward: float) -> str:
    """'kept', or why the rewrite is rejected, in this order: 'unfinished turn'; 'echoes the guide'
    (small models copy the instruction into their reply); 'consult decision changed'; 'refusal
    decision changed' (the judge's `refused` on the two answers); 'copy of the original' (not a
    rewrite: the same text up to small edits, which in a small model are slips, e.g. 14 + 29 = 33);
    'reward < min_reward' (Eq. 1)."""
    if rewritten is None:
        return "unfinished turn"
    if any(echoes_guide(turn) for turn in rewritten["turns"]):
        return "echoes the guide"
    if consulted(rewritten) != consulted(original):
        return "consult decision changed"
    trajs = [as_trajectory(chat, c) for c in (original, rewritten)]
    before, after = judge([t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs])
    if before.refused != after.refused:
        return "refusal decision changed"
    if near_copy(rewritten["turns"], original["turns"]):
        return "copy of the original"
    if ascl.reward(trajs[1].label, trajs[1], after).total < min_reward:
        return f"reward < {min_reward:g}"
    return "kept"


# ----------------------------------------------------------------------------- the distribution gap
@torch.no_grad()
def nll_sums(
    model, chat: ascl.ChatFormat, conversations: list[dict], max_total_tokens: int, batch_size: int = 8
) -> list[tuple[float, int]]:
    """Per conversation: the model's summed negative log-likelihood of the tokens BC trains on
    (those of train.bc_samples: every model turn, end-of-turn included, that ends within
    max_total_tokens) and their number. One forward per conversation: under a causal model a
    turn scores the same in its own BC sample as in the whole conversation."""
    seqs, masks = [], []
    for c in conversations:
        ids, _, spans = chat.encode_conversation(c["prompt"], c["turns"], c["tool_results"])
        end = max([e for _, e in spans if e <= max_total_tokens], default=1)
        seqs.append(ids[:end])
        masks.append([int(any(s <= t < e for s, e in spans)) for t in range(end)])
    out = []
    for b in range(0, len(seqs), batch_size):
        batch = ascl.pad_batch(seqs[b : b + batch_size], masks[b : b + batch_size], chat.pad_id)
        logprobs, mask = ascl.token_logprobs(model, *(t.to(model.device) for t in batch))
        out += [(-lp.sum().item(), int(m.sum())) for lp, m in zip(logprobs, mask)]
    return out


def mean_nll(sums: list[tuple[float, int]]) -> float:
    """NLL per token over conversations: [(6.0, 2), (3.0, 1)] -> 3.0. A model whose every
    next-token distribution is uniform over V tokens gives log(V)."""
    return sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))


def print_gap(model, chat, originals: list[dict], refined: list[dict], args: Args):
    """NLL and perplexity on the original rows, the refined file, and the rewritten rows alone."""

    def line(name, sums):
        nll = mean_nll(sums)
        print(f"  {name:<34} {len(sums):>4} rows   NLL {nll:.3f}   perplexity {math.exp(nll):.2f}")

    before = nll_sums(model, chat, originals, args.max_total_tokens, args.batch_size)
    rewritten = [r for r in refined if r["refined"]]
    after = nll_sums(model, chat, rewritten, args.max_total_tokens, args.batch_size)
    after = dict(zip([r["source_row"] for r in rewritten], after))
    print("distribution gap: the target model's NLL per model-written token (lower = closer to the model)")
    line("original data", before)
    line("refined data", [after.get(r["source_row"], before[r["source_row"]]) for r in refined])
    if after:
        line("  rewritten rows, before", [before[i] for i in after])
        line("  rewritten rows, after", list(after.values()))


# ----------------------------------------------------------------------------- files
def resume_point(path: Path) -> int:
    """The first source row not yet refined into `path` (0 for a new file). A partial last line,
    left by an interrupted run, is cut off; a file with any other line is refused, unchanged. Rows are
    written in source order; the batch holding this row is rewritten again whole (same seed, same
    batch, same rewrites) and its done rows skipped."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    rows = []
    for n, line in enumerate(lines + [data[len(complete) :]], 1):  # all checked before anything is cut
        if not line.strip():
            continue
        if n > len(lines):  # what an interrupted write left: the start of a JSON object
            ours = line.startswith(b"{")
        else:
            try:
                rows.append(json.loads(line))
            except ValueError:  # not UTF-8, not JSON
                rows.append(None)
            ours = isinstance(rows[-1], dict) and isinstance(rows[-1].get("source_row"), int)
        if not ours:
            raise SystemExit(
                f"--out {path}:{n}: not a line refine.py writes, so nothing to resume; give a new --out file"
            )
    if complete != data:
        path.write_bytes(complete)
    return rows[-1]["source_row"] + 1 if rows else 0


# ----------------------------------------------------------------------------- main
def output_row(i: int, original: dict, rewritten: dict | None, outcome: str, on_reject: str) -> dict | None:
    """The line written for source row i: the rewrite if kept, else the original (with the reason
    and the rejected rewrite's turns, for inspection; train.py reads neither) or nothing (drop)."""
    if outcome == "kept":
        return {**rewritten, "source_row": i, "refined": True}
    if on_reject == "drop":
        return None
    return {
        **original,
        "source_row": i,
        "refined": False,
        "reason": outcome,
        "rejected_turns": rewritten["turns"] if rewritten else None,
    }


def check_inputs(args: Args):
    """Refuse, in one line and before anything loads, settings that would crash, a model or judge that
    cannot load, and an --out that cannot be written or is the input itself."""
    if args.on_reject not in ("original", "drop"):
        raise SystemExit(f"--on_reject must be 'original' or 'drop', not {args.on_reject!r}")
    for name in ("max_new_tokens", "max_total_tokens", "batch_size", "limit"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise SystemExit(f"--{name} must be greater than 0, not {getattr(args, name)}")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be 0 (greedy) or more, not {args.temperature}")
    plumbing.check_output(args.out, "--out", folder=False)
    if Path(args.out).resolve() == Path(args.bc_data).resolve():
        raise SystemExit(f"--out {args.out} is the --bc_data file; give a new file name")
    plumbing.check_model(args.model)
    plumbing.check_judge(args.judge)


def main(args: Args) -> Counter:
    check_inputs(args)
    rule_book = ascl.RuleBook.from_json()
    originals = sources.load_bc_conversations(args.bc_data, rule_book)[
        : args.limit
    ]  # checked before the model
    out = Path(args.out)
    start = resume_point(out)
    model, tokenizer = plumbing.load_policy(args.model)
    model.eval()
    chat, judge = ascl.ChatFormat(tokenizer), guard.make_judge(args.judge)
    out.parent.mkdir(parents=True, exist_ok=True)
    outcomes: Counter = Counter()
    with (
        open(out, "a", encoding="utf-8") as f,
        tqdm(desc="DGR refine", initial=start, total=len(originals)) as bar,
    ):
        for c in range(start - start % args.batch_size, len(originals), args.batch_size):
            chunk = originals[c : c + args.batch_size]
            set_seed(args.seed + c)  # per batch of rows, so a resumed run makes the same rewrites
            for i, (original, rewritten) in enumerate(
                zip(chunk, rewrite(model, chat, rule_book, chunk, args)), c
            ):
                if i < start:
                    continue  # written before the last run stopped
                outcome = judge_rewrite(chat, judge, original, rewritten, args.min_reward)
                outcomes[outcome] += 1
                row = output_row(i, original, rewritten, outcome, args.on_reject)
                if row is not None:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                bar.update()
                bar.set_postfix(kept=outcomes["kept"])
    rejected = ", ".join(f"{k} {v}" for k, v in outcomes.items() if k != "kept") or "none"
    verb = "fell back to the original" if args.on_reject == "original" else "dropped"
    print(
        f"rows {start}..{len(originals) - 1}: kept {outcomes['kept']} rewrites; {verb}: {rejected}"
        + (f" (rows 0..{start - 1} were done before)" if start else "")
    )
    refined = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    if refined:
        print_gap(model, chat, originals, refined, args)
    print(
        f"wrote {len(refined)} BC rows -> {out}   (train on them: python train.py --stage bc --bc_data {out})"
    )
    return outcomes


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
