"""Shared fixtures: tiny models in real Hugging Face layout, built once per session.

On Linux the test process re-executes itself with the system OpenBLAS when
one is installed (as the ``mlxpost`` command does), so MLX's matmuls do not
run on the bundled reference BLAS, and MLX's CPU JIT builds vectorized
kernels (``mlxpost.backend.jit``), so the tests run the code paths users get.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

from mlxpost.data.render import Renderer
from mlxpost.model.tiny import build_tiny_model


def pytest_configure(config):
    # Re-exec with OpenBLAS preloaded (see mlxpost.backend.blas). pytest captures
    # the standard streams by now; give them back first, or the new process
    # would write into the capture files.
    from mlxpost.backend import jit
    from mlxpost.backend.blas import fast_blas_env, maybe_reexec

    jit.apply()  # vectorized MLX CPU kernels, as the CLI has them (an environment change, no re-exec)
    if fast_blas_env() and not os.environ.get("MLXPOST_REEXEC"):
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        maybe_reexec()

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir) -> Path:
    """Llama, tied embeddings, ChatML template without generation markers."""
    return build_tiny_model(models_dir / "chatml")


@pytest.fixture(scope="session")
def tiny_model_generation(models_dir) -> Path:
    """Same tokenizer family, ChatML with {% generation %} markers."""
    return build_tiny_model(models_dir / "chatml-generation", template="chatml-generation")


@pytest.fixture(scope="session")
def tiny_model_bos(models_dir) -> Path:
    """Llama-3 style: the template writes BOS and the tokenizer adds one too."""
    return build_tiny_model(models_dir / "llama3", template="llama3")


@pytest.fixture(scope="session")
def tiny_qwen(models_dir) -> Path:
    """Qwen2 architecture (q/k/v biases), untied output head."""
    return build_tiny_model(models_dir / "qwen2", model_type="qwen2", tie_word_embeddings=False)


def prompt_ids(lm, texts) -> list[list[int]]:
    """Token ids of each text rendered as a user prompt (chat template, generation prompt added)."""
    r = Renderer(lm.tokenizer)
    return [r.prompt(t)[0] for t in texts]


def chat(user: str, reply: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": msgs}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        rows.append(chat(f"What is {a} plus {b}?", f"The answer is {a + b}."))
    return rows


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sft_data")
    write_jsonl(d / "train.jsonl", arithmetic_rows(64, seed=0))
    write_jsonl(d / "valid.jsonl", arithmetic_rows(12, seed=1))
    return d


@pytest.fixture(autouse=True)
def _seed():
    from mlxpost.core.logprobs import set_head_chunk_bytes

    mx.random.seed(0)
    yield
    set_head_chunk_bytes(None)  # a run under a tight memory budget lowers it for the process


def mlxpost_env() -> dict:
    """Environment for CLI subprocesses: the repo importable, plain output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic pairs: the right sum in one phrasing against a wrong sum in another.

    Half the rows are strings, half message lists (some with a system message).
    """
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        q, good, bad = f"What is {a} plus {b}?", f"The answer is {a + b}.", f"I think it is {wrong}."
        if i % 2:
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
        else:
            prompt = ([{"role": "system", "content": "Be brief."}] if i % 4 == 0 else []) + [
                {"role": "user", "content": q}]
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pref_data")
    write_jsonl(d / "train.jsonl", preference_rows(48, seed=0))
    write_jsonl(d / "valid.jsonl", preference_rows(12, seed=1))
    return d


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory, tiny_model) -> Path:
    """The demo's stage runs (sft, dpo --from sft, grpo --from dpo, rlvr --from grpo) on the tiny model, two
    steps each, few short RL evaluations."""
    from mlxpost.tools.demo import run_demo
    from mlxpost.ui import NullReporter

    out = tmp_path_factory.mktemp("demo") / "demo"
    run_demo(out, model=str(tiny_model), reporter=NullReporter(),
             extra_sets=["train.steps=2", "lora.num_layers=-1", "grpo.eval_prompts=6", "sample.max_tokens=8",
                         "grpo.max_new_tokens=8"])
    return out
