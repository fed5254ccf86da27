"""The trainer end to end on one GPU, prepared on the CPU before a GPU is lent: random-initialised Llama models of
~0.5B and ~1.5B parameters built from a config alone and a 128 256-token tokenizer built here (nothing is
downloaded), trained in bf16 as users run srppo-fast, beside TRL's GRPOTrainer on the same model, prompts and
lengths. Each phase runs in a subprocess with its own deadline; a CSV row is appended as each ends, so a phase
that fails or runs out of time costs only itself.

    phase       what it measures
    matmul      the card's bf16 matmul rate (8192^3 on random data): the MFU denominator
    build       tokenizer, pi_PT and pi_SFT per size (random, saved in bf16), demonstrations and prompts
    fused_op    linear_token_logprobs at real size under bf16 autocast (fp32 master-style inputs): forward and
                backward against the fp64 reference, the extra memory over the inputs, seconds
    gpu_tests   the GPU-marked tests of tests/test_kernels.py (real vocabularies, 16k tokens)
    sft         srppo-fast SFT steps (torch engine; DeepSpeed ZeRO-2 at world size 1): tokens/s, MFU
    srppo       srppo-fast SRPPO steps with HF sampling (GRPO advantages and no KL, as TRL's GRPO here):
                samples/s, the update's MFU
    trl         TRL's GRPOTrainer, HF generate, the coherent reward as a reward function on bf16 pi_SFT/pi_PT
Every training phase also reports its peak allocated GPU memory against the --dry-run plan's stage total.
MFU = 6 x parameters x trained tokens / seconds / the measured matmul rate (model FLOPs; attention scores and
the frozen forwards not counted).

    python benchmarks/gpu_e2e.py                  # a GPU machine: both sizes, at most 8 minutes (--budget)
    python benchmarks/gpu_e2e.py --toy --out X    # the CPU at toy size (tests/test_bench.py runs this)

Rows go to benchmarks/results/gpu_e2e.csv (hardware, versions and git SHA in every row). docs/gpu.md
has the device command that carries what the GPU image lacks (DeepSpeed, TRL and their missing dependencies).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import append_rows, cpu_model, git_sha, version  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_e2e.csv"
COLUMNS = ["timestamp", "hardware", "git_sha", "python", "torch", "transformers", "deepspeed", "trl", "size", "params",
           "phase", "engine", "status", "wall_s", "steps", "tokens_per_s", "samples_per_s", "step_s", "mfu",
           "matmul_tflops", "peak_allocated_gib", "plan_gib", "peak_over_plan", "ratio_vs_trl", "detail"]
VOCAB = 128256
ARCH = {"model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 500000.0}
SIZES = {  # head_dim 128; GQA as the models of that size
    "0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class Scale:
    """The workload of one run: lengths, batch shapes, steps and the phases' deadlines (seconds)."""

    vocab: int = VOCAB
    prompt_words: int = 48  # a prompt renders to ~52 tokens
    response_words: int = 448  # an SFT sequence ~500 tokens
    demos: int = 512
    prompts: int = 512
    sft_batch: int = 64  # sequences per optimizer step (~32k tokens)
    micro_batch_tokens: int = 8192
    sft_steps: int = 8  # the first is warm-up
    prompts_per_step: int = 32
    n_samples: int = 4
    max_new_tokens: int = 128
    train_batch: int = 64
    rl_warmup: int = 1
    rl_steps: int = 3
    fused_tokens: int = 8192
    matmul_n: int = 8192
    deadlines: tuple = (("matmul", 45), ("build", 120), ("fused_op", 90), ("gpu_tests", 150), ("sft", 120),
                        ("srppo", 150), ("trl", 150))


TOY = Scale(vocab=512, prompt_words=8, response_words=24, demos=32, prompts=64, sft_batch=8, micro_batch_tokens=256,
            sft_steps=2, prompts_per_step=4, n_samples=2, max_new_tokens=8, train_batch=4, rl_warmup=1, rl_steps=1,
            fused_tokens=256, matmul_n=256,
            deadlines=(("matmul", 60), ("build", 120), ("fused_op", 120), ("gpu_tests", 60), ("sft", 300),
                       ("srppo", 300), ("trl", 300)))


