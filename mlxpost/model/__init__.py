"""Models: loading with mlx-lm, the built-in default model, GGUF import, LoRA / DoRA layers with the
adapters-off switch, adapter files, PEFT adapters in, and tiny models for tests."""
