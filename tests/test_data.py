"""Offline data: roles are disjoint, user files are read, calibration batches are seeded."""

from __future__ import annotations

import json

import pytest
import torch

from zipkd.data.assets import boolq_partition, coqa_partition, ensure_data
from zipkd.data.text import calibration_batch, load_texts
from zipkd.errors import ZipkdError


def test_roles_are_disjoint():
    folder = ensure_data()
    calib = set((folder / "calib.txt").read_text().split("\n\n"))
    calib = {c.strip() for c in calib if c.strip()}
    boolq_eval = [json.loads(line) for line in (folder / "eval" / "boolq.jsonl").open()]
    assert calib and boolq_eval
    assert not calib & {r["passage"].strip() for r in boolq_eval}
    assert all(boolq_partition(r["passage"]) == "eval" for r in boolq_eval)
    sources = {json.loads(line)["source"] for line in (folder / "finetune.jsonl").open()}
    tasks = {p.stem for p in (folder / "eval").glob("*.jsonl")}
    assert sources and not sources & tasks
    heldout = (folder / "heldout.txt").read_text()
    assert not any(c[:200] in heldout for c in list(calib)[:200])
    # Development stories: none calibrated on, none in the held-out text; both partitions non-empty.
    dev = {d.strip() for d in (folder / "dev.txt").read_text().split("\n\n") if d.strip()}
    assert len(dev) >= 50 and not dev & calib
    assert not any(d[:200] in heldout for d in dev)
    info = json.loads((folder / "datasets.json").read_text())
    assert info["counts"]["calib_stories"] > 3 * info["counts"]["dev_stories"] > 0
    assert len(calib) == info["counts"]["calib_passages"] + info["counts"]["calib_stories"]
    parts = [coqa_partition(f"story {i}") for i in range(1000)]
    assert 0.15 < parts.count("dev") / 1000 < 0.25 and parts == [
        coqa_partition(f"story {i}") for i in range(1000)
    ]


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\nthree")
    assert load_texts(tmp_path / "a.txt") == ["one", "two", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"instruction": "q", "response": "a"}\n')
    assert load_texts(tmp_path / "b.jsonl") == ["x", "q\na"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"foo": 1}\n')
    with pytest.raises(ZipkdError, match="c.jsonl:2"):
        load_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(ZipkdError, match="empty"):
        load_texts(tmp_path / "d.txt")
    import datasets

    datasets.Dataset.from_dict({"text": ["p", "q"]}).to_parquet(str(tmp_path / "e.parquet"))
    assert load_texts(tmp_path / "e.parquet") == ["p", "q"]


class _Tok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_calibration_batch_seeded():
    texts = ["hello world"] * 50
    a = calibration_batch(_Tok(), texts, 4, 16, seed=3)
    b = calibration_batch(_Tok(), texts, 4, 16, seed=3)
    c = calibration_batch(_Tok(), texts, 4, 16, seed=4)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ZipkdError, match="too short"):
        calibration_batch(_Tok(), ["hi"], 4, 16, seed=0)


# --- calibration mix, development domains, held-out domains (issue #17) ---------------------------------------


def _docs(path):
    return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]


def _norm(text):
    return " ".join(text.split())


def _grams(texts, n=13):
    """Word 13-grams, the usual contamination unit: a shared one means a shared passage, not a shared idiom."""
    out = set()
    for t in texts:
        w = t.split()
        out.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return out


def _strings(obj):
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _eval_strings(folder):
    """Every string of every evaluation row, normalised as `_norm` does."""
    return {
        _norm(s)
        for p in (folder / "eval").glob("*.jsonl")
        for line in p.open()
        for s in _strings(json.loads(line))
    }


def test_mix_and_domain_api():
    from zipkd.data import assets

    folder = ensure_data()
    mix = assets.calib_mix()
    assert list(mix) == ["prose", "code", "chat", "math"]
    assert mix["prose"][0] == assets.calib_text_path() == folder / "calib.txt"
    assert (
        {n: w for n, (_, w) in mix.items()}
        == assets.CALIB_WEIGHTS
        == {
            "prose": 0.4,
            "code": 0.2,
            "chat": 0.2,
            "math": 0.2,
        }
    )
    assert sum(w for _, w in mix.values()) == pytest.approx(1.0)
    held = assets.heldout_domains()
    assert set(held) >= {"lambada", "code", "science", "math", "medicine"}
    assert held["lambada"] == assets.heldout_text_path() == folder / "heldout.txt"
    dev = assets.dev_domains()
    assert set(dev) == set(mix) and dev["prose"] == assets.dev_text_path() == folder / "dev.txt"
    info = json.loads((folder / "datasets.json").read_text())
    assert info["export_version"] == assets.EXPORT_VERSION == 4
    # The calibration code is never Python (Python is the held-out code domain).
    assert "python" not in info["calib_code_languages"] and "python" not in assets.CALIB_CODE_LANGS
    # The old accessors still work and heldout.txt is still the first 1500 LAMBADA passages.
    lambada = [json.loads(line)["text"] for line in (folder / "eval" / "lambada.jsonl").open()]
    assert _docs(held["lambada"]) == [t.strip() for t in lambada[:1500]]
    assert assets.finetune_path().is_file() and assets.eval_data_path("boolq").is_file()


