"""Bundled data: the example SFT and preference datasets and the behaviour they teach (see :mod:`.behaviour`),
the arithmetic tasks of online RL, and the recipes the demo runs."""

from pathlib import Path

DEFAULT_SFT_RECIPE = Path(__file__).parent / "default_sft.yaml"
ARITH_TASKS_DIR = Path(__file__).parent / "arith_tasks"  # multi-step tasks (examples/make_arithmetic_tasks.py)
ARITH_FACTS_DIR = Path(__file__).parent / "arith_facts"  # one-step questions sized to a 135M model (--facts)
ARITH_SUMS_DIR = Path(__file__).parent / "arith_sums"  # two-digit sums (--facts --min-operand 10)
# Forty everyday questions with short prose answers (written for mlxpost, unrelated to the bundled tasks): the
# demo's retention check, the perplexity of general text before and after each stage (``ppl:FILE``).
GENERAL_TEXT = Path(__file__).parent / "general_text.jsonl"
RECIPES_DIR = Path(__file__).parent / "recipes"  # recipes the package itself runs (the demo); copies in recipes/
