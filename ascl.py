"""ASCL: safety alignment as multi-turn tool use (Wang et al., arXiv 2602.13562).

The safety rules live outside the weights, behind one tool, `retrieve_policy`.
While thinking, the model decides whether to look rules up, reads what comes
back, and decides whether the request is really harmful or a normal one.

Reading order, which is also the order data flows in:
  1. RuleBook             the rule book (rules.json) and the retrieve_policy tool
  2. ChatFormat           prompts and tool turns, rendered by the model's chat template
  3. parse_tool_calls     what the model wrote -> tool calls, malformed ones flagged
  4. rollout              multi-turn generation -> Trajectory (ids + action mask, answer, calls)
  5. reward               Eq. 1, from a trajectory and a judge's verdict (OfflineJudge here;
                          Qwen3Guard-Gen in guard.py)
What is not the method lives beside it: decoding.py (how turns are decoded fast), plumbing.py
(data rows, model loading, checkpoints), sources.py (where data comes from).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import decoding

HERE = Path(__file__).resolve().parent
RULES_PATH = HERE / "rules.json"
TOOL_NAME = "retrieve_policy"
MAX_TOP_K = 20


# ----------------------------------------------------------------------------- 1. rule book
@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    text: str


_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it me my of on or the this "
    "to what when where which who why with you your about into any some that their them "
    "they there these those was were will would should could".split()
)


def _terms(text: str) -> list[str]:
    """Lower-cased word stems: 'Hacking passwords' -> ['hack', 'password']."""
    out = []
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in _STOPWORDS or len(w) < 2:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if len(w) > len(suffix) + 2 and w.endswith(suffix):
                w = w[: -len(suffix)]
                break
        out.append(w)
    return out


class RuleBook:
    """Rules with TF-IDF cosine retrieval (the paper does not name its retriever).

    >>> book = RuleBook([Rule("A", "Violence & Weapons", "Building bombs or explosives."),
    ...                  Rule("B", "Gambling", "Rigging casino games.")])
    >>> print(book.retrieve_policy("how to build a bomb", top_k=1))
    Result 1
    Similarity: 63.2%
    Content: Building bombs or explosives.
    """

    def __init__(self, rules: list[Rule]):
        if not rules:
            raise ValueError("the rule book is empty")
        self.rules = rules
        docs = [Counter(_terms(r.text + " " + r.category)) for r in rules]
        df = Counter(t for d in docs for t in d)
        n = len(docs)
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        self.vectors = [self._vector(d) for d in docs]

    @classmethod
    def from_json(cls, path: str | os.PathLike = RULES_PATH) -> "RuleBook":
        """Load rules.json: {"categories": [...], "rules": [{"id", "category", "text"}, ...]}."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls([Rule(r["id"], r["category"], r["text"]) for r in data["rules"]])

    def _vector(self, counts: Counter) -> dict[str, float]:
        v = {t: (1.0 + math.log(c)) * self.idf.get(t, 0.0) for t, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items() if x}

    def search(self, query: str, top_k: int = 3) -> list[tuple[float, Rule]]:
        """The top_k rules by cosine similarity to the query, best first."""
        q = self._vector(Counter(_terms(query)))
        scored = [(sum(w * v.get(t, 0.0) for t, w in q.items()), i) for i, v in enumerate(self.vectors)]
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [(score, self.rules[i]) for score, i in scored[:top_k]]

    def retrieve_policy(self, query: str, top_k: int = 3) -> str:
        """The tool itself: ranked rules with a similarity percentage. top_k is clamped to 1..20."""
        top_k = max(1, min(MAX_TOP_K, int(top_k)))
        hits = self.search(query, top_k)
        return "\n\n".join(f"Result {i}\nSimilarity: {100 * s:.1f}%\nContent: {r.text}" for i, (s, r) in enumerate(hits, 1))


TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Search the safety rule book and return the most similar rules, ranked, with a similarity score.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look up, e.g. the behaviour the request asks for."},
                "top_k": {"type": "integer", "description": f"How many rules to return (1-{MAX_TOP_K}).", "default": 3},
            },
            "required": ["query"],
        },
    },
}

SYSTEM_PROMPT = (
    "You are a helpful assistant. Think inside <think> </think> before answering. "
    "If a request might violate safety rules, you may call the retrieve_policy tool to look them up, "
    "then decide whether the request is really harmful or a normal request you should answer helpfully."
)

# Used when the chat template knows no tools (e.g. SmolLM2): Hermes-style markup, written out
# compactly (the prompt is re-read by every forward pass, so its length is paid for in every step).
TOOL_INSTRUCTIONS = (
    "Tool: retrieve_policy(query: str, top_k: int = 3) searches the safety rule book. "
    "To call it, write <tool_call>{\"name\": \"retrieve_policy\", \"arguments\": {\"query\": \"...\"}}</tool_call> "
    "and stop; the rules come back in <tool_response></tool_response>."
)


# ----------------------------------------------------------------------------- 2. chat format
class ChatFormat:
    """Renders ASCL conversations with a tokenizer's own chat template.

    Templates that know tools (Qwen2.5/Qwen3/Hermes style) get `tools=` and a
    `tool` role. Others (plain ChatML, e.g. SmolLM2) get the tool description in
    the system prompt and each tool result as a user turn wrapped in
    <tool_response>. What the model writes is never re-rendered or
    re-tokenized: a trajectory is prompt ids + the model's own ids + tool-turn
    ids, which equals the template applied to the whole conversation.
    """

    _PLACEHOLDER = "ASCL_ASSISTANT_TURN"

    def __init__(self, tokenizer, system_prompt: str = SYSTEM_PROMPT):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; ASCL needs a chat model")
        self.tokenizer = tokenizer
        self.native_tools = self._supports_tools()
        self.system_prompt = system_prompt
        if not self.native_tools:
            self.system_prompt += "\n\n" + TOOL_INSTRUCTIONS
        self.end_of_turn_id = tokenizer.eos_token_id
        if self.end_of_turn_id is None:
            raise ValueError("the tokenizer has no eos token, so a model turn cannot end")
        self.end_of_turn = tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_of_turn_id

    def _supports_tools(self) -> bool:
        msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                {"role": "tool", "content": "TOOL_OUTPUT_PROBE"}]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tools=[TOOL_SCHEMA], tokenize=False)
        except Exception:
            return False
        return TOOL_NAME in text and "TOOL_OUTPUT_PROBE" in text

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        kwargs = {"tools": [TOOL_SCHEMA]} if self.native_tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_messages(self, prompt: str) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]

    def tool_messages(self, results: list[str]) -> list[dict]:
        if self.native_tools:
            return [{"role": "tool", "content": r} for r in results]
        body = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
        return [{"role": "user", "content": body}]

    def messages(self, prompt: str, turns: list[str], tool_results: list[list[str]]) -> list[dict]:
        """The conversation as chat messages, tool results in the `tool` role (for logs and samples)."""
        msgs = self.prompt_messages(prompt)
        for k, text in enumerate(turns):
            msgs.append({"role": "assistant", "content": text})
            msgs += [{"role": "tool", "content": r} for r in (tool_results[k] if k < len(tool_results) else [])]
        return msgs

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.encode(self.render(self.prompt_messages(prompt), add_generation_prompt=True))

    def tool_turn_ids(self, results: list[str]) -> list[int]:
        """Ids that follow the model's end-of-turn token: template glue, the tool
        turn(s) and the next assistant header. None of them is trained."""
        before = self.prompt_messages("u") + [{"role": "assistant", "content": self._PLACEHOLDER}]
        text = self.render(before + self.tool_messages(results), add_generation_prompt=True)
        after = text[text.rindex(self._PLACEHOLDER) + len(self._PLACEHOLDER):]
        if not after.startswith(self.end_of_turn):
            raise ValueError(f"the chat template does not close an assistant turn with the eos token {self.end_of_turn!r}")
        return self.encode(after[len(self.end_of_turn):])

    def encode_conversation(self, prompt: str, turns: list[str], tool_results: list[list[str]]):
        """ids and action mask of a finished conversation, built the way rollout builds it.

        turns: the model's texts (without end-of-turn); tool_results[k]: the results
        that followed turn k (len(tool_results) == len(turns) - 1).
        Returns (ids, action_mask, spans), spans[k] = (start, end) of turn k's trained ids.
        """
        ids = self.prompt_ids(prompt)
        mask = [0] * len(ids)
        spans = []
        for k, text in enumerate(turns):
            turn = self.encode(text) + [self.end_of_turn_id]
            spans.append((len(ids), len(ids) + len(turn)))
            ids += turn
            mask += [1] * len(turn)
            if k < len(tool_results):
                glue = self.tool_turn_ids(tool_results[k])
                ids += glue
                mask += [0] * len(glue)
        return ids, mask, spans


