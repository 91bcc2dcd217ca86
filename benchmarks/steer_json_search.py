"""Which steering vector, layers and strength raise SmolLM2-135M's JSON-answer rate? (issue 18's done-when)

The demo's SFT run teaches one-line JSON answers. Its adapters ON vs OFF give
the contrast; the question is whether adding a vector derived from it to the
*base* model (adapters off) makes the base answer in JSON. Searched here:

* vectors (every block, from the 30 even-indexed held-out demo questions):
  ``adapter-last``: adapters on - off at the prompt's last token;
  ``adapter-completion``: adapters on - off, mean over the tokens of the SFT
  model's own greedy replies (the same sequences both sides);
  ``output-contrast``: the base model reading the SFT model's replies minus the
  base model reading its own replies, mean over completion tokens;
* where: one block (several tried), or every block at once with the
  per-block increments ``v_l - v_(l-1)`` (so the shifts add up to ``v_l``);
* strength: for one block ``α · r_l · v/‖v‖`` with ``r_l`` the mean residual
  norm at that block (tokens after the first) -- λ relative to the stream;
  for every block the raw ``λ`` on the increments.

Scored on the 30 odd-indexed held-out questions (greedy, 48 new tokens):
the strict JSON-answer rate (``check_json_answer``) and the share of replies
that start with ``{``, with Wilson 95% intervals.

    python benchmarks/steer_json_search.py --run runs/demo/sft --out benchmarks/results/steer_json_search.json
    python benchmarks/steer_json_search.py --run runs/demo/sft --prompt-only --only-combos \
        --combos 'adapter-last:all:2;adapter-last:24:1'      # steering the prompt's pass only

``--prompt-only`` adds the vectors in the prompt's pass only (``--steer
DIR@λ:prompt``): the decode steps run on the shifted KV cache, unsteered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxpost.assets.behaviour import check_json_answer, heldout_questions
from mlxpost.backend.blas import maybe_reexec
from mlxpost.data.render import Renderer
from mlxpost.model.lora import adapters_off
from mlxpost.stats import rate_interval
from mlxpost.steer.extract import load_for_steering
from mlxpost.steer.hooks import SteerSpec, model_blocks, steered
from mlxpost.steer.scores import is_json_object
from mlxpost.steer.sweep import greedy_replies, residual_norms
from mlxpost.steer.vectors import hidden_states


def score(texts):
    j = sum(map(check_json_answer, texts))
    o = sum(map(is_json_object, texts))
    b = sum(t.lstrip().startswith("{") for t in texts)
    return {"json": j / len(texts), "json_ci": rate_interval(j, len(texts)), "object": o / len(texts),
            "object_ci": rate_interval(o, len(texts)), "brace": b / len(texts), "brace_ci": rate_interval(b, len(texts))}


def main():
    maybe_reexec()  # OpenBLAS preloaded, as the CLI runs (the bundled reference BLAS is ~30x slower)
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default="benchmarks/results/steer_json_search.json")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--n-eval", type=int, default=30)
    ap.add_argument("--single-layers", default="6,12,18,24")
    ap.add_argument("--alphas", default="0.25,0.5,1,2")
    ap.add_argument("--all-lambdas", default="1,2,4")
    ap.add_argument("--combos", default="", help="extra configurations, ';'-separated, each a '+'-sum of "
                    "VECTOR:BLOCK:STRENGTH terms (BLOCK 'all': raw λ on the increments; a block: α relative)")
    ap.add_argument("--only-combos", action="store_true", help="skip the grid, run only --combos")
    ap.add_argument("--cache", help="npz of the replies' vectors and norms (written when missing)")
    ap.add_argument("--prompt-only", action="store_true",
                    help="add every vector at the prompt's positions only (--steer ...:prompt), not while decoding")
    args = ap.parse_args()
    t_all = time.perf_counter()
    loaded = load_for_steering(None, args.run)
    model, tok = loaded.model, loaded.tokenizer
    r = Renderer(tok)
    qs = [q["prompt"] for q in heldout_questions()]
    ext, ev = qs[0::2], qs[1::2][:args.n_eval]
    ext_ids = [r.prompt(q)[0] for q in ext]
    ev_ids = [r.prompt(q)[0] for q in ev]
    n_blocks = len(model_blocks(model))
    layers = list(range(n_blocks))
    pad = r.eos_id or 0
    res = {"run": args.run, "n_eval": len(ev), "max_new_tokens": args.max_new_tokens, "rows": []}

    t0 = time.perf_counter()
    cached = np.load(args.cache, allow_pickle=True) if args.cache and Path(args.cache).exists() else None
    if cached is not None:
        sft_ext, base_ext = list(cached["sft_ext"]), list(cached["base_ext"])
    else:
        sft_ext = greedy_replies(model, tok, ext_ids, 64)
        with adapters_off(model):
            base_ext = greedy_replies(model, tok, ext_ids, 64)
    sft_ev = greedy_replies(model, tok, ev_ids, args.max_new_tokens)
    with adapters_off(model):
        base_ev = greedy_replies(model, tok, ev_ids, args.max_new_tokens)
    res["sft_adapters_on"] = score(sft_ev)
    res["base"] = score(base_ev)
    res["examples"] = {"sft": sft_ev[:3], "base": base_ev[:3]}
    print(f"replies: {time.perf_counter() - t0:.0f}s; SFT on eval {res['sft_adapters_on']}; base {res['base']}",
          flush=True)

    def rows(replies):
        out = []
        for q, a in zip(ext, replies):
            ids, mask, _ = r.render({"prompt": q, "completion": a or " "})
            out.append((ids, next(t for t, m in enumerate(mask) if m)))
        return out

    sft_rows, base_rows = rows(sft_ext), rows(base_ext)
    kw = dict(batch_size=8, pad_id=pad)
    t0 = time.perf_counter()
    on_last = hidden_states(model, ext_ids, layers, position="last", **kw)
    on_comp = hidden_states(model, [a for a, _ in sft_rows], layers, position="completion",
                            starts=[b for _, b in sft_rows], **kw)
    with adapters_off(model):
        off_last = hidden_states(model, ext_ids, layers, position="last", **kw)
        off_comp = hidden_states(model, [a for a, _ in sft_rows], layers, position="completion",
                                 starts=[b for _, b in sft_rows], **kw)
        base_comp = hidden_states(model, [a for a, _ in base_rows], layers, position="completion",
                                  starts=[b for _, b in base_rows], **kw)
        norms = residual_norms(model, ev_ids, layers)
    vecs = {
        "adapter-last": {l: on_last[l].mean(0) - off_last[l].mean(0) for l in layers},
        "adapter-completion": {l: on_comp[l].mean(0) - off_comp[l].mean(0) for l in layers},
        "output-contrast": {l: off_comp[l].mean(0) - base_comp[l].mean(0) for l in layers},
    }
    res["extract_seconds"] = time.perf_counter() - t0
    if args.cache and cached is None:
        np.savez(args.cache, sft_ext=np.array(sft_ext, dtype=object), base_ext=np.array(base_ext, dtype=object))
    res["residual_norm"] = {str(l): norms[l] for l in layers}
    res["vector_norm"] = {k: {str(l): float(np.linalg.norm(v[l])) for l in layers} for k, v in vecs.items()}
    print(f"vectors: {res['extract_seconds']:.0f}s; residual norms " +
          ", ".join(f"{l}:{norms[l]:.1f}" for l in layers[::6]), flush=True)

    def run(name, specs, **info):
        if args.prompt_only:
            specs = [dataclasses.replace(x, prompt_only=True) for x in specs]
            info["positions"] = "prompt"
        t = time.perf_counter()
        with adapters_off(model), steered(model, specs):
            texts = greedy_replies(model, tok, ev_ids, args.max_new_tokens)
        sc = score(texts)
        row = {"vector": name, **info, **sc, "changed": sum(a != b for a, b in zip(texts, base_ev)) / len(ev),
               "seconds": time.perf_counter() - t, "example": texts[0][:120], "replies": texts}
        res["rows"].append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))

    for combo in [c for c in args.combos.split(";") if c.strip()]:
        specs = []
        for term in combo.split("+"):
            name, block, strength = term.strip().split(":")
            v, x = vecs[name], float(strength)
            if block == "all":
                specs += [SteerSpec(l, mx.array(v[l] - (v[l - 1] if l else 0)), x) for l in layers]
            else:
                l = int(block)
                specs.append(SteerSpec(l, mx.array(v[l] / np.linalg.norm(v[l])), x * norms[l]))
        run(combo.strip(), specs, layers="combo")
    if args.only_combos:
        layers_grid = []
    else:
        layers_grid = layers
    for name, v in vecs.items():  # every block first (the adapters act on many blocks), then single blocks
        for lam in [float(x) for x in args.all_lambdas.split(",")] if layers_grid else []:
            specs = [SteerSpec(l, mx.array(v[l] - (v[l - 1] if l else 0)), lam) for l in layers]
            run(name, specs, layers="all (increments)", raw_lambda=lam)
    for name, v in vecs.items():
        for l in [int(x) for x in args.single_layers.split(",")] if layers_grid else []:
            nv = float(np.linalg.norm(v[l]))
            if nv == 0:  # a block below every adapter: adapters on and off agree there
                continue
            for a in [float(x) for x in args.alphas.split(",")]:
                run(name, [SteerSpec(l, mx.array(v[l] / nv), a * norms[l])], layers=str(l), alpha=a,
                    raw_lambda=a * norms[l] / nv)
    res["wall_seconds"] = time.perf_counter() - t_all
    Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(f"wall {res['wall_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
