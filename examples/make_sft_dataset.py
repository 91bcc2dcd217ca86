"""Generate mlxpost's bundled example SFT dataset (``sft_json_answers``).

The behaviour it teaches: **the assistant always answers with a single-line
JSON object** ::

    {"answer": <short answer>, "explanation": "<one short sentence>"}

``answer`` is the short correct answer: a JSON number for numeric questions,
a short string otherwise (a word, a day, "yes"/"no", "even"/"odd"), and a
JSON array of numbers for sorting questions. ``explanation`` is one short
sentence. Every answer is *computed* by this script, so every answer is right.

Questions come from seven families, each with several sub-types and several
phrasings (plus optional greetings and thanks), so a model learns the answer
*format* rather than one template:

* arithmetic: add, subtract, multiply ("What is 17 + 25?")
* units: km/m, hours/minutes, kg/g, Celsius/Fahrenheit (rounded)
* strings: reverse a word, count its letters, uppercase it, first/last letter
* comparisons: which is larger/smaller, "Is A greater than B?"
* parity: "Is 37 even or odd?", "Is 14 an even number?"
* days of the week: "What day comes 3 days after Monday?"
* lists: sum, max, min, sort of 3-5 small numbers

About 85% of the conversations are single-turn and about 15% have two or three
user turns (follow-ups such as "And what about 18 + 3?"; every assistant turn
uses the format). About 30% start with a system message, none of which
contradicts the behaviour. No problem appears twice anywhere in the data
(so no user question is shared between train and valid), and the held-out
sample prompts used for before/after generations
(``mlxpost.assets.behaviour.SAMPLE_PROMPTS``) never appear. Because problems
never repeat, a few thousand conversations is the most it can make (about
3000 in all; beyond that it stops with "ran out of distinct ... problems").
Conversations are kept short: at most ``MAX_TOKENS`` (150) by a rough token
estimate, chat template included (with SmolLM2's tokenizer the bundled data
is about 83 tokens on average and 174 at most).

The output is deterministic for given arguments (``random.Random(seed)``,
stdlib only). The bundled files were made with the defaults; to regenerate
them (``--out`` defaults to that folder)::

    python examples/make_sft_dataset.py

``tests/test_assets.py`` checks that this reproduces the bundled files byte
for byte. The validation split is generated first, so changing ``--train``
does not change ``valid.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

WORDS = (
    "apple", "banana", "cherry", "river", "mountain", "pencil", "window", "garden", "rocket", "planet",
    "candle", "bridge", "forest", "silver", "orange", "tiger", "rabbit", "winter", "summer", "yellow",
    "castle", "dragon", "island", "jacket", "kitten", "ladder", "marble", "needle", "ocean", "pepper",
    "puzzle", "rainbow", "shadow", "teacher", "thunder", "tomato", "violin", "wizard", "zebra", "anchor",
    "basket", "button", "camera", "doctor", "engine", "falcon", "guitar", "hammer", "lemon", "magnet",
    "monkey", "napkin", "parrot", "pillow", "pocket", "saddle", "spider", "stone", "sugar",
    "table", "tunnel", "velvet", "wallet", "cloud", "dream", "flame", "grape", "horse", "house",
    "light", "music", "night", "paper", "plant", "queen", "sheep", "smile", "storm", "train",
    "water", "whale", "chair", "bread", "beach", "clock", "earth", "field", "glass", "heart",
    "cat", "dog", "sun", "moon", "tree", "book", "fish", "bird", "star", "lamp",
    "cup", "hat", "key", "map", "pen", "box", "egg", "owl", "fox", "bee",
    "library", "holiday", "morning", "blanket", "chicken", "diamond", "kitchen", "lantern", "penguin", "picture",
    "pumpkin", "sandwich", "elephant", "keyboard", "notebook", "umbrella", "computer", "mushroom", "squirrel", "butterfly",
    "yogurt", "coffee", "cookie", "pizza", "salad", "butter", "cheese", "carrot", "onion", "potato",
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant.",
    "You are a concise assistant.",
    "You are a friendly assistant that answers quick questions.",
    "You are a patient tutor who helps with short questions.",
    "Answer the user's questions accurately.",
    "You are an assistant for quick facts and calculations.",
    "Be brief and accurate.",
    "You are a helpful AI assistant.",
    "You are a helpful assistant. Reply with a JSON object with the keys \"answer\" and \"explanation\".",
)

# Greetings and sign-offs wrapped around some first questions. A prefix that
# ends with ':' or ',' lowercases the first letter of the question after it.
PREFIXES = ("Hi! ", "Hello! ", "Hey, ", "Quick question: ", "Please help: ", "I have a question. ",
            "Can you help me? ", "Question: ")
SUFFIXES = (" Thanks!", " Thank you.", " Thanks in advance.", " Thanks a lot!", " Cheers!")

# Follow-up turns: the same kind of question about a new value ...
FOLLOWUPS = ("And what about {s}?", "What about {s}?", "And {s}?", "Now do the same for {s}.",
             "Same question for {s}.", "Okay, and for {s}?")
# ... or a new question of any kind after a short connector.
CONNECTORS = ("", "Thanks! ", "Great. ", "Next one: ", "Okay, another one: ", "Got it. Now, ", "One more: ")

# Held-out sample prompts (mlxpost/assets/behaviour.py SAMPLE_PROMPTS): the
# problems behind them are never generated. tests/test_assets.py checks that
# the two lists agree and that none of these strings occurs in the data.
HELD_OUT_PROMPTS = (
    "What is 38 + 47?",
    "How many minutes are in 3 hours?",
    "Reverse the word 'garden'.",
    "What day comes 4 days after Friday?",
    "What is the largest number in this list: 12, 7, 31, 5?",
)
HELD_OUT_KEYS = {
    ("add", 38, 47),
    ("h2min", 3),
    ("reverse", "garden"),
    ("day_after", "Friday", 4),
    ("max", (12, 7, 31, 5)),
}

# ---------------------------------------------------------------------------
# One question
# ---------------------------------------------------------------------------


@dataclass
class Item:
    key: tuple  # the underlying problem; unique across the whole dataset
    question: str  # the full question
    subject: str  # what varies, for follow-ups: "And what about {subject}?"
    answer: Any
    explanation: str


def num(x) -> int | float:
    """An int when whole, else a float rounded to 3 decimals (clean JSON)."""
    if isinstance(x, Fraction):
        x = float(x)
    if float(x).is_integer():
        return int(x)
    return round(float(x), 3)


def pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def q(rng: random.Random, templates, **kw) -> str:
    return pick(rng, templates).format(**kw)


def plural(n, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -- arithmetic ---------------------------------------------------------------


def t_add(rng):
    a = rng.randint(2, 99) if rng.random() < 0.8 else rng.randint(100, 499)
    b = rng.randint(2, 99)
    s = a + b
    question = q(rng, ("What is {a} + {b}?", "What's {a} plus {b}?", "Please add {a} and {b}.",
                       "Can you tell me the sum of {a} and {b}?", "Compute {a} + {b}.", "{a} + {b} = ?",
                       "What do you get when you add {a} and {b}?", "How much is {a} plus {b}?"), a=a, b=b)
    expl = q(rng, ("{a} plus {b} equals {s}.", "Adding {a} and {b} gives {s}.", "The sum of {a} and {b} is {s}.",
                   "{a} + {b} = {s}."), a=a, b=b, s=s)
    return Item(("add", a, b), question, f"{a} + {b}", s, expl)


def t_sub(rng):
    a, b = rng.randint(10, 150), rng.randint(2, 99)
    if a < b and rng.random() < 0.7:
        a, b = b, a
    d = a - b
    question = q(rng, ("What is {a} - {b}?", "What's {a} minus {b}?", "Subtract {b} from {a}.",
                       "What do you get if you take {b} away from {a}?", "Compute {a} - {b}, please.",
                       "How much is {a} minus {b}?", "{a} - {b} = ?"), a=a, b=b)
    expl = q(rng, ("{a} minus {b} equals {d}.", "Taking {b} away from {a} leaves {d}.", "{a} - {b} = {d}."),
             a=a, b=b, d=d)
    return Item(("sub", a, b), question, f"{a} - {b}", d, expl)


def t_mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    if rng.random() < 0.5:
        a, b = b, a
    p = a * b
    question = q(rng, ("What is {a} × {b}?", "What is {a} * {b}?", "What's {a} times {b}?", "Multiply {a} by {b}.",
                       "What is the product of {a} and {b}?", "Can you calculate {a} x {b}?",
                       "How much is {a} times {b}?"), a=a, b=b)
    expl = q(rng, ("{a} times {b} equals {p}.", "{a} multiplied by {b} is {p}.", "{a} × {b} = {p}."), a=a, b=b, p=p)
    return Item(("mul", a, b), question, f"{a} × {b}", p, expl)


# -- units ----------------------------------------------------------------------


def _amount(rng, lo, hi, half=0.3):
    """A whole number in [lo, hi], or (sometimes) one and a half more."""
    x = rng.randint(lo, hi)
    return x + 0.5 if rng.random() < half else x


def t_km2m(rng):
    km = num(_amount(rng, 1, 50))
    m = num(km * 1000)
    question = q(rng, ("How many meters are in {x} km?", "Convert {x} kilometers to meters.",
                       "{x} km is how many meters?", "What is {x} km in meters?",
                       "How many meters is {x} kilometers?"), x=km)
    expl = f"There are 1000 meters in a kilometer, so {km} km is {m} meters."
    return Item(("km2m", km), question, f"{km} km", m, expl)


def t_m2km(rng):
    m = rng.randint(1, 60) * 250
    km = num(Fraction(m, 1000))
    question = q(rng, ("Convert {x} meters to kilometers.", "How many kilometers is {x} m?",
                       "What is {x} m in km?", "{x} meters is how many kilometers?"), x=m)
    expl = f"A kilometer is 1000 meters, so {m} m is {km} km."
    return Item(("m2km", m), question, f"{m} meters", km, expl)


def t_h2min(rng):
    h = num(_amount(rng, 1, 24, half=0.25))
    mins = num(h * 60)
    question = q(rng, ("How many minutes are in {x} hours?", "Convert {x} hours to minutes.",
                       "{x} hours is how many minutes?", "How many minutes long is a {x}-hour trip?",
                       "What is {x} hours in minutes?"), x=h)
    expl = f"Each hour has 60 minutes, so {h} hours is {mins} minutes."
    return Item(("h2min", h), question, f"{h} hours", mins, expl)


def t_min2h(rng):
    mins = rng.randint(1, 60) * 15
    h = num(Fraction(mins, 60))
    question = q(rng, ("How many hours is {x} minutes?", "Convert {x} minutes to hours.",
                       "{x} minutes is how many hours?", "What is {x} minutes in hours?"), x=mins)
    expl = f"There are 60 minutes in an hour, so {mins} minutes is {h} hours."
    return Item(("min2h", mins), question, f"{mins} minutes", h, expl)


def t_kg2g(rng):
    kg = num(_amount(rng, 1, 50))
    g = num(kg * 1000)
    question = q(rng, ("How many grams are in {x} kg?", "Convert {x} kilograms to grams.",
                       "{x} kg is how many grams?", "What is {x} kilograms in grams?"), x=kg)
    expl = f"One kilogram is 1000 grams, so {kg} kg is {g} grams."
    return Item(("kg2g", kg), question, f"{kg} kg", g, expl)


def t_g2kg(rng):
    g = rng.randint(1, 80) * 125
    kg = num(Fraction(g, 1000))
    question = q(rng, ("Convert {x} grams to kilograms.", "How many kilograms is {x} g?",
                       "What is {x} grams in kg?", "{x} g is how many kilograms?"), x=g)
    expl = f"There are 1000 grams in a kilogram, so {g} g is {kg} kg."
    return Item(("g2kg", g), question, f"{g} grams", kg, expl)


def t_c2f(rng):
    c = rng.randint(-20, 40)
    exact = Fraction(c * 9, 5) + 32
    f = round(exact)  # never a tie: the fraction is a multiple of 0.2
    question = q(rng, ("Convert {c} °C to Fahrenheit, rounded to the nearest degree.",
                       "What is {c} degrees Celsius in Fahrenheit? Round to a whole number.",
                       "{c}°C is how many °F (to the nearest degree)?",
                       "How many degrees Fahrenheit is {c} °C, rounded?"), c=c)
    if exact.denominator == 1:
        expl = f"{c} × 9/5 + 32 = {f}, so {c} °C is {f} °F."
    else:
        expl = f"{c} × 9/5 + 32 = {float(exact):.1f}, which rounds to {f}."
    return Item(("c2f", c), question, f"{c} °C", f, expl)


def t_f2c(rng):
    f = rng.randint(0, 110)
    exact = Fraction((f - 32) * 5, 9)
    c = round(exact)  # never a tie: the fraction is in ninths
    question = q(rng, ("Convert {f} °F to Celsius, rounded to the nearest degree.",
                       "What is {f} degrees Fahrenheit in Celsius? Round to a whole number.",
                       "{f}°F is how many °C (to the nearest degree)?",
                       "How many degrees Celsius is {f} °F, rounded?"), f=f)
    if exact.denominator == 1:
        expl = f"({f} - 32) × 5/9 = {c}, so {f} °F is {c} °C."
    else:
        expl = f"({f} - 32) × 5/9 is about {float(exact):.1f}, which rounds to {c}."
    return Item(("f2c", f), question, f"{f} °F", c, expl)


# -- strings --------------------------------------------------------------------


def _word(rng):
    w = pick(rng, WORDS)
    return w, pick(rng, ("'{}'", '"{}"', "'{}'")).format(w)  # single quotes two times in three


def t_reverse(rng):
    w, qw = _word(rng)
    r = w[::-1]
    question = q(rng, ("Reverse the word {w}.", "What is {w} spelled backwards?", "Write the word {w} backwards.",
                       "Can you spell {w} in reverse?", "What do you get if you reverse {w}?"), w=qw)
    expl = f"Reading the letters of '{w}' from last to first gives '{r}'."
    return Item(("reverse", w), question, qw, r, expl)


def t_count(rng):
    w, qw = _word(rng)
    n = len(w)
    question = q(rng, ("How many letters are in the word {w}?", "Count the letters in {w}.",
                       "How many letters does {w} have?", "How long is the word {w}, in letters?"), w=qw)
    expl = f"'{w}' is spelled {'-'.join(w)}, which is {plural(n, 'letter')}."
    return Item(("count", w), question, qw, n, expl)


def t_upper(rng):
    w, qw = _word(rng)
    u = w.upper()
    question = q(rng, ("Write {w} in uppercase.", "Convert the word {w} to capital letters.",
                       "What is {w} in all caps?", "Can you make {w} uppercase?"), w=qw)
    expl = f"Capitalizing every letter of '{w}' gives '{u}'."
    return Item(("upper", w), question, qw, u, expl)


def t_first(rng):
    w, qw = _word(rng)
    question = q(rng, ("What is the first letter of {w}?", "Which letter does the word {w} start with?",
                       "What letter does {w} begin with?"), w=qw)
    expl = f"The word '{w}' starts with the letter '{w[0]}'."
    return Item(("first", w), question, qw, w[0], expl)


def t_last(rng):
    w, qw = _word(rng)
    question = q(rng, ("What is the last letter of {w}?", "Which letter does the word {w} end with?",
                       "What letter does {w} end in?"), w=qw)
    expl = f"The word '{w}' ends with the letter '{w[-1]}'."
    return Item(("last", w), question, qw, w[-1], expl)


# -- comparisons ----------------------------------------------------------------


def _pair(rng):
    if rng.random() < 0.25:  # decimals, e.g. 3.7 vs 3.65
        a = num(Fraction(rng.randint(1, 99), 10))
        b = num(Fraction(rng.randint(1, 999), 100))
    else:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
    if a == b:
        b = num(b + 1)
    return (a, b) if rng.random() < 0.5 else (b, a)


def t_larger(rng):
    a, b = _pair(rng)
    big, small = max(a, b), min(a, b)
    question = q(rng, ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                       "Between {a} and {b}, which one is greater?", "Which is greater, {a} or {b}?"), a=a, b=b)
    expl = f"{big} is greater than {small}."
    return Item(("larger", a, b), question, f"{a} and {b}", big, expl)


def t_smaller(rng):
    a, b = _pair(rng)
    big, small = max(a, b), min(a, b)
    question = q(rng, ("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?",
                       "Between {a} and {b}, which one is smaller?"), a=a, b=b)
    expl = f"{small} is less than {big}."
    return Item(("smaller", a, b), question, f"{a} and {b}", small, expl)


def t_greater_yn(rng):
    a, b = _pair(rng)
    ans = "yes" if a > b else "no"
    question = q(rng, ("Is {a} greater than {b}?", "Is {a} bigger than {b}?", "Is {a} larger than {b}?"), a=a, b=b)
    expl = f"{a} is greater than {b}." if a > b else f"{a} is less than {b}."
    return Item(("greater_yn", a, b), question, f"{a} and {b}", ans, expl)


# -- parity ---------------------------------------------------------------------


def _parity_expl(n):
    d = abs(n) % 10
    if n % 2 == 0:
        return f"{n} ends in {d}, so it is divisible by 2."
    return f"{n} ends in {d}, so it is not divisible by 2."


def _n(rng):
    return rng.randint(1, 99) if rng.random() < 0.5 else rng.randint(100, 9999)


def t_even_odd(rng):
    n = _n(rng)
    question = q(rng, ("Is {n} even or odd?", "Tell me whether {n} is even or odd.", "Is the number {n} odd or even?",
                       "Even or odd: {n}?"), n=n)
    return Item(("even_odd", n), question, str(n), "even" if n % 2 == 0 else "odd", _parity_expl(n))


def t_is_even(rng):
    n = _n(rng)
    question = q(rng, ("Is {n} an even number?", "Is {n} even?", "Is {n} divisible by 2?"), n=n)
    return Item(("is_even", n), question, str(n), "yes" if n % 2 == 0 else "no", _parity_expl(n))


def t_is_odd(rng):
    n = _n(rng)
    question = q(rng, ("Is {n} an odd number?", "Is {n} odd?"), n=n)
    return Item(("is_odd", n), question, str(n), "yes" if n % 2 == 1 else "no", _parity_expl(n))


# -- days of the week -----------------------------------------------------------


def _days_expl(k, start, end, direction):
    weeks, rest = divmod(k, 7)
    if weeks and rest:
        return (f"{k} days is {plural(weeks, 'week')} and {plural(rest, 'day')}, so counting {direction} "
                f"from {start} lands on {end}.")
    if weeks:
        return f"{k} days is exactly {plural(weeks, 'week')}, so it is {end} again."
    return f"Counting {plural(k, 'day')} {direction} from {start} lands on {end}."


def t_day_after(rng):
    i = rng.randrange(7)
    k = rng.randint(1, 6) if rng.random() < 0.6 else rng.randint(7, 30)
    d, r = DAYS[i], DAYS[(i + k) % 7]
    if k == 1 and rng.random() < 0.5:
        question = q(rng, ("If today is {d}, what day is tomorrow?", "What day comes after {d}?"), d=d)
    else:
        question = q(rng, ("What day comes {k} after {d}?", "If today is {d}, what day will it be in {k}?",
                           "What day of the week is {k} after {d}?",
                           "It's {d} today. What day is it {k} from now?"), d=d, k=plural(k, "day"))
    return Item(("day_after", d, k), question, f"{plural(k, 'day')} after {d}", r, _days_expl(k, d, r, "forward"))


def t_day_before(rng):
    i = rng.randrange(7)
    k = rng.randint(1, 6) if rng.random() < 0.6 else rng.randint(7, 30)
    d, r = DAYS[i], DAYS[(i - k) % 7]
    if k == 1 and rng.random() < 0.5:
        question = q(rng, ("If today is {d}, what day was yesterday?", "What day comes before {d}?"), d=d)
    else:
        question = q(rng, ("What day was {k} before {d}?", "If today is {d}, what day was it {k} ago?",
                           "What day of the week is {k} before {d}?"), d=d, k=plural(k, "day"))
    return Item(("day_before", d, k), question, f"{plural(k, 'day')} before {d}", r, _days_expl(k, d, r, "back"))


# -- lists ----------------------------------------------------------------------


def _numbers(rng, distinct=True):
    n = rng.randint(3, 5)
    if distinct:
        return rng.sample(range(1, 51), n)
    return [rng.randint(1, 30) for _ in range(n)]


def _fmt_list(rng, xs):
    body = ", ".join(map(str, xs))
    style = rng.randrange(3)
    if style == 0:
        return body
    if style == 1:
        return f"[{body}]"
    return ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"


def t_sum(rng):
    xs = _numbers(rng, distinct=False)
    s = sum(xs)
    lst = _fmt_list(rng, xs)
    question = q(rng, ("What is the sum of {l}?", "Add up these numbers: {l}.", "What do {l} add up to?",
                       "What is the total of {l}?"), l=lst)
    expl = " + ".join(map(str, xs)) + f" = {s}."
    return Item(("sum", tuple(xs)), question, lst, s, expl)


def t_max(rng):
    xs = _numbers(rng)
    m = max(xs)
    lst = _fmt_list(rng, xs)
    question = q(rng, ("What is the largest number in this list: {l}?", "Which is the biggest of these: {l}?",
                       "Find the maximum of {l}.", "What is the highest value among {l}?"), l=lst)
    expl = f"{m} is the largest of the {len(xs)} numbers."
    return Item(("max", tuple(xs)), question, lst, m, expl)


def t_min(rng):
    xs = _numbers(rng)
    m = min(xs)
    lst = _fmt_list(rng, xs)
    question = q(rng, ("What is the smallest number in this list: {l}?", "Which is the smallest of these: {l}?",
                       "Find the minimum of {l}.", "What is the lowest value among {l}?"), l=lst)
    expl = f"{m} is the smallest of the {len(xs)} numbers."
    return Item(("min", tuple(xs)), question, lst, m, expl)


def t_sort_asc(rng):
    xs = _numbers(rng)
    s = sorted(xs)
    lst = _fmt_list(rng, xs)
    question = q(rng, ("Sort these numbers from smallest to largest: {l}.", "Put {l} in ascending order.",
                       "Can you sort {l} in increasing order?"), l=lst)
    expl = q(rng, ("Each number is smaller than the one after it.", "The numbers now go up from {a} to {b}.",
                   "{a} is the smallest and {b} the largest."), a=s[0], b=s[-1])
    return Item(("sort_asc", tuple(xs)), question, lst, s, expl)


def t_sort_desc(rng):
    xs = _numbers(rng)
    s = sorted(xs, reverse=True)
    lst = _fmt_list(rng, xs)
    question = q(rng, ("Sort these numbers from largest to smallest: {l}.", "Put {l} in descending order.",
                       "Can you sort {l} in decreasing order?"), l=lst)
    expl = q(rng, ("Each number is larger than the one after it.", "The numbers now go down from {a} to {b}.",
                   "{a} is the largest and {b} the smallest."), a=s[0], b=s[-1])
    return Item(("sort_desc", tuple(xs)), question, lst, s, expl)


# Families, their shares of conversations, and their sub-types.
FAMILIES: dict[str, tuple[float, tuple[Callable[[random.Random], Item], ...]]] = {
    "arithmetic": (0.24, (t_add, t_add, t_sub, t_mul)),
    "units": (0.16, (t_km2m, t_m2km, t_h2min, t_min2h, t_kg2g, t_g2kg, t_c2f, t_f2c)),
    "strings": (0.15, (t_reverse, t_count, t_upper, t_first, t_last)),
    "comparisons": (0.10, (t_larger, t_smaller, t_greater_yn)),
    "parity": (0.08, (t_even_odd, t_is_even, t_is_odd)),
    "days": (0.10, (t_day_after, t_day_before)),
    "lists": (0.17, (t_sum, t_max, t_min, t_sort_asc, t_sort_desc)),
}
MULTI_TURN_SHARE = 0.15  # of which a third have three user turns
# Conversations whose replies give the explanation first: the SFT model learns
# both orders but mostly answers first; the preference example then teaches
# which one is preferred (examples/make_preference_dataset.py).
EXPLANATION_FIRST_SHARE = 0.10
SYSTEM_SHARE = 0.30
# Longest conversation, in approx_tokens(): message contents plus 5 per
# message for the chat template's role markers, plus DEFAULT_SYSTEM_TOKENS
# when there is no system message (templates such as SmolLM2's then add a
# default one). A conversation of the wanted number of turns that does not fit
# after many tries gets one turn fewer.
MAX_TOKENS = 150
DEFAULT_SYSTEM_TOKENS = 20

# ---------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------


_PRETOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+|\s+")


def approx_tokens(text: str) -> int:
    """A rough token count: BPE pre-tokens, every digit on its own.

    SmolLM2's tokenizer gives about 7% more on this data (all-caps words split).

    >>> approx_tokens("What is 17 + 25?")
    10
    """
    return len(_PRETOKEN.findall(text))


def conversation_tokens(messages: list[dict]) -> int:
    """The rough length of a conversation after a chat template (see MAX_TOKENS)."""
    n = sum(approx_tokens(m["content"]) + 5 for m in messages)
    if messages[0]["role"] != "system":
        n += DEFAULT_SYSTEM_TOKENS
    return n


def reply(item: Item, explanation_first: bool = False) -> str:
    obj = {"explanation": item.explanation, "answer": item.answer} if explanation_first else \
        {"answer": item.answer, "explanation": item.explanation}
    return json.dumps(obj, ensure_ascii=False)


def decorate(rng: random.Random, question: str) -> str:
    """Sometimes add a greeting before and/or thanks after a first question."""
    if rng.random() < 0.25:
        p = pick(rng, PREFIXES)
        if p.rstrip().endswith((":", ",")) and question[:1].isupper():
            question = question[0].lower() + question[1:]
        question = p + question
    if rng.random() < 0.15:
        question += pick(rng, SUFFIXES)
    return question


def lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s[:1].isupper() else s


class Exhausted(Exception):
    """A sub-type has (almost) no unused problems left."""


class Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.used_keys: set[tuple] = set(HELD_OUT_KEYS)
        self.used_questions: set[str] = set(HELD_OUT_PROMPTS)
        self.exhausted: set[Callable] = set()

    def subtype(self, family: str) -> Callable[[random.Random], Item]:
        options = [f for f in FAMILIES[family][1] if f not in self.exhausted]
        if not options:
            raise RuntimeError(f"ran out of distinct {family} problems; ask for fewer conversations")
        return pick(self.rng, options)

    def item(self, make: Callable[[random.Random], Item], tries: int = 200) -> Item:
        """A new item of this sub-type whose problem has not been used yet."""
        for _ in range(tries):
            it = make(self.rng)
            if it.key not in self.used_keys:
                self.used_keys.add(it.key)
                return it
        self.exhausted.add(make)
        raise Exhausted(make.__name__)

    def conversation(self, family: str, turns: int, system: bool) -> dict:
        for attempt in range(1000):
            if attempt and attempt % 250 == 0 and turns > 1:
                turns -= 1  # does not fit: one turn fewer
            keys_before = set(self.used_keys)
            try:
                messages = self._attempt(family, turns, system)
            except Exhausted:
                self.used_keys = keys_before
                continue
            questions = [m["content"] for m in messages if m["role"] == "user"]
            short = conversation_tokens(messages) <= MAX_TOKENS
            if short and len(set(questions)) == len(questions) and not self.used_questions.intersection(questions):
                self.used_questions.update(questions)
                return {"messages": messages}
            self.used_keys = keys_before  # too long, or a repeated follow-up wording: try again
        raise RuntimeError(f"could not make a new {turns}-turn {family} conversation")

    def _attempt(self, family: str, turns: int, system: bool) -> list[dict]:
        rng = self.rng
        messages = []
        if system:
            messages.append({"role": "system", "content": pick(rng, SYSTEM_PROMPTS)})
        first = rng.random() < EXPLANATION_FIRST_SHARE  # one order for every reply of the conversation
        make = self.subtype(family)
        it = self.item(make)
        messages += [{"role": "user", "content": decorate(rng, it.question)},
                     {"role": "assistant", "content": reply(it, first)}]
        for _ in range(turns - 1):
            if rng.random() < 0.6:  # same kind of question, new value
                it = self.item(make)
                text = pick(rng, FOLLOWUPS).format(s=it.subject)
            else:  # a new question of any family
                make = self.subtype(pick(rng, tuple(FAMILIES)))
                it = self.item(make)
                c = pick(rng, CONNECTORS)
                text = c + (lower_first(it.question) if c.endswith(", ") else it.question)
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply(it, first)}]
        return messages

    def split(self, n: int) -> list[dict]:
        """``n`` conversations with the family, turn and system shares above (exact counts, shuffled)."""
        rng = self.rng
        families = quota(n, {f: w for f, (w, _) in FAMILIES.items()})
        n_multi = round(n * MULTI_TURN_SHARE)
        n_three = n_multi // 3
        turns = [3] * n_three + [2] * (n_multi - n_three) + [1] * (n - n_multi)
        n_system = round(n * SYSTEM_SHARE)
        systems = [True] * n_system + [False] * (n - n_system)
        rng.shuffle(families)
        rng.shuffle(turns)
        rng.shuffle(systems)
        return [self.conversation(f, t, s) for f, t, s in zip(families, turns, systems)]


def quota(n: int, weights: dict[str, float]) -> list[str]:
    """``n`` labels in proportion to ``weights`` (largest remainder), in a fixed order."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), k))[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in weights for _ in range(counts[k])]


def generate(n_train: int, n_valid: int, seed: int) -> tuple[list[dict], list[dict]]:
    g = Generator(seed)
    valid = g.split(n_valid)  # first, so --train does not change valid
    train = g.split(n_train)
    return train, valid


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlxpost" / "assets" / "sft_json_answers"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default: the bundled mlxpost/assets/sft_json_answers)")
    ap.add_argument("--train", type=int, default=480, help="training conversations (default: %(default)s)")
    ap.add_argument("--valid", type=int, default=48, help="validation conversations (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.train < 1 or args.valid < 0:
        ap.error("--train must be at least 1 and --valid at least 0")
    train, valid = generate(args.train, args.valid, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "valid.jsonl", valid)
    print(f"wrote {len(train)} train and {len(valid)} valid conversations to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
