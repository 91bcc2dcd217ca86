"""Generate multi-step arithmetic tasks for RL (GRPO / step-verified RLVR) or SFT.

Each row of ``train.jsonl`` / ``valid.jsonl`` is one expression to compute
step by step ::

    {"prompt": "Compute (3 + 4) * 2 - 5.\\nWork step by step: ...",
     "answer": "9", "numbers": [3, 4, 2, 5],
     "solution": "3 + 4 = 7\\n7 * 2 = 14\\n14 - 5 = 9\\nAnswer: 9"}

Use them with the ``accuracy`` and ``format`` rewards and the ``arithmetic``
step verifier (``mlxpost.rl.rewards``, ``mlxpost.rl.verifiers``). With ``--sft`` the
rows are ``{"prompt": ..., "completion": <solution>}`` for supervised
fine-tuning on the worked solutions instead.

Results are always integers (division only when exact; no negative
intermediate results unless ``--allow-negative``). The output is
deterministic for given arguments; the validation tasks are generated first,
so ``--n`` does not change ``valid.jsonl``, and no task is in both files.

The bundled set (``mlxpost/assets/arith_tasks``) was made with the defaults::

    python examples/make_arithmetic_tasks.py

With ``--facts``: every one-step question ``What is a op b?`` with operands
up to ``--max-operand``, the ``--valid`` ones held out (the bundled
``mlxpost/assets/arith_facts``, sized to a 135M model: about half right
before RL)::

    python examples/make_arithmetic_tasks.py --facts --ops '+*' --max-operand 12 --valid 48 --out mlxpost/assets/arith_facts
    python examples/make_arithmetic_tasks.py --facts --ops '+' --min-operand 10 --max-operand 60 --n 512 \\
        --valid 48 --out mlxpost/assets/arith_sums

Harder tasks, e.g.::

    python examples/make_arithmetic_tasks.py --n 4096 --steps 3 5 --max-operand 50 --ops '+-*/' --out data/arith
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mlxpost.errors import MlxpostError
from mlxpost.rl.tasks import ARITH_TASKS_DIR, fact_questions, write_split, write_task_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ARITH_TASKS_DIR,
                    help="output folder for train.jsonl and valid.jsonl (default: the bundled set)")
    ap.add_argument("--n", type=int, default=512, help="training tasks (default: %(default)s)")
    ap.add_argument("--valid", type=int, default=64, help="validation tasks (default: %(default)s)")
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 3], metavar="N",
                    help="calculations per task: N, or MIN MAX (default: 2 3)")
    ap.add_argument("--max-operand", type=int, default=20, help="numbers are 1..this (default: %(default)s)")
    ap.add_argument("--min-operand", type=int, default=None, help="--facts: the smallest operand (default: 1, 2 for *)")
    ap.add_argument("--ops", default="+-*", help="operators to use, from '+-*/' (default: %(default)s)")
    ap.add_argument("--max-result", type=int, default=None,
                    help="bound on every intermediate result (default: 2 * max-operand**2)")
    ap.add_argument("--allow-negative", action="store_true", help="allow negative intermediate results")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--sft", action="store_true", help="write prompt/completion rows (completion = solution)")
    ap.add_argument("--facts", action="store_true", help="every one-step question instead (--ops, --max-operand, "
                                                         "--valid, --seed)")
    args = ap.parse_args(argv)
    if args.facts:
        try:
            train, valid = fact_questions(ops=args.ops, max_operand=args.max_operand, n_valid=args.valid,
                                          seed=args.seed, min_operand=args.min_operand,
                                          n_train=args.n if "--n" in (argv or sys.argv) else None)
        except MlxpostError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_split(args.out, train, valid)
        print(f"wrote {len(train)} questions to {args.out / 'train.jsonl'} and {len(valid)} to "
              f"{args.out / 'valid.jsonl'}")
        return 0
    try:
        train, valid = write_task_files(args.out, n_train=args.n, n_valid=args.valid, sft=args.sft,
                                        steps=args.steps, max_operand=args.max_operand, ops=args.ops,
                                        seed=args.seed, allow_negative=args.allow_negative,
                                        max_result=args.max_result)
    except MlxpostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} tasks to {train} and {args.valid} to {valid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
