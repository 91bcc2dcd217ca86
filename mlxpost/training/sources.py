"""A run's data, by kind: rows, preference pairs or prompts, read into batch sources.

A method names the kind of data it trains on (:attr:`mlxpost.methods.base.Method.data`);
the pipeline asks that kind (:func:`data_kind`) to

* read and tokenize the files (or the bundled example) into batch sources
  (:meth:`DataKind.read`), with the rows it adds to the setup table;
* measure the model before and after training (:meth:`DataKind.measure`):
  greedy replies to a few prompts for rows and pairs (and, on the bundled
  data, the behaviour they show), greedy answers to the validation prompts,
  scored by the rewards and the verifier, for prompts;
* put what it measured in the summary (:meth:`DataKind.summarize`).

The kinds know no method by name; what differs between methods of a kind
they ask the method (:meth:`~mlxpost.methods.base.Method.share_prompt`,
:meth:`~mlxpost.methods.base.Method.rollout`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import yaml

from ..assets import ARITH_TASKS_DIR, behaviour, pref_behaviour
from ..core.batches import BatchSource
from ..core.forward import attention_span
from ..core.pairs import PairSource
from ..core.probes import choose_batching, resolve_share_prompt
from ..data.load import (
    DataStats,
    Example,
    load_prompts,
    resolve_data_files,
    split_examples,
    tokenize_file,
    tokenize_pairs_file,
)
from ..data.render import Renderer
from ..errors import MlxpostError
from ..files import read_json
from ..methods.base import from_run
from ..model.adapters import ADAPTER_WEIGHTS, own_adapter_dir
from ..rl.evaluate import evaluate
from ..rl.rewards import RewardSet, parse_reward_option
from ..rl.source import RolloutSource
from ..rl.verifiers import StepVerifier
from ..stats import paired_change
from .samples import run_samples, sample_steering

SHOWN_SAMPLES = 5  # before/after replies printed at the end of a run (all are in samples.json)

if TYPE_CHECKING:
    from ..config import RunConfig
    from .pipeline import Prepared
    from .rundir import RunDir


def pack_length(cfg: RunConfig, examples: list[Example]) -> int:
    """Tokens per packed row: ``data.pack_len``, else the longest example rounded up to 32.

    Attention costs O(row length^2) whatever the mask, so rows no longer than
    the longest example keep packing from paying for attention it discards
    (this matters most on MLX's CPU backend).
    """
    longest = max(len(e) for e in examples)
    if cfg.data.pack_len:
        if cfg.data.pack_len < longest:
            raise MlxpostError(f"data.pack_len={cfg.data.pack_len} is shorter than the longest example ({longest} "
                               "tokens); raise it or lower data.max_seq_len")
        return cfg.data.pack_len
    return min(cfg.data.max_seq_len, -(-longest // 32) * 32)


def warn_data(stats: DataStats, cfg: RunConfig, rep) -> None:
    """Say what reading the data dropped, truncated or skipped."""
    if stats.bad_rows:
        rep.warn(f"skipped {stats.bad_rows} bad rows (data.skip_bad_rows)")
    if stats.truncated:
        rep.warn(f"{stats.truncated} examples were longer than data.max_seq_len={cfg.data.max_seq_len} "
                 "tokens and were truncated (data.overflow=drop drops them instead)")
    if stats.dropped_too_long:
        rep.warn(f"dropped {stats.dropped_too_long} examples longer than data.max_seq_len={cfg.data.max_seq_len}")
    if stats.dropped_no_targets:
        rep.warn(f"dropped {stats.dropped_no_targets} examples with no trained tokens left (for pairs: the "
                 "prompt filled data.max_seq_len)")
    if stats.dropped_identical:
        rep.warn(f"dropped {stats.dropped_identical} pairs whose chosen and rejected answers differ only beyond "
                 f"data.max_seq_len={cfg.data.max_seq_len} tokens (raise it to keep them)")
    if stats.prefix_fallback:
        rep.warn(f"{stats.prefix_fallback} conversations: the chat template rewrites earlier turns, so only "
                 "their final assistant turn is trained on")


def data_stats(files: dict, train: list, valid: list | None, tstats: DataStats, vstats: DataStats | None) -> dict:
    """What data_stats.json records: the files, their statistics, and the examples each split kept."""
    return {"files": {k: str(v) for k, v in files.items()}, "train": tstats.summary(),
            "valid": vstats.summary() if vstats else None, "train_examples": len(train),
            "valid_examples": len(valid or [])}


class DataKind:
    """How the pipeline reads, batches and measures one kind of data (see the module docstring)."""

    name = ""
    bundled: Path  # the bundled example data
    distributed = True  # whether a run of this kind can be split over several processes
    examples = "examples"  # what the setup table calls its examples
    before_file = ""  # where measure() keeps what it found before training (read back by a resumed run)
    after_file = ""  # ... and after training

    def files(self, cfg: RunConfig) -> dict[str, Path]:
        return resolve_data_files(cfg.data.path or self.bundled, cfg.data.valid)

    def longest(self, prep: Prepared, rep) -> int | None:
        """The longest prompt (tokens) the memory plan sizes online RL's training passes by; None: not known
        before :meth:`read` (the plan then uses the configured lengths)."""
        return None

    def read(self, prep: Prepared, rep, *, rank: int, world: int, cache=None) -> None:
        """Fill ``prep``'s batch sources, statistics and setup rows."""
        raise NotImplementedError

    def measure(self, prep: Prepared, rep, rundir: RunDir, when: str) -> Any:
        """What the model does before (``when="before"``) or after training; kept in the run directory."""
        return None

    def scores(self, prep: Prepared, rep) -> dict | None:
        """Held-out figures in the middle of training (``train.measure_every``), or None."""
        return None

    def measured(self, rundir: RunDir, when: str) -> Any:
        """What :meth:`measure` returned, read back from the run directory (None when it is not there)."""
        name = self.before_file if when == "before" else self.after_file
        return rundir.read_json(name) if name else None

    def summarize(self, prep: Prepared, summary: dict, before: Any, after: Any) -> None:
        """Put what :meth:`measure` found in the summary."""


def carried_replies(prep: Prepared, prompts: list[str]) -> tuple[Path, list[str]] | None:
    """The ``--from`` run's replies after its training, when they are this run's replies before it.

    A run trained on top of another starts from that run's model (its
    adapter stack merged into the same base). When that run finished
    (``summary.json``), answered the same prompts after its adapter was last
    written, with the same sampling settings (``sample``, the seed, the
    model's dtype and quantization), sampling again would give the same
    replies up to the float rounding of merging the adapter into the base:
    in the demo's chain the DPO stage's 60 replies before training equalled
    the SFT stage's after, one by one. Anything else (an adapter
    directory, a run resumed since, other settings): None, and the run samples.
    """
    src = from_run(prep.cfg, prep.method)
    if not src:
        return None
    d = Path(src)
    try:
        rows = read_json(d / "samples.json")
        old = yaml.safe_load((d / "config.yaml").read_text())
        weights = own_adapter_dir(d) / ADAPTER_WEIGHTS
        if not (d / "summary.json").exists() or (d / "samples.json").stat().st_mtime < weights.stat().st_mtime:
            return None
    except (OSError, ValueError, yaml.YAMLError, MlxpostError):
        return None
    new = prep.cfg.to_dict()
    if not isinstance(old, dict) or not isinstance(rows, list) or len(rows) != len(prompts):
        return None
    same = [old.get("sample") == new["sample"],
            *((old.get(sec) or {}).get(key) == new[sec][key]
              for sec, key in (("train", "seed"), ("model", "dtype"), ("model", "quantize"),
                               ("model", "quantize_group_size")))]
    if not all(same) or any(not isinstance(r, dict) or r.get("prompt") != p or not isinstance(r.get("after"), str)
                            for r, p in zip(rows, prompts)):
        return None
    return d, [r["after"] for r in rows]


class Rows(DataKind):
    """Rows trained on their completion tokens (SFT): padded or packed batches."""

    name = "sft"
    bundled = behaviour.DATASET_DIR
    before_file = "samples_before.json"
    after_file = "samples.json"
    checks = ("json", "correct")  # what the bundled data teaches, measured on its held-out questions
    pairs = False  # see choose_batching

    def tokenize(self, path, renderer, **kw):
        return tokenize_file(path, renderer, **kw)

    def load(self, cfg: RunConfig, tokenizer, files: dict, rank: int = 0, world: int = 1):
        """Tokenized train and validation examples of this rank, and data statistics."""
        d = cfg.data
        renderer = Renderer(tokenizer, chat_template=d.chat_template, add_eos=d.add_eos)
        # Every rank validates every row (errors are the same everywhere) but renders only its own share.
        shard = (rank, world) if world > 1 else None
        opts = dict(max_seq_len=d.max_seq_len, overflow=d.overflow, skip_bad_rows=d.skip_bad_rows, shard=shard)
        train, tstats = self.tokenize(files["train"], renderer, limit=d.max_examples, **opts)
        valid, vstats = None, None  # None: no validation split (decided alike on every rank)
        if "valid" in files:
            valid, vstats = self.tokenize(files["valid"], renderer, **opts)
        elif d.valid_fraction > 0 and tstats.valid_rows >= 20:
            # Decided on the global row count, so every rank agrees.
            train, valid = split_examples(train, d.valid_fraction, cfg.train.seed, total=tstats.valid_rows)
        return train, valid, data_stats(files, train, valid, tstats, vstats), tstats

    def read(self, prep: Prepared, rep, *, rank: int, world: int, cache=None) -> None:
        cfg, loaded = prep.cfg, prep.loaded
        files = self.files(cfg)
        with rep.status("reading and tokenizing data"):
            def read():
                return self.load(cfg, loaded.tokenizer, files, rank, world)

            train, valid, prep.stats, tstats = (cache.data(cfg, loaded, self.name, files, rank, world, read)
                                                if cache is not None else read())
        warn_data(tstats, cfg, rep)
        if not train:
            raise MlxpostError("no training examples left after reading the data")
        prep.data_path = Path(cfg.data.path) if cfg.data.path else self.bundled
        prep.batching = self.batching(prep, rep)
        prep.train = self.source(prep, train, shuffle=True)
        prep.valid = self.source(prep, valid, shuffle=False) if valid is not None else None

    def batching(self, prep: Prepared, rep) -> str:
        batching = choose_batching(prep.cfg.data.batching, prep.loaded.model, pairs=self.pairs)
        if prep.cfg.data.batching == "auto" and batching == "pad" and (self.pairs or not device_is_cpu()):
            rep.warn("this model does not isolate packed examples; using padded batches")
        return batching

    def source(self, prep: Prepared, examples: list, shuffle: bool) -> BatchSource:
        # Each source sizes its own rows: long validation chats must not widen
        # every training row (that padding costs as much as real tokens).
        cfg, B = prep.cfg, prep.cfg.train.batch_size
        L = pack_length(cfg, examples) if examples else cfg.data.max_seq_len
        bucket = max(64, (B * L // 16) // 64 * 64) if prep.batching == "pack" else 64
        return BatchSource(examples, **self._source_options(prep, B, L, shuffle, bucket))

    @staticmethod
    def _source_options(prep: Prepared, batch_size: int, max_len: int, shuffle: bool, bucket: int) -> dict:
        return dict(mode=prep.batching, batch_size=batch_size, max_len=max_len, pad_id=prep.pad_id,
                    seed=prep.cfg.train.seed, shuffle=shuffle, select_bucket=bucket if prep.split else None)

    # -- before and after --------------------------------------------------------
    def prompts(self, cfg: RunConfig) -> tuple[list[str], list]:
        """The prompts answered before and after training, with their answers (None when unknown).

        ``sample.prompts`` when given; with the bundled data, its held-out
        questions (:data:`mlxpost.assets.behaviour.HELDOUT`); else none.
        """
        if cfg.sample.prompts:
            return [str(p) for p in cfg.sample.prompts], [None] * len(cfg.sample.prompts)
        if cfg.data.path is not None:
            return [], []
        rows = behaviour.heldout_questions()
        return [r["prompt"] for r in rows], [r["answer"] for r in rows]

    def behaviour(self, replies: list[str], answers: list) -> dict[str, list[bool]]:
        """Per check (``self.checks``), its outcome on every reply (``correct``: where the answer is known)."""
        checks = [behaviour.reply_checks(r, a) for r, a in zip(replies, answers)]
        return {name: [c[name] for c in checks if name in c] for name in self.checks}

    def measure(self, prep: Prepared, rep, rundir: RunDir, when: str) -> list[str] | None:
        prompts, _ = self.prompts(prep.cfg)
        if not prompts:
            return None
        model, tok = prep.loaded.model, prep.loaded.tokenizer
        carried = carried_replies(prep, prompts) if when == "before" else None
        if carried is not None:
            rep.info(f"replies before training: those of {carried[0]} after its training (the model this run "
                     "starts from, the same prompts and sampling settings)")
            replies = carried[1]
        else:
            with rep.status(f"answering {len(prompts)} prompts {when} training"):
                replies = run_samples(model, tok, prompts, prep.cfg)
        if when == "before":
            rundir.write_json("samples_before.json", replies)
            return replies
        before = rundir.read_json("samples_before.json")  # also when a resumed run sampled it the first time
        rows = [{"prompt": p, **({"before": b} if before else {}), "after": a}
                for p, b, a in zip(prompts, before or [""] * len(prompts), replies)]
        rundir.write_json("samples.json", rows)
        rep.samples(rows[:SHOWN_SAMPLES])
        if len(rows) > SHOWN_SAMPLES:
            rep.info(f"({SHOWN_SAMPLES} of {len(rows)} shown; all in {rundir.path / 'samples.json'})")
        return replies

    def measured(self, rundir: RunDir, when: str) -> list[str] | None:
        found = super().measured(rundir, when)
        if when == "before" or found is None:
            return found
        ok = isinstance(found, list) and all(isinstance(r, dict) and "after" in r for r in found)
        return [r["after"] for r in found] if ok else None  # samples.json: rows of prompt, before, after

    def scores(self, prep: Prepared, rep) -> dict | None:
        """Each check's rate on the held-out prompts (those with answers, for ``correct``)."""
        prompts, answers = self.prompts(prep.cfg)
        if not prompts or prep.cfg.data.path is not None:
            return None
        with rep.status(f"answering {len(prompts)} held-out prompts"):
            replies = run_samples(prep.loaded.model, prep.loaded.tokenizer, prompts, prep.cfg)
        return {name: sum(v) / len(v) for name, v in self.behaviour(replies, answers).items() if v}

    def summarize(self, prep: Prepared, summary: dict, before, after) -> None:
        """With the bundled data: each check's rate before and after, the change and its 95% interval."""
        if prep.cfg.data.path is not None or not after:
            return
        _, answers = self.prompts(prep.cfg)
        a = self.behaviour(after, answers)
        b = self.behaviour(before, answers) if before and len(before) == len(after) else None
        summary["behaviour"] = {name: paired_change(b[name], a[name]) if b else
                                {"n": len(a[name]), "after": sum(a[name]) / max(len(a[name]), 1)}
                                for name in self.checks if a[name]}


class Pairs(Rows):
    """Preference pairs: the chosen and rejected sides of a batch in one forward pass, packed or padded."""

    name = "pairs"
    bundled = pref_behaviour.DATASET_DIR
    checks = ("explanation_first", "json", "correct")
    examples = "pairs"
    pairs = True

    def tokenize(self, path, renderer, **kw):
        return tokenize_pairs_file(path, renderer, **kw)

    def batching(self, prep: Prepared, rep) -> str:
        batching = super().batching(prep, rep)
        share, note = resolve_share_prompt(prep.method.share_prompt(prep.cfg), prep.loaded.model, batching,
                                           prep.split, prep.cfg.train.grad_checkpoint)
        prep.state["share_prompt"], prep.state["prompt_note"] = share, note
        return batching

    def read(self, prep: Prepared, rep, *, rank: int, world: int, cache=None) -> None:
        super().read(prep, rep, rank=rank, world=world, cache=cache)
        n, total = prep.train.shared_batches()
        note = prep.state.pop("prompt_note")
        if prep.state.pop("share_prompt"):
            note = f"once per pair (both replies after it) in {n} of {total} batches an epoch (where that costs less)"
        prep.rows = [("batching", f"chosen+rejected in one {'packed' if prep.batching == 'pack' else 'padded'} "
                                  "batch"), ("prompt", note)]
        prep.record = {"prompt_shared": prep.train.share_prompt, "prompt_shared_batches": [n, total]}

    def source(self, prep: Prepared, examples: list, shuffle: bool) -> BatchSource:
        cfg, B = prep.cfg, prep.cfg.train.batch_size
        L = pack_length(cfg, examples) if examples else cfg.data.max_seq_len
        # attention_span weighs wide pair rows' attention; the chunk counts the scores a row computes.
        return PairSource(examples, span=attention_span(prep.loaded.model), share_prompt=prep.state["share_prompt"],
                          chunk=prep.chunk, **self._source_options(prep, B, L, shuffle, 64))



class Prompts(DataKind):
    """Prompts of online RL: the batch source samples completions, scores them and batches them itself."""

    name = "prompts"
    bundled = ARITH_TASKS_DIR
    distributed = False  # distributed rollouts are not supported
    examples = "prompts"
    before_file = "rl_eval_before.json"
    after_file = "rl_eval_after.json"

    def longest(self, prep: Prepared, rep) -> int | None:
        """The longest training prompt (tokens), rather than ``grpo.max_prompt_len``. Reads the prompts (kept
        for :meth:`read`)."""
        train = self._load(prep, rep)[0]
        return max((len(p.tokens) for p in train), default=None)

    def _load(self, prep: Prepared, rep) -> tuple:
        """``(train, valid, tstats, vstats, files)``: the tokenized prompts, read once per run."""
        if "prompts" in prep.state:
            return prep.state["prompts"]
        cfg, d, loaded = prep.cfg, prep.cfg.data, prep.loaded
        plan = prep.method.rollout(cfg)
        files = self.files(cfg)
        renderer = Renderer(loaded.tokenizer, chat_template=d.chat_template, add_eos=d.add_eos)
        opts = dict(max_prompt_len=plan.max_prompt_len, skip_bad_rows=d.skip_bad_rows)
        with rep.status("reading prompts"):
            train, tstats = load_prompts(files["train"], renderer, limit=d.max_examples, **opts)
            valid, vstats = [], None
            if "valid" in files:
                valid, vstats = load_prompts(files["valid"], renderer, **opts)
            elif d.valid_fraction > 0 and len(train) >= 20:
                train, valid = split_examples(train, d.valid_fraction, cfg.train.seed, total=tstats.valid_rows)
        if tstats.dropped_too_long:
            rep.warn(f"{tstats.dropped_too_long} prompts longer than grpo.max_prompt_len={plan.max_prompt_len} "
                     "tokens were dropped")
        prep.state["prompts"] = (train, valid, tstats, vstats, files)
        return prep.state["prompts"]

    def read(self, prep: Prepared, rep, *, rank: int, world: int, cache=None) -> None:
        cfg, d, loaded = prep.cfg, prep.cfg.data, prep.loaded
        plan = prep.method.rollout(cfg)  # after the memory plan, which may have set grpo.micro_batch
        train, valid, tstats, vstats, files = self._load(prep, rep)
        prep.state.pop("prompts")
        rewards = RewardSet([parse_reward_option(r) for r in plan.rewards]) if plan.rewards else None
        verifier = StepVerifier(plan.verifier) if plan.verifier else None
        prep.train = RolloutSource(loaded.model, loaded.tokenizer, train, plan.settings, rewards=rewards,
                                   verifier=verifier, split=prep.split, seed=cfg.train.seed, pad_id=prep.pad_id)
        prep.valid = None
        # The micro-batches of one rollout make one optimizer step.
        cfg.train.grad_accum = prep.train.micro_per_step
        prep.stats = data_stats(files, train, valid, tstats, vstats)
        prep.data_path = Path(d.path) if d.path else self.bundled
        prep.batching = "pad"
        s = plan.settings
        filters = "".join(f", {name} {v}" for name, v, off in (("top-k", s.sampling.top_k, 0),
                                                              ("min-p", s.sampling.min_p, 0.0)) if v != off)
        prep.rows = [("rollout", f"{s.prompts_per_step} prompts x {s.group_size} completions, <= "
                                 f"{s.sampling.max_new_tokens} new tokens, T={s.sampling.temperature}, "
                                 f"top-p {s.sampling.top_p}{filters}")]
        prep.state["rl"] = {"eval_rows": valid[: plan.eval_prompts], "rewards": rewards, "verifier": verifier,
                            "settings": s}

    def measure(self, prep: Prepared, rep, rundir: RunDir, when: str) -> dict | None:
        """Greedy answers to the validation prompts, scored (reward, final and step accuracy)."""
        rl = prep.state["rl"]
        if not rl["eval_rows"]:
            return None
        with rep.status(f"answering {len(rl['eval_rows'])} validation prompts ({when} training)"):
            t0 = time.time()
            ev = self._validate(prep)
            ev["seconds"] = round(time.time() - t0, 1)
        shown = ", ".join(f"{k} {ev[k]:.3f}" for k in ("reward", "final_acc", "step_acc") if k in ev)
        rep.info(f"validation ({when} training): {shown}")
        rundir.write_json(f"rl_eval_{when}.json", ev)
        return ev

    def scores(self, prep: Prepared, rep) -> dict | None:
        rl = prep.state["rl"]
        if not rl["eval_rows"]:
            return None
        with rep.status(f"answering {len(rl['eval_rows'])} validation prompts"):
            ev = self._validate(prep)
        return {k: ev[k] for k in ("reward", "final_acc", "step_acc") if k in ev}

    @staticmethod
    def _validate(prep: Prepared) -> dict:
        """Greedy answers to the validation prompts, scored; steered by ``sample.steer`` as the SFT samples are."""
        rl = prep.state["rl"]
        with sample_steering(prep.loaded.model, prep.cfg):
            return evaluate(prep.loaded.model, prep.loaded.tokenizer, rl["eval_rows"], rl["settings"],
                            rewards=rl["rewards"], verifier=rl["verifier"])

    def summarize(self, prep: Prepared, summary: dict, before, after) -> None:
        """The evaluations' means, and (when both ran on the same prompts) each change with its 95% interval."""
        for key, ev in (("eval_before", before), ("eval_after", after)):
            if ev is not None:
                summary[key] = {k: v for k, v in ev.items() if k not in ("samples", "rewards", "finals")}
        if before and after and before.get("n") == after.get("n"):
            summary["eval_change"] = {name: paired_change(before[key], after[key])
                                      for name, key in (("reward", "rewards"), ("final_acc", "finals"))
                                      if before.get(key) and after.get(key)}


KINDS: dict[str, DataKind] = {k.name: k for k in (Rows(), Pairs(), Prompts())}


def data_kind(name: str) -> DataKind:
    try:
        return KINDS[name]
    except KeyError:
        raise MlxpostError(f"unknown kind of data {name!r} (known: {', '.join(KINDS)})") from None


def bundled_data(name: str) -> Path:
    """The bundled example data of a kind (``sft`` rows, preference ``pairs`` or ``prompts``)."""
    return data_kind(name).bundled


def device_is_cpu() -> bool:
    return mx.default_device() == mx.cpu
