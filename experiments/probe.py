"""Can the model's own features tell the held-out harmful prompts from the benign-but-edgy ones?

    python experiments/probe.py                          # the embedded SmolLM2-135M, before any training
    python experiments/probe.py --model runs/bc/final    # a trained checkpoint
    python experiments/probe.py --model runs/bc/final --after_lookup runs/eval_bc/samples-*.jsonl
    python experiments/probe.py --bc_data runs/bc_variant.jsonl   # fit on another BC data file

A linear probe (logistic regression) reads the model's hidden states at the end of each prompt,
chat template and tool instructions included, exactly as the policy sees it before its first turn.
It is fit on the BC prompts (harmful against the rest, math left out, the two classes weighted
equally) and scored on the bundled held-out sets, which it never saw. It prints:

- AUC: the chance that a held-out harmful prompt scores above a held-out benign one.
- the rates at the probe's own threshold (fit on the BC prompts alone).
- the share of harmful prompts caught when the threshold flags 10% of the benign ones. That
  threshold is read off the held-out labels: an upper bound on what this readout can do, not a
  result.

If the probe separates the two sets well and BC does not, the model has what it needs to decide,
and what BC teaches it to use is the problem, not its size.

--after_lookup SAMPLES (eval.py's samples file of the same model): the probe reads the state at the
point where the model decides after a look-up, at the end of [prompt | its first turn with the
call | the rules that came back]. It is fit on the BC retrieval rows (refusals against
consult-then-answer, their demonstrated first turn and the rule book's real answer) and scored on
the held-out prompts the model looked up, with its own first turn. Beside it, the model's own
refusal rates after those look-ups.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ascl  # noqa: E402
from plumbing import load_model, load_tokenizer, read_jsonl  # noqa: E402
from sources import seed_row_to_conversation  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"


@torch.no_grad()
def features(model, contexts: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Per context: the last token's hidden state and the mean over its tokens, at the middle
    layer, at three quarters of the depth and at the last layer, concatenated."""
    rows = []
    for start in range(0, len(contexts), batch_size):
        seqs = contexts[start : start + batch_size]
        ids, mask, _ = ascl.pad_batch(seqs, [[0] * len(s) for s in seqs], pad_id=0)  # no action mask
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        n = len(states) - 1
        last = mask.sum(1) - 1
        parts = []
        for layer in (n // 2, 3 * n // 4, n):
            h = states[layer]
            parts.append(h[torch.arange(len(seqs)), last])
            parts.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression by L-BFGS, each class weighted to half the loss."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    share = y.mean()
    weight = torch.where(y > 0, 0.5 / share, 0.5 / (1 - share))
    optimizer = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def first_turn_contexts(chat, rows: list[dict], rule_book) -> list[list[int]]:
    """[prompt | the demonstrated first turn with its call | the rules that came back] of BC rows."""
    out = []
    for row in rows:
        turns, results = seed_row_to_conversation(row, rule_book)
        out.append(chat.encode_conversation(row["prompt"], turns[:1], results)[0])
    return out


def sampled_first_turn_contexts(chat, samples: list[dict]) -> list[list[int]]:
    """The same for eval.py samples that looked rules up: the model's own first turn and its results."""
    out = []
    for sample in samples:
        messages = sample["messages"]
        first = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
        results = []
        for m in messages[first + 1 :]:
            if m["role"] != "tool":
                break
            results.append(m["content"])
        out.append(chat.encode_conversation(sample["prompt"], [messages[first]["content"]], [results])[0])
    return out


def report(x_train, y_train, x_harmful, x_benign, what: str):
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    w, b = fit_probe((x_train - mean) / std, y_train)
    on_harmful = (x_harmful - mean) / std @ w + b
    on_benign = (x_benign - mean) / std @ w + b
    auc = (on_harmful[:, None] > on_benign[None, :]).float().mean().item()
    threshold = on_benign.sort().values[int(0.9 * len(on_benign))]
    held_out = f"{len(x_harmful)} harmful + {len(x_benign)} benign held out"
    print(f"probe fit on {len(y_train)} BC {what}, scored on {held_out}")
    print(f"AUC {auc:.3f}")
    print(
        f"at the probe's threshold: harmful flagged {100 * (on_harmful > 0).float().mean():.1f}%, "
        f"benign flagged {100 * (on_benign > 0).float().mean():.1f}%"
    )
    caught = 100 * (on_harmful > threshold).float().mean()
    print(f"threshold flagging 10% of the benign (oracle): harmful flagged {caught:.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--after_lookup", nargs="+", default=None, help="eval.py samples files of --model")
    parser.add_argument(
        "--bc_data",
        default=str(DATA / "bc_seed.jsonl"),
        help="the BC rows the probe is fit on: how a change to the data would move the line, before training",
    )
    args = parser.parse_args()
    if args.after_lookup is not None:
        samples = [s for path in args.after_lookup for s in read_jsonl(path) if s.get("used_tool")]
        harmful = [s for s in samples if s["label"] == "harmful"]
        benign = [s for s in samples if s["label"] == "benign"]  # math prompts left out
        if not harmful or not benign:
            raise SystemExit(
                "--after_lookup needs samples that looked the rules up on harmful and on benign prompts; "
                f"these have {len(harmful)} and {len(benign)}"
            )
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    chat = ascl.ChatFormat(load_tokenizer(args.model))
    bc = read_jsonl(args.bc_data)

    if args.after_lookup is None:
        train = [r for r in bc if r["kind"] != "math_direct"]
        harmful = read_jsonl(DATA / "eval_harmful.jsonl")
        benign = read_jsonl(DATA / "eval_benign.jsonl")
        x_train = features(model, [chat.prompt_ids(r["prompt"]) for r in train])
        x_harmful = features(model, [chat.prompt_ids(r["prompt"]) for r in harmful])
        x_benign = features(model, [chat.prompt_ids(r["prompt"]) for r in benign])
        y_train = torch.tensor([float(r["label"] == "harmful") for r in train])
        report(x_train, y_train, x_harmful, x_benign, "prompts")
        return

    rule_book = ascl.RuleBook.from_json()
    train = [r for r in bc if r.get("query")]
    x_train = features(model, first_turn_contexts(chat, train, rule_book))
    x_harmful = features(model, sampled_first_turn_contexts(chat, harmful))
    x_benign = features(model, sampled_first_turn_contexts(chat, benign))
    y_train = torch.tensor([float(r["label"] == "harmful") for r in train])
    report(x_train, y_train, x_harmful, x_benign, "look-ups")
    rates = [f"{100 * sum(bool(s['refused']) for s in part) / len(part):.1f}%" for part in (harmful, benign)]
    print(
        f"the model itself after these look-ups refused {rates[0]} of the harmful, {rates[1]} of the benign"
    )


if __name__ == "__main__":
    main()
