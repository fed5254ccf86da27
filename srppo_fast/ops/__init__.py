"""Numerical ops of the trainer, each a PyTorch reference (the spec, `*_ref`) beside its Triton kernels,
behind one dispatching function: impl="auto" (Triton on CUDA, the reference elsewhere; the
environment variable SRPPO_FAST_IMPL overrides), "torch" or "triton"."""

from .gae import coherent_gae, coherent_gae_ref, gae, gae_ref, masked_whiten, returns_to_go
from .linear_logprobs import linear_token_logprobs, linear_token_logprobs_ref
from .logprobs import token_logprobs, token_logprobs_ref
from .ppo import kl_estimate, policy_loss_ref, ppo_loss, ppo_loss_ref, value_loss, value_loss_ref
from .rewards import coherent_rewards_ref, kl_shaped_rewards_ref, last_index, sequence_rewards_ref

__all__ = ["coherent_gae", "coherent_gae_ref", "coherent_rewards_ref", "gae", "gae_ref", "kl_estimate",
           "kl_shaped_rewards_ref", "last_index", "linear_token_logprobs", "linear_token_logprobs_ref", "masked_whiten",
           "policy_loss_ref", "ppo_loss", "ppo_loss_ref", "returns_to_go", "sequence_rewards_ref", "token_logprobs",
           "token_logprobs_ref", "value_loss", "value_loss_ref"]