def test_domain_files_sizes():
    from zipkd.data.assets import calib_mix, dev_domains, heldout_domains

    for name, path in heldout_domains().items():
        docs = _docs(path)
        assert len(docs) >= 150 and 30_000 <= len(path.read_text()) <= 500_000, name
        assert len(set(map(_norm, docs))) == len(docs), name  # no document twice
    for name, path in dev_domains().items():
        assert len(_docs(path)) >= 50 and len(path.read_text()) >= 30_000, name
    for name, (path, _) in calib_mix().items():
        assert len(_docs(path)) >= 300 and len(path.read_text()) >= 100_000, name
    # The development fifth is held back from each calibration source (by a stable hash, about 1/5).
    info = json.loads((ensure_data() / "datasets.json").read_text())["counts"]
    assert 0.15 < info["dev_code"] / (info["dev_code"] + info["calib_code"]) < 0.25


def test_no_document_in_two_roles():
    from zipkd.data.assets import calib_mix, dev_domains, heldout_domains

    folder = ensure_data()
    files = {f"calib:{n}": p for n, (p, _) in calib_mix().items()}
    files |= {f"dev:{n}": p for n, p in dev_domains().items()}
    files |= {f"heldout:{n}": p for n, p in heldout_domains().items()}
    docs = {name: {_norm(d) for d in _docs(p)} for name, p in files.items()}
    names = sorted(docs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not docs[a] & docs[b], (a, b)
    # Nothing of the mix or the new held-out domains is an evaluation row's text.
    evals = _eval_strings(folder)
    for name in names:
        if name != "heldout:lambada":  # heldout.txt is LAMBADA, an evaluation role itself
            assert not docs[name] & evals, name
    # Held-out domains share no passage (13 words in a row) with calibration, development, fine-tuning text
    # or another held-out domain.
    ft = [s for line in (folder / "finetune.jsonl").open() for s in _strings(json.loads(line))]
    other = {name: _grams(_docs(p)) for name, p in files.items()} | {"finetune": _grams(ft)}
    for name in heldout_domains():
        mine = other[f"heldout:{name}"]
        for o, grams in other.items():
            if o != f"heldout:{name}":
                assert not mine & grams, (name, o)


def test_code_domains():
    import ast
    import re

    from zipkd.data.assets import calib_mix, dev_domains, heldout_domains

    # Held-out code is Python: every document parses.
    for doc in _docs(heldout_domains()["code"]):
        ast.parse(doc)
    # Calibration/dev code is not: fenced in a non-Python language, no Python `def f(...):` line.
    py_def = re.compile(r"^\s*def \w+\s*\(.*\)\s*(->[^:]*)?:\s*$", re.M)
    for path in (calib_mix()["code"][0], dev_domains()["code"]):
        for doc in _docs(path):
            fence = re.search(r"^```(\w+)$", doc, re.M)
            assert fence and fence.group(1) != "python" and "```python" not in doc
            assert not py_def.search(doc), doc[:200]


def test_roles_doc_is_generated():
    from pathlib import Path

    from zipkd.data.assets import roles_table

    doc = Path(__file__).resolve().parents[1] / "docs" / "data-roles.md"
    assert roles_table() in doc.read_text(), (
        "docs/data-roles.md is stale: python -m zipkd.data.assets docs/data-roles.md"
    )


def test_recover_mix_is_a_disjoint_superset():
    """`recover_mix()`: the calibration mix's sources with more text a file. Every calibration document is kept
    (pass one of the code is the calibration code), each file holds more than twice the text, and nothing in it
    is development, held-out or evaluation text, nor shares a 13-word passage with a held-out domain."""
    from zipkd.data.assets import CALIB_CHARS, LARGE_MIX_CHARS, calib_mix, heldout_domains, recover_mix

    folder = ensure_data()
    mix, large = calib_mix(), recover_mix()
    assert list(large) == list(mix) and large["prose"] == mix["prose"]
    assert {n: w for n, (_, w) in large.items()} == {n: w for n, (_, w) in mix.items()}
    others = [*(folder / "dev").glob("*.txt"), folder / "dev.txt", *heldout_domains().values()]
    banned = {_norm(d) for p in others for d in _docs(p)}
    banned |= _eval_strings(folder)
    held = set().union(*(_grams(_docs(p)) for p in heldout_domains().values()))
    for name in ("code", "chat", "math"):
        path = large[name][0]
        assert path == folder / "recover" / f"{name}.txt"
        docs = [_norm(d) for d in _docs(path)]
        assert len(set(docs)) == len(docs), name
        assert {_norm(d) for d in _docs(mix[name][0])} <= set(docs), name
        assert 2 * CALIB_CHARS < len(path.read_text()) <= LARGE_MIX_CHARS + 2, name
        assert not set(docs) & banned, name
        assert not _grams(_docs(path)) & held, name
