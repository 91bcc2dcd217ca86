"""mlxpost: post-training for MLX (LoRA SFT on a shared core; preference and RL methods build on it)."""

__version__ = "0.1.0"
