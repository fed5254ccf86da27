"""Side-by-side throughput of one RL training step: TRL's GRPOTrainer vs srppo-fast, same workload.

What is measured: samples/s of the RL step loop (generate -> score -> advantages -> policy update), per
rollout buffer of `prompts_per_step x n_samples` responses, as the median (and p20/p80) over the buffers
after `--warmup` warm-up buffers. Both engines get the same workload:

  * the same policy (the quickstart's pi_SFT checkpoint) and reward models (pi_SFT and the base pi_PT);
  * the same prompts (the quickstart world's prompts.jsonl, rendered with the checkpoint's chat template,
    prompts longer than max_prompt_len dropped; the token ids are checked to be identical on both sides);
  * prompts_per_step x n_samples responses per buffer, sampled at the same temperature (top-p 1, no top-k)
    up to max_new_tokens;
  * the coherent reward: sum over response tokens of log pi_SFT(y_t|x,y_<t) - log pi_PT(y_t|x,y_<t), each
    token's term clipped to +-token_clip, and no_eos_penalty for a response cut off without EOS (the
    quickstart's reward settings). srppo-fast computes it internally; TRL gets it as a Python reward function
    running both frozen models in fp32 on the completion token ids;
  * the GRPO estimator (group-mean baseline, group-std scaling; srppo-fast without advantage whitening and
    without a critic), KL coefficient 0 on both sides (TRL's beta, srppo.kl.coef), one PPO epoch /
    num_iterations=1, clip 0.2, AdamW with the same lr / betas / eps / no weight decay, grad-norm clip 1.0,
    fp32, no gradient checkpointing (GRPOConfig turns it on by default; the quickstart runs without it);
  * the same minibatching: each buffer is split into buffer / train_batch_size optimizer steps (quickstart:
    128 samples, 2 steps of 64). In TRL: per_device_train_batch_size=train_batch_size, no gradient
    accumulation, steps_per_generation = buffer / train_batch_size, so generation_batch_size = the buffer.

What one "step" (one buffer) includes:
  * srppo-fast: its own `time/step` (metrics.jsonl): generation, the frozen scoring forwards, rewards and
    advantages, the PPO update and the rollout engine's weight sync. Metric logging is outside it.
  * TRL: the wall time from `on_step_begin` to `on_step_end` of the steps_per_generation optimizer steps that
    consume one generation batch (generation, reward function, old-policy log-probs, loss, backward,
    optimizer). Logging and the data loader's fetch of the raw prompt rows are outside it.
samples/s = buffer size / that time. Both engines run as fresh subprocesses of this script, one after the
other (with --rounds N, N times each in alternating order), with the same environment (threads: torch's
default unless OMP_NUM_THREADS is set by the caller). The share of each engine's wall time during which some
task waited for a CPU (/proc/pressure/cpu) is recorded as cpu_pressure_pct: on a shared VM other tenants'
load inflates step times by several x in bursts, so compare engines only from runs where it is low and alike.

    python benchmarks/trl_side_by_side.py --run /tmp/qs_ref --steps 6 --warmup 2
    python benchmarks/trl_side_by_side.py --run RUN --engines srppo --extra srppo.rollout.engine=vllm

--steps counts measured buffers; each engine runs warmup + steps buffers. --extra KEY=VALUE (repeatable)
goes to srppo-fast's command line after this script's own overrides (so it can change any of them).
Rows are appended to benchmarks/results/trl_side_by_side.csv (one per engine; ratio_vs_trl = the engine's
median samples/s over TRL's from the same invocation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import append_rows, cpu_model, git_sha, version  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "trl_side_by_side.csv"
ENGINES = ("trl", "srppo")

COLUMNS = ["timestamp", "hardware", "git_sha", "python", "torch", "transformers", "trl", "engine", "model_path",
           "n_params", "prompts_per_step", "n_samples", "max_new_tokens", "train_batch_size", "estimator",
           "kl_coef", "lr", "threads", "rounds", "steps", "warmup_steps", "samples_per_s", "samples_per_s_p20",
           "samples_per_s_p80", "samples_per_s_max", "step_s_median", "mean_response_len", "cpu_pressure_pct",
           "ratio_vs_trl", "extra", "note"]


@dataclass
class Workload:
    """Everything both engines must agree on (the quickstart's srppo settings, GRPO, no KL)."""

    run: str                      # a finished quickstart run: checkpoints/{sft,pretrain}, world/prompts.jsonl
    steps: int                    # measured rollout buffers
    warmup: int                   # buffers run first and not measured
    prompts_per_step: int = 32
    n_samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    max_prompt_len: int = 32
    train_batch_size: int = 64    # samples per optimizer step
    lr: float = 2e-5
    betas: tuple = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    token_clip: float = 3.0
    no_eos_penalty: float = -1.0
    seed: int = 1
    precision: str = "fp32"       # bf16: TRL's bf16=True (autocast) on its fp32 model, as srppo-fast's fp32 masters,
                                  # and bf16 reward models; srppo-fast gets runtime.precision=bf16 from the caller
    timeout_s: float | None = None  # each engine's subprocess

    @property
    def sft(self) -> str:
        return os.path.join(self.run, "checkpoints", "sft")

    @property
    def pretrained(self) -> str:
        return os.path.join(self.run, "checkpoints", "pretrain")

    @property
    def prompts(self) -> str:
        return os.path.join(self.run, "world", "prompts.jsonl")

    @property
    def buffer(self) -> int:
        return self.prompts_per_step * self.n_samples

    @property
    def updates_per_buffer(self) -> int:
        return self.buffer // self.train_batch_size


# ---------------------------------------------------------------------------------------------
# machine and version facts for the CSV


def hardware() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_model()}, {os.cpu_count()} cores"


