"""zipkd eval in llama.cpp: the real embedded model (SmolLM2-135M) exported once to an F32 GGUF scores like the
torch path on the same token ids (perplexity on the same windows, per-request loglikelihoods, lm-eval accuracy,
greedy generations); `zipkd eval FILE.gguf` writes a report and gates; bad input is one line and exit 1.

llama.cpp and torch run with one thread here: scores do not depend on the thread count, and on a loaded 2-core
machine two spinning threads were 2-4x slower than one (the whole file: 64 s instead of 115 s)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest

from zipkd.errors import ZipkdError

THREADS = 1
# Per-request loglikelihood tolerance, llama.cpp F32 vs torch F32: llama.cpp keeps its KV cache in f16, which
# moves a summed log-probability by up to about 7e-4 of its size (measured on ARC-Easy/HellaSwag requests).
LL_RTOL, LL_ATOL = 2e-3, 2e-3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _runner():
    from typer.testing import CliRunner

    return CliRunner()


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "Traceback" not in res.output and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


@pytest.fixture(scope="module")
def gguf32(tmp_path_factory, real_model):
    """The embedded model as an F32 GGUF (zipkd export), once per module."""
    from zipkd.export.api import ExportConfig, export

    path = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    export(real_model, ExportConfig(quantization="f32"), path)
    return path


@pytest.fixture(scope="module")
def engine_lm(gguf32, real_model):
    from zipkd.evaluate.llamacpp_lm import LlamaCppLM, hf_tokenizer

    tok, source = hf_tokenizer(gguf32, real_model.path)
    assert "exported from" in source  # the export manifest led to the source folder's tokenizer
    with LlamaCppLM(gguf32, tok, threads=THREADS) as lm:
        yield lm


def _task_requests(tasks: dict[str, int]):
    """(context, continuation) loglikelihood requests of the first documents of each task, as lm-eval builds
    them for multiple-choice tasks."""
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from zipkd.evaluate.harness import TASK_PREFIX, task_folder

    reqs = []
    with task_folder(list(tasks)) as folder:
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        for name, n in tasks.items():
            task = manager.load([TASK_PREFIX + name])["tasks"][TASK_PREFIX + name]
            for doc in list(task.eval_docs)[:n]:
                ctx = task.doc_to_text(doc)
                for choice in task.doc_to_choice(doc):
                    args = (ctx, task.config.target_delimiter + choice)
                    reqs.append(Instance("loglikelihood", doc, args, 0))
    return reqs


def _hflm(real_model, max_length=None):
    from zipkd.evaluate.harness import _lm_class

    return _lm_class()(
        pretrained=real_model.model, tokenizer=real_model.tokenizer, batch_size=8, max_length=max_length
    )


# ---------------------------------------------------------------- fast: headers, config, bad input


def test_gguf_header_matches_the_gguf_reader(tmp_path):
    from gguf import GGUFReader

    from zipkd.models.embedded import embedded_gguf
    from zipkd.runtimes.llamacpp import check_gguf, gguf_header

    path = embedded_gguf()
    head = gguf_header(path)
    reader = GGUFReader(str(path))
    assert head["tensors"] == len(reader.tensors)
    assert head["params"] == sum(int(t.n_elements) for t in reader.tensors)
    assert head["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert head["data_end"] == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert head["file_type"] == "q4_1" and head["fields"]["llama.context_length"] == 8192
    assert head["fields_array_len"]["tokenizer.ggml.tokens"] == 49152
    data = path.read_bytes()
    for cut, why in (
        (len(data) - 1, "truncated"),
        (len(data) // 2, "truncated"),
        (4000, "corrupt or truncated"),
    ):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(ZipkdError, match=why):
            check_gguf(tmp_path / "t.gguf")


def test_config_refuses_torch_quantization_and_torch_with_gguf_options():
    from zipkd.evaluate import EvalConfig
    from zipkd.evaluate.api import gguf_type

    assert (
        gguf_type(" Q4_K_M") == "q4_k_m"
        and EvalConfig(runtime="llama.cpp", quantization="Q8_0").quantization == "q8_0"
    )
    with pytest.raises(ZipkdError, match="torch quantization.*q8_0"):
        EvalConfig(runtime="llama.cpp", quantization="bnb-int8")
    with pytest.raises(ZipkdError, match="unknown GGUF quantization"):
        EvalConfig(quantization="q9_9")
    for bad in ({"runtime": "torch", "quantization": "q8_0"}, {"runtime": "torch", "threads": 2}):
        with pytest.raises(ZipkdError, match="llama.cpp"):
            EvalConfig(**bad)
    with pytest.raises(ZipkdError, match="unknown runtime"):
        EvalConfig(runtime="onnx")
    with pytest.raises(ZipkdError, match="threads"):
        EvalConfig(runtime="llama.cpp", threads=0)


def _fake_gguf(path: Path, manifest: dict | None, file_type: int = 15) -> Path:
    """A GGUF with metadata only (no tensors): enough for the header, lineage and type lookups."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    if manifest is not None:
        w.add_string("zipkd.manifest", json.dumps(manifest))
    w.add_uint32("general.file_type", file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_base_and_regime_come_from_the_export_manifest_chain(tmp_path):
    """A GGUF zipkd exported names its source folder; the base is the root of that folder's manifest chain, and a
    llama.cpp regime recorded there (a latency table measured in llama.cpp) is the one timed."""
    from zipkd.evaluate import EvalConfig
    from zipkd.evaluate.api import _engine_model, _llamacpp_base, _llamacpp_regime

    base, child = tmp_path / "base", tmp_path / "child"
    for folder in (base, child):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    regime = {
        "device": "cpu",
        "regime": "decode",
        "context": 256,
        "runtime": "llama.cpp",
        "quantization": "q4_0",
    }
    (child / "zipkd.json").write_text(
        json.dumps(
            {
                "stage": "prune",
                "inputs": [{"role": "model", "path": str(base)}],
                "prune": {"table": {"regime": regime}},
            }
        )
    )
    manifest = {"stage": "export", "inputs": [{"role": "model", "path": str(child)}]}
    gguf = _fake_gguf(tmp_path / "child.gguf", manifest)
    m = _engine_model(str(gguf))
    assert m.source == child and m.quantization == "q4_k_m" and m.manifest["stage"] == "export"
    assert _llamacpp_base([m], EvalConfig()).path == base
    assert _llamacpp_base([m], EvalConfig(base=None)) is None
    assert _llamacpp_base([m], EvalConfig(base=str(gguf))) is None  # the model itself
    r, source, recorded = _llamacpp_regime([m], EvalConfig(), threads=3)
    assert (r.regime, r.context, r.threads, recorded) == ("decode", 256, 3, "q4_0") and "child" in source
    r, source, _ = _llamacpp_regime([m], EvalConfig(regime={"regime": "prefill", "seq_len": 64}), threads=1)
    assert (r.regime, r.seq_len, r.runtime) == ("prefill", 64, "llama.cpp") and "seq_len=64 given" in source
    # a GGUF zipkd did not export (no manifest): no base, the llama.cpp defaults
    plain = _engine_model(str(_fake_gguf(tmp_path / "plain.gguf", None, file_type=7)))
    assert (
        plain.source is None
        and plain.quantization == "q8_0"
        and _llamacpp_base([plain], EvalConfig()) is None
    )
    r, source, recorded = _llamacpp_regime([plain], EvalConfig(), threads=2)
    assert (r.regime, r.seq_len, r.context, r.decode_tokens, recorded) == ("prefill", 512, 128, 64, None)
    assert source == "llama.cpp defaults"


def test_cli_bad_inputs_are_one_line(tmp_path):
    from zipkd.cli import app
    from zipkd.models.embedded import embedded_gguf

    runner = _runner()
    data = embedded_gguf().read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 3])
    (tmp_path / "head.gguf").write_bytes(data[:5000])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 100)
    for name, why in (("trunc", "truncated"), ("head", "corrupt or truncated"), ("junk", "not a GGUF file")):
        assert why in _one_line_error(runner.invoke(app, ["eval", str(tmp_path / f"{name}.gguf")]))
    # a torch-only quantization for llama.cpp: the GGUF types are named
    err = _one_line_error(
        runner.invoke(app, ["eval", "smollm2-135m", "--runtime", "llama.cpp", "--quantization", "bnb-int8"])
    )
    assert "torch quantization" in err and "q8_0" in err and "q4_k_m" in err
    err = _one_line_error(runner.invoke(app, ["eval", "smollm2-135m", "--quantization", "quanto-int8"]))
    assert "q8_0" in err
    # GGUF options with torch
    err = _one_line_error(
        runner.invoke(app, ["eval", "smollm2-135m", "--runtime", "torch", "--quantization", "q8_0"])
    )
    assert "--runtime llama.cpp" in err
    err = _one_line_error(runner.invoke(app, ["eval", "smollm2-135m", "--threads", "2"]))
    assert "--runtime llama.cpp" in err
    # a folder quantized by zipkd in torch: export the unquantized model instead
    q = tmp_path / "quantized"
    q.mkdir()
    (q / "config.json").write_text(
        json.dumps({"model_type": "llama", "zipkd_quantization": {"method": "quanto-int8", "modules": {}}})
    )
    (q / "zipkd.json").write_text(
        json.dumps({"stage": "quantize", "inputs": [{"role": "model", "path": str(tmp_path)}]})
    )
    err = _one_line_error(runner.invoke(app, ["eval", str(q), "--runtime", "llama.cpp"]))
    assert "quantized in torch (quanto-int8)" in err and "export the unquantized model" in err
    res = runner.invoke(app, ["eval", "smollm2-135m", "--runtime", "onnx"])
    assert res.exit_code == 2 and "onnx" in res.output
    err = _one_line_error(
        runner.invoke(app, ["eval", "smollm2-135m", "--runtime", "llama.cpp", "--batch", "4"])
    )
    assert "batch 1" in err


