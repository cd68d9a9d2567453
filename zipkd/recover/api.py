"""`recover(model, RecoverConfig(...), out)`: self-data distillation recovery of a pruned model.

1. Teacher: the unpruned ancestor named in the student's manifest chain (or `config.teacher`); same tokenizer.
2. Data: instruction/response JSONL (default: zipkd's fine-tuning set, disjoint from every evaluation task), a
   seeded subset; with `distill`, the teacher rewrites each response (cached by content hash).
3. Training (`train.py`): full or LoRA, loss on response tokens, optional KD against the teacher and optional
   plain-text windows (calibration-role text by default; never evaluation text); checkpointed and resumable.
4. Output: a model folder with a manifest naming teacher, data hash, distilled-set hash, config, seed, loss."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zipkd.data.assets import finetune_path, recover_mix
from zipkd.data.text import load_texts, parse_weighted
from zipkd.errors import ZipkdError
from zipkd.manifest import content_hash, read_manifest
from zipkd.models.formats import folder_format
from zipkd.models.io import LoadedModel, load_model, read_config, resolve_model, save_model
from zipkd.outputs import check_output, output_lock
from zipkd.recover.data import (
    RewriteSettings,
    check_same_tokenizer,
    encode_examples,
    examples_hash,
    load_examples,
    mixed_windows,
    select_examples,
    self_distill,
)
from zipkd.recover.train import TrainConfig, clock, config_dict, resolve_precision, train

# Stages whose output derives from a model that is not the user's original: followed back to find the teacher.
DERIVED_STAGES = ("prune", "recover", "merge", "quantize")


def default_mix() -> list[tuple[Path, float]]:
    """The mixing text when none is given: the pruning calibration mix's sources at `CALIB_WEIGHTS` (prose,
    code, chat, math; calibration-role text, never evaluation text), code, chat and math with up to 1M
    characters a file (`recover_mix()`). Chosen on development text: against the prose alone the four-domain mix
    recovered the development geometric-mean perplexity ratio to 2.62x dense instead of 3.29x at 40 steps
    (`--choose mix`); with the larger files, 1.32x instead of 1.67x in 30 minutes (`--choose mix-size`: the
    calibration files' 242k-token pool was seen twice)."""
    return list(recover_mix().values())


@dataclass
class RecoverConfig:
    """Everything a recovery run depends on (the CLI only fills this in)."""

    teacher: str | None = None  # None: the first non-pruned ancestor in the student's manifest chain
    data: str | None = None  # instruction/response JSONL; None: zipkd's default fine-tuning set
    distill: bool = True  # self-data distillation; False: plain SFT on the original responses
    max_examples: int | None = 256  # seeded subset of the data (None: all)
    rewrite: RewriteSettings = field(default_factory=RewriteSettings)
    # plain text for `train.mix_ratio`: files, each `PATH` or `PATH:WEIGHT` (weights are shares of the text
    # windows); None: `DEFAULT_MIX` (calibration-role text, never evaluation text)
    mix_text: str | Sequence[str] | None = None
    text_window: int | None = None  # tokens per plain-text window (None: train.max_seq_len)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.mix_text is not None:
            items = [self.mix_text] if isinstance(self.mix_text, str) else self.mix_text
            self.mix_text = tuple(str(m) for m in items)
            parse_weighted(self.mix_text, "mixing text")  # validates the weights
        if self.max_examples is not None and self.max_examples < 1:
            raise ZipkdError(f"max examples must be at least 1 (got {self.max_examples})")
        if self.text_window is not None and not 8 <= self.text_window <= self.train.max_seq_len:
            raise ZipkdError(
                f"text window must be between 8 and max_seq_len ({self.train.max_seq_len}) tokens"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ZipkdError(f"unknown device {self.device!r}; use cpu or cuda[:N]")

    @property
    def data_path(self) -> Path:
        """The fine-tuning set: `data`, or the embedded default."""
        return Path(self.data).expanduser() if self.data else finetune_path()

    @property
    def mix_sources(self) -> list[tuple[Path, float]]:
        """(file, share of the text windows) of every mixing-text source."""
        if self.mix_text is None:
            return default_mix()
        return parse_weighted(self.mix_text, "mixing text")

    @property
    def needs_teacher(self) -> bool:
        return self.distill or self.train.uses_teacher


def _resolve(path: str | os.PathLike) -> Path:
    return resolve_model(str(path))


def find_teacher(student: str | os.PathLike) -> Path:
    """Follow the `model` inputs of the manifests back from the student to the first ancestor that was not
    produced by pruning (or recovery/merging/quantization of a pruned model)."""
    path = Path(student)
    first = read_manifest(path)
    if first is None:
        raise ZipkdError(f"{path} has no zipkd.json manifest to find its unpruned teacher in; pass --teacher")
    if first.get("stage") not in DERIVED_STAGES:
        raise ZipkdError(f"{path} is not a pruned model (stage {first.get('stage')!r}); pass --teacher")
    seen = {path.resolve()}
    while True:
        manifest = read_manifest(path)
        if manifest is None or manifest.get("stage") not in DERIVED_STAGES:
            return path
        entry = next((i for i in manifest.get("inputs", []) if i.get("role") == "model"), None)
        if entry is None:
            raise ZipkdError(f"the manifest of {path} names no input model; pass --teacher")
        try:
            parent = _resolve(entry["path"])
        except ZipkdError:
            raise ZipkdError(
                f"the model {entry['path']} that {path} was made from is missing; pass --teacher"
            ) from None
        if parent.resolve() in seen:
            raise ZipkdError(f"the manifests from {student} form a cycle; pass --teacher")
        seen.add(parent.resolve())
        if entry.get("sha256") and parent.is_dir():
            if content_hash(parent) != entry["sha256"]:
                raise ZipkdError(
                    f"{parent} has changed since {path} was made from it (hash mismatch); "
                    "pass --teacher to use it anyway"
                )
        path = parent


def work_dir_for(out: Path) -> Path:
    """Checkpoints live beside the output (same file system), removed once the output is written."""
    return out.parent / f".{out.name}.recover-work"


def _run_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def recover(
    model: Any,
    config: RecoverConfig | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: Any = None,
    callback: Any = None,
) -> Path:
    """Recover a pruned model (a path/name or a `LoadedModel` with a `.path`) into the folder `out`. The
    output is checked (and locked) before anything loads; a quantized model is refused. A time budget
    (`config.train.budget`) counts from here: loading and the teacher's rewrites take their share."""
    started = clock()
    config = config or RecoverConfig()
    if out is None:
        raise ZipkdError("recover needs an output folder")
    src = Path(model.path) if isinstance(model, LoadedModel) else resolve_model(model)
    if isinstance(model, LoadedModel):
        check_trainable(model.model.config.to_dict(), src)
    elif src.is_dir():
        check_trainable(read_config(src), src)
    mix = config.mix_sources if config.train.mix_ratio > 0 else []  # validated once, before any loading
    data = [Path(config.data).expanduser()] if config.data else []
    data += [p for p, _ in mix] if config.mix_text else []  # the user's files (not zipkd's own default mix)
    out = check_output(out, force, (src, *data))
    data_path = config.data_path
    examples = select_examples(
        load_examples(data_path), config.max_examples, config.train.seed
    )  # before weights
    with output_lock(out):
        return _recover(model, config, out, force, progress, callback, data_path, examples, mix, started)


def check_trainable(model_config: dict[str, Any], src: Path) -> None:
    """Recovery trains float weights: a model saved in a quantized format is refused (recover, then quantize)."""
    fmt = folder_format(model_config)
    if fmt is not None:
        recipe = model_config[fmt]
        method = recipe.get("method", fmt) if isinstance(recipe, dict) else fmt
        raise ZipkdError(
            f"{src} is quantized ({method}); recovery trains float weights: recover the unquantized model, then "
            "quantize the result"
        )


def _recover(
    model: Any,
    config: RecoverConfig,
    out: Path,
    force: bool,
    progress: Any,
    callback: Any,
    data_path: Path,
    examples: list[Any],
    mix: list[tuple[Path, float]],
    started: float | None = None,
) -> Path:
    from accelerate import PartialState

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    cfg = config.train
    dist = PartialState(cpu=config.device == "cpu")
    device = str(dist.device) if config.device.startswith("cuda") else "cpu"
    if lm.tokenizer is None:
        raise ZipkdError(f"{lm.path} has no tokenizer; recovery needs one")

    # `auto` precision is settled here, once, so the run key, the manifest and the loop agree on it.
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))

    teacher_path = teacher = None
    teacher_hash = ""
    if config.needs_teacher:
        teacher_path = _resolve(config.teacher) if config.teacher else find_teacher(lm.path)
        if teacher_path.resolve() == Path(lm.path).resolve():
            raise ZipkdError(f"the teacher {teacher_path} is the student itself; pass the unpruned model")
        dtype = "bfloat16" if cfg.precision == "bf16" and device != "cpu" else "float32"
        t_lm = load_model(teacher_path, dtype=dtype, device=device)
        check_same_tokenizer(lm.tokenizer, t_lm.tokenizer, str(lm.path), str(teacher_path))
        if t_lm.model.config.vocab_size != lm.model.config.vocab_size:
            raise ZipkdError(
                f"teacher and student have different vocabulary sizes "
                f"({t_lm.model.config.vocab_size} vs {lm.model.config.vocab_size})"
            )
        teacher = t_lm.model
        teacher_hash = content_hash(teacher_path)

    distilled = None
    train_examples = examples
    if config.distill:
        if dist.is_main_process:
            distilled = self_distill(teacher, lm.tokenizer, examples, config.rewrite, teacher_hash, progress)
        dist.wait_for_everyone()
        if not dist.is_main_process:  # the main process has filled the cache
            distilled = self_distill(teacher, lm.tokenizer, examples, config.rewrite, teacher_hash, None)
        train_examples = distilled.examples
    if not cfg.uses_teacher:  # the rewrites are made and no KD follows: free the teacher before training
        teacher = t_lm = None
    qa = encode_examples(lm.tokenizer, train_examples, cfg.max_seq_len)
    text = []
    if mix:
        sources = [(load_texts(path), w) for path, w in mix]
        text = mixed_windows(lm.tokenizer, sources, config.text_window or cfg.max_seq_len, cfg.seed)

    student_hash = content_hash(lm.path)
    data_hash = examples_hash(examples)
    train_hash = examples_hash(train_examples)
    run_key = _run_key(
        {
            "student": student_hash,
            "teacher": teacher_hash,
            "train_data": train_hash,
            "mix": [(content_hash(path), w) for path, w in mix] if mix else None,
            "text_window": config.text_window,
            "train": asdict(cfg),
        }
    )
    work = work_dir_for(out)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    result = train(
        lm.model,
        teacher if cfg.uses_teacher else None,
        qa,
        text,
        cfg,
        work,
        pad,
        run_key=run_key,
        device=device,
        progress=progress,
        callback=callback,
        deadline=(started if started is not None else clock()) + cfg.budget
        if cfg.budget is not None
        else None,
    )

    if not dist.is_main_process:
        return out
    inputs = {"model": lm.path, "teacher": teacher_path, "data": data_path}
    if len(mix) == 1:
        inputs["mix_text"] = mix[0][0]
    else:
        inputs.update({f"mix_text.{i}": path for i, (path, _) in enumerate(mix)})
    hashes = {"model": student_hash}
    if teacher_path is not None:
        hashes["teacher"] = teacher_hash
    metrics = {
        "final_loss": result.final_loss,
        "steps": result.steps,
        "tokens": result.tokens,
        "target_tokens": result.target_tokens,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.seconds,
        "peak_lr": result.peak_lr,
        "resumed_from_step": result.resumed_from,
        "examples": len(examples),
        "sequences": len(qa),
        "text_windows": len(text),
    }
    extra = {
        "recovery": {
            "data_hash": data_hash,
            "train_data_hash": train_hash,
            "distilled_set": (
                {"hash": distilled.hash, "cache_key": distilled.key, "stats": distilled.stats}
                if distilled
                else None
            ),
            "loss_curve": result.losses[:: max(1, len(result.losses) // 100)],
        }
    }
    conf = {
        "teacher": str(teacher_path) if teacher_path else None,
        "data": str(data_path),
        "distill": config.distill,
        "max_examples": config.max_examples,
        "rewrite": asdict(config.rewrite),
        "mix_text": [f"{path}:{w:g}" for path, w in mix] or None,
        "text_window": config.text_window or cfg.max_seq_len,
        "train": config_dict(cfg),
        "device": config.device,
    }
    path = save_model(
        result.model.to("cpu"),
        lm.tokenizer,
        out,
        stage="recover",
        inputs=inputs,
        config=conf,
        seed=cfg.seed,
        metrics=metrics,
        extra=extra,
        force=force,
        input_hashes=hashes,
    )
    shutil.rmtree(work, ignore_errors=True)
    return path
