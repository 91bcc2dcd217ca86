"""Runs out to other tools: exports (PEFT, fused, mlx-lm), model cards, and uploads to the Hugging Face Hub."""
