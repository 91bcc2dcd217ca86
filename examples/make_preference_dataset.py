"""Generate mlxpost's bundled example preference dataset (``pref_json_answers``).

It is the next stage after the SFT example (``examples/make_sft_dataset.py``,
which teaches the assistant to answer with one-line JSON
``{"answer": ..., "explanation": "..."}``): a preference (DPO/ORPO) dataset
that teaches what the SFT model does not do: **reason before answering**.
Every row has a ``prompt``, a ``chosen`` reply, a ``rejected`` reply and an
extra column ``kind`` naming the failure shown by the rejected reply.

**chosen** is always the correct one-line JSON object with the explanation
*first* and a concise explanation (at most 10 words), e.g. ::

    {"explanation": "17 plus 25 equals 42.", "answer": 42}

so that the model works the answer out before it commits to it. **rejected**
is always answer-first, as the SFT model writes, and shows one of four
failures, a quarter of the rows each (exact counts, shuffled):

* ``answer_first``: the same answer and explanation, in the SFT order (the
  pair differs only in what comes first);
* ``wrong_answer``: a slightly wrong answer (off by 1, 2 or 10, a
  neighbouring day, a flipped yes/no or even/odd, two letters swapped, a wrong
  conversion factor, ...), with an explanation that matches it;
* ``long_explanation``: the right answer, but a padded, repetitive
  explanation of 25 to 45 words;
* ``wrapped``: the right answer, but the JSON inside chatty text ("Sure! Here
  is the answer: {...} Let me know if ...") or a markdown code fence.

Chosen and rejected are never identical.

Questions come from the seven families of the SFT example (its question
makers are reused: arithmetic, units, strings, comparisons, parity, days,
lists, in the same shares). About 80% of the rows are conversational
(``prompt`` a list of messages, ``chosen``/``rejected`` a one-message list
``[{"role": "assistant", "content": ...}]``): about 30% of those start with a
system message and about 15% are multi-turn, with one or two earlier
user/assistant exchanges in the prompt (each earlier assistant turn in the
chosen format). The other 20% use plain strings
(``{"prompt": "...", "chosen": "...", "rejected": "..."}``), so both row forms
are exercised.

``heldout.jsonl`` holds questions for measuring the behaviour before and
after training (``{"prompt", "answer", "family"}``, single-turn, in the
family shares); ``mlxpost.assets.behaviour`` reads them for both the SFT and
the preference example.

No problem appears twice anywhere in the data (so no question is shared
between train, valid and heldout). None of the SFT dataset's problems is used
either: the SFT generator is re-run with its defaults to learn them. The
held-out sample prompts of both examples (``HELD_OUT_PROMPTS``) never appear.
Rows are kept short: prompt plus the longer reply is at most ``MAX_TOKENS``
(130) by the SFT generator's rough estimate, chat template included.

The output is deterministic for given arguments (``random.Random(seed)``,
stdlib only). The bundled files were made with the defaults; to regenerate
them (``--out`` defaults to that folder)::

    python examples/make_preference_dataset.py

``tests/test_assets_pref_behaviour.py`` checks the bundled files. The
validation split is generated first and the held-out questions last, so
changing ``--train`` does not change ``valid.jsonl``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any


def _load_sft_generator():
    """examples/make_sft_dataset.py as a module (its question makers are reused)."""
    name = "make_sft_dataset"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "make_sft_dataset.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up here
        spec.loader.exec_module(mod)
    return sys.modules[name]


sft = _load_sft_generator()
pick, num, plural, quota = sft.pick, sft.num, sft.plural, sft.quota

# The defaults of make_sft_dataset.py: re-running it with these gives the
# problems of the bundled SFT data, which this dataset does not reuse.
SFT_TRAIN, SFT_VALID, SFT_SEED = 480, 48, 0

# Held-out sample prompts (mlxpost/assets/pref_behaviour.py PREF_SAMPLE_PROMPTS,
# checked by tests/test_pref_assets.py): the problems behind them, in either
# operand order and for every parity sub-type, are never generated.
HELD_OUT_PROMPTS = (
    "What is 56 + 29?",
    "What's 93 minus 48?",
    "What is 7 × 14?",
    "Is 731 even or odd?",
    "Is 2046 an even number?",
)
HELD_OUT_KEYS = {
    ("add", 56, 29), ("add", 29, 56),
    ("sub", 93, 48),
    ("mul", 7, 14), ("mul", 14, 7),
    *((kind, n) for kind in ("even_odd", "is_even", "is_odd") for n in (731, 2046)),
}

KINDS = ("answer_first", "wrong_answer", "long_explanation", "wrapped")
STRING_SHARE = 0.20  # rows in the plain-string form
SYSTEM_SHARE = 0.30  # of the conversational rows
MULTI_TURN_SHARE = 0.15  # of the conversational rows; a quarter of them have three user turns
# Longest row: prompt plus the longer reply, by sft.conversation_tokens() (a
# rough estimate, chat template included), which is about 10% under SmolLM2's
# count on this data, and up to 30% under it for code fences and capitals.
MAX_TOKENS = 130
MAX_CHOSEN_WORDS = 10
LONG_WORDS = (25, 45)

# ---------------------------------------------------------------------------
# Concise explanations
# ---------------------------------------------------------------------------

# Per sub-type (the first element of an item's key), templates of at most
# MAX_CHOSEN_WORDS words. {x} is the answer (right or wrong), {o} the other
# number of a pair, {p} "even"/"odd" for yes/no parity answers, {k} "3 days".
SHORT = {
    "add": ("{a} plus {b} equals {x}.", "{a} + {b} = {x}.", "Adding {a} and {b} gives {x}."),
    "sub": ("{a} minus {b} equals {x}.", "{a} - {b} = {x}.", "Taking {b} from {a} leaves {x}."),
    "mul": ("{a} times {b} equals {x}.", "{a} × {b} = {x}.", "{a} multiplied by {b} is {x}."),
    "km2m": ("{a} km is {x} meters.", "Multiply by 1000: {a} km is {x} m."),
    "m2km": ("{a} m is {x} km.", "Divide by 1000: {a} m is {x} km."),
    "h2min": ("{a} hours is {x} minutes.", "Multiply by 60: {a} hours is {x} minutes."),
    "min2h": ("{a} minutes is {x} hours.", "Divide by 60: {a} minutes is {x} hours."),
    "kg2g": ("{a} kg is {x} grams.", "Multiply by 1000: {a} kg is {x} g."),
    "g2kg": ("{a} g is {x} kg.", "Divide by 1000: {a} g is {x} kg."),
    "c2f": ("{a} × 9/5 + 32 rounds to {x}.", "{a} °C is about {x} °F."),
    "f2c": ("({a} - 32) × 5/9 rounds to {x}.", "{a} °F is about {x} °C."),
    "reverse": ("'{a}' backwards is '{x}'.", "Reading '{a}' from the end gives '{x}'."),
    "count": ("'{a}' has {x} letters.", "The word '{a}' has {x} letters."),
    "upper": ("'{a}' in capitals is '{x}'.", "Uppercase '{a}' is '{x}'."),
    "first": ("'{a}' starts with '{x}'.", "The first letter of '{a}' is '{x}'."),
    "last": ("'{a}' ends with '{x}'.", "The last letter of '{a}' is '{x}'."),
    "larger": ("{x} is greater than {o}.", "{x} is the larger number."),
    "smaller": ("{x} is less than {o}.", "{x} is the smaller number."),
    "greater_yn": ("{a} is {rel} {b}.",),
    "even_odd": ("{a} ends in {d}, so it is {x}.", "{a} is an {x} number."),
    "is_even": ("{a} ends in {d}, so it is {p}.", "{a} is an {p} number."),
    "is_odd": ("{a} ends in {d}, so it is {p}.", "{a} is an {p} number."),
    "day_after": ("{k} after {a} is {x}.", "Counting {k} forward from {a} gives {x}."),
    "day_before": ("{k} before {a} is {x}.", "Counting {k} back from {a} gives {x}."),
    "sum": ("The numbers add up to {x}.", "Their total is {x}."),
    "max": ("{x} is the largest number.", "The biggest value is {x}."),
    "min": ("{x} is the smallest number.", "The lowest value is {x}."),
    "sort_asc": ("Smallest first, largest last.", "The numbers now go up from {lo} to {hi}."),
    "sort_desc": ("Largest first, smallest last.", "The numbers now go down from {lo} to {hi}."),
}


def short_explanation(key: tuple, answer: Any, variant: int) -> str:
    """A concise explanation of ``answer`` (right or wrong) to the problem ``key``."""
    kind = key[0]
    f: dict[str, Any] = {"x": answer}
    if kind in ("add", "sub", "mul", "larger", "smaller", "greater_yn"):
        a, b = key[1], key[2]
        f.update(a=a, b=b, o=b if answer == a else a)
        f["rel"] = "greater than" if answer == "yes" else "not greater than"
    elif kind in ("day_after", "day_before"):
        f.update(a=key[1], k=plural(key[2], "day"))
    elif kind in ("sort_asc", "sort_desc"):
        f.update(lo=answer[0], hi=answer[-1])
    elif kind in ("sum", "max", "min"):
        pass
    else:  # units, strings, parity: one value
        f["a"] = key[1]
        if kind in ("even_odd", "is_even", "is_odd"):
            f["d"] = abs(key[1]) % 10
            f["p"] = {"even_odd": answer, "is_even": {"yes": "even", "no": "odd"}.get(answer),
                      "is_odd": {"yes": "odd", "no": "even"}.get(answer)}[kind]
    templates = SHORT[kind]
    return templates[variant % len(templates)].format(**f)


# ---------------------------------------------------------------------------
# Wrong answers
# ---------------------------------------------------------------------------


def _swap_adjacent(rng: random.Random, seq):
    """``seq`` with one pair of adjacent, different elements swapped."""
    spots = [i for i in range(len(seq) - 1) if seq[i] != seq[i + 1]]
    i = pick(rng, spots)
    out = list(seq)
    out[i], out[i + 1] = out[i + 1], out[i]
    return "".join(out) if isinstance(seq, str) else out


def wrong_answer(rng: random.Random, key: tuple, answer: Any) -> Any:
    """A plausible but wrong answer: off by a little, a neighbouring value, a flip."""
    kind = key[0]
    if kind in ("add", "sub", "sum"):
        options = [answer + d for d in (1, -1, 2, -2, 10, -10)]
    elif kind == "mul":
        a, b = key[1], key[2]
        options = [answer + d for d in (1, -1, 2, -2, a, -a, b, -b)]
    elif kind in ("km2m", "kg2g"):  # a wrong factor, or a little off
        options = [num(key[1] * 100), num(answer + 100), num(answer - 100), num(answer + 500)]
    elif kind in ("m2km", "g2kg"):
        x = Fraction(key[1], 1000)
        options = [num(x * 10), num(x + Fraction(1, 2)), num(x - Fraction(1, 2)), num(x + 1)]
    elif kind == "h2min":
        options = [num(key[1] * 100), num(answer + 10), num(answer - 10), num(answer + 30)]
    elif kind == "min2h":
        x = Fraction(key[1], 60)
        options = [num(Fraction(key[1], 100)), num(x + Fraction(1, 2)), num(x - Fraction(1, 2)), num(x + 1)]
    elif kind in ("c2f", "f2c"):
        options = [answer + d for d in (1, -1, 2, -2)]
    elif kind == "reverse":
        options = [_swap_adjacent(rng, answer)]
    elif kind == "count":
        options = [answer + 1, answer - 1]
    elif kind == "upper":
        w = key[1]
        options = [w.capitalize(), w.upper()[:-1] + w[-1]]
    elif kind == "first":
        options = [key[1][1], key[1][-1]]
    elif kind == "last":
        options = [key[1][-2], key[1][0]]
    elif kind in ("larger", "smaller"):
        options = [key[2] if answer == key[1] else key[1]]
    elif kind in ("greater_yn", "is_even", "is_odd"):
        options = [{"yes": "no", "no": "yes"}[answer]]
    elif kind == "even_odd":
        options = [{"even": "odd", "odd": "even"}[answer]]
    elif kind in ("day_after", "day_before"):
        i = sft.DAYS.index(answer)
        options = [sft.DAYS[(i + 1) % 7], sft.DAYS[(i - 1) % 7]]
    elif kind in ("max", "min"):
        xs = sorted(key[1], reverse=kind == "max")
        options = [xs[1]]  # the runner-up
    elif kind in ("sort_asc", "sort_desc"):
        options = [_swap_adjacent(rng, answer)]
    else:
        raise ValueError(f"no wrong answers for {kind!r}")
    positive = isinstance(answer, (int, float)) and not isinstance(answer, bool) and answer > 0
    options = [o for o in options if o != answer and not (positive and o <= 0)]  # no 0 or -3 for a positive answer
    return pick(rng, options)


# ---------------------------------------------------------------------------
# Rejected replies
# ---------------------------------------------------------------------------

OPENERS = (
    "Okay, so let me think about this question very carefully before answering.",
    "This is a good question, so let me explain it step by step.",
    "To answer this, we need to look at the question very carefully.",
    "Let me explain in detail how I got to this answer.",
    "Well, this is actually a fairly simple question to answer.",
    "First of all, it is important to understand what the question is asking.",
)
RESTATES = (
    "In other words, the answer is {ans}.",
    "So the answer is {ans}, just as I said.",
    "That means that the answer is definitely {ans}.",
    "Again, the answer to this question is {ans}.",
    "So, to repeat myself, it is {ans}.",
    "Therefore, the final answer is {ans}.",
)
CLOSERS = (
    "I hope this explanation is clear and helpful.",
    "It is always a good idea to double-check your work.",
    "This is how we can be sure that the answer is correct.",
    "I really hope that this helps you understand the answer.",
    "Questions like this one are very common and quite useful.",
    "It is important to be careful with questions like this.",
)

WRAPPERS = (
    "Sure! Here is the answer: {j} Let me know if you have any other questions.",
    "Of course! Here you go:\n{j}\nHope this helps!",
    "Great question! {j}",
    "{j}\n\nI hope this helps! Let me know if you need anything else.",
    "The answer is {ans}. {j}",
    "Sure, here is my answer in JSON format:\n{j}",
    "```json\n{j}\n```",
    "Here is the answer in JSON:\n\n```json\n{j}\n```",
    "```\n{j}\n```",
    "Sure!\n```json\n{j}\n```\nLet me know if you have more questions.",
)


def answer_text(answer: Any) -> str:
    return ", ".join(map(str, answer)) if isinstance(answer, list) else str(answer)


def words(text: str) -> int:
    return len(text.split())


def long_explanation(rng: random.Random, short: str, answer: Any) -> str:
    """A padded, repetitive explanation of LONG_WORDS words around ``short``."""
    ans = answer_text(answer)
    for _ in range(100):
        target = rng.randint(LONG_WORDS[0], LONG_WORDS[1] - 5)
        restates = [r.format(ans=ans) for r in rng.sample(RESTATES, 3)]
        parts = [pick(rng, OPENERS), short, restates.pop()]  # always repeats the answer at least once
        pads = restates + rng.sample(CLOSERS, 3)
        rng.shuffle(pads)
        for p in pads:
            if words(" ".join(parts)) >= target:
                break
            parts.append(p)
        text = " ".join(parts)
        if LONG_WORDS[0] <= words(text) <= LONG_WORDS[1]:
            return text
    raise RuntimeError(f"could not pad {short!r}")


def json_reply(answer: Any, explanation: str, *, explanation_first: bool = False) -> str:
    """The one-line JSON reply: answer first (the SFT example's order), or the explanation first."""
    obj = {"explanation": explanation, "answer": answer} if explanation_first else \
        {"answer": answer, "explanation": explanation}
    return json.dumps(obj, ensure_ascii=False)


def replies(rng: random.Random, it, kind: str) -> tuple[str, str]:
    """(chosen, rejected) contents for item ``it`` and failure ``kind``."""
    variant = rng.randrange(6)
    short = short_explanation(it.key, it.answer, variant)
    chosen = json_reply(it.answer, short, explanation_first=True)
    if kind == "answer_first":
        rejected = json_reply(it.answer, short)
    elif kind == "wrong_answer":
        bad = wrong_answer(rng, it.key, it.answer)
        rejected = json_reply(bad, short_explanation(it.key, bad, variant))
    elif kind == "long_explanation":
        rejected = json_reply(it.answer, long_explanation(rng, short, it.answer))
    elif kind == "wrapped":
        rejected = pick(rng, WRAPPERS).format(j=json_reply(it.answer, short), ans=answer_text(it.answer))
    else:
        raise ValueError(kind)
    assert chosen != rejected and words(short) <= MAX_CHOSEN_WORDS, (chosen, rejected)
    return chosen, rejected


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


def sft_problems(train: int = SFT_TRAIN, valid: int = SFT_VALID, seed: int = SFT_SEED) -> tuple[set, set]:
    """The problem keys and user questions of the SFT data made with these arguments."""
    g = sft.Generator(seed)
    rows = g.split(valid) + g.split(train)  # the order of sft.generate()
    questions = {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    return set(g.used_keys), questions


class PrefGenerator(sft.Generator):
    """Picks sub-types and unused problems as the SFT generator does; builds preference rows."""

    def __init__(self, seed: int):
        super().__init__(seed)
        keys, questions = sft_problems()
        self.used_keys |= keys | HELD_OUT_KEYS
        self.used_questions |= questions | set(HELD_OUT_PROMPTS)

    def row(self, family: str, kind: str, form: str, turns: int, system: bool) -> dict:
        for attempt in range(1000):
            if attempt and attempt % 250 == 0 and turns > 1:
                turns -= 1  # does not fit: one turn fewer
            keys_before = set(self.used_keys)
            try:
                row, questions, sizes = self._attempt(family, kind, form, turns, system)
            except sft.Exhausted:
                self.used_keys = keys_before
                continue
            if (max(sizes) <= MAX_TOKENS and len(set(questions)) == len(questions)
                    and not self.used_questions.intersection(questions)):
                self.used_questions.update(questions)
                return row
            self.used_keys = keys_before  # too long, or a repeated follow-up wording: try again
        raise RuntimeError(f"could not make a new {turns}-turn {family} row")

    def _attempt(self, family, kind, form, turns, system):
        rng = self.rng
        make = self.subtype(family)
        it = self.item(make)
        if form == "string":
            question = sft.decorate(rng, it.question)
            chosen, rejected = replies(rng, it, kind)
            row = {"prompt": question, "chosen": chosen, "rejected": rejected, "kind": kind}
            user = [{"role": "user", "content": question}]
            sizes = [sft.conversation_tokens(user + [{"role": "assistant", "content": c}]) for c in (chosen, rejected)]
            return row, [question], sizes

        prompt = [{"role": "system", "content": pick(rng, sft.SYSTEM_PROMPTS)}] if system else []
        text = sft.decorate(rng, it.question)
        questions = [text]
        for _ in range(turns - 1):  # earlier exchanges, answered in the concise format
            short = short_explanation(it.key, it.answer, rng.randrange(6))
            prompt += [{"role": "user", "content": text},
                       {"role": "assistant", "content": json_reply(it.answer, short, explanation_first=True)}]
            if rng.random() < 0.6:  # same kind of question, new value
                it = self.item(make)
                text = pick(rng, sft.FOLLOWUPS).format(s=it.subject)
            else:  # a new question of any family
                make = self.subtype(pick(rng, tuple(sft.FAMILIES)))
                it = self.item(make)
                c = pick(rng, sft.CONNECTORS)
                text = c + (sft.lower_first(it.question) if c.endswith(", ") else it.question)
            questions.append(text)
        prompt.append({"role": "user", "content": text})
        chosen, rejected = replies(rng, it, kind)
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}], "kind": kind}
        sizes = [sft.conversation_tokens(prompt + c) for c in (row["chosen"], row["rejected"])]
        return row, questions, sizes

    def split(self, n: int) -> list[dict]:
        """``n`` rows with the family, kind, form, turn and system shares above (exact counts, shuffled)."""
        rng = self.rng
        families = quota(n, {f: w for f, (w, _) in sft.FAMILIES.items()})
        kinds = quota(n, dict.fromkeys(KINDS, 1.0))
        n_string = round(n * STRING_SHARE)
        n_conv = n - n_string
        n_multi = round(n_conv * MULTI_TURN_SHARE)
        n_three = n_multi // 4
        n_system = round(n_conv * SYSTEM_SHARE)
        turns = [3] * n_three + [2] * (n_multi - n_three) + [1] * (n_conv - n_multi)
        systems = [True] * n_system + [False] * (n_conv - n_system)
        for xs in (families, kinds, turns, systems):
            rng.shuffle(xs)
        forms = ["string"] * n_string + ["messages"] * n_conv
        rng.shuffle(forms)
        rows, conv = [], iter(zip(turns, systems))
        for family, kind, form in zip(families, kinds, forms):
            t, s = next(conv) if form == "messages" else (1, False)
            rows.append(self.row(family, kind, form, t, s))
        return rows


    def questions(self, n: int) -> list[dict]:
        """``n`` new single-turn questions in the family shares, with their answers, to measure replies by."""
        rows = []
        families = quota(n, {f: w for f, (w, _) in sft.FAMILIES.items()})
        self.rng.shuffle(families)
        for family in families:
            for _ in range(1000):
                try:
                    it = self.item(self.subtype(family))
                except sft.Exhausted:
                    continue
                question = sft.decorate(self.rng, it.question)
                if question not in self.used_questions:
                    self.used_questions.add(question)
                    rows.append({"prompt": question, "answer": it.answer, "family": family})
                    break
            else:
                raise RuntimeError(f"could not make a new {family} question")
        return rows


def generate(n_train: int, n_valid: int, seed: int, n_heldout: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    g = PrefGenerator(seed)
    valid = g.split(n_valid)  # first, so --train does not change valid
    train = g.split(n_train)
    return train, valid, g.questions(n_heldout)


DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlxpost" / "assets" / "pref_json_answers"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default: the bundled mlxpost/assets/pref_json_answers)")
    ap.add_argument("--train", type=int, default=480, help="training pairs (default: %(default)s)")
    ap.add_argument("--valid", type=int, default=48, help="validation pairs (default: %(default)s)")
    ap.add_argument("--heldout", type=int, default=60, help="held-out questions (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.train < 1 or args.valid < 0:
        ap.error("--train must be at least 1 and --valid at least 0")
    train, valid, heldout = generate(args.train, args.valid, args.seed, args.heldout)
    args.out.mkdir(parents=True, exist_ok=True)
    sft.write_jsonl(args.out / "train.jsonl", train)
    sft.write_jsonl(args.out / "valid.jsonl", valid)
    sft.write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(valid)} valid preference pairs and {len(heldout)} held-out "
          f"questions to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
