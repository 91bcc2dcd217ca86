"""Time per completion of every built-in reward and verifier on the fuzz cases.

    python benchmarks/bench_scoring.py                  # the fuzz test's cases (seed and count)
    python benchmarks/bench_scoring.py --n 10000 --seed 1
    python benchmarks/bench_scoring.py --repeat 3       # each call timed 3 times, the fastest kept

The cases are those of ``tests/test_rl_scoring_fuzz.py`` (:func:`fuzz_cases`):
hand-made worst cases (``1e4999999``, a hundred 11-digit factors, 100k-
character lines, deep nesting, thousands of ``=``) and random ones (random
code points, random arithmetic in every operator spelling, mutated right
solutions). Each completion is scored alone, the way the RL loop meets a bad
one: a reward is called with a batch of one (``fn([completion], answer=[...])``),
a verifier with that completion and its row. The fuzz test asserts that
nothing raises and every score is in range; this reports how long it takes:
the median, 99th percentile and maximum microseconds per completion, and
which completion was the slowest. A table on stdout and
``benchmarks/results/scoring.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

from mlxpost.rl.rewards import BUILTIN_REWARDS  # noqa: E402
from mlxpost.rl.verifiers import BUILTIN_VERIFIERS


def load_fuzz_module():
    """tests/test_rl_scoring_fuzz.py as a module (it holds the case generator)."""
    spec = importlib.util.spec_from_file_location("_scoring_fuzz_cases", ROOT / "tests" / "test_rl_scoring_fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_calls(call, cases, repeat: int) -> list[float]:
    """Microseconds per case: the fastest of ``repeat`` timings of ``call(completion, row)``."""
    out = []
    for completion, row in cases:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            call(completion, row)
            best = min(best, time.perf_counter() - t0)
        out.append(best * 1e6)
    return out


def describe(text: str) -> str:
    shown = text[:40].encode("unicode_escape").decode("ascii")
    return f"{shown}{'...' if len(text) > 40 else ''} ({len(text)} chars)"


def main(argv: list[str] | None = None) -> int:
    fuzz = load_fuzz_module()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=fuzz.N_RANDOM, help="random cases (besides the hand-made ones)")
    ap.add_argument("--seed", type=int, default=fuzz.SEED)
    ap.add_argument("--repeat", type=int, default=1, help="timings per call; the fastest is kept")
    ap.add_argument("--out", default=str(RESULTS / "scoring.json"))
    args = ap.parse_args(argv)

    cases = fuzz.fuzz_cases(args.n, args.seed)
    calls = {}
    for name, fn in BUILTIN_REWARDS.items():
        calls[f"reward {name}"] = lambda c, row, fn=fn: fn([c], answer=[row["answer"]], numbers=[row["numbers"]])
    for name, fn in BUILTIN_VERIFIERS.items():
        calls[f"verifier {name}"] = lambda c, row, fn=fn: fn(c, answer=row["answer"], numbers=row["numbers"],
                                                                prompt_text="Compute 3 + 4 * 12 - 7.")
    print(f"{len(cases)} completions ({len(fuzz.adversarial_completions())} hand-made, {args.n} random, "
          f"seed {args.seed}), longest {max(len(c) for c, _ in cases)} characters; "
          f"Python {platform.python_version()}, {platform.machine()}")
    header = f"{'function':<28}{'median us':>11}{'p99 us':>11}{'max us':>12}{'total s':>9}  slowest completion"
    print(header)
    print("-" * len(header))
    rows = {}
    for name, call in calls.items():
        us = time_calls(call, cases, args.repeat)
        order = sorted(us)
        slowest = max(range(len(us)), key=us.__getitem__)
        rows[name] = {"median_us": statistics.median(us), "p99_us": order[int(0.99 * (len(order) - 1))],
                      "max_us": order[-1], "total_s": sum(us) / 1e6, "slowest": describe(cases[slowest][0])}
        r = rows[name]
        print(f"{name:<28}{r['median_us']:>11.1f}{r['p99_us']:>11.1f}{r['max_us']:>12.1f}{r['total_s']:>9.3f}  "
              f"{r['slowest']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": {"cases": len(cases), "random": args.n, "seed": args.seed,
                                         "repeat": args.repeat, "python": platform.python_version(),
                                         "machine": platform.machine()},
                               "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
