"""Evaluation (mlxpost.eval) on tiny models built in the tests, offline.

The log-likelihood engine against a naive per-request computation (and the
probe that guards its shared layout), lm-eval's requests through our model
class, a local multiple-choice lm-eval task against a hand computation,
the built-in tasks' arithmetic, HumanEval's sandbox, retention and its exit
codes, a run directory against its fused export, resume, bad input, the SFT
health checks and gate, ``train.eval_tasks`` in a training run, and
``mlxpost compare``'s eval columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import preference_rows, write_jsonl

from mlxpost.cli.main import cli
from mlxpost.config import build_config
from mlxpost.errors import DataError, MlxpostError
from mlxpost.eval import builtin, humaneval, loglik
from mlxpost.eval.context import EvalContext
from mlxpost.eval.lm_eval_model import make_lm
from mlxpost.eval.loglik import Scorer, sharing_problem
from mlxpost.eval.retention import compare as compare_retention
from mlxpost.eval.run import evaluate
from mlxpost.eval.sandbox import Limits, run_program, run_programs
from mlxpost.eval.tasks import parse_tasks
from mlxpost.methods.sft import SFTConfig, SFTHealth
from mlxpost.model.load import load_model
from mlxpost.tools.compare import collect_runs, compare
from mlxpost.training.pipeline import run as run_training
from mlxpost.ui import NullReporter

MC_ROWS = [
    {"question": "What is 2 plus 2?", "choices": ["3", "4", "5"], "answer": 1},
    {"question": "What color is the sky?", "choices": ["blue", "green"], "answer": "blue"},
    {"question": "How many legs has a cat?", "choices": ["two", "four", "six", "eight"], "answer": 1},
    {"question": "Which is a number?", "choices": ["seven", "tree"], "answer": 0},
    {"question": "What is 10 minus 3?", "choices": ["7", "13", "3"], "answer": 0},
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model))


def naive_logprob(model, prefix: list[int], cont: list[int]) -> tuple[float, bool]:
    """One request, one sequence, the model's own full logits: sum of log p(cont_j | prefix, cont_<j)."""
    seq = mx.array([list(prefix) + list(cont)])
    lp = nn.log_softmax(model(seq).astype(mx.float32), axis=-1)[0]
    P = len(prefix)
    total, greedy = 0.0, True
    for j, t in enumerate(cont):
        total += lp[P - 1 + j, t].item()
        greedy = greedy and int(mx.argmax(lp[P - 1 + j]).item()) == t
    return total, greedy


def requests(*pairs):
    return [SimpleNamespace(args=p) for p in pairs]


# ---------------------------------------------------------------------------
# The log-likelihood engine and the lm-eval model class
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("share", ["auto", "off"])
def test_loglikelihood_equals_a_naive_per_request_computation(tiny, share):
    model, tok = tiny.model, tiny.tokenizer
    scorer = Scorer(model, batch_size=3, share=share)
    assert scorer.shared == (share == "auto")  # the tiny llama passes the sharing probe
    lm = make_lm(model, tok, scorer=scorer, max_length=4096)
    reqs = requests(("Question: what is red?\nAnswer:", " the apple"), ("Question: what is red?\nAnswer:", " sky"),
                    ("Question: what is red?\nAnswer:", " a red stone and a tree"), ("hello world ", "model"),
                    ("", "the cat"), ("one two three", " four"), ("one two three", ""))
    out = lm.loglikelihood(reqs)
    assert len(out) == len(reqs) and out[-1] == (0.0, True)  # an empty continuation: log 1
    for req, (lp, greedy) in zip(reqs[:-1], out):
        ctx, cont = lm.encode_pair(*req.args)
        want, want_greedy = naive_logprob(model, ctx, cont)
        assert lp == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # lm-eval's tokenization: the context's trailing space moves to the continuation; an empty context is BOS/EOS
    assert lm.encode_pair("hello world ", "model")[1] == lm.encode_pair("hello world", " model")[1]
    assert lm.encode_pair("", "the cat")[0] == [lm.prefix_id]