# ---------------------------------------------------------------------------------------------
# workers (each phase's subprocess: `--worker NAME --json RESULT ...`)


def worker_matmul(args) -> dict:
    import torch

    n = args.n
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))  # never zeros: METHOD.md
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    return {"tflops": 2 * n**3 / seconds / 1e12}


def make_tokenizer(vocab: int, out: str) -> None:
    """A word-level tokenizer of exactly `vocab` tokens (specials, two chat markers, then words w0, w1, ...) with a
    prefix-stable chat template, saved for transformers: a real vocabulary's size without a corpus to train on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    words = [*specials.values(), "Q:", "A:"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} Q: {{ m['content'] }}"
                          "{% elif m['role'] == 'assistant' %} A: {{ m['content'] }} {{ eos_token }}{% endif %}"
                          "{% endfor %}{% if add_generation_prompt %} A: {% endif %}")
    fast.save_pretrained(out)
    assert len(fast) == vocab, (len(fast), vocab)


def worker_build(args) -> dict:
    """Per size: run/checkpoints/{pretrain,sft} (random bf16 models + the tokenizer), run/world/prompts.jsonl and
    demos.jsonl: the layout trl_side_by_side.Workload reads."""
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    scale = TOY if args.toy else Scale()
    work = Path(args.workdir)
    make_tokenizer(scale.vocab, str(work / "tokenizer"))
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    rng = random.Random(0)
    words = lambda k: " ".join(f"w{rng.randrange(scale.vocab - 6)}" for _ in range(k))  # noqa: E731
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "demos.jsonl", "w") as fh:
        for _ in range(scale.demos):
            fh.write(json.dumps({"messages": [{"role": "user", "content": words(scale.prompt_words)},
                                              {"role": "assistant", "content": words(scale.response_words)}]}) + "\n")
    with open(data / "prompts.jsonl", "w") as fh:
        for _ in range(scale.prompts):
            fh.write(json.dumps({"messages": [{"role": "user", "content": words(scale.prompt_words)}]}) + "\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = {}
    for size in args.sizes.split(","):
        arch = {**ARCH, **SIZES[size]}
        config = AutoConfig.for_model(arch.pop("model_type"), **arch, vocab_size=scale.vocab,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
        run = work / size / "run"
        for name, seed in (("pretrain", 1), ("sft", 2)):
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(run / "checkpoints" / name)
            tok.save_pretrained(run / "checkpoints" / name)
            params[size] = sum(p.numel() for p in model.parameters())
            del model
        (run / "world").mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "prompts.jsonl", run / "world" / "prompts.jsonl")
    return {"params": params}


def worker_fused_op(args) -> dict:
    """linear_token_logprobs under bf16 autocast on fp32 inputs (an update's), forward and backward, against the
    fp64 reference (chunks of rows) and against plain autocast ops: relative errors, extra memory, seconds. It
    passes within bf16's reach: at most twice the autocast ops' error, for the log-probs and both gradients."""
    import torch

    from srppo_fast.ops import linear_token_logprobs, linear_token_logprobs_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = TOY if args.toy else Scale()
    H = SIZES["toy" if args.toy else "1.5b"]["hidden_size"]
    N, V = scale.fused_tokens, scale.vocab
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=g)
    weight = torch.randn(V, H, device=device, generator=g) * 0.05
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    up = torch.randn(N, device=device, generator=g)

    def run(fn, autocast: bool, rows: slice = slice(None), dtype=torch.float32):
        h, w = (t.detach().to(dtype).clone().requires_grad_() for t in (hidden[rows], weight))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logp = fn(h, w, labels[rows])
        (logp * up[rows]).sum().backward()
        return logp.detach().float(), h.grad, w.grad

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    t0 = time.perf_counter()
    fused = run(lambda h, w, y: linear_token_logprobs(h, w, y, impl="auto"), True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    step = min(N, 2048)
    parts = [run(linear_token_logprobs_ref, False, slice(i, i + step), torch.float64) for i in range(0, N, step)]
    ref = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sum(p[2] for p in parts))
    ops = [run(linear_token_logprobs_ref, True, slice(i, i + step)) for i in range(0, N, step)]
    ops = (torch.cat([p[0] for p in ops]), torch.cat([p[1] for p in ops]), sum(p[2] for p in ops))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    out = {"N": N, "H": H, "V": V, "seconds_fwd_bwd": seconds, "extra_gib": extra,
           **{f"rel_{k}": rel(a, b) for k, a, b in zip(("logp", "grad_hidden", "grad_weight"), fused, ref)},
           **{f"rel_{k}_autocast_ops": rel(a, b) for k, a, b in zip(("logp", "grad_hidden", "grad_weight"), ops, ref)}}
    out["ok"] = all(out[f"rel_{k}"] <= 2 * out[f"rel_{k}_autocast_ops"] + 1e-6
                    for k in ("logp", "grad_hidden", "grad_weight"))
    return out


WORKERS = {"matmul": worker_matmul, "build": worker_build, "fused_op": worker_fused_op}


# ---------------------------------------------------------------------------------------------
# the phases (in the parent)


class Phase:
    """One phase: a subprocess under its deadline, its row(s) appended as it ends."""

    def __init__(self, run: E2E, name: str, size: str = "", engine: str = ""):
        self.run, self.name, self.size, self.engine = run, name, size, engine
        self.deadline = min(dict(run.scale.deadlines)[name] * run.slack, max(1.0, run.remaining()))
        self.t0 = time.perf_counter()

    def row(self, status: str, **values) -> dict:
        row = {**self.run.facts, "size": self.size, "params": self.run.params.get(self.size, ""), "phase": self.name,
               "engine": self.engine, "status": status, "wall_s": f"{time.perf_counter() - self.t0:.1f}",
               "matmul_tflops": f"{self.run.tflops:.0f}" if self.run.tflops else "", **values}
        self.run.rows.append(row)
        if not self.run.dry:
            append_rows(self.run.out, [row], COLUMNS)
        shown = {k: v for k, v in row.items() if k in ("phase", "size", "engine", "status", "wall_s", "tokens_per_s",
                                                       "samples_per_s", "mfu", "peak_allocated_gib", "plan_gib",
                                                       "ratio_vs_trl", "detail") and v not in ("", None)}
        print(json.dumps(shown), flush=True)
        return row


class E2E:
    def __init__(self, args):
        self.scale = TOY if args.toy else Scale()
        self.toy, self.dry, self.out = args.toy, args.dry, Path(args.out)
        self.sizes = args.sizes.split(",") if args.sizes else (["toy"] if args.toy else ["1.5b", "0.5b"])
        self.slack = args.slack
        self.budget, self.start = args.budget * args.slack, time.perf_counter()
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_e2e_", dir=_scratch_dir()))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.params: dict[str, int] = {}
        self.tflops: float | None = None
        self.trl_rate: dict[str, float] = {}
        import torch

        self.gpu = torch.cuda.is_available()
        self.gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if self.gpu else 80.0
        self.facts = {"timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                      "hardware": torch.cuda.get_device_name() if self.gpu else f"CPU {cpu_model()}",
                      "git_sha": git_sha(), "python": platform.python_version(), "torch": torch.__version__,
                      "transformers": version("transformers"), "deepspeed": version("deepspeed"), "trl": version("trl")}

    def remaining(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def worker(self, phase: Phase, name: str, *extra: str) -> dict:
        result = self.workdir / f"{name}.json"
        cmd = [sys.executable, __file__, "--worker", name, "--json", str(result), "--workdir", str(self.workdir),
               "--sizes", ",".join(self.sizes), *(["--toy"] if self.toy else []), *extra]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=phase.deadline)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-1500:])
        return json.loads(result.read_text())

    def guarded(self, phase: Phase, body) -> None:
        if phase.deadline < 5:
            phase.row("skipped", detail=f"the {self.budget:.0f} s budget is spent")
            return
        try:
            body(phase)
        except subprocess.TimeoutExpired:
            phase.row("timeout", detail=f"deadline {phase.deadline:.0f} s")
        except Exception as e:  # noqa: BLE001 - recorded, and the next phase runs
            phase.row("failed", detail=" ".join(str(e).split())[-600:])

    # -- the phases ----------------------------------------------------------------------------

    def matmul(self, phase: Phase) -> None:
        self.tflops = self.worker(phase, "matmul", "--n", str(self.scale.matmul_n))["tflops"]
        phase.row("ok", detail=f"bf16 {self.scale.matmul_n}^3 random")

    def build(self, phase: Phase) -> None:
        self.params = {k: int(v) for k, v in self.worker(phase, "build")["params"].items()}
        phase.row("ok", detail=" ".join(f"{k}={v / 1e9:.3f}B" for k, v in self.params.items()) +
                  f", vocab {self.scale.vocab}, in {self.workdir}")

    def fused_op(self, phase: Phase) -> None:
        r = self.worker(phase, "fused_op")
        extra = f", extra {r['extra_gib']:.2f} GiB" if r["extra_gib"] is not None else ""
        phase.row("ok" if r["ok"] else "wrong", step_s=f"{r['seconds_fwd_bwd']:.3f}",
                  detail=f"N={r['N']} H={r['H']} V={r['V']} bf16 autocast: rel err logp {r['rel_logp']:.2e} "
                         f"(autocast ops {r['rel_logp_autocast_ops']:.2e}), grad hidden {r['rel_grad_hidden']:.2e} "
                         f"({r['rel_grad_hidden_autocast_ops']:.2e}), grad weight {r['rel_grad_weight']:.2e} "
                         f"({r['rel_grad_weight_autocast_ops']:.2e}){extra}")

    def gpu_tests(self, phase: Phase) -> None:
        if not self.gpu:
            phase.row("skipped", detail="no CUDA device")
            return
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels.py",
                               "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True,
                              timeout=phase.deadline)
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
        phase.row("ok" if done.returncode == 0 else "failed", detail=last)

    def cli_overrides(self, size: str, engine: str, out: Path) -> list[str]:
        return [f"output_dir={out}", "runtime.progress=false", "logging.backends=[jsonl]", "runtime.precision=bf16",
                f"runtime.engine={engine}", "deepspeed.zero_stage=2", "runtime.device=auto"]

    def plan_gib(self, overrides: list[str], stage: str) -> float | None:
        from srppo_fast.config_load import load_config
        from srppo_fast.engine.memory import plan_memory

        cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), overrides, check_files=False)
        plan = {p.name: p for p in plan_memory(cfg, 1, 1, self.gpu_gib)}[stage]
        return plan.total_bytes / 2**30 if plan.total_bytes is not None else None

    def memory_cells(self, rows: list[dict], plan: float | None) -> dict:
        peaks = [r["memory/peak_allocated_gib"] for r in rows if "memory/peak_allocated_gib" in r]
        if not peaks:
            return {"plan_gib": f"{plan:.1f}" if plan else ""}
        peak = max(peaks)
        return {"peak_allocated_gib": f"{peak:.1f}", "plan_gib": f"{plan:.1f}" if plan else "",
                "peak_over_plan": f"{peak / plan:.2f}" if plan else ""}

    def sft(self, phase: Phase) -> None:
        size, engine, s = phase.size, phase.engine, self.scale
        run = self.workdir / size / "run"
        out = Path(tempfile.mkdtemp(dir=self.workdir, prefix=f"sft_{size}_{engine}_"))
        overrides = [*self.cli_overrides(size, engine, out), "stages=[sft]", f"model.base={run}/checkpoints/pretrain",
                     "model.tokenizer=auto", "sft.init=base", f"sft.data={self.workdir}/data/demos.jsonl",
                     "sft.eval_data=null", f"sft.max_steps={s.sft_steps}", f"sft.batch_size={s.sft_batch}",
                     f"sft.micro_batch_tokens={s.micro_batch_tokens}",
                     f"sft.max_seq_len={min(1024, s.micro_batch_tokens)}", "sft.save_every=0", "sft.log_every=1",
                     "sft.optim.warmup_ratio=0.0"]
        done = subprocess.run([sys.executable, "-m", "srppo_fast", "train", "--config",
                               str(REPO / "configs" / "quickstart.yaml"), *overrides], cwd=REPO, capture_output=True,
                              text=True, timeout=phase.deadline)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-1500:])
        rows = [r for r in _metrics(out) if r.get("stage") == "sft" and "tokens_per_s" in r]
        steady = rows[1:] or rows
        tps = statistics.median(r["tokens_per_s"] for r in steady)
        step_s = statistics.median(r["tokens"] / r["tokens_per_s"] for r in steady)
        mfu = 6 * self.params[size] * tps / (self.tflops * 1e12) if self.tflops else None
        phase.row("ok", steps=len(steady), tokens_per_s=f"{tps:.0f}", step_s=f"{step_s:.3f}",
                  mfu=f"{mfu:.3f}" if mfu is not None else "",
                  **self.memory_cells(rows, self.plan_gib(overrides, "sft")),
                  detail=f"{s.sft_batch} seqs x ~{s.prompt_words + s.response_words + 6} tokens per step, "
                         f"micro-batches of {s.micro_batch_tokens} tokens")
        shutil.rmtree(out, ignore_errors=True)

    def workload(self, size: str, phase: Phase):
        from benchmarks.trl_side_by_side import Workload

        s = self.scale
        return Workload(run=str(self.workdir / size / "run"), steps=s.rl_steps, warmup=s.rl_warmup,
                        prompts_per_step=s.prompts_per_step, n_samples=s.n_samples, max_new_tokens=s.max_new_tokens,
                        max_prompt_len=s.prompt_words + 8, train_batch_size=s.train_batch, precision="bf16",
                        timeout_s=phase.deadline)

    def srppo(self, phase: Phase) -> None:
        from benchmarks.trl_side_by_side import run_srppo, srppo_overrides

        size, engine, s = phase.size, phase.engine, self.scale
        w = self.workload(size, phase)
        extra = [*self.cli_overrides(size, engine, Path("unused"))[1:],
                 f"srppo.ppo.micro_batch_tokens={s.micro_batch_tokens}", "srppo.rollout.batch_size=512"]
        result = run_srppo(w, str(self.workdir), extra)
        rows = result["rows"]
        rate = statistics.median(w.buffer / r["time/step"] for r in rows)
        update_mfu = statistics.median(r["update/flops"] / r["time/update"] for r in rows) / (self.tflops * 1e12) \
            if self.tflops else None
        phases = ", ".join(f"{k} {statistics.median(r[f'time/{k}'] for r in rows):.2f} s"
                           for k in ("generate", "score", "advantages", "update"))
        trl = self.trl_rate.get(size)
        plan = self.plan_gib([*srppo_overrides(w, str(result["out_dir"])), *extra], "srppo")
        phase.row("ok", steps=len(rows), samples_per_s=f"{rate:.2f}",
                  tokens_per_s=f"{statistics.median(r['rollout/tokens'] / r['time/step'] for r in rows):.0f}",
                  step_s=f"{statistics.median(r['time/step'] for r in rows):.2f}",
                  mfu=f"{update_mfu:.3f}" if update_mfu is not None else "",
                  ratio_vs_trl=f"{rate / trl:.2f}" if trl else "", **self.memory_cells(rows, plan),
                  detail=f"{w.prompts_per_step} prompts x {w.n_samples} samples x {w.max_new_tokens} new tokens, "
                         f"train batch {w.train_batch_size}, GRPO, no KL; per step {phases}; mfu: the update's")
        shutil.rmtree(result["out_dir"], ignore_errors=True)

    def trl(self, phase: Phase) -> None:
        from benchmarks.trl_side_by_side import run_trl

        if not version("trl"):
            raise RuntimeError("TRL is not installed (pip install 'srppo-fast[peers]', or carry its wheel)")
        w = self.workload(phase.size, phase)
        result = run_trl(w, str(self.workdir))
        rate = statistics.median(w.buffer / b for b in result["buffer_s"])
        self.trl_rate[phase.size] = rate
        peak = result.get("peak_allocated_gib")
        phase.row("ok", steps=len(result["buffer_s"]), samples_per_s=f"{rate:.2f}",
                  step_s=f"{statistics.median(result['buffer_s']):.2f}",
                  peak_allocated_gib=f"{peak:.1f}" if peak else "",
                  detail=f"GRPOTrainer bf16=True, policy {result.get('param_dtype')} under autocast, HF generate, "
                         f"reward fn = bf16 pi_SFT/pi_PT forwards; "
                         f"{w.prompts_per_step} x {w.n_samples} x {w.max_new_tokens}")

    def run(self, phases: list[str]) -> None:
        """The first size's training phases come right after the models are built (what the budget is for), the
        kernel checks after them, then the other sizes."""
        print(f"gpu_e2e: {self.facts['hardware']}; sizes {self.sizes}; budget {self.budget:.0f} s; workdir "
              f"{self.workdir}", flush=True)
        for name in ("matmul", "build"):
            if name in phases:
                self.guarded(Phase(self, name), getattr(self, name))
        for i, size in enumerate(self.sizes):
            if size in self.params:  # its models were built
                # TRL before srppo: the srppo rows carry the ratio to it
                for name, engine in (("sft", "torch"), ("trl", "trl"), ("srppo", "torch"), ("sft", "deepspeed"),
                                     ("srppo", "deepspeed")):
                    if name in phases:
                        self.guarded(Phase(self, name, size, engine), getattr(self, name))
            if i == 0:
                for name in ("fused_op", "gpu_tests"):
                    if name in phases:
                        self.guarded(Phase(self, name), getattr(self, name))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _scratch_dir() -> str | None:
    """Models and checkpoints go to memory when the machine has room (/dev/shm): a 1.5B checkpoint is 3-6 GB."""
    shm = "/dev/shm"
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return shm if free > 40 * 2**30 else None


PHASES = ("matmul", "build", "fused_op", "gpu_tests", "trl", "sft", "srppo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="toy sizes (the CPU test)")
    p.add_argument("--sizes", default="", help="comma-separated: " + ", ".join(SIZES) + " (default 1.5b,0.5b; toy)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all phases (each also has a deadline)")
    p.add_argument("--slack", type=float, default=1.0, help="multiply the budget and every deadline (the CPU test: its "
                   "time depends on the machine's load, not on what it checks)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="CSV to append to")
    p.add_argument("--workdir", default=None)
    p.add_argument("--dry", action="store_true", help="print the rows, do not append them")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=8192, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.sizes = args.sizes or ("toy" if args.toy else "1.5b,0.5b")
        result = WORKERS[args.worker](args)
        Path(args.json).write_text(json.dumps(result))
        return 0
    phases = [x for x in args.phases.split(",") if x]
    unknown = [x for x in phases + (args.sizes.split(",") if args.sizes else []) if x not in PHASES and x not in SIZES]
    if unknown:
        p.error(f"unknown phase or size: {', '.join(unknown)}")
    e2e = E2E(args)
    e2e.run(phases)
    bad = [r for r in e2e.rows if r["status"] not in ("ok", "skipped")]
    print(f"gpu_e2e: {len(e2e.rows)} rows ({len(bad)} not ok) in {time.perf_counter() - e2e.start:.0f} s"
          + ("" if args.dry else f", appended to {args.out}"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
