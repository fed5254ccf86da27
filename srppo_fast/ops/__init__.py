"""Numerical ops of the trainer, each a PyTorch reference (the spec) behind a dispatching function
(`impl="auto" | "torch"`; the Triton kernels join as another impl)."""

from .gae import gae, gae_ref, masked_whiten, returns_to_go
from .logprobs import token_logprobs, token_logprobs_ref
from .ppo import kl_estimate, policy_loss_ref, ppo_loss, ppo_loss_ref, value_loss, value_loss_ref
from .rewards import coherent_rewards_ref, kl_shaped_rewards_ref, last_index, sequence_rewards_ref

__all__ = ["coherent_rewards_ref", "gae", "gae_ref", "kl_estimate", "kl_shaped_rewards_ref", "last_index",
           "masked_whiten", "policy_loss_ref", "ppo_loss", "ppo_loss_ref", "value_loss", "value_loss_ref", "returns_to_go", "sequence_rewards_ref", "token_logprobs", "token_logprobs_ref"]