def test_a_context_too_long_for_the_model_loses_its_start(tiny):
    lm = make_lm(tiny.model, tiny.tokenizer, scorer=Scorer(tiny.model), max_length=12)
    ctx = "one two three four five six seven eight nine ten eleven twelve"
    (lp, _), = lm.loglikelihood(requests((ctx, " red green")))
    c, cont = lm.encode_pair(ctx, " red green")
    assert len(c) + len(cont) > 13
    kept = c[len(c) + len(cont) - 13:]  # as lm-eval's models do: the last max_length + 1 tokens
    assert lp == pytest.approx(naive_logprob(tiny.model, kept, cont)[0], abs=1e-4)


def test_the_sharing_probe_catches_a_leaked_branch_or_a_wrong_position(tiny, monkeypatch):
    """The probe compares hidden states, which a random model's log-probs would not show."""
    split = Scorer(tiny.model).split
    assert sharing_problem(tiny.model, split) is None
    real = loglik.shared_row

    def leaky(group):  # every continuation sees the others
        r = real(group)
        r.branches[:] = 0
        return r

    def unpositioned(group):  # RoPE positions of the row's slots, not of each sequence
        r = real(group)
        r.positions[:] = np.arange(len(r.positions))
        return r

    for broken in (leaky, unpositioned):
        monkeypatch.setattr(loglik, "shared_row", broken)
        assert "differ from separate sequences" in sharing_problem(tiny.model, split)


def test_rolling_loglikelihood_scores_every_token_once(tiny):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = tiny.model, tiny.tokenizer
    text = "the cat and the dog sat by the river when the sun was up " * 3
    for max_length in (4096, 9):  # one window; several windows
        lm = make_lm(model, tok, scorer=Scorer(model, batch_size=2), max_length=max_length)
        ids = lm.hf(text, add_special_tokens=False)["input_ids"]
        want = 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_id, max_length, 1)):
            want += naive_logprob(model, ctx, cont)[0]
        assert lm.loglikelihood_rolling(requests((text,)))[0] == pytest.approx(want, abs=1e-3)
    lm = make_lm(model, tok, scorer=Scorer(model), max_length=4096)
    assert lm.loglikelihood_rolling(requests((text,)))[0] == pytest.approx(
        naive_logprob(model, [lm.prefix_id], ids)[0], abs=1e-3)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(tiny):
    model, tok = tiny.model, tiny.tokenizer
    lm = make_lm(model, tok, scorer=Scorer(model), max_length=4096, batch_size=4)
    prompts = ["the red cat", "one two three four five", "hello"]
    got = lm.generate_until(requests(*[(p, {"until": ["\n\n"], "max_gen_toks": 12}) for p in prompts]))
    for p, text in zip(prompts, got):
        ids = lm.encode(p)
        for _ in range(12):  # greedy, one token at a time, the whole sequence each time
            nxt = int(mx.argmax(model(mx.array([ids]))[0, -1]).item())
            if nxt in tok.eos_token_ids:
                break
            ids.append(nxt)
        want = lm.hf.decode(ids[len(lm.encode(p)):])
        assert text == want.split("\n\n")[0]