# ----------------------------------------------------------------------------- 3. tool calls
@dataclass
class ToolCall:
    query: str | None
    top_k: int = 3
    error: str | None = None  # why the call is faulty (Eq. 1's P_r), None if valid
    syntax_error: bool = False  # broken markup or JSON: the format gate P_f is 0


_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """All tool calls in one model turn, malformed ones flagged rather than raised.

    >>> parse_tool_calls('<tool_call>{"name": "retrieve_policy", "arguments": {"query": "bombs"}}</tool_call>')
    [ToolCall(query='bombs', top_k=3, error=None, syntax_error=False)]
    >>> parse_tool_calls('<tool_call>{"name": "search"}</tool_call>')[0].error
    "unknown tool 'search'"
    >>> parse_tool_calls("<tool_call>{oops")[0].syntax_error
    True
    """
    calls = [_parse_call(body) for body in _CALL_RE.findall(text)]
    tail = text[text.rfind("</tool_call>") + 1:] if "</tool_call>" in text else text
    if "<tool_call>" in tail:
        calls.append(ToolCall(None, error="unclosed <tool_call> tag", syntax_error=True))
    return calls


def _parse_call(body: str) -> ToolCall:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError:
        return ToolCall(None, error="tool call is not valid JSON", syntax_error=True)
    if not isinstance(call, dict):
        return ToolCall(None, error="tool call must be a JSON object")
    if call.get("name") != TOOL_NAME:
        return ToolCall(None, error=f"unknown tool {call.get('name')!r}")
    args = call.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCall(None, error="arguments are not valid JSON", syntax_error=True)
    if not isinstance(args, dict):
        return ToolCall(None, error="arguments must be a JSON object")
    query, top_k = args.get("query"), args.get("top_k", 3)
    if query is None:
        return ToolCall(None, error="missing required argument 'query'")
    if not isinstance(query, str) or not query.strip():
        return ToolCall(None, error="'query' must be a non-empty string")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        return ToolCall(query, error="'top_k' must be an integer")
    return ToolCall(query, max(1, min(MAX_TOP_K, top_k)))


def run_tool_calls(calls: list[ToolCall], rule_book: RuleBook) -> list[str]:
    """One result string per call; a faulty call gets an error message back."""
    return [f"Error: {c.error}" if c.error else rule_book.retrieve_policy(c.query, c.top_k) for c in calls]


