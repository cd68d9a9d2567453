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