def n_params(model_dir: str) -> int:
    """Parameters stored in a safetensors checkpoint (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), framework="pt") as fh:
                for key in fh.keys():
                    shape = fh.get_slice(key).get_shape()
                    total += math.prod(int(d) for d in shape)
    return total


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80); the inclusive method keeps them inside the observed range for a few samples."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def cpu_stall_us() -> int | None:
    """Microseconds that some runnable task of this machine (or container) has waited for a CPU, from Linux
    pressure-stall information; None where /proc/pressure is absent. On a shared VM this shows contention
    from other tenants, which inflates step times (read the ratio only from runs where it is low)."""
    try:
        with open("/proc/pressure/cpu") as fh:
            return int(fh.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# the shared prompt set


def load_prompt_set(w: Workload, tokenizer) -> tuple[list[list[dict]], list[list[int]]]:
    """The prompts as srppo-fast sees them (srppo_fast.data.read_records / render; stages.rl.load_prompts
    drops those longer than max_prompt_len): (chat messages, token ids) per kept prompt."""
    from srppo_fast.data import read_records
    from srppo_fast.tokens import render

    messages, ids = [], []
    for rec in read_records(w.prompts, "prompt"):
        tokens = tokenizer(render(tokenizer, rec.messages, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        if len(tokens) <= w.max_prompt_len:
            messages.append(rec.messages)
            ids.append(tokens)
    return messages, ids


# ---------------------------------------------------------------------------------------------
# TRL (runs in a subprocess: `--worker trl`)


def coherent_reward_fn(w: Workload, prompt_ids: list[list[int]], tokenizer, calls: list[dict]):
    """A TRL reward function computing the coherent reward with frozen fp32 pi_SFT and pi_PT. TRL passes the
    completion token ids (cut after the first EOS, which they keep) and the dataset's extra columns; the
    `prompt_index` column finds each prompt's token ids. Each call's size is appended to `calls`."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
    sft, pt = (AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval().requires_grad_(False)
               for p in (w.sft, w.pretrained))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def response_logprobs(model, input_ids, attention_mask, starts, lengths):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        pos = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)[None]  # position t predicts token t + 1
        mask = (pos >= starts[:, None] - 1) & (pos < (starts + lengths)[:, None] - 1)
        return logp, mask

    @torch.inference_mode()
    def coherent(prompts, completions, completion_ids, prompt_index, **_):
        t0 = time.perf_counter()
        seqs = [prompt_ids[i] + list(c) for i, c in zip(prompt_index, completion_ids)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # right padding: every sequence starts at position 0
            input_ids[row, :len(s)] = torch.tensor(s)
            attention_mask[row, :len(s)] = 1
        starts = torch.tensor([len(prompt_ids[i]) for i in prompt_index])
        lengths = torch.tensor([len(c) for c in completion_ids])
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logp_sft, mask = response_logprobs(sft, input_ids, attention_mask, starts.to(device), lengths.to(device))
        logp_pt, _ = response_logprobs(pt, input_ids, attention_mask, starts.to(device), lengths.to(device))
        per_token = ((logp_sft - logp_pt).clamp(-w.token_clip, w.token_clip) * mask).sum(-1).cpu()
        ended = torch.tensor([len(c) > 0 and c[-1] == eos for c in completion_ids])
        reward = torch.where(ended, per_token, torch.full_like(per_token, w.no_eos_penalty))
        calls.append({"completions": len(completion_ids), "prompts": len(set(prompt_index)),
                      "mean_len": float(lengths.float().mean()), "seconds": time.perf_counter() - t0})
        return reward.tolist()

    coherent.__name__ = "coherent"
    return coherent


def trl_worker(w: Workload, workdir: str) -> dict:
    """Train warmup + steps buffers with GRPOTrainer; return the per-buffer times and the generation checks."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(w.sft)
    messages, ids = load_prompt_set(w, tokenizer)
    rendered = tokenizer.apply_chat_template(messages[:64], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    if [list(r) for r in rendered] != ids[:64]:
        raise SystemExit("TRL's chat-template tokenization differs from srppo-fast's; the prompts would not match")
    dataset = Dataset.from_dict({"prompt": messages, "prompt_index": list(range(len(messages)))})

    calls: list[dict] = []
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin -> on_step_end)."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=os.path.join(workdir, "out"), report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=w.precision == "bf16", fp16=False, use_vllm=False, seed=w.seed,
        max_steps=(w.warmup + w.steps) * w.updates_per_buffer,
        per_device_train_batch_size=w.train_batch_size, gradient_accumulation_steps=1,
        steps_per_generation=w.updates_per_buffer, num_generations=w.n_samples,
        max_completion_length=w.max_new_tokens, temperature=w.temperature, top_p=1.0, top_k=0,
        beta=w.kl_coef, num_iterations=1, epsilon=w.clip_eps, scale_rewards="group",
        learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=w.betas[0], adam_beta2=w.betas[1], adam_epsilon=w.adam_eps, max_grad_norm=w.grad_clip,
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        gradient_checkpointing=False,  # TRL's default is True; srppo-fast's quickstart runs without it
    )
    # fp32 weights either way: with bf16=True TRL computes under autocast and AdamW keeps fp32 state, as srppo-fast's
    # bf16 engine does with its fp32 masters (a bf16 model would train in pure bf16: a cheaper, lossier step)
    model = AutoModelForCausalLM.from_pretrained(w.sft, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          reward_funcs=[coherent_reward_fn(w, ids, tokenizer, calls)], callbacks=[StepTimer()])
    trainer.train()

    k = w.updates_per_buffer
    buffers = [sum(step_times[i:i + k]) for i in range(0, len(step_times) - k + 1, k)]
    bad = [c for c in calls if c["completions"] != w.buffer or c["prompts"] != w.prompts_per_step]
    if len(calls) != w.warmup + w.steps or bad:
        raise SystemExit(f"TRL did not generate {w.prompts_per_step} prompts x {w.n_samples} samples once per "
                         f"buffer: reward calls {calls}")
    measured = calls[w.warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"buffer_s": buffers[w.warmup:], "mean_response_len": statistics.mean(c["mean_len"] for c in measured),
            "reward_s": statistics.median(c["seconds"] for c in measured), "threads": torch.get_num_threads(),
            "param_dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            "peak_allocated_gib": peak}


# ---------------------------------------------------------------------------------------------
# srppo-fast (its CLI in a subprocess)


def srppo_overrides(w: Workload, out_dir: str) -> list[str]:
    """The quickstart config, reduced to its srppo stage on the given run's checkpoints and prompt file."""
    return [
        f"output_dir={out_dir}", "stages=[srppo]", f"seed={w.seed}", "runtime.progress=false",
        f"model.base={w.pretrained}", f"model.tokenizer={w.sft}",
        f"srppo.init={w.sft}", f"srppo.reward.sft={w.sft}", f"srppo.reward.pretrained={w.pretrained}",
        f"srppo.prompts={w.prompts}", f"srppo.max_prompt_len={w.max_prompt_len}",
        f"srppo.max_steps={w.warmup + w.steps}", "srppo.eval_every=0", "srppo.save_every=0",
        f"srppo.prompts_per_step={w.prompts_per_step}", f"srppo.rollout.n_samples={w.n_samples}",
        f"srppo.rollout.max_new_tokens={w.max_new_tokens}", f"srppo.rollout.temperature={w.temperature}",
        "srppo.rollout.top_p=1.0",
        "srppo.reward.type=coherent", "srppo.reward.granularity=sequence", f"srppo.reward.token_clip={w.token_clip}",
        "srppo.reward.no_eos=penalty", f"srppo.reward.no_eos_penalty={w.no_eos_penalty}", "srppo.reward.whiten=false",
        "srppo.advantage.estimator=grpo", "srppo.advantage.whiten=false", "srppo.critic.warmup_buffers=0",
        f"srppo.kl.coef={w.kl_coef}",
        "srppo.ppo.epochs=1", f"srppo.ppo.train_batch_size={w.train_batch_size}", f"srppo.ppo.clip_eps={w.clip_eps}",
        "srppo.ppo.entropy_coef=0.0",
        f"srppo.optim.lr={w.lr}", f"srppo.optim.betas=[{w.betas[0]}, {w.betas[1]}]", f"srppo.optim.eps={w.adam_eps}",
        "srppo.optim.weight_decay=0.0", f"srppo.optim.grad_clip={w.grad_clip}", "srppo.optim.schedule=constant",
        "srppo.optim.warmup_ratio=0.0",
    ]


def run_srppo(w: Workload, workdir: str, extra: list[str]) -> dict:
    out_dir = tempfile.mkdtemp(dir=workdir, prefix="srppo_")  # fresh: a finished stage would be skipped
    cmd = [sys.executable, "-m", "srppo_fast", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
           *srppo_overrides(w, out_dir), *extra]
    log_path = os.path.join(out_dir, "srppo.log")
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=w.timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"srppo-fast exited with {done.returncode}; see {log_path}:\n" + _tail(log_path))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    steps = sorted((r for r in rows if r.get("stage") == "srppo" and "samples_per_s" in r), key=lambda r: r["step"])
    if len(steps) != w.warmup + w.steps:
        raise RuntimeError(f"expected {w.warmup + w.steps} srppo step rows in {out_dir}/metrics.jsonl, "
                           f"got {len(steps)}")
    measured = steps[w.warmup:]
    return {"buffer_s": [r["time/step"] for r in measured],
            "mean_response_len": statistics.mean(r["response_length"] for r in measured),
            "threads": _threads_from_log(log_path), "rows": measured, "out_dir": out_dir}


