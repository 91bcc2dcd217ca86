"""Bundled data: the example SFT dataset and the behaviour it teaches (see :mod:`.behaviour`)."""

from pathlib import Path

DEFAULT_SFT_RECIPE = Path(__file__).parent / "default_sft.yaml"
ARITH_TASKS_DIR = Path(__file__).parent / "arith_tasks"
RECIPES_DIR = Path(__file__).parent / "recipes"  # recipes the package itself runs (the demo); copies in recipes/
