"""BC data from a teacher: it answers RL prompts with the tool available, and the trajectories the
reward fully accepts are kept as BC conversations (docs/method.md section 3.1).

    python collect.py --model M --out outputs/bc_collected.jsonl     # default teacher: the embedded model
    python train.py --stage bc --bc_data outputs/bc_collected.jsonl   # then clone them

The paper's teacher was a large model. With the policy itself as the teacher this is
self-distillation: distribution-grounded BC data generated from scratch (refine.py instead
rewrites existing BC data in the policy's words, as DGR does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

import ascl
import guard
import plumbing
import sources
from plumbing import arg

HERE = Path(__file__).resolve().parent


@dataclass
class Args:
    model: str | None = arg(
        None, "the teacher: hub id, local folder or .gguf file; default: the embedded SmolLM2-135M"
    )
    out: str = arg(
        "outputs/bc_collected.jsonl", "where the kept conversations go (JSONL, train.py's --bc_data shape)"
    )
    rl_data: list[str] = arg([str(HERE / "data/rl_prompts.jsonl")], "prompts, as train.py's --rl_data")
    harmful_fraction: float = arg(2 / 7, "share of harmful prompts, as in train.py")
    max_prompts: int | None = arg(None, "use at most this many prompts")
    samples: int = arg(4, "rollouts sampled per prompt")
    min_reward: float = arg(1.5, "Eq. 1 reward a trajectory must reach; 1.5 = the most any prompt earns")
    judge: str = arg("offline", "offline | a Qwen3Guard-Gen hub id")
    seed: int = arg(0, "seeds sampling and the prompt mix")
    temperature: float = arg(1.0, "sampling temperature")
    max_new_tokens: int = arg(96, "tokens per model turn")
    max_tool_calls: int = arg(2, "tool calls executed per rollout")
    max_total_tokens: int = arg(1024, "tokens per conversation")
    rollout_batch_size: int | None = arg(
        None, "rollouts decoded together; default: all of a batch of 8 prompts"
    )


def collect(
    args: Args, model, chat: ascl.ChatFormat, rule_book: ascl.RuleBook, prompts: list[dict], judge
) -> list[dict]:
    """The kept conversations: every rollout whose Eq. 1 reward reaches args.min_reward."""
    kept = []
    per_call = 8 if args.rollout_batch_size is None else max(1, args.rollout_batch_size // args.samples)
    for b in tqdm(range(0, len(prompts), per_call), desc="collect"):
        rows = prompts[b : b + per_call]
        trajs = ascl.rollout(
            model,
            chat,
            rule_book,
            [r["prompt"] for r in rows],
            [r["label"] for r in rows],
            group_size=args.samples,
            max_new_tokens=args.max_new_tokens,
            max_tool_calls=args.max_tool_calls,
            max_total_tokens=args.max_total_tokens,
            temperature=args.temperature,
        )
        verdicts = judge([t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs])
        kept += [
            {"prompt": t.prompt, "label": t.label, "turns": t.turns, "tool_results": t.tool_results}
            for t, v in zip(trajs, verdicts)
            if ascl.reward(t.label, t, v).total >= args.min_reward
        ]
    return kept


def main(args: Args) -> list[dict]:
    for name in (
        "samples",
        "temperature",
        "max_new_tokens",
        "max_total_tokens",
        "max_prompts",
        "rollout_batch_size",
    ):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise SystemExit(f"--{name} must be greater than 0, not {getattr(args, name)}")
    plumbing.check_output(args.out, "--out", folder=False)
    plumbing.check_model(args.model)
    plumbing.check_judge(args.judge)
    chat = ascl.ChatFormat(plumbing.load_tokenizer(args.model))
    prompts = sources.load_rl_prompts(args.rl_data, args.harmful_fraction, args.max_prompts, args.seed)
    prompts = plumbing.drop_long_prompts(prompts, chat, args.max_new_tokens, args.max_total_tokens, "RL data")
    set_seed(args.seed)
    model = plumbing.load_model(args.model)
    kept = collect(
        args, model, chat, ascl.RuleBook.from_json(), prompts, guard.make_judge(args.judge, model.device)
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plumbing.write_atomic(args.out, "".join(json.dumps(row) + "\n" for row in kept))
    print(f"kept {len(kept)} of {len(prompts) * args.samples} trajectories -> {args.out}")
    if not kept:
        print(
            "nothing kept: no rollout earned --min_reward. A base model that does not yet follow the tool "
            "protocol rarely does; use a stronger teacher (--model), more --samples, or a BC checkpoint"
        )
    return kept


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