# ----------------------------------------------------------------------------- 4. rollout
@dataclass
class Trajectory:
    """One rollout. input_ids[action_mask == 1] are exactly the tokens the model wrote."""

    prompt: str
    label: str
    input_ids: list[int]
    action_mask: list[int]
    turns: list[str] = field(default_factory=list)  # the model's text per turn, end-of-turn dropped
    tool_results: list[list[str]] = field(default_factory=list)
    num_tool_calls: int = 0  # calls the model wrote, faulty ones and ones beyond the cap included
    faulty_calls: int = 0
    valid_calls: int = 0  # well-formed retrieve_policy calls (each returned rules, if within the cap)
    syntax_error: bool = False
    truncated: bool = False  # ran out of max_new_tokens / max_total_tokens / max_tool_calls
    answer: str | None = None  # text after the reasoning in the final turn; None if missing or cut off

    @property
    def used_tool(self) -> bool:
        """m_i of Eq. 3: the rollout consulted the rule book, i.e. wrote at least one valid call.

        The one definition used everywhere (IFPO weights, logs, eval's tool-call rate, P_h).
        A faulty attempt (unknown tool, bad JSON, unclosed <tool_call>) retrieves nothing and is
        already punished by P_r / P_f, so it is not a consultation; a rollout cut off before any
        call counts as direct (m = 0): m records the behaviour, its failure is in the reward.
        """
        return self.valid_calls > 0

    @property
    def reasoning(self) -> str:
        text = "".join(self.turns).split("</think>")[0] if any("</think>" in t for t in self.turns) else ""
        return text.replace("<think>", "").strip()

    def count_calls(self, calls: list[ToolCall]):
        self.num_tool_calls += len(calls)
        self.faulty_calls += sum(c.error is not None for c in calls)
        self.valid_calls += sum(c.error is None for c in calls)
        self.syntax_error |= any(c.syntax_error for c in calls)


def final_answer(turns: list[str], truncated: bool) -> str | None:
    """The text after </think> in the final turn (or the whole final turn, if </think> closed
    in an earlier one); None when cut off, ending on a tool call, or never out of <think>.

    >>> final_answer(["<think>Hm.</think>" + "<tool_call>{}</tool_call>", "No, sorry."], truncated=False)
    'No, sorry.'
    """
    if truncated or not turns or parse_tool_calls(turns[-1]):
        return None
    last = turns[-1]
    if "</think>" in last:
        answer = last.rsplit("</think>", 1)[1]
    elif any("</think>" in t for t in turns[:-1]):
        answer = last
    else:
        return None
    return answer.strip() or None


def trajectory_from_turns(chat: ChatFormat, prompt: str, label: str, turns: list[str],
                          tool_results: list[list[str]], truncated: bool = False) -> Trajectory:
    """A finished conversation (e.g. a BC row) as the Trajectory a rollout would have made of it."""
    ids, mask, _ = chat.encode_conversation(prompt, turns, tool_results)
    t = Trajectory(prompt, label, ids, mask, turns=list(turns), tool_results=tool_results, truncated=truncated)
    for text in turns:
        t.count_calls(parse_tool_calls(text))
    t.answer = final_answer(t.turns, truncated)
    return t


# How turns are decoded: decoding.TurnDecoder (continuous batching, KV caches reused across
# turns) or decoding.ReferenceDecoder (one plain `generate` per batch); same greedy tokens.
DECODER = decoding.TurnDecoder


