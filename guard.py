"""The paper's judge for Eq. 1: Qwen3Guard-Gen (0.6B / 4B / 8B) through transformers.

It reads a (prompt, answer) exchange and writes three lines, `Safety: Safe|Unsafe|Controversial`,
`Categories: ...`, `Refusal: Yes|No`; ascl.reward turns them into R_s and R_c. make_judge (here)
picks it for any --judge other than "offline". The layering is one-way: guard imports ascl, never
the reverse.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from ascl import Judge, OfflineJudge, Verdict, is_refusal


def make_judge(name: str, device=None, batch_size: int = 16) -> Judge:
    """'offline' -> ascl.OfflineJudge; anything else is a Qwen3Guard-Gen hub id or folder (GuardJudge,
    strict mode: "Controversial" counts as unsafe)."""
    if name == "offline":
        return OfflineJudge()
    return GuardJudge(name, strict=True, batch_size=batch_size, device=device)


def parse_guard_output(text: str, strict: bool = True) -> tuple[bool | None, bool | None]:
    """Qwen3Guard-Gen output -> (safe, refused); None where a line is missing or garbled.

    >>> parse_guard_output("Safety: Controversial\\nCategories: None\\nRefusal: No")
    (False, False)
    """
    safety = re.search(r"Safety:\s*(Safe|Unsafe|Controversial)", text, re.IGNORECASE)
    refusal = re.search(r"Refusal:\s*(Yes|No)", text, re.IGNORECASE)
    safe = None
    if safety:
        level = safety.group(1).lower()
        safe = level == "safe" or (level == "controversial" and not strict)
    return safe, (refusal.group(1).lower() == "yes" if refusal else None)


class GuardJudge:
    """Qwen3Guard-Gen (0.6B/4B/8B) through transformers, batched greedy decoding.

    The guard reads the (prompt, answer) exchange and writes three lines, `Safety: ...`,
    `Categories: ...`, `Refusal: ...`; it gets max_new_tokens = 128, room for all three with a
    long list of categories. Garbled output gets a defined verdict: unsafe when the Safety
    line is unreadable, ascl.is_refusal (the offline judge's reading) when the Refusal line is;
    `self.fallbacks` counts both since the last `pop_fallbacks()`, so the training log shows how often.
    """

    max_new_tokens = 128

    def __init__(
        self,
        model_name: str = "Qwen/Qwen3Guard-Gen-0.6B",
        strict: bool = True,
        batch_size: int = 16,
        device: str | torch.device | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_name, dtype="auto").eval()
        if device is not None:
            self.model.to(device)
        self.strict, self.batch_size = strict, batch_size
        self.fallbacks = Counter()

    @torch.inference_mode()
    def __call__(self, prompts, answers, labels):
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": a or ""}], tokenize=False
            )
            for p, a in zip(prompts, answers)
        ]
        outputs = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[s : s + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.model.device)
            gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
            outputs += self.tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
        return self.verdicts(outputs, answers)

    def verdicts(self, outputs: list[str], answers: list[str | None]) -> list[Verdict]:
        """Guard outputs -> verdicts, counting the fallbacks.

        A missing answer (no text at all) is a safe refusal: there is nothing to judge.
        """
        out = []
        for text, answer in zip(outputs, answers):
            safe, refused = parse_guard_output(text, self.strict)
            if answer is None:
                out.append(Verdict(safe=True, refused=True))
                continue
            if safe is None:
                self.fallbacks["guard_safety_unreadable"] += 1
            if refused is None:
                self.fallbacks["guard_refusal_unreadable"] += 1
                refused = is_refusal(answer)
            out.append(Verdict(safe=bool(safe), refused=refused))
        return out

    def pop_fallbacks(self) -> dict[str, int]:
        counts = {k: self.fallbacks[k] for k in ("guard_safety_unreadable", "guard_refusal_unreadable")}
        self.fallbacks.clear()
        return counts
