"""Shared fixtures: a real tokenizer read offline from the embedded GGUF, tiny random models."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

import ascl
import plumbing


def pytest_configure(config):
    """transformers' warnings about deprecated arguments and methods fail the test that triggers them:
    a deprecated argument (`past_key_values`, warned from wherever the model was called) or a call
    into transformers that it warns about (`gradient_checkpointing_enable`)."""
    config.addinivalue_line("filterwarnings", r"error:`\w+` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", "error::FutureWarning:transformers")
    config.addinivalue_line("filterwarnings", "error::DeprecationWarning:transformers")
    # peft 0.21 itself reads the deprecated `is_gradient_checkpointing`; the project never does
    # (test_no_project_file_uses_a_deprecated_transformers_name)
    config.addinivalue_line(
        "filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )


# A Hermes-style template in the shape of Qwen2.5's: tools in the system turn, a `tool` role.
HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' + messages[0].content + '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages[1:] %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 2].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer: plain ChatML, no tool support, pad == eos."""
    from transformers import AutoTokenizer

    path = plumbing.embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.pad_token_id == tok.eos_token_id
    return tok


@pytest.fixture(scope="session")
def hermes_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = HERMES_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def rule_book():
    return ascl.RuleBook.from_json()


def make_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(len(tokenizer))


# ----------------------------------------------------------------------------- scripted generation
def _call(query):
    import json

    return (
        "<tool_call>"
        + json.dumps({"name": "retrieve_policy", "arguments": {"query": query}})
        + "</tool_call>"
    )


SCRIPTS = [  # first turns; a tool call is answered by TOOL_FOLLOW_UP
    "<think>This could be unsafe. " + _call("dangerous request"),
    "<think>A normal request.</think>\nSure, here is how it works.",
    "<think>Not sure.</think>\nI'm sorry, but I can't help with that.",
    "Sure, no thinking needed.",
]
TOOL_FOLLOW_UP = "The rules do not cover this.</think>\nHere is a helpful answer."


def install_decoder(monkeypatch, write):
    """Decode by script: write(context_ids, j) -> the turn's ids, j = the row in its batch. Turns
    are cut at their budget and first end-of-turn as ascl.generate_turns cuts them."""

    def scripted(model, contexts, budgets, end_of_turn_id, pad_id, **sampling):
        out = []
        for j, (c, budget) in enumerate(zip(contexts, budgets)):
            row = write(c, j)[:budget]
            out.append(row[: row.index(end_of_turn_id) + 1] if end_of_turn_id in row else row)
        return out

    monkeypatch.setattr(ascl, "generate_turns", scripted)


def install_scripted_generation(monkeypatch, tokenizer, deterministic: bool):
    """Turn 1 is one of SCRIPTS, chosen by the torch RNG or, when deterministic, by (prompt,
    rollout index in the batch); a tool call gets TOOL_FOLLOW_UP."""
    import zlib

    eot = tokenizer.eos_token_id

    def write(ctx, j):
        text = tokenizer.decode(ctx)
        if text.count("<|im_start|>assistant") > 1:
            turn = TOOL_FOLLOW_UP
        elif deterministic:
            prompt = text.split("<|im_start|>user\n")[1]
            turn = SCRIPTS[(zlib.crc32(prompt.encode()) + j) % len(SCRIPTS)]
        else:
            turn = SCRIPTS[int(torch.randint(len(SCRIPTS), (1,)))]
        return tokenizer(turn, add_special_tokens=False)["input_ids"] + [eot]

    install_decoder(monkeypatch, write)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama saved like a checkpoint: loadable by plumbing.load_policy(folder)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
