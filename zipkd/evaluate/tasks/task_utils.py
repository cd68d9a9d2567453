"""Document processing for zipkd's lm-eval tasks, loaded by the YAMLs through `!function task_utils.<name>`.

Every task shuffles its documents with a fixed seed, so `--limit N` scores a reproducible random sample of N
rather than the first N rows of a file sorted by subject or source. HellaSwag and WinoGrande follow
lm-evaluation-harness's own preprocessing exactly."""

from __future__ import annotations

import re

SHUFFLE_SEED = 1234


def shuffled(dataset):
    """The documents in a fixed pseudo-random order (the mean over all of them is unchanged)."""
    return dataset.shuffle(seed=SHUFFLE_SEED).flatten_indices()


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def process(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return shuffled(dataset).map(process)


def winogrande_text(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choice(doc) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
