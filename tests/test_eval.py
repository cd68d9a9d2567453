"""zipkd eval (fast): task files, lm-eval on tiny models against a naive scorer, speed, lineage, report, plots,
the gate and the CLI. Tiny random Llamas use the embedded model's tokenizer (lm-eval needs real text)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model

from zipkd.errors import ZipkdError
from zipkd.evaluate import harness
from zipkd.evaluate.gate import GateConfig, gate
from zipkd.evaluate.report import SCHEMA_VERSION, ModelEval, Report, write_report

REGIME = {
    "device": "cpu",
    "regime": "prefill",
    "batch": 1,
    "seq_len": 16,
    "context": 16,
    "dtype": "float32",
    "runtime": "eager",
    "quantization": None,
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from zipkd.models.io import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def _tiny(tokenizer, layers: int = 4, seed: int = 0):
    return tiny_model(
        "llama",
        seed=seed,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
    )


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer):
    """base (dense, 4 layers) -> pruned (2 layers dropped, manifest like `zipkd prune` writes) -> child."""
    from zipkd.models.io import save_model
    from zipkd.models.surgery import drop_layers, sync_config

    root = tmp_path_factory.mktemp("family")
    base = save_model(_tiny(tokenizer), tokenizer, root / "base", stage="convert")
    pruned_model = _tiny(tokenizer)
    drop_layers(pruned_model, [1, 2])
    sync_config(pruned_model)
    pruned = save_model(
        pruned_model,
        tokenizer,
        root / "pruned",
        stage="prune",
        inputs={"model": base},
        metrics={"predicted_speedup": 1.7},
        extra={"prune": {"table": {"regime": REGIME}}},
    )
    child = save_model(
        pruned_model,
        tokenizer,
        root / "child",
        stage="recover",
        inputs={"model": pruned},
        metrics={"loss": 1.0},
    )
    return {"base": base, "pruned": pruned, "child": child}


# ---------------------------------------------------------------- task files


def test_every_task_file_loads_with_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    names = harness.available_tasks()
    assert set(names) >= {
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "piqa",
        "winogrande",
        "boolq",
        "lambada",
        "mmlu",
    }
    folder = harness.materialize_tasks(tmp_path, names)
    assert "@ZIPKD_DATA" not in "".join(p.read_text() for p in folder.glob("*.yaml"))
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    for name in names:
        task = tm.load([harness.TASK_PREFIX + name])["tasks"][harness.TASK_PREFIX + name]
        docs = list(task.eval_docs)
        from zipkd.data.assets import eval_data_path

        n_rows = sum(1 for line in eval_data_path(name).open() if line.strip())
        assert len(docs) == n_rows, name  # shuffled, not subsampled
        doc = docs[0]
        text = task.doc_to_text(doc)
        assert isinstance(text, (str, int)), name
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = (
                text if isinstance(text, int) else int(task.doc_to_target(doc))
            )  # winogrande: context index
            assert len(choices) >= 2 and 0 <= gold < len(choices), name
        assert harness.PRIMARY_METRIC[name] in {m["metric"] for m in task.config.metric_list}


def test_scoring_data_is_disjoint_from_calibration_and_finetuning():
    """The tasks read only evaluation-role files; none of their passages feed pruning or recovery."""
    from zipkd.data.assets import calib_text_path, eval_data_path, finetune_path, heldout_text_path

    calib = calib_text_path().read_text()
    finetune = finetune_path().read_text()
    for line in eval_data_path("boolq").open():
        passage = json.loads(line)["passage"].strip()
        assert passage not in calib
    heldout = [p for p in heldout_text_path().read_text().split("\n\n") if p.strip()]
    assert heldout and not any(p.strip() in calib or p.strip() in finetune for p in heldout[:200])
    for name in harness.available_tasks():
        text = (harness.TASK_DIR / f"zipkd_{name}.yaml").read_text()
        assert f"@ZIPKD_DATA({name})@" in text  # each task reads its own evaluation file, nothing else


def test_shuffle_is_fixed_and_a_permutation():
    import datasets

    from zipkd.evaluate.tasks.task_utils import shuffled

    ds = datasets.Dataset.from_dict({"i": list(range(50))})
    a, b = shuffled(ds)["i"], shuffled(ds)["i"]
    assert a == b and sorted(a) == list(range(50)) and a != list(range(50))


def test_unknown_task_lists_available():
    with pytest.raises(ZipkdError) as exc:
        harness.resolve_tasks(["arc_easy", "nope"])
    msg = str(exc.value)
    assert "nope" in msg and all(t in msg for t in harness.available_tasks())
    assert harness.resolve_tasks(["zipkd_boolq", "boolq", " piqa"]) == ["boolq", "piqa"]


# ---------------------------------------------------------------- lm-eval on an in-memory model


def _naive_arc(model, tokenizer, docs):
    """Reference scorer: sum of log-probabilities of each choice's tokens after the prompt, one at a time.
    Returns acc, acc_norm and "1"/"0" per document by acc."""
    acc = acc_norm = 0
    right = ""
    for doc in docs:
        ctx = f"Question: {doc['question']}\nAnswer:"
        choices = doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        lls = []
        for choice in choices:
            whole = tokenizer.encode(ctx + " " + choice)
            n_ctx = len(tokenizer.encode(ctx))
            ids = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(logp[p - 1, whole[p]].item() for p in range(n_ctx, len(whole))))
        hit = int(max(range(len(lls)), key=lambda i: lls[i]) == gold)
        acc += hit
        acc_norm += int(max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == gold)
        right += str(hit)
    return acc / len(docs), acc_norm / len(docs), right


def test_run_tasks_matches_naive_scorer(tokenizer, tmp_path):
    from lm_eval.tasks import TaskManager

    model = _tiny(tokenizer, seed=3)
    res = harness.run_tasks(model, tokenizer, ["arc_easy"], limit=6, batch_size=4)["arc_easy"]
    assert res.n == 6 and res.primary == "acc"
    folder = harness.materialize_tasks(tmp_path, ["arc_easy"])
    task = TaskManager(include_path=str(folder), include_defaults=False).load(["zipkd_arc_easy"])["tasks"][
        "zipkd_arc_easy"
    ]
    docs = list(task.eval_docs)[:6]  # --limit takes the first documents after the fixed shuffle
    acc, acc_norm, right = _naive_arc(model, tokenizer, docs)
    assert res.correct == right and res.doc_ids == list(range(6))  # per document, by the primary metric
    assert res.metrics["acc"] == pytest.approx(acc, abs=1e-12)
    assert res.metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert res.stderr["acc"] == pytest.approx(math.sqrt(acc * (1 - acc) / 5), abs=1e-9)


def test_run_tasks_scores_the_documents_asked_for(tokenizer, tmp_path):
    """`docs` scores exactly those documents (a development slice past a report's first ones), against the naive
    scorer on the same documents; with a limit too it is refused."""
    from lm_eval.tasks import TaskManager

    model = _tiny(tokenizer, seed=3)
    res = harness.run_tasks(model, tokenizer, ["arc_easy"], docs=[9, 7, 8], batch_size=4)["arc_easy"]
    assert res.n == 3 and res.doc_ids == [7, 8, 9]
    folder = harness.materialize_tasks(tmp_path, ["arc_easy"])
    task = TaskManager(include_path=str(folder), include_defaults=False).load(["zipkd_arc_easy"])["tasks"][
        "zipkd_arc_easy"
    ]
    acc, _, right = _naive_arc(model, tokenizer, list(task.eval_docs)[7:10])
    assert res.correct == right and res.metrics["acc"] == pytest.approx(acc, abs=1e-12)
    with pytest.raises(ZipkdError, match="not both"):
        harness.run_tasks(model, tokenizer, ["arc_easy"], limit=3, docs=[0])


def test_llamacpp_scores_the_same_documents_per_document(family, tokenizer, tmp_path):
    """The llama.cpp LM keeps the per-document results too (the gate's paired test), on torch's documents."""
    from zipkd.evaluate.llamacpp_lm import run_tasks_llamacpp
    from zipkd.export.api import ExportConfig, export
    from zipkd.models.io import load_model

    lm = load_model(str(family["base"]))
    export(lm, ExportConfig(quantization="f32", threads=1), tmp_path / "base.gguf")
    engine = run_tasks_llamacpp(tmp_path / "base.gguf", tokenizer, ["arc_easy"], limit=3, threads=1)[
        "arc_easy"
    ]
    torch_res = harness.run_tasks(lm.model, tokenizer, ["arc_easy"], limit=3)["arc_easy"]
    assert engine.doc_ids == torch_res.doc_ids == [0, 1, 2] and engine.docs_sha256 == torch_res.docs_sha256
    assert engine.score == pytest.approx(engine.correct.count("1") / 3) and len(engine.correct) == 3


# ---------------------------------------------------------------- speed, lineage


def test_speed_sizes_and_memory(tokenizer, family):
    from zipkd.evaluate.speed import disk_bytes, measure_speed, parameter_count, tensor_bytes
    from zipkd.latency.table import Regime

    a, b = _tiny(tokenizer), _tiny(tokenizer, layers=2)
    naive = sum(
        p.numel()
        for n, p in a.named_parameters()
        if n != "lm_head.weight" or not a.config.tie_word_embeddings
    )
    assert parameter_count(a) == naive
    assert tensor_bytes(a) >= 4 * naive
    rows = measure_speed([a, b], Regime(seq_len=16), warmup=1, repeats=3)
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(16 / (row["median_ms"] / 1e3))
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and row["repeats"] == 3
        assert row["memory"]["peak_bytes"] >= row["memory"]["weights_bytes"] > 0
    # the forward's activations are seen: at least one MLP intermediate (batch x seq x width floats), and
    # more for a bigger batch; a decode step's peak includes its KV cache prefill
    from zipkd.evaluate.speed import peak_memory_bytes

    one = peak_memory_bytes(a, Regime(seq_len=64))["activation_bytes"]
    four = peak_memory_bytes(a, Regime(seq_len=64, batch=4))
    assert one >= 64 * 64 * 4 and four["activation_bytes"] >= 4 * 64 * 64 * 4
    assert (
        four["activation_bytes"] > one
        and four["peak_bytes"] == four["weights_bytes"] + four["activation_bytes"]
    )
    decode = measure_speed([b], Regime(regime="decode", batch=2, context=8), warmup=0, repeats=2)[0]
    assert decode["tokens_per_s"] == pytest.approx(2 / (decode["median_ms"] / 1e3))
    on_disk = sum(f.stat().st_size for f in family["base"].glob("*.safetensors"))
    assert disk_bytes(family["base"]) == on_disk and disk_bytes(None) is None


def test_lineage(family):
    from zipkd.evaluate import lineage

    assert lineage.base_model(family["child"]) == family["base"].resolve()
    assert lineage.base_model(family["pruned"]) == family["base"].resolve()
    assert lineage.base_model(family["base"]) is None
    regime, source = lineage.recorded_regime(family["child"])
    assert regime.seq_len == 16 and "prune.table.regime" in source and "pruned" in source
    assert lineage.predicted_speedup(family["child"])[0] == 1.7
    assert (
        lineage.recorded_regime(family["base"]) is None and lineage.predicted_speedup(family["base"]) is None
    )


def test_family_folder_expands_to_its_models(family):
    from zipkd.evaluate.api import expand_specs

    root = family["base"].parent
    assert expand_specs([root, family["child"]]) == [str(family[k]) for k in ("base", "child", "pruned")]
    assert expand_specs(["smollm2-135m"]) == ["smollm2-135m"]


# ---------------------------------------------------------------- the API end to end on tiny models


@pytest.fixture(scope="module")
def tiny_report(family):
    from zipkd.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        tasks=["arc_easy", "boolq"],
        limit=4,
        batch_size=4,
        ppl_max_length=64,
        ppl_max_tokens=256,
        warmup=1,
        repeats=3,
    )
    return evaluate([family["child"]], cfg)


def test_evaluate_family_report(tiny_report, family, tmp_path):
    r = tiny_report
    assert r.base is not None and r.base.path == str(family["base"].resolve())
    assert r.regime["seq_len"] == 16 and "prune.table.regime" in r.regime_source
    m = r.models[0]
    assert m.name == "child" and m.predicted_speedup == 1.7 and m.stage == "recover"
    assert m.measured_speedup == pytest.approx(r.base.speed["median_ms"] / m.speed["median_ms"])
    for t in ("arc_easy", "boolq"):
        q, b = m.quality[t], r.base.quality[t]
        assert q["n"] == 4 and 0 <= q["score"] <= 1
        # per document, for the paired gate: the ids scored and right/wrong by the primary metric
        assert q["doc_ids"] == b["doc_ids"] == [0, 1, 2, 3] and q["docs_sha256"] == b["docs_sha256"]
        assert q["score"] == pytest.approx(q["correct"].count("1") / 4) and set(q["correct"]) <= {"0", "1"}
        assert m.retention[t] == (q["score"] / b["score"] if b["score"] > 0 else None)
    assert m.memory["params"] < r.base.memory["params"]
    assert m.memory["disk_bytes"] < r.base.memory["disk_bytes"]
    assert math.isfinite(m.perplexity["perplexity"]) and m.perplexity["max_length"] == 64
    out = write_report(r, tmp_path / "rep")
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "zipkd-eval-report"
    back = Report.load(out)
    assert back.models[0].quality == m.quality and back.base.speed == r.base.speed
    md = (out / "report.md").read_text()
    assert "| arc_easy (acc) |" in md and "measured speedup" in md and "child" in md
    with pytest.raises(ZipkdError, match="already exists"):
        write_report(r, out)


def test_bad_config_values():
    from zipkd.evaluate import EvalConfig

    with pytest.raises(ZipkdError, match="available tasks"):
        EvalConfig(tasks=["arc_easy", "winogrand"])
    for bad in (
        {"limit": 0},
        {"limit": 2.5},
        {"batch_size": 0},
        {"repeats": 0},
        {"regime": {"regime": "x"}},
        {"regime": {"nope": 1}},
        {"dtype": "int3"},
    ):
        with pytest.raises(ZipkdError):
            EvalConfig(**bad)


# ---------------------------------------------------------------- report schema, plots


def _report(
    scores: dict[str, float],
    n: int = 50,
    speedup: float | None = 2.0,
    ppl: float = 20.0,
    weights: int = 2**20,
) -> Report:
    quality = {
        t: {"metric": "acc", "score": s, "stderr": 0.05, "n": n, "metrics": {"acc": s}}
        for t, s in scores.items()
    }
    m = ModelEval(
        name="m",
        path=None,
        quality=quality,
        perplexity={"perplexity": ppl, "tokens": 1024, "max_length": 512},
        memory={"weights_bytes": weights},
        measured_speedup=speedup,
    )
    return Report(tasks=list(scores), limit=n, models=[m])


def test_report_refuses_other_schema_and_non_reports(tmp_path):
    d = _report({"arc_easy": 0.5}).to_json()
    Report.from_json(d)
    with pytest.raises(ZipkdError, match="schema version 99"):
        Report.from_json({**d, "schema_version": 99})
    with pytest.raises(ZipkdError, match="not a zipkd eval report"):
        Report.from_json({"results": {}})
    header = {k: d[k] for k in ("kind", "schema_version", "tasks")}
    with pytest.raises(
        ZipkdError, match="baseline b.json is not a zipkd eval report: it has no 'models' list"
    ):
        Report.from_json(header, "baseline b.json")
    with pytest.raises(ZipkdError, match="model 1 has no 'quality' mapping"):
        Report.from_json({**header, "models": [{"name": "m"}]})
    with pytest.raises(ZipkdError, match="'models' is a dict, not a list"):
        Report.from_json({**header, "models": {}})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ZipkdError, match="cannot read"):
        Report.load(tmp_path / "bad.json")
    with pytest.raises(ZipkdError, match="not found"):
        Report.load(tmp_path / "missing.json")


def test_pareto_front_matches_naive():
    import itertools
    import random

    from zipkd.evaluate.plots import pareto_front

    rng = random.Random(0)
    for _ in range(20):
        pts = [(rng.choice([1.0, 1.5, 2.0, 3.0]), rng.choice([0.5, 0.7, 0.9])) for _ in range(7)]
        naive = [
            i for i, p in enumerate(pts) if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)
        ]
        assert sorted(pareto_front(pts)) == naive
        assert all(a in naive for a in itertools.chain(pareto_front(pts)))


def test_plots_are_pngs_with_labelled_axes(tiny_report, tmp_path):
    from zipkd.evaluate.plots import pareto_figure, retention_figure, save_plots

    family = replace(
        tiny_report,
        models=tiny_report.models + [replace(tiny_report.models[0], name="other", measured_speedup=3.0)],
    )
    for fig in (
        pareto_figure(family),
        retention_figure(family),
        pareto_figure(_report({"a": 0.5, "b": 0.6})),
    ):
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert "speedup" in pareto_figure(family).axes[0].get_xlabel()
    assert "retention" in retention_figure(family).axes[0].get_ylabel()
    for path in save_plots(family, tmp_path):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        from matplotlib.image import imread

        assert imread(path).ndim == 3


# ---------------------------------------------------------------- gate


def test_gate_passes_same_and_names_each_regression():
    base = _report({"arc_easy": 0.60, "boolq": 0.70})
    assert gate(base, base, GateConfig(max_drop=0.02, min_speedup=1.8)).passed
    small = _report({"arc_easy": 0.59, "boolq": 0.70})  # within 0.02
    assert gate(small, base).passed
    worse = _report({"arc_easy": 0.50, "boolq": 0.69}, speedup=1.5, ppl=30.0, weights=2**21)
    res = gate(worse, base, GateConfig(max_drop=0.02, min_speedup=1.8))
    failed = {c.metric for c in res.failures}
    assert failed == {
        "arc_easy acc",
        "held-out perplexity",
        "weights in memory (MiB)",
        "measured speedup vs base",
    }
    assert "0.5" in next(c.describe() for c in res.failures if c.metric == "arc_easy acc")
    no_speed = _report({"arc_easy": 0.60, "boolq": 0.70}, speedup=None)
    res = gate(no_speed, base, GateConfig(min_speedup=1.2))
    assert [c.metric for c in res.failures] == ["measured speedup vs base"]
    assert "not measured" in res.failures[0].describe()
    # these reports have no per-document results (as an older zipkd wrote): compared as numbers, with a warning
    assert "without the paired test" in res.warnings[0]
    # the speedup floor gates with no baseline too
    assert not gate(worse, None, GateConfig(min_speedup=1.8)).passed
    assert [c.metric for c in gate(worse, None, GateConfig(min_speedup=1.2)).checks] == [
        "measured speedup vs base"
    ]


def test_gate_refuses_other_task_set_or_sample():
    base = _report({"arc_easy": 0.6, "boolq": 0.7})
    with pytest.raises(ZipkdError, match="tasks"):
        gate(_report({"arc_easy": 0.6}), base)
    with pytest.raises(ZipkdError, match="--limit"):
        gate(_report({"arc_easy": 0.6, "boolq": 0.7}, n=20), base)
    with pytest.raises(ZipkdError):
        GateConfig(max_drop=-0.1)


# ---------------------------------------------------------------- CLI


SMALL = ["--batch-size", "4", "--ppl-max-length", "64", "--ppl-tokens", "256", "--repeats", "2"]


def test_cli_eval_report_and_gate(family, tmp_path):
    from typer.testing import CliRunner

    from zipkd.cli import app

    runner = CliRunner()
    common = ["--tasks", "arc_easy", "--limit", "20", *SMALL]
    res = runner.invoke(app, ["eval", str(family["child"]), *common, "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "pareto.png").is_file() and "measured speedup" in res.output
    # the same model against its own report passes; against a baseline that scored higher it fails, naming it
    res = runner.invoke(
        app,
        [
            "eval",
            str(family["child"]),
            "--baseline",
            str(tmp_path / "rep"),
            "--no-speed",
            "--max-drop",
            "0.02",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "gate passed" in res.output and "(0 lost, 0 gained of 20)" in res.output
    assert "Scores of base reused" in res.output  # the base's scores come from the baseline report
    better = json.loads((tmp_path / "rep" / "report.json").read_text())
    better["models"][0]["quality"]["arc_easy"].update(score=1.0, correct="1" * 20)  # every answer right
    (tmp_path / "better.json").write_text(json.dumps(better))
    res = runner.invoke(
        app,
        [
            "eval",
            str(family["child"]),
            "--baseline",
            str(tmp_path / "better.json"),
            "--max-drop",
            "0.02",
            "--min-speedup",
            "100",
        ],
    )
    assert res.exit_code == 1
    assert "arc_easy acc" in res.output and "measured speedup" in res.output and "gate failed" in res.output
    assert (
        "95% lower bound" in res.output
        and "McNemar p" in res.output
        and "fails 80% of the time" in res.output
    )
    # bad input: unknown task (lists them), another task set than the baseline, another schema version
    assert runner.invoke(app, ["eval"]).exit_code == 2
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["eval", str(family["child"]), "--device", "cuda"])
        assert res.exit_code == 2 and "no CUDA device" in res.output
    res = runner.invoke(app, ["eval", str(family["child"]), "--tasks", "arc_esay"])
    assert res.exit_code == 2 and "arc_easy" in res.output
    res = runner.invoke(
        app, ["eval", str(family["child"]), "--tasks", "boolq", "--baseline", str(tmp_path / "rep")]
    )
    assert res.exit_code == 2 and "scores tasks" in res.output
    (tmp_path / "v0.json").write_text(json.dumps({**better, "schema_version": 0}))
    res = runner.invoke(app, ["eval", str(family["child"]), "--baseline", str(tmp_path / "v0.json")])
    assert res.exit_code == 2 and "schema version 0" in res.output


@pytest.fixture
def no_work(monkeypatch):
    """Refusals must come before any work: evaluating fails the test."""

    def evaluate(*args, **kwargs):
        raise AssertionError("the command started evaluating")

    monkeypatch.setattr("zipkd.evaluate.api.evaluate", evaluate)


def _one_line(res) -> str:
    """The output as one line, without the usage panel's frame (it wraps long messages)."""
    return " ".join(res.output.replace("│", " ").split())


def test_cli_min_speedup_gates_without_a_baseline(family):
    """`--min-speedup` alone gates: it fails a model slower than the floor against its base, timed in this run."""
    from typer.testing import CliRunner

    from zipkd.cli import app

    args = ["--tasks", "boolq", "--limit", "2", "--no-perplexity", *SMALL]
    res = CliRunner().invoke(app, ["eval", str(family["child"]), *args, "--min-speedup", "100"])
    assert res.exit_code == 1, res.output
    assert "measured speedup vs base" in res.output and "gate failed" in res.output


def test_cli_gate_options_that_cannot_gate_are_refused(family, no_work):
    from typer.testing import CliRunner

    from zipkd.cli import app

    runner = CliRunner()
    child, base = str(family["child"]), str(family["base"])
    for args, says in (
        ([child, "--min-speedup", "1.5", "--no-base"], "--no-base leaves none"),
        ([base, "--min-speedup", "1.5"], "pass --base MODEL"),  # the base itself: nothing to time against
        ([child, "--max-drop", "0.05"], "--max-drop: it needs --baseline"),
        ([child, "--max-ppl-increase", "0.1"], "--max-ppl-increase: it needs --baseline"),
        ([child, "--confidence", "0.9"], "--confidence: it needs --baseline"),
    ):
        res = runner.invoke(app, ["eval", *args])
        assert res.exit_code == 2 and says in _one_line(res), (args, res.output)
    res = runner.invoke(app, ["eval", child, "--min-speedup", "1.5", "--no-speed", "--no-base"])
    assert res.exit_code == 2


def test_cli_limit_zero_is_refused(family, no_work):
    from typer.testing import CliRunner

    from zipkd.cli import app

    res = CliRunner().invoke(app, ["eval", str(family["child"]), "--limit", "0"])
    assert res.exit_code == 2 and "a limit of 0 scores no documents" in _one_line(res)


def test_cli_baseline_that_is_not_a_report_says_what_is_missing(family, tmp_path, no_work):
    from typer.testing import CliRunner

    from zipkd.cli import app

    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"kind": "zipkd-eval-report", "schema_version": SCHEMA_VERSION, "tasks": []}))
    res = CliRunner().invoke(app, ["eval", str(family["child"]), "--baseline", str(path)])
    assert res.exit_code == 2
    assert f"baseline {path} is not a zipkd eval report: it has no 'models' list" in _one_line(res)
    assert "malformed" not in res.output


def test_cli_eval_prints_no_git_errors(family, tmp_path, monkeypatch, capfd):
    """lm-eval asks git for a commit hash; outside a repository git's "fatal:" line must not reach stderr."""
    from typer.testing import CliRunner

    from zipkd.cli import app

    monkeypatch.chdir(tmp_path)  # not a git repository
    args = ["--tasks", "boolq", "--limit", "2", "--no-perplexity", "--no-speed", "--no-base", *SMALL]
    res = CliRunner().invoke(app, ["eval", str(family["child"]), *args])
    assert res.exit_code == 0, res.output
    assert "fatal:" not in capfd.readouterr().err + res.output
