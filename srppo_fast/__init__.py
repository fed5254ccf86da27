"""srppo-fast: Self-Rewarding PPO — SFT on demonstrations, then PPO with the coherent reward
log pi_SFT(y|x) - log pi_PT(y|x)."""

__version__ = "0.1.0"