def _threads_from_log(path: str) -> int | None:
    """srppo-fast logs 'device ..., precision ..., N CPU threads' at start-up."""
    for line in open(path, errors="replace"):
        if "CPU threads" in line:
            try:
                return int(line.rsplit("CPU threads", 1)[0].split(",")[-1])
            except ValueError:
                return None
    return None


def run_trl(w: Workload, workdir: str) -> dict:
    workdir = tempfile.mkdtemp(dir=workdir, prefix="trl_")
    spec, result = os.path.join(workdir, "trl_workload.json"), os.path.join(workdir, "trl_result.json")
    with open(spec, "w") as fh:
        json.dump(asdict(w), fh)
    log_path = os.path.join(workdir, "trl.log")
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, __file__, "--worker", "trl", "--workdir", workdir], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, timeout=w.timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"the TRL run exited with {done.returncode}; see {log_path}:\n" + _tail(log_path))
    with open(result) as fh:
        return json.load(fh)


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# orchestration


NOTES = {
    "trl": "GRPOTrainer, HF generate (padded, KV cache), reward fn = frozen fp32 SFT/PT forwards; step = "
           "on_step_begin..on_step_end over steps_per_generation optimizer steps",
    "srppo": "srppo-fast CLI; step = metrics.jsonl time/step (generate+score+advantages+update)",
}