def rollout(model, chat: ChatFormat, rule_book: RuleBook, prompts: list[str], labels: list[str], group_size: int = 1,
            max_new_tokens: int = 256, max_tool_calls: int = 2, max_total_tokens: int = 2048, do_sample: bool = True,
            temperature: float = 1.0, top_p: float = 1.0, batch_size: int | None = None) -> list[Trajectory]:
    """Generate len(prompts) * group_size multi-turn rollouts, grouped by prompt.

    Each rollout: the model writes a turn; if it called the tool, the results are appended as
    a tool turn (ids, mask 0) and the model writes the next turn; otherwise it is done. Output
    i belongs to prompt i // group_size. Limits:
    - each turn stops at max_new_tokens, and each rollout at max_total_tokens (its own
      budget: a long conversation in the batch does not cut the others short);
    - at most max_tool_calls calls are executed per rollout: a turn whose calls would go
      past the cap ends the rollout truncated, none of them executed (no answer, so
      P_f = 0); top_k is clamped to 1..20 when a call is parsed;
    - a tool turn that leaves no room to answer is not appended: truncated.

    Worked example (ids made up; E = end of turn, pad == E in SmolLM2, so the mask comes
    from lengths, never from token values):
        prompt ids        [s s u u a]                   mask [0 0 0 0 0]
        turn 1 (a call)   [t t c c E]                   mask [1 1 1 1 1]   the model wrote these
        tool turn + glue  [g r r r g a]                 mask [0 0 0 0 0 0]
        turn 2 (answer)   [t x x E]                     mask [1 1 1 1]
        input_ids = the four concatenated; action_mask marks turn 1 and turn 2, E included.
    """
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    trajs = []
    for p, y in zip(prompts, labels):
        ids = chat.prompt_ids(p)
        if len(ids) >= max_total_tokens:
            raise ValueError(f"prompt is {len(ids)} tokens, over max_total_tokens={max_total_tokens}: {p[:80]!r}")
        trajs += [Trajectory(p, y, list(ids), [0] * len(ids)) for _ in range(group_size)]
    decoder = DECODER(model, chat.end_of_turn_id, chat.pad_id, decoding.Sampling(
        max_new_tokens, max_total_tokens, do_sample, temperature, top_p, batch_size))
    for i, t in enumerate(trajs):
        decoder.add(i, t.input_ids)
    for i, new in decoder.turns():  # turns come back as they end; a tool call queues the next one
        t = trajs[i]
        ended = bool(new) and new[-1] == chat.end_of_turn_id
        t.input_ids += new
        t.action_mask += [1] * len(new)
        t.turns.append(chat.tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False))
        calls = parse_tool_calls(t.turns[-1]) if ended else []
        t.truncated = not ended
        t.count_calls(calls)
        if calls and sum(len(r) for r in t.tool_results) + len(calls) > max_tool_calls:
            t.truncated = True  # past --max_tool_calls: nothing executed, the rollout ends
        elif calls:
            results = run_tool_calls(calls, rule_book)
            glue = chat.tool_turn_ids(results)
            if len(t.input_ids) + len(glue) < max_total_tokens:
                t.tool_results.append(results)
                t.input_ids += glue
                t.action_mask += [0] * len(glue)
                decoder.add(i, t.input_ids)
                continue
            t.truncated = True  # the tool turn is not appended: no room to answer after it
        t.answer = final_answer(t.turns, t.truncated)  # the rollout is done
    return trajs


# ----------------------------------------------------------------------------- 5. reward (Eq. 1)
@dataclass
class Verdict:
    safe: bool  # the answer is safe (strict: "Controversial" counts as unsafe)
    refused: bool  # the answer declines the request


class Judge(Protocol):
    def __call__(self, prompts: list[str], answers: list[str | None], labels: list[str]) -> list[Verdict]: ...


REFUSAL_RE = re.compile(
    r"\b(i\s*(?:am|'m)\s*(?:sorry|unable|not able)|i\s*(?:can(?:no|')t|cannot|won't|will not|must decline)"
    r"|(?:can(?:no|')t|cannot|unable to|not able to)\s+(?:help|assist|provide|comply|support)"
    r"|against (?:my|the) (?:rules|guidelines|policy|policies)|i (?:do not|don't) (?:provide|assist|help))",
    re.IGNORECASE,
)

# A claim, in the final answer, of having looked up safety rules: a hallucination when no
# look-up happened (P_h). It must name the *safety* rules / policy / rule book, or say they
# were retrieved: "the rules of chess" or "I checked the rules of the game" do not count,
# since every false positive here pushes the policy toward calling the tool.
_SAFETY_RULES = (r"(?:(?:safety|content|usage|retrieved)\s+(?:rules?|polic(?:y|ies)|guidelines)"
                 r"|rule\s*book|retrieve_policy)")