def test_a_local_multiple_choice_task_through_lm_eval_gives_the_hand_computed_accuracy(tmp_path, tiny):
    data = write_jsonl(tmp_path / "quiz.jsonl", [{**r, "answer": r["choices"].index(r["answer"])
                                                  if isinstance(r["answer"], str) else r["answer"]} for r in MC_ROWS])
    yaml_file = tmp_path / "quiz.yaml"
    yaml_file.write_text(f"task: quiz_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                         "test_split: test\noutput_type: multiple_choice\n"
                         "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
                         "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    doc = evaluate(tiny, [str(yaml_file)], out=tmp_path / "out")
    res = doc["tasks"][str(yaml_file)]
    lm = make_lm(tiny.model, tiny.tokenizer, scorer=Scorer(tiny.model), max_length=4096)
    acc, acc_norm = [], []
    for r in [json.loads(line) for line in data.read_text().splitlines()]:
        ctx = f"Question: {r['question']}\nAnswer:"
        lps = [naive_logprob(tiny.model, *lm.encode_pair(ctx, " " + c))[0] for c in r["choices"]]
        acc.append(int(np.argmax(lps)) == r["answer"])
        norm = [lp / len((" " + c).encode()) for lp, c in zip(lps, r["choices"])]
        acc_norm.append(int(np.argmax(norm)) == r["answer"])
    assert res["n"] == len(MC_ROWS) and res["kind"] == "lm-eval"
    assert res["metrics"]["acc"]["value"] == pytest.approx(np.mean(acc))
    assert res["metrics"]["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))
    assert res["metrics"]["acc"]["stderr"] == pytest.approx(np.std(acc, ddof=1) / np.sqrt(len(acc)))
    assert res["lm_eval_version"] and res["config_hash"] and res["higher_is_better"]["acc"] is True


# ---------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------


def test_user_multiple_choice_rows_are_scored_by_log_likelihood(tmp_path, tiny):
    f = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    doc = evaluate(tiny, [f"task:{f}"], out=tmp_path / "o")
    res = doc["tasks"][f"task:{f}"]
    ctx = EvalContext(tiny.model, tiny.tokenizer)
    acc = []
    for r in MC_ROWS:
        prompt = ctx.renderer.prompt(r["question"])[0]
        lps = [naive_logprob(tiny.model, prompt, ctx.renderer.hf(c, add_special_tokens=False)["input_ids"])[0]
               for c in r["choices"]]
        gold = r["answer"] if isinstance(r["answer"], int) else r["choices"].index(r["answer"])
        acc.append(float(int(np.argmax(lps)) == gold))
    assert res["metrics"]["acc"]["value"] == pytest.approx(np.mean(acc))
    assert res["rows"] == {"multiple_choice": 5, "generate": 0}


def test_arith_checks_every_step_and_the_final_answer(tmp_path, tiny, monkeypatch):
    tasks = [{"prompt": "Compute 2 + 3 * 4.", "answer": "14", "numbers": [2, 3, 4]},
             {"prompt": "Compute (5 - 1) * 3.", "answer": "12", "numbers": [5, 1, 3]}]
    f = write_jsonl(tmp_path / "arith.jsonl", tasks)
    replies = {"Compute 2 + 3 * 4.": "3 * 4 = 12\n2 + 12 = 14\nAnswer: 14",  # all right
               "Compute (5 - 1) * 3.": "5 - 1 = 4\n4 * 3 = 13\nAnswer: 13"}  # second step and answer wrong

    def fake_complete(model, tokenizer, prompts, sampling, **kw):
        text = [tokenizer.decode(p) for p in prompts]
        return [[next(v for k, v in replies.items() if k in t)] for t in text], [[False] for _ in prompts]

    monkeypatch.setattr(builtin, "complete", fake_complete)
    res = evaluate(tiny, [f"arith:{f}"], out=tmp_path / "o")["tasks"][f"arith:{f}"]
    m = res["metrics"]
    assert m["final_acc"]["value"] == 0.5 and m["step_acc"]["value"] == 0.75 and m["format"]["value"] == 1.0
    assert res["steps"] == 4 and res["n"] == 2
    # a rate carries Wilson's 95% interval (1 of 2 right); the ratio of steps, not a 0/1 mean, does not
    assert m["final_acc"]["ci95"] == pytest.approx([0.0945, 0.9055]) and "ci95" not in m["step_acc"]


def test_ppl_is_the_exponential_of_the_mean_loss_over_trained_tokens(tmp_path, tiny, sft_data):
    doc = evaluate(tiny, [f"ppl:{sft_data / 'valid.jsonl'}"], out=tmp_path / "o", batch_size=5)
    res = doc["tasks"][f"ppl:{sft_data / 'valid.jsonl'}"]
    ctx = EvalContext(tiny.model, tiny.tokenizer)
    from mlxpost.data.load import tokenize_file

    examples, _ = tokenize_file(sft_data / "valid.jsonl", ctx.renderer, max_seq_len=4096)
    nll = count = 0.0
    for ex in examples:
        lp = nn.log_softmax(tiny.model(mx.array(ex.tokens[None, :-1])).astype(mx.float32), axis=-1)[0]
        picked = np.array(lp[mx.arange(len(ex) - 1), mx.array(ex.tokens[1:])])
        nll -= float((picked * ex.mask[1:]).sum())
        count += ex.mask[1:].sum()
    assert res["metrics"]["nll"]["value"] == pytest.approx(nll / count, rel=1e-5)
    assert res["metrics"]["ppl"]["value"] == pytest.approx(np.exp(nll / count), rel=1e-5)
    assert res["tokens"] == count and res["higher_is_better"]["ppl"] is False


def test_humaneval_sandbox_passes_canonical_solutions_and_stops_bad_code():
    problems = humaneval.load_problems()
    assert len(problems) == 164
    limits = Limits(seconds=5)
    out = run_programs([humaneval.check_program(p, p["canonical_solution"]) for p in problems], limits)
    failed = [(p["task_id"], o.status, o.detail) for p, o in zip(problems, out) if not o.passed]
    assert not failed, failed[:5]
    p0 = problems[0]
    bad = {"wrong": ("    return False\n", "failed"),
           "hang": ("    while True:\n        pass\n", "timeout"),
           "memory": ("    x = bytearray(8 << 30)\n    return x\n", "memory"),
           "fork": ("    import os\n    os.fork()\n", "failed"),
           "exit": ("    import os\n    os._exit(0)\n", "failed"),
           "network": ("    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n", "failed")}
    got = run_programs([humaneval.check_program(p0, code) for code, _ in bad.values()], Limits(seconds=3))
    assert [(o.passed, o.status) for o in got] == [(False, want) for _, want in bad.values()]
    assert run_program("assert True", limits).isolation["limits"]  # the child says what it applied
    # humaneval:chat: a reply's fenced code, a whole function (replacing the stub) or only its body
    replies = [f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in problems[:6]]
    replies += [f"```python\n{p['canonical_solution']}```" for p in problems[6:12]]
    out = run_programs([humaneval.chat_program(p, r) for p, r in zip(problems[:12], replies)], limits)
    assert all(o.passed for o in out), [o.detail for o in out if not o.passed]


def test_humaneval_pass_at_k_and_consent(tmp_path, tiny, monkeypatch):
    problems = humaneval.load_problems()[:4]

    def fake_complete(model, tokenizer, prompts, sampling, n=1, **kw):  # 2 of 3 samples right on problem 0 ...
        texts = [[p["canonical_solution"]] * n for p in problems]
        texts[0][0] = "    return None\n"
        texts[1] = ["    return None\n"] * n  # ... none on problem 1
        return texts, [[False] * n for _ in prompts]

    monkeypatch.setattr(humaneval, "complete", fake_complete)
    with pytest.raises(MlxpostError, match="--allow-code-exec"):
        evaluate(tiny, ["humaneval"], limit=4)
    res = evaluate(tiny, ["humaneval"], limit=4, num_samples=3, allow_code_exec=True,
                   out=tmp_path / "o")["tasks"]["humaneval"]
    assert res["metrics"]["pass@1"]["value"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert set(res["metrics"]) == {"pass@1"} and res["statuses"] == {"passed": 8, "failed": 4}


# ---------------------------------------------------------------------------
# Retention, exit codes, run directories, resume
# ---------------------------------------------------------------------------


def _eval_json(path: Path, value: float, config_hash: str = "h", hib=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": {"spec": "x"}, "tasks": {"t": {
        "config_hash": config_hash, "higher_is_better": {"acc": hib},
        "metrics": {"acc": {"value": value, "stderr": 0.01}}}}}))
    return path