# ---------------------------------------------------------------- slow: the real model, torch vs llama.cpp


@pytest.mark.slow
def test_perplexity_matches_torch_on_the_same_windows(engine_lm, real_model):
    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts
    from zipkd.evaluate.llamacpp_lm import perplexity_windows
    from zipkd.evaluate.perplexity import perplexity

    texts = load_texts(heldout_text_path())
    torch_ppl = perplexity(real_model.model, real_model.tokenizer, texts, max_length=256, max_tokens=512)
    ours = engine_lm.perplexity(texts, max_length=256, max_tokens=512)
    assert ours["tokens"] == torch_ppl["tokens"] == 2 * 255 and ours["max_length"] == 256
    assert perplexity_windows(engine_lm.tokenizer, texts, 256, 512) == perplexity_windows(
        real_model.tokenizer, texts, 256, 512
    )
    assert abs(ours["perplexity"] / torch_ppl["perplexity"] - 1) < 1e-3  # within 0.1%
    assert 10 < ours["perplexity"] < 200


@pytest.mark.slow
def test_loglikelihoods_and_accuracy_match_torch(engine_lm, gguf32, real_model):
    from lm_eval.api.instance import Instance

    from zipkd.evaluate.harness import run_tasks
    from zipkd.evaluate.llamacpp_lm import LlamaCppLM, run_tasks_llamacpp

    reqs = _task_requests({"arc_easy": 4, "hellaswag": 1})
    hf = _hflm(real_model).loglikelihood(reqs)
    ours = engine_lm.loglikelihood(reqs)
    assert len(ours) == len(hf) == len(reqs) >= 18
    for (a, ga), (b, gb) in zip(hf, ours, strict=True):
        assert abs(a - b) <= LL_ATOL + LL_RTOL * abs(a), (a, b)
        assert ga == gb
    # contexts truncated from the left to max_length as HFLM does: the same (shorter) inputs are scored
    short = reqs[:8]
    hf24 = _hflm(real_model, max_length=24)
    hf_short = hf24.loglikelihood(short)
    with LlamaCppLM(gguf32, engine_lm.tokenizer, max_length=24, threads=THREADS) as lm24:
        ours_short = lm24.loglikelihood(short)
        assert lm24.engine(1).n_ctx <= 256  # sized to the longest request, not to the model's 8192
        # rolling loglikelihood over several windows of 24 tokens
        texts = [
            ("The quick brown fox jumps over the lazy dog. " * 6,),
            ("Once upon a time there was a tree.",),
        ]
        rolling = [Instance("loglikelihood_rolling", {}, t, 0) for t in texts]
        hf_roll = hf24.loglikelihood_rolling(rolling)
        our_roll = lm24.loglikelihood_rolling(rolling)
    for (a, _), (b, _) in zip(hf_short, ours_short, strict=True):
        assert abs(a - b) <= LL_ATOL + LL_RTOL * abs(a), (a, b)
    # the truncation did change them
    assert any(abs(x[0] - y[0]) > 0.1 for x, y in zip(hf_short, hf[:8], strict=True))
    for a, b in zip(hf_roll, our_roll, strict=True):
        assert abs(a - b) <= LL_ATOL + LL_RTOL * abs(a), (a, b)
    # lm-eval end to end: the same accuracy on the same documents
    torch_res = run_tasks(real_model.model, real_model.tokenizer, ["arc_easy"], limit=8)["arc_easy"]
    ours_res = run_tasks_llamacpp(gguf32, engine_lm.tokenizer, ["arc_easy"], limit=8, threads=THREADS)[
        "arc_easy"
    ]
    assert ours_res.n == torch_res.n == 8
    assert ours_res.metrics == torch_res.metrics


