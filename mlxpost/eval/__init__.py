"""Capability evaluation: ``mlxpost eval``, the before/after tasks of a training run, retention gates.

* :mod:`.tasks`: task specs and the registry (built-in offline tasks,
  lm-evaluation-harness tasks, local YAML tasks);
* :mod:`.context`: what a task runs in and returns;
* :mod:`.builtin` (arithmetic, perplexity, preference pairs, your JSONL rows),
  :mod:`.humaneval` (with :mod:`.sandbox` for the generated code),
  :mod:`.lmeval` (with :mod:`.lm_eval_model`, our lm-eval model class);
* :mod:`.loglik`: batched log-likelihoods, choices sharing one pass over their
  context; :mod:`.generation`: batched KV-cached sampling;
* :mod:`.stats` (means, standard errors, pass@k), :mod:`.retention`
  (deltas, retention, verdicts);
* :mod:`.run`: targets, eval.json, resume, baselines (:func:`.run.evaluate`);
  :mod:`.stage`: ``train.eval_tasks`` before and after training.
"""