def test_retention_arithmetic():
    before = json.loads(_eval_json(Path("/tmp") / "mlxpost-test-b.json", 0.8).read_text())["tasks"]
    for after, hib, want, verdict in ((0.76, True, 0.95, "pass"), (0.7, True, 0.875, "fail"),
                                      (1.0, False, 0.8, "fail"), (0.8, None, None, "n/a")):
        a = {"t": {**before["t"], "higher_is_better": {"acc": hib},
                   "metrics": {"acc": {"value": after, "stderr": 0.02}}}}
        r = compare_retention(before, a, 0.95)[0]
        assert (r.retention is None and want is None) or r.retention == pytest.approx(want)
        assert r.verdict == verdict and r.delta == pytest.approx(after - 0.8)
        assert r.delta_stderr == pytest.approx(np.hypot(0.01, 0.02))
    other = {"t": {**before["t"], "config_hash": "other"}}
    assert compare_retention(before, other, 0.95)[0].verdict == "n/a"  # other samples: no verdict


def test_gate_exit_codes(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    runner = CliRunner()
    args = ["eval", str(tiny_model), "--tasks", f"task:{f}", "--plain"]
    r = runner.invoke(cli, args + ["--out", str(tmp_path / "now")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "now" / "eval.json").read_text())
    acc = doc["tasks"][f"task:{f}"]["metrics"]["acc"]["value"]
    assert acc > 0
    for factor, code in ((1.2, 1), (1.0, 0), (0.5, 0)):  # the baseline was better by 20%, equal, worse
        base = json.loads(json.dumps(doc))
        for m in base["tasks"][f"task:{f}"]["metrics"].values():
            m["value"] *= factor
        (tmp_path / "base.json").write_text(json.dumps(base))
        r = runner.invoke(cli, args + ["--out", str(tmp_path / "now"), "--baseline", str(tmp_path / "base.json")])
        assert r.exit_code == code, r.output
        assert ("retention gate failed" in r.output) == (code == 1)
    r = runner.invoke(cli, args + ["--out", str(tmp_path / "now"), "--baseline", str(tmp_path / "base.json"),
                                   "--min-retention", "2.5"])
    assert r.exit_code == 1  # acc / (acc / 2) = 2 < 2.5


def test_a_run_directory_equals_its_fused_export(tmp_path, tiny_model, sft_data, pref_data):
    from test_hub_export import make_run

    from mlxpost.hub.export import export

    sft = make_run(tmp_path, tiny_model, "sft", seed=1)
    dpo = make_run(tmp_path, tiny_model, "dpo", from_run=sft, method="dpo", seed=2)  # a --from stack
    export(dpo, "fused", tmp_path / "fused")
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    tasks = [f"ppl:{sft_data / 'valid.jsonl'}", f"task:{mc}", f"pairs:{pref_data / 'valid.jsonl'}"]
    a = evaluate(str(dpo), tasks, limit=6)
    b = evaluate(str(tmp_path / "fused"), tasks, limit=6, out=tmp_path / "fused-eval")
    assert Path(a["path"]).parent == dpo / "eval" and a["target"]["kind"] == "run"
    assert [x["path"] for x in a["target"]["adapters"]] == [str(sft.resolve()), str(dpo.resolve())]
    for task in tasks:
        for m, v in b["tasks"][task]["metrics"].items():
            assert a["tasks"][task]["metrics"][m]["value"] == pytest.approx(v["value"], rel=1e-4, abs=1e-4), (task, m)
    pairs = a["tasks"][tasks[2]]["metrics"]
    assert "implicit_acc" in pairs and "implicit_acc" not in b["tasks"][tasks[2]]["metrics"]
    assert a["tasks"][tasks[2]]["beta"] == 0.1  # dpo.beta of the run's config


def test_a_run_baseline_is_evaluated_once_and_kept_in_its_directory(tmp_path, tiny_model):
    from test_hub_export import make_run

    sft = make_run(tmp_path, tiny_model, "sft", seed=1)
    dpo = make_run(tmp_path, tiny_model, "dpo", from_run=sft, method="dpo", seed=2)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    doc = evaluate(str(dpo), [f"task:{mc}"], baseline=str(sft))
    saved = list((sft / "eval").glob("*.json"))
    assert len(saved) == 1 and doc["baseline"]["target"]["spec"] == str(sft)
    assert {r["metric"] for r in doc["baseline"]["rows"]} == {"acc", "acc_norm"}
    before = saved[0].stat().st_mtime_ns
    again = evaluate(str(dpo), [f"task:{mc}"], baseline=str(sft))  # the SFT run's saved result is reused
    assert saved[0].stat().st_mtime_ns == before and again["baseline"]["rows"] == doc["baseline"]["rows"]


def test_resume_keeps_finished_tasks_and_redoes_changed_ones(tmp_path, tiny, sft_data):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    ppl = f"ppl:{sft_data / 'valid.jsonl'}"
    first = evaluate(tiny, [f"task:{mc}"], out=tmp_path / "o", limit=3)
    both = evaluate(tiny, [f"task:{mc}", ppl], out=tmp_path / "o", limit=3, resume=True)
    assert both["tasks"][f"task:{mc}"] == first["tasks"][f"task:{mc}"] and ppl in both["tasks"]
    again = evaluate(tiny, [f"task:{mc}"], out=tmp_path / "o", limit=4, resume=True)  # another limit: redone
    assert again["tasks"][f"task:{mc}"]["n"] == 4


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(MlxpostError, match=r"(?s)unknown task 'nosuchtask_xyz'.*humaneval.*task:FILE.jsonl.*add one"):
        parse_tasks("nosuchtask_xyz")
    with pytest.raises(MlxpostError, match="'frob' is not a kind of task"):
        parse_tasks("frob:x.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [MC_ROWS[0], {"question": "q", "choices": ["a"], "answer": 0},
                                               {"question": "q", "choices": ["a", "b"], "answer": 5}, {"x": 1}])
    with pytest.raises(DataError) as e:
        parse_tasks(f"task:{bad}")
    msg = str(e.value)
    assert f"{bad}:2: choices: expected a list of at least two strings" in msg
    assert f"{bad}:3: answer: index 5 is out of range for 2 choices" in msg and f"{bad}:4: unknown row" in msg
    with pytest.raises(MlxpostError, match="no such file"):
        parse_tasks(f"ppl:{tmp_path / 'missing.jsonl'}")
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    with pytest.raises(MlxpostError, match=r'pip install -e "\.\[eval\]"'):
        parse_tasks("hellaswag")


