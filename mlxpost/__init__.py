"""mlxpost: post-training for MLX (LoRA SFT on a shared core; preference and RL methods build on it).

How it is built::

    data rows ──> render (chat template + loss mask) ──> batches (pad | pack | pairs)
                                                              │
      rollouts (GRPO/RLVR: sample, verify, advantages) ───────┤  another batch source
                                                              ▼
                    the one log-prob function (reference: adapters off, or precomputed)
                                                              │
                    the method's pure loss on arrays ──> loss sum, count, metrics
                                                              │
                    one training loop for all methods (compiled step, accumulation,
                    schedule, evaluation, checkpoints, resume, live display)

What each part owns:

* ``cli/``: the command line, one module per family (``train``: one command per method, ``tools``, ``data``,
  ``sweep``, ``compare``, ``runs``, ``chat``, ``steer``, ``eval``);
* ``config.py``: typed sections (the method's from the method), recipes, precedence, errors with file:line;
* ``methods/``: one module per method (its config section, options, loss and hooks); the families
  ``preference`` and ``online_rl``; the registry;
* ``training/``: the loop, the pipeline every method shares, data by kind, run directories, resume, health
  checks, experiment trackers, the memory budget;
* ``core/``: batches, the forward pass (packing masks, query chunks), log-probs, probes of a model's fast
  paths, generation;
* ``model/``: loading (mlx-lm), the default model, GGUF import (gguf-py), LoRA/DoRA layers, adapter files,
  PEFT import, tiny test models;
* ``data/``: row formats and validation, rendering with loss masks, tokenized examples, dataset conversion,
  Hub datasets (``hf:``);
* ``rl/``: rollouts, the rollout batch source, rewards, verifiers, final answers, plugins, arithmetic tasks;
* ``hub/``: exports (PEFT, fused, mlx, GGUF with our K-quant encoders), model cards, uploads;
* ``eval/``: ``mlxpost eval``: tasks (built-in, lm-eval, local YAML), batched log-likelihoods, the HumanEval
  sandbox, eval.json, baselines and retention, ``train.eval_tasks``;
* ``steer/``: steering hooks (``steered``), vector extraction, sweeps, AQI, abliteration;
* ``tools/``: sweeps, comparisons, the run listing, chat sessions, terminal tables, the demo;
* ``backend/``: BLAS, the JIT flags, CPU kernels, ``doctor``.

A new method is one module in ``methods/`` (its section, defaults, options, objective and hooks) and one line
in ``methods/__init__.py``; the loop, the pipeline, the configuration and the CLI need no change (a test adds
one).
"""

__version__ = "0.1.0"