LOOKUP_CLAIM_RE = re.compile(
    rf"\b(?:retrieved|consulted|looked\s+up|checked|searched|reviewed)\b[^.\n]{{0,30}}{_SAFETY_RULES}"
    rf"|\b(?:according\s+to|based\s+on|per|under|as\s+stated\s+in)\s+(?:the\s+|my\s+|our\s+)?{_SAFETY_RULES}"
    r"|\b(?:rules?|polic(?:y|ies)|guidelines)\s+(?:that\s+)?I\s+(?:retrieved|looked\s+up|consulted)",
    re.IGNORECASE,
)


class OfflineJudge:
    """Refusal patterns + the prompt's label; needs no model.

    Known failure modes: a harmful request answered without refusal words is
    unsafe (right), but a harmful answer that opens with "I'm sorry" counts as
    a safe refusal; benign prompts are assumed safe to answer, so an unsafe
    answer to a benign prompt goes unnoticed; unusual refusals are missed.
    """

    def __call__(self, prompts, answers, labels):
        out = []
        for answer, label in zip(answers, labels):
            refused = answer is None or bool(REFUSAL_RE.search(answer))
            out.append(Verdict(safe=refused if label == "harmful" else True, refused=refused))
        return out


def make_judge(name: str, device=None, batch_size: int = 16) -> Judge:
    """'offline' -> OfflineJudge; anything else is a Qwen3Guard-Gen hub id or folder (guard.GuardJudge,
    strict mode: "Controversial" counts as unsafe)."""
    if name == "offline":
        return OfflineJudge()
    from guard import GuardJudge

    return GuardJudge(name, strict=True, batch_size=batch_size, device=device)


@dataclass
class Reward:
    total: float
    safety: float  # R_s
    compliance: float  # R_c
    retrieval_penalty: float  # P_r
    format_gate: int  # P_f
    hallucination_gate: int  # P_h


def format_ok(t: Trajectory) -> bool:
    """P_f = 1: well-formed tool calls, non-empty reasoning, and a final answer."""
    return not t.syntax_error and bool(t.reasoning) and t.answer is not None


def hallucinated_lookup(t: Trajectory) -> bool:
    """P_h = 0: the final answer claims a safety-rule look-up, but no valid call was made.

    Only the answer is read: reasoning may plan a look-up ("let me check the rule book").
    """
    return not t.used_tool and bool(LOOKUP_CLAIM_RE.search(t.answer or ""))


def reward(label: str, t: Trajectory, verdict: Verdict, tool_penalty: float = 0.0) -> Reward:
    """Eq. 1: R = P_h * P_f * (R_s + R_c - P_r).

    R_s: 1.5 (harmful) / 0.5 (sensitive) if the judge calls the answer safe.
    R_c: sensitive prompts only, 1.0 unless the answer over-refuses.
    P_r: 0.4 per faulty tool call, plus `tool_penalty` per valid call. The paper's reward has
        no per-call term (tool_penalty = 0); it exists for the ablation the paper ran instead
        of IFPO (a per-call penalty, which drove the tool-call rate to 0).
    "benign" is accepted as an alias of "sensitive".
    """
    if label not in ("harmful", "sensitive", "benign"):
        raise ValueError(f"unknown prompt label {label!r}: expected 'harmful' or 'sensitive'")
    harmful = label == "harmful"
    r_s = (1.5 if harmful else 0.5) if verdict.safe else 0.0
    r_c = 0.0 if harmful or verdict.refused else 1.0
    p_r = 0.4 * t.faulty_calls + tool_penalty * t.valid_calls
    p_f = int(format_ok(t))
    p_h = int(not hallucinated_lookup(t))
    return Reward(p_h * p_f * (r_s + r_c - p_r), r_s, r_c, p_r, p_f, p_h)