@pytest.mark.slow
def test_greedy_generation_matches_torch(engine_lm, real_model):
    """lm-eval's generate_until: the same text as HFLM where the greedy choice is clear; in general every token
    llama.cpp picks is torch's argmax up to a near-tie (f16 KV cache), checked with torch teacher-forced."""
    import torch
    from lm_eval.api.instance import Instance

    req = Instance(
        "generate_until", {}, ("The capital of France is", {"until": ["\n\n"], "max_gen_toks": 12}), 0
    )
    assert engine_lm.generate_until([req]) == _hflm(real_model).generate_until([req]) == [" Paris."]
    prompt = real_model.tokenizer.encode("Question: What do bees make?\nAnswer:")
    new = engine_lm.greedy(prompt, 16)
    assert len(new) == 16
    with torch.no_grad():
        logits = real_model.model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : -1].double()
    chosen = logits[torch.arange(len(new)), torch.tensor(new)]
    assert (logits.max(-1).values - chosen).max().item() < 0.05  # each token is (up to a near-tie) the argmax
    with pytest.raises(ZipkdError, match="greedily"):
        engine_lm.generate_until([Instance("generate_until", {}, ("Hi", {"do_sample": True}), 0)])


@pytest.mark.slow
def test_cli_eval_gguf_report_and_gate(gguf32, tmp_path):
    """`zipkd eval FILE.gguf --base smollm2-135m`: the base is exported to a temporary GGUF of the file's type
    (F32: the same weights, so the same scores), both timed round-robin in prefill and decode; the report is
    written and gates."""
    from zipkd.cli import app
    from zipkd.evaluate.report import Report

    runner = _runner()
    scoring = ["--tasks", "arc_easy", "--limit", "4", "--ppl-max-length", "256", "--ppl-tokens", "256"]
    small = ["--threads", str(THREADS), "--base", "smollm2-135m"]
    timing = ["--repeats", "1", "--seq-len", "32", "--context", "8", "--decode-tokens", "4"]
    before = set(Path(tempfile.gettempdir()).glob("zipkd-eval-*"))
    res = runner.invoke(app, ["eval", str(gguf32), *scoring, *small, *timing, "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert set(Path(tempfile.gettempdir()).glob("zipkd-eval-*")) == before  # the temporary GGUF is gone
    assert "llama.cpp" in res.output and "decode" in res.output
    report = Report.load(tmp_path / "rep")
    cfg, regime = report.config, report.regime
    assert cfg["runtime"] == "llama.cpp" and cfg["quantization"] == "f32" and cfg["threads"] == THREADS
    assert regime["runtime"] == "llama.cpp" and regime["seq_len"] == 32 and regime["decode_tokens"] == 4
    m, b = report.models[0], report.base
    assert m.engine["gguf"] == str(gguf32) and m.engine["quantization"] == "f32" and m.stage == "export"
    assert b.engine["exported_from"] and b.engine["gguf"] is None and b.engine["quantization"] == "f32"
    assert m.quality["arc_easy"] == b.quality["arc_easy"] and m.retention["arc_easy"] == 1.0
    assert m.perplexity == b.perplexity and m.perplexity["tokens"] == 255
    assert m.memory["disk_bytes"] == gguf32.stat().st_size and m.memory["params"] == b.memory["params"]
    assert set(m.speed["regimes"]) == {"prefill", "decode"} and m.speed["regime"] == "prefill"
    assert m.measured_speedup == pytest.approx(b.speed["median_ms"] / m.speed["median_ms"])
    assert m.speed["regimes"]["decode"]["tokens_per_s"] == pytest.approx(
        1e3 / m.speed["regimes"]["decode"]["median_ms"]
    )
    assert 0.2 < m.measured_speedup < 5  # the same weights: about 1x
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "decode, ms/token" in md and "Runtime: llama.cpp" in md
    # the gate: the base's scores are reused from the baseline (same weights, same settings); no speed was
    # measured, so a speedup floor fails naming it
    res = runner.invoke(
        app,
        [
            "eval",
            str(gguf32),
            *small,
            "--baseline",
            str(tmp_path / "rep"),
            "--no-speed",
            "--min-speedup",
            "1.5",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "Scores of smollm2-135m reused" in res.output and "measured speedup" in res.output
    assert "arc_easy acc" in res.output and "gate failed" in res.output


@pytest.mark.slow
def test_model_folder_in_llamacpp_at_q8_0(real_model, engine_lm):
    """A model folder with runtime llama.cpp is exported to a temporary q8_0 GGUF, scored there and removed."""
    from zipkd.evaluate import EvalConfig, evaluate

    before = set(Path(tempfile.gettempdir()).glob("zipkd-eval-*"))
    cfg = EvalConfig(
        tasks=["arc_easy"],
        limit=4,
        ppl_max_length=256,
        ppl_max_tokens=256,
        speed=False,
        runtime="llama.cpp",
        quantization="q8_0",
        threads=THREADS,
    )
    report = evaluate("smollm2-135m", cfg)
    assert set(Path(tempfile.gettempdir()).glob("zipkd-eval-*")) == before
    m = report.models[0]
    assert report.base is None  # the embedded model is a base itself
    assert m.engine["quantization"] == "q8_0" and m.engine["exported_from"] == str(real_model.path)
    assert m.path == str(real_model.path) and m.stage == "convert"
    assert m.memory["weights_bytes"] < 0.3 * 4 * m.memory["params"]  # about 8.5 bits per weight
    assert m.quality["arc_easy"]["n"] == 4 and math.isfinite(m.perplexity["perplexity"])
    assert report.config["runtime"] == "llama.cpp" and report.regime is None
    # q8_0 is close to lossless: perplexity within 2% of the F32 GGUF's on the same windows
    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts

    f32 = engine_lm.perplexity(load_texts(heldout_text_path()), max_length=256, max_tokens=256)
    assert f32["tokens"] == m.perplexity["tokens"]
    assert abs(m.perplexity["perplexity"] / f32["perplexity"] - 1) < 0.02