def pool(rounds: list[dict]) -> dict:
    """One engine's rounds as one result: all measured buffers; CPU pressure as the share of its wall time
    (process start-up included) during which some task waited for a CPU."""
    stalls = [r["stall_us"] for r in rounds]
    return {"buffer_s": [s for r in rounds for s in r["buffer_s"]],
            "mean_response_len": statistics.mean(r["mean_response_len"] for r in rounds),
            "threads": rounds[0].get("threads"),
            "cpu_pressure_pct": 100e-6 * sum(stalls) / sum(r["wall_s"] for r in rounds) if None not in stalls else None}


def make_row(w: Workload, engine: str, result: dict, trl_median: float | None, extra: list[str], facts: dict,
             rounds: int) -> dict:
    rates = [w.buffer / s for s in result["buffer_s"]]
    median, p20, p80 = quantiles(rates)
    pressure = result.get("cpu_pressure_pct")
    return {
        **facts, "engine": engine, "model_path": w.sft, "prompts_per_step": w.prompts_per_step,
        "n_samples": w.n_samples, "max_new_tokens": w.max_new_tokens, "train_batch_size": w.train_batch_size,
        "estimator": "grpo", "kl_coef": w.kl_coef, "lr": w.lr, "threads": result.get("threads") or "",
        "rounds": rounds, "steps": w.steps, "warmup_steps": w.warmup, "samples_per_s": f"{median:.2f}",
        "samples_per_s_p20": f"{p20:.2f}", "samples_per_s_p80": f"{p80:.2f}", "samples_per_s_max": f"{max(rates):.2f}",
        "step_s_median": f"{statistics.median(result['buffer_s']):.3f}",
        "mean_response_len": f"{result['mean_response_len']:.1f}",
        "cpu_pressure_pct": f"{pressure:.1f}" if pressure is not None else "",
        "ratio_vs_trl": f"{median / trl_median:.2f}" if trl_median else "",
        "extra": " ".join(extra) if engine == "srppo" else "", "note": NOTES[engine],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a finished quickstart run (checkpoints/sft, checkpoints/pretrain, world/)")
    p.add_argument("--steps", type=int, default=6, help="measured rollout buffers per engine and round")
    p.add_argument("--warmup", type=int, default=2, help="rollout buffers run first and not measured")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="CSV to append to")
    p.add_argument("--engines", default="trl,srppo", help="comma-separated, run in this order: trl, srppo")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the engines this many times each, alternating the order every round (A B, B A, ...), "
                        "pooling the measured buffers: spreads a shared machine's load drift over both")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override passed on to srppo-fast (repeatable), e.g. srppo.rollout.engine=vllm")
    p.add_argument("--workdir", default=None, help="where the runs write (default: a new temporary directory)")
    p.add_argument("--dry", action="store_true", help="print the rows, do not append them to the CSV")
    p.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)  # internal: the TRL subprocess
    args = p.parse_args(argv)

    if args.worker == "trl":
        with open(os.path.join(args.workdir, "trl_workload.json")) as fh:
            spec = json.load(fh)
        result = trl_worker(Workload(**{**spec, "betas": tuple(spec["betas"])}), args.workdir)
        with open(os.path.join(args.workdir, "trl_result.json"), "w") as fh:
            json.dump(result, fh)
        return

    if not args.run:
        p.error("--run is required")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        p.error(f"--engines: choose from {', '.join(ENGINES)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    w = Workload(run=os.path.abspath(args.run), steps=args.steps, warmup=args.warmup)
    if w.buffer % w.train_batch_size:
        p.error("prompts_per_step x n_samples must be a multiple of train_batch_size")
    for path in (w.sft, w.pretrained, w.prompts):
        if not os.path.exists(path):
            p.error(f"{path} does not exist; --run must be a finished quickstart run")
    workdir = args.workdir or tempfile.mkdtemp(prefix="trl_side_by_side_")
    os.makedirs(workdir, exist_ok=True)

    import torch

    facts = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hardware": hardware(), "git_sha": git_sha(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": version("transformers"), "trl": version("trl"),
        "n_params": n_params(w.sft),
    }
    print(f"workload: {w.prompts_per_step} prompts x {w.n_samples} samples, {w.max_new_tokens} new tokens, "
          f"train batch {w.train_batch_size}, GRPO, kl {w.kl_coef}; {w.warmup} + {w.steps} buffers x {args.rounds} "
          f"round(s); "
          f"torch threads {torch.get_num_threads()}; workdir {workdir}", flush=True)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for engine in engines if r % 2 == 0 else engines[::-1]:
            t0, stall0 = time.perf_counter(), cpu_stall_us()
            res = run_trl(w, workdir) if engine == "trl" else run_srppo(w, workdir, args.extra)
            wall, stall1 = time.perf_counter() - t0, cpu_stall_us()
            res["stall_us"], res["wall_s"] = (stall1 - stall0) if stall0 is not None else None, wall
            runs[engine].append(res)
            rates = ", ".join(f"{w.buffer / s:.1f}" for s in res["buffer_s"])
            pressure = f", CPU pressure {100e-6 * res['stall_us'] / wall:.0f}%" if res["stall_us"] is not None else ""
            print(f"round {r + 1} {engine}: samples/s per measured buffer [{rates}] ({wall:.0f} s in all{pressure})",
                  flush=True)
    results = {e: pool(rs) for e, rs in runs.items()}

    trl_median = quantiles([w.buffer / s for s in results["trl"]["buffer_s"]])[0] if "trl" in results else None
    rows = [make_row(w, e, results[e], trl_median, args.extra, facts, args.rounds) for e in engines]
    for r in rows:
        print(f"{r['engine']:<6} {r['samples_per_s']:>8} samples/s  [p20 {r['samples_per_s_p20']}, "
              f"p80 {r['samples_per_s_p80']}]  step {r['step_s_median']} s  ratio vs TRL {r['ratio_vs_trl'] or '-'}")
    if args.dry:
        return
    append_rows(Path(args.out), rows, COLUMNS)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
