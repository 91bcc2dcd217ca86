"""Run by test_distributed_gradients_are_exact under `mlx.launch -n 2`: one optimizer step
on this rank's half of a fixed batch, then rank 0 saves the adapter weights."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from mlxpost.config import build_config
from mlxpost.core.batches import _stack
from mlxpost.methods import sft
from mlxpost.training.loop import Trainer
from mlxpost.training.pipeline import prepare
from mlxpost.training.rundir import RunDir
from mlxpost.ui import NullReporter


class Fixed:
    epoch_progress = 0.0

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def state(self):
        return {"epoch": 0, "index": 0}


def main(model, data, out, ranks):
    world = mx.distributed.init() if ranks > 1 else None
    rank = world.rank() if world else 0
    cfg = build_config(None, [f"model.path={model}", f"data.path={data}", "data.valid_fraction=0",
                              "train.steps=2", "train.lr=0.5", "data.batching=pad", "train.eval_at_start=false",
                              # SGD without clipping: the update is proportional to the gradient,
                              # so a normalisation error across ranks cannot hide.
                              "train.optimizer=sgd", "train.max_grad_norm=null", "train.schedule=constant"])
    prep = prepare(cfg, NullReporter())  # every rank reads all rows here; we pick shares by hand
    ex = prep.train.examples[:8]
    if world:
        mine = [ex[i] for i in range(8) if i // 2 % 2 == rank]  # rank 0: 0,1,4,5; rank 1: 2,3,6,7
        batches = [_stack([[e] for e in mine[i:i + 2]], 64, 0, packed=False) for i in (0, 2)]
    else:
        batches = [_stack([[e] for e in ex[i:i + 4]], 64, 0, packed=False) for i in (0, 4)]
    tr = Trainer(prep.loaded.model, sft.objective(None), cfg.train, total_steps=2,
                 run=RunDir(Path(out) / f"run{ranks}", writer=rank == 0), reporter=NullReporter(),
                 adapter_cfg=prep.adapter_cfg, world=world)
    result = tr.fit(Fixed(batches), None)
    if rank == 0:
        losses = [h["loss"] for h in result.history if h["kind"] == "train"]
        (Path(out) / f"loss{ranks}.txt").write_text(" ".join(map(str, losses)))
        from mlx.utils import tree_flatten

        np.savez(Path(out) / f"weights{ranks}.npz",
                 **{k: np.array(v) for k, v in tree_flatten(prep.loaded.model.trainable_parameters())})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