def test_code_that_runs_generated_code_needs_consent_before_loading(tmp_path):
    with pytest.raises(MlxpostError, match="--allow-code-exec"):
        evaluate(str(tmp_path / "no-model-here"), ["humaneval"])  # refused before any model is looked for


# ---------------------------------------------------------------------------
# SFT health, train.eval_tasks, compare
# ---------------------------------------------------------------------------


def test_sft_health_flags_flat_rising_and_oscillating_runs():
    t = SFTConfig(flat_window=5, rising_evals=3, oscillation_window=10)
    flat = SFTHealth(40, t, warmup=2)
    found = [f for s in range(1, 20) for f in flat.observe(s, {"loss": 2.0 + 0.001 * (s % 2)})]
    assert [f.check for f in found] == ["flat-loss"] and found[0].step == 12  # 2 warmup + 2 windows
    falling = SFTHealth(40, t, warmup=2)
    assert not [f for s in range(1, 30) for f in falling.observe(s, {"loss": 3.0 * 0.95 ** s})]
    zigzag = SFTHealth(40, t, warmup=2)
    found = [f for s in range(1, 20) for f in zigzag.observe(s, {"loss": 2.0 - 0.02 * s + (0.5 if s % 2 else 0)})]
    assert "oscillation" in [f.check for f in found]
    rising = SFTHealth(40, t, warmup=2)
    evals = [rising.observe_eval(s, {"val_loss": v}) for s, v in enumerate([2.0, 1.5, 1.6, 1.7, 1.8])]
    assert [bool(f) for f in evals] == [False, False, False, False, True] and evals[-1][0].check == "val-rising"
    assert rising.summary({"val_ppl": 12.0})["quality_gate"]["verdict"] == "pass"
    gate = rising.summary({"val_ppl": 25.0})
    assert gate["quality_gate"]["verdict"] == "fail" and gate["val_rising"]["verdict"] == "warn"


