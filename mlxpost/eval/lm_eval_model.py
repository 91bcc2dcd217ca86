"""An mlxpost model as an lm-evaluation-harness model: its three requests, batched.

lm-eval (EleutherAI's lm-evaluation-harness) turns a task into requests and
asks the model three things; :class:`MlxpostLMMethods` answers them on a
model already in memory (a run directory's adapter stack included):

* ``loglikelihood``: ``(context, continuation) -> (log p, is_greedy)``.
  Requests with the same context are one :class:`mlxpost.eval.loglik.Group`,
  so the choices of a question share one pass over it, and groups are
  batched (:class:`mlxpost.eval.loglik.Scorer`). Tokens as lm-eval's own
  Hugging Face model makes them: trailing spaces of the context move to the
  continuation, the continuation is what ``encode(context + continuation)``
  adds after ``encode(context)``; an empty context is the BOS (or EOS) token;
  a context too long for the model loses its start.
* ``loglikelihood_rolling``: a document's log-probability in windows of the
  model's length (lm-eval's own windowing), each window one request.
* ``generate_until``: greedy (or sampled, when the task asks) completions
  through the batched KV-cached rollout sampler, cut at the task's stop
  strings.

lm-eval is an optional extra: this module imports it only in
:func:`make_lm`, which puts these methods on lm-eval's ``LM`` base class.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, ContextManager

from ..core.sampling import Sampling
from ..data.render import Renderer
from .context import no_progress
from .generation import complete
from .loglik import Group, Scorer


class MlxpostLMMethods:
    """lm-eval's model interface on an mlxpost model (see the module docstring); made an ``LM`` by :func:`make_lm`.

    ``progress(description, total)``: a context manager with ``advance(n)``,
    to show each kind of request's progress. ``chat_template``: what lm-eval
    asks for when a task is run with ``apply_chat_template``.
    """

    def __init__(self, model, tokenizer, *, scorer: Scorer, batch_size: int = 8, max_length: int = 2048,
                 seed: int = 0, progress: Callable[[str, int], ContextManager] | None = None, name: str = "mlxpost"):
        super().__init__()  # lm-eval's LM sets its rank and cache hook
        self.model, self.tok = model, tokenizer
        self.scorer = scorer
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.progress = progress
        self.name = name
        self.renderer = Renderer(tokenizer)
        self.hf = self.renderer.hf
        self.prefix_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.eos_token_id

    # -- tokens ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with one BOS where this tokenizer wants one."""
        return self.renderer.text_ids(text) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` as lm-eval's Hugging Face model splits them."""
        if not context:
            cont = self.hf(continuation, add_special_tokens=False)["input_ids"]
            return ([self.prefix_id], cont) if cont and cont[0] != self.prefix_id else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def _fit(self, ctx: list[int], conts: list[list[int]]) -> list[int]:
        """The context without its start when context and the longest continuation exceed the model's length."""
        over = len(ctx) + max(len(c) for c in conts) - (self.max_length + 1)
        return ctx[max(0, min(over, len(ctx) - 1)):] if over > 0 else ctx

    def _progress(self, what: str, total: int):
        return (self.progress or no_progress)(what, total)

    # -- the three requests ---------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [self.encode_pair(*req.args) for req in requests]
        by_context: dict[tuple, list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(encoded):
            by_context[tuple(ctx)].append(i)
        groups, members = [], []
        for ctx, idx in by_context.items():
            scored = [i for i in idx if encoded[i][1]]  # an empty continuation has log-prob 0
            if scored:
                conts = [encoded[i][1] for i in scored]
                groups.append(Group(self._fit(list(ctx), conts), conts))
                members.append(scored)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        with self._progress("log-likelihoods", len(groups)) as bar:
            scores = self.scorer.score(groups, progress=bar.advance)
        for idx, ss in zip(members, scores):
            for i, s in zip(idx, ss):
                out[i] = (s.logprob, s.greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # lm-eval: an optional extra

        groups, owner = [], []
        for i, req in enumerate(requests):
            ids = self.hf(req.args[0], add_special_tokens=False)["input_ids"]
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_id, max_seq_len=self.max_length, context_len=1)):
                groups.append(Group(ctx, [cont]))
                owner.append(i)
        totals = [0.0] * len(requests)
        with self._progress("rolling log-likelihoods", len(groups)) as bar:
            scores = self.scorer.score(groups, progress=bar.advance)
        for i, ss in zip(owner, scores):
            totals[i] += ss[0].logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        kinds: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            kinds[self._sampling_key(req.args[1])].append(i)
        out = [""] * len(requests)
        with self._progress("generations", len(requests)) as bar:
            for (until, max_new, temperature), idx in kinds.items():
                sampling = Sampling(temperature=temperature, max_new_tokens=max_new, stop=until)
                prompts = [self.encode(requests[i].args[0])[-max(1, self.max_length - max_new):] for i in idx]
                pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else 0
                texts, _ = complete(self.model, self.tok, prompts, sampling, batch_size=self.batch_size,
                                    seed=self.seed, pad_id=pad, progress=bar.advance)
                for i, t in zip(idx, texts):
                    out[i] = t[0]
        return out

    def _sampling_key(self, kwargs: dict[str, Any]) -> tuple:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        stop = tuple(dict.fromkeys(u for u in until if u))  # the end-of-sequence token stops the sampler itself
        max_new = int(kwargs.get("max_gen_toks", 256))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
        return stop, max_new, temperature

    # -- chat templates (tasks run with apply_chat_template) ------------------------------
    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.hf.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=not add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.hf, "name_or_path", self.name)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.hf, "chat_template", None) if chat_template else None


def make_lm(model, tokenizer, **kwargs):
    """An lm-eval ``LM`` instance of :class:`MlxpostLMMethods` (lm-eval imported here: an optional extra)."""
    from lm_eval.api.model import LM  # lm-eval: the eval extra

    class MlxpostLM(MlxpostLMMethods, LM):
        pass

    return MlxpostLM(model, tokenizer, **kwargs)
