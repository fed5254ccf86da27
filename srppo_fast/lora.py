"""LoRA adapters as the model roles: one frozen base module, several named adapters, one role per call.

SRPPO's four models are one base seen four ways (model.lora):

    pi_PT     the base, adapters off
    pi_SFT    the base + the SFT stage's adapter, frozen (also the KL reference)
    actor     the base + a trainable adapter, started from the SFT adapter
    critic    the base + its own adapter + a value head

`SharedBase` holds the base (frozen, in the run's precision) with peft's LoRA layers injected for every adapter;
`RoleView` is one role: a module whose own parameters are only its adapter's (and the critic's value head), so an
engine built on it optimises, clips, casts and checkpoints exactly those. Every forward through a view first makes
its adapter the active one (peft's switch also flips requires_grad, which we put back: a frozen role never
becomes trainable), and activation checkpointing recomputes a block under the adapter its forward ran with (a
checkpoint context), so an actor and a critic forward in one autograd graph stay apart.

Merging never touches the base: the merged weight W + (alpha / r) B A is a new tensor (peft's in-place
merge/unmerge cycle drifts W by rounding, which would break "adapters off = pi_PT" exactly). Adapters are saved
in peft's format (adapter_config.json, adapter_model.safetensors; the critic's head in value_head.safetensors),
so peft, transformers and vLLM read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass

import torch

from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    VALUE_HEAD,
    merged_weight,
)
from .errors import ConfigError


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs peft, which is not installed: pip install 'srppo-fast[lora]'.") from None
    return peft


def peft_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    peft = require_peft()
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")


def read_adapter_config(path: str):
    """The peft LoraConfig saved in an adapter directory."""
    peft = require_peft()
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as fh:
        data = json.load(fh)
    known = {k: data[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias") if k in data}
    return peft.LoraConfig(**known)


@dataclass(frozen=True)
class Resolved:
    """A model reference under LoRA: the full weights it sits on, and its adapter (None: the weights alone)."""

    base: str  # what load_model reads ('scratch', a directory, a hub name, a GGUF file)
    adapter: str | None  # an adapter directory (peft format)


class SharedBase:
    """One base module (frozen) carrying named LoRA adapters; `view(name)` is a role on it."""

    def __init__(self, model: torch.nn.Module, label: str):
        require_peft()
        self.model, self.label = model, label
        model.requires_grad_(False)
        self.configs: dict = {}  # adapter name -> peft LoraConfig
        self._params: dict[str, list] = {}  # adapter name -> its (peft key, parameter) pairs
        self._active: object = None  # None: adapters off
        self._layers: list = []
        self._gc = False

    # -- adapters ----------------------------------------------------------------------------------

    def add(self, name: str, config, *, seed: int, dtype: torch.dtype, state: dict | None = None) -> None:
        """Inject adapter `name` (frozen; B = 0 unless `state`, a peft-keyed state dict, gives its weights)."""
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists on {self.label}")
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # A's init: the same for the same seed
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # several adapters is the point
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.model, adapter_name=name)
        self.configs[name] = config
        self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        ends = {f".lora_A.{name}.weight": ".lora_A.weight", f".lora_B.{name}.weight": ".lora_B.weight"}
        self._params[name] = [(PEFT_PREFIX + n[:-len(end)] + ends[end], p) for n, p in self.model.named_parameters()
                              for end in ends if n.endswith(end)]
        for p in self.model.parameters():  # peft's injection marks trainability its own way: ours stands
            p.requires_grad_(flags.get(id(p), False))
        with torch.no_grad():
            for key, p in self.params(name):
                p.data = p.data.to(dtype)
                if state is not None:
                    if key not in state:
                        raise ConfigError(f"the adapter for {name} lacks the weight {key}; it was saved for other "
                                          "target modules or another architecture.")
                    p.copy_(state[key])
        self._active = object()  # unknown: the next call switches for real

    def base_numel(self) -> int:
        """The base's own parameters (tied ones once), without any adapter's."""
        return sum(p.numel() for n, p in self.model.named_parameters() if ".lora_" not in n)

    def params(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        """(peft key, parameter) of adapter `name`, in module order."""
        return self._params[name]

    def switch(self, name: str | None) -> None:
        """Make adapter `name` the one every forward adds (None: the base alone), leaving requires_grad as it was."""
        if name == self._active:
            return
        flags = [(p, p.requires_grad) for _, p in self._all_params()]
        for layer in self._layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name, inference_mode=True)
        for p, flag in flags:
            p.requires_grad_(flag)
        self._active = name

    def _all_params(self):
        return [(k, p) for name in self.configs for k, p in self.params(name)]

    @contextlib.contextmanager
    def active(self, name: str | None):
        before = self._active
        self.switch(name)
        try:
            yield
        finally:
            if before in self.configs or before is None:
                self.switch(before)

    # -- activation checkpointing ------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in the backward under the adapter its forward ran with (torch's checkpoint
        context_fn), however the roles interleave before that backward."""
        if self._gc or not hasattr(self.model, "gradient_checkpointing_enable"):
            return

        def contexts():
            return contextlib.nullcontext(), self.active(self._active if self._active in self.configs else None)

        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": contexts})
        self._gc = True

    # -- merged weights (never in place) ----------------------------------------------------------

    def merged_parameters(self, name: str | None) -> list[tuple[str, MergedParameter]]:
        """The plain model's parameters in order (tied ones once), adapter `name` merged into each targeted
        weight when it is read: a sampler's sync takes them bucket by bucket, never the whole merged model."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = {n: m for n, m in self.model.named_modules()
                  if name is not None and isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {})}
        out = []
        for key, p in self.model.named_parameters():
            if ".lora_" in key:
                continue
            plain = key.replace(".base_layer.", ".")
            layer = layers.get(plain.rsplit(".", 1)[0]) if key.endswith(".base_layer.weight") else None
            out.append((plain, MergedParameter(p, layer, name)))
        return out

    def view(self, name: str | None, value_head: torch.nn.Module | None = None, *, owner: bool = False) -> RoleView:
        return RoleView(self, name, value_head, owner=owner)


class MergedParameter:
    """A base weight as a sampler sees it: W, or W + (alpha / r) B A computed when `value()` is called."""

    def __init__(self, weight: torch.nn.Parameter, layer, adapter: str | None):
        self.weight, self.layer, self.adapter = weight, layer, adapter
        self.shape = weight.shape

    def numel(self) -> int:
        return self.weight.numel()

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        if self.layer is None:
            return self.weight.detach()
        return merged_weight(self.weight, self.layer.lora_A[self.adapter].weight,
                             self.layer.lora_B[self.adapter].weight, self.layer.scaling[self.adapter])


class _Body:
    """A view's transformer body (what `model.base_model` is for a plain causal LM), under the view's adapter."""

    def __init__(self, view: RoleView):
        self.view = view

    def __call__(self, *args, **kwargs):
        self.view.enter()
        return self.view.shared.model.base_model(*args, **kwargs)


class ValueOutput:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class RoleView(torch.nn.Module):
    """One role on a SharedBase: its own parameters are its adapter's (and a value head), so an engine built on it
    updates, casts, clips and saves only those; forwards go through the shared base under its adapter."""

    def __init__(self, shared: SharedBase, adapter: str | None, value_head: torch.nn.Module | None = None, *,
                 owner: bool = False):
        """owner: the base is this view's submodule (ZeRO-3: the engine that shards the base must hold it in its
        module tree; its optimizer still takes only the parameters that require grad)."""
        super().__init__()
        self.__dict__["shared"] = shared
        if owner:
            self.base = shared.model  # ZeRO-3's engine shards it and gathers it around every forward
        self.adapter = adapter
        pairs = shared.params(adapter) if adapter is not None else []
        self.adapter_keys = [k for k, _ in pairs]
        self.adapter_params = torch.nn.ParameterList([p for _, p in pairs])
        self.score = value_head
        self.train(False)

    # -- what the stages call ----------------------------------------------------------------------

    def enter(self) -> None:
        """This role's adapter active, and the base's dropout mode this view's."""
        self.shared.switch(self.adapter)
        if self.shared.model.training != self.training:
            self.shared.model.train(self.training)

    def forward(self, *args, **kwargs):
        self.enter()
        if self.score is None:
            return self.shared.model(*args, **kwargs)
        hidden = self.shared.model.base_model(*args, **kwargs).last_hidden_state
        return ValueOutput(self.score(hidden))

    @property
    def base_model(self):
        return _Body(self)

    @property
    def config(self):
        return self.shared.model.config

    def get_output_embeddings(self):
        return self.shared.model.get_output_embeddings()

    def set_attn_implementation(self, impl: str):
        return self.shared.model.set_attn_implementation(impl)

    def generate(self, *args, **kwargs):
        self.enter()
        return self.shared.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, **_):
        self.shared.enable_gradient_checkpointing()

    def sync_parameters(self) -> list[tuple[str, MergedParameter]]:
        """What a sampler serves for this role: the plain model's parameters, merged when read."""
        return self.shared.merged_parameters(self.adapter)

    # -- its own state: the adapter (peft keys) and the value head -------------------------------------

    def own_parameters(self) -> list[torch.nn.Parameter]:
        """The role's own weights: its adapter's, and the value head's."""
        return list(self.adapter_params) + (list(self.score.parameters()) if self.score is not None else [])

    def state_dict(self, *args, keep_vars: bool = False, **kwargs) -> dict:  # noqa: ARG002 - nn.Module's signature
        out = {k: (p if keep_vars else p.detach()) for k, p in zip(self.adapter_keys, self.adapter_params)}
        if self.score is not None:
            out.update({f"score.{k}": (v if keep_vars else v.detach())
                        for k, v in self.score.state_dict(keep_vars=True).items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):  # noqa: ARG002
        for k, p in zip(self.adapter_keys, self.adapter_params):
            p.copy_(state[k])
        if self.score is not None:
            for k, v in self.score.state_dict(keep_vars=True).items():
                v.copy_(state[f"score.{k}"])

    def save_pretrained(self, path: str, safe_serialization: bool = True, state_dict: dict | None = None,  # noqa: ARG002
                        **_) -> None:
        """peft's adapter directory (adapter_config.json, adapter_model.safetensors; value_head.safetensors for a
        critic), from `state_dict` (an engine's: fp32 masters) or the view's own weights."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        os.makedirs(path, exist_ok=True)
        adapter = {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith("score.")}
        save_file(adapter, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = self.shared.configs[self.adapter].to_dict()
        config.update(base_model_name_or_path=self.shared.label, inference_mode=True)
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=1, default=str)
        head = {k[len("score."):]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("score.")}
        if head:
            save_file(head, os.path.join(path, VALUE_HEAD), metadata={"format": "pt"})


def value_head(hidden_size: int, state: dict | None = None) -> torch.nn.Linear:
    """The critic's scalar head on the shared body: zero at the start (the first values are 0, a neutral baseline)
    unless `state` holds a trained one."""
    head = torch.nn.Linear(hidden_size, 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    if state is not None:
        head.load_state_dict(state)
    return head