def test_train_eval_tasks_run_before_and_after_training(tmp_path, tiny_model, sft_data):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    tasks = f"[ppl:{sft_data / 'valid.jsonl'}, task:{mc}]"
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", "train.steps=4", "train.lr=3e-3",
                              f"train.eval_tasks={tasks}", "train.eval_limit=6", f"output.dir={tmp_path}",
                              "output.name=r", "train.eval_every=2", "sft.gate_max_val_ppl=1e9"], method="sft")
    path, _ = run_training(cfg, reporter=NullReporter())
    base = json.loads((path / "baseline_metrics.json").read_text())
    after = [json.loads(f.read_text()) for f in (path / "eval").glob("*.json")]
    assert len(after) == 1 and set(base["tasks"]) == set(after[0]["tasks"])
    ppl_key = f"ppl:{sft_data / 'valid.jsonl'}"
    b, a = base["tasks"][ppl_key]["metrics"]["ppl"]["value"], after[0]["tasks"][ppl_key]["metrics"]["ppl"]["value"]
    assert a < b  # trained on the same kind of rows: perplexity falls
    summary = json.loads((path / "summary.json").read_text())
    ev = summary["eval_tasks"]
    assert ev["before"][ppl_key]["ppl"] == pytest.approx(b) and ev["after"][ppl_key]["ppl"] == pytest.approx(a)
    assert summary["health"]["quality_gate"]["verdict"] == "pass"
    rows = after[0]["baseline"]["rows"]
    assert {r["metric"] for r in rows if r["task"] == ppl_key} == {"nll", "ppl"}
    assert next(r for r in rows if r["metric"] == "ppl")["verdict"] == "pass"  # lower perplexity: retention > 1

    comp = compare(collect_runs([path]))
    assert f"eval:{ppl_key}/ppl" in comp.metrics and comp.direction(f"eval:{ppl_key}/ppl") == "min"
    assert comp.rows[0].cells[f"eval:{ppl_key}/ppl"].mean == pytest.approx(a)


