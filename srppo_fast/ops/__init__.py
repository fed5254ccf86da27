"""Numerical ops of the trainer. Each public op dispatches on `impl` ("auto" | "torch" | ...)."""

from .logprobs import token_logprobs, token_logprobs_ref

__all__ = ["token_logprobs", "token_logprobs_ref"]