def test_a_run_from_another_takes_its_evaluation_after_training_as_baseline(tmp_path, tiny_model, sft_data,
                                                                          pref_data):
    """DPO --from an SFT run that measured the same tasks after training starts from that very model: the
    evaluation is copied, not measured again; once the SFT run's adapter changes, it is measured."""
    from safetensors.numpy import load_file, save_file

    tasks = f"train.eval_tasks=[ppl:{sft_data / 'valid.jsonl'}]"
    common = [f"model.path={tiny_model}", "train.steps=2", tasks, "train.eval_limit=4", f"output.dir={tmp_path}",
              "train.eval_every=0"]
    sft = build_config(None, common + [f"data.path={sft_data}", "output.name=sft", "sft.gate_max_val_ppl=1e9"],
                       method="sft")
    sft_dir, _ = run_training(sft, reporter=NullReporter())
    after = json.loads(next((sft_dir / "eval").glob("*.json")).read_text())

    def dpo(name: str, *extra) -> dict:
        cfg = build_config(None, common + [f"data.path={pref_data}", f"output.name={name}",
                                           f"preference.from_run={sft_dir}", *extra], method="dpo")
        path, _ = run_training(cfg, reporter=NullReporter())
        return json.loads((path / "baseline_metrics.json").read_text())

    copied = dpo("dpo")
    assert copied["target"]["copied_from"] == str(sft_dir / "eval")
    assert copied["tasks"] == after["tasks"]
    # Other settings of the task (here its limit): measured.
    assert "copied_from" not in dpo("dpo-limit", "train.eval_limit=3")["target"]
    # The SFT run's adapter is no longer the one evaluated: measured, and the value differs.
    weights = sft_dir / "adapters.safetensors"
    save_file({k: v * 3 for k, v in load_file(str(weights)).items()}, str(weights))
    measured = dpo("dpo-changed")
    key = f"ppl:{sft_data / 'valid.jsonl'}"
    assert "copied_from" not in measured["target"]
    assert measured["tasks"][key]["metrics"]["ppl"]["value"] != pytest.approx(
        after["tasks"][key]["metrics"]["ppl"]["value"], rel=1e-4)


def test_train_eval_tasks_are_checked_before_the_model_loads(tmp_path, tiny_model, sft_data):
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", "train.steps=2",
                              "train.eval_tasks=[humaneval]", f"output.dir={tmp_path}"], method="sft")
    with pytest.raises(MlxpostError, match="eval_allow_code_exec"):
        run_training(cfg, reporter=NullReporter())
    assert not list(tmp_path.iterdir())  # no run directory was made


def test_pairs_of_a_fresh_adapter_have_no_implicit_preference(tmp_path, tiny, pref_data):
    """Reference = the run's own adapter off; a zero adapter: every implicit reward margin is 0."""
    from mlxpost.model.adapters import attach_adapters, resolve_targets
    from mlxpost.model.load import load_model as load

    lm = load(str(tiny.path))
    attach_adapters(lm.model, rank=4, scale=2.0, keys=resolve_targets(lm.model, "all-linear"))
    res = evaluate(lm, [f"pairs:{pref_data / 'valid.jsonl'}"], limit=4)["tasks"][f"pairs:{pref_data / 'valid.jsonl'}"]
    assert res["metrics"]["implicit_margin"]["value"] == pytest.approx(0.0, abs=1e-4)
    assert res["metrics"]["implicit_acc"]["value"] == 0.0  # ties do not count as ranked right
    rows = preference_rows(4, seed=1)
    assert res["n"] == len(rows)
