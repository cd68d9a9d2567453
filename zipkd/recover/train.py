"""The recovery training loop: full fine-tuning or LoRA of the pruned student on instruction sequences (loss on
response tokens) and optional plain-text windows, with an optional logit-distillation term against the teacher.

Reproducible and resumable: the data order is a pure function of (seed, step); every `checkpoint_every` steps
the trainable weights (safetensors), the optimizer state (`torch.save`, read back with `weights_only=True`),
the RNG states and the step are written atomically into a work folder, and a rerun with the same inputs resumes
from the last checkpoint and ends with bit-identical weights (CPU). Runs under `accelerate launch` (DDP): each
process takes its share of every batch and `accelerate` averages the gradients; only the main process writes."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zipkd.errors import ZipkdError
from zipkd.manifest import set_seed
from zipkd.models.adapters import adapter_for
from zipkd.recover.allocator import reuse_freed_memory
from zipkd.recover.data import TrainSeq
from zipkd.recover.losses import KD_MODES, combined_loss, fused_head_loss
from zipkd.recover.master import TrainWeights

METHODS = ("full", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
CKPT_PREFIX = "ckpt-"
_clock = time.monotonic  # the time budget's clock (a test replaces it)


def clock() -> float:
    """Seconds on the time budget's clock."""
    return _clock()


KEEP_CHECKPOINTS = 2

# full fine-tuning's default peak learning rate by run length, chosen on development text (BENCHMARKS.md
# "Recovery's peak lr by run length"): 1e-3 won at 40 and 76 steps (the demo's scale), 3e-4 at 400 (the
# bench's 30 minutes); between the two run lengths it is interpolated on log scales
FULL_LR_BY_STEPS = ((76, 1e-3), (400, 3e-4))


def default_full_lr(steps: int) -> float:
    """Full fine-tuning's default peak learning rate for a run of `steps` steps."""
    (s0, lr0), (s1, lr1) = FULL_LR_BY_STEPS
    if steps <= s0:
        return lr0
    if steps >= s1:
        return lr1
    f = math.log(steps / s0) / math.log(s1 / s0)
    return math.exp(math.log(lr0) + f * math.log(lr1 / lr0))


@dataclass
class TrainConfig:
    """Hyper-parameters of one recovery run (validated on construction)."""

    steps: int = 200
    # a budget instead of `steps` (at most one): student tokens ("2M", "500k", 2000000; the step count follows
    # from the data order before training), or wall time ("20m", "90s", "1.5h"; counted from the start of
    # `recover`, teacher rewrites included: the step count is planned from the speed of the warm-up steps and
    # may grow once, at four times that step, from the speed since)
    tokens: int | str | None = None
    budget: float | str | None = None  # seconds once validated
    batch_size: int = 8
    lr: float | None = None  # None: by run length for full fine-tuning (`default_full_lr`), 5e-4 for LoRA
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay down to this fraction of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    method: str = field(default="full", metadata={"choices": METHODS})
    lora_rank: int = 16
    lora_alpha: float = 32.0
    train_embeddings: bool = False  # full fine-tuning: also train the (tied) embeddings / LM head
    # logit distillation against the teacher, off by default: at equal wall time, cross-entropy on the teacher's
    # rewrites beat forward KL at weight 0.5 on every development domain at 5 and 30 minutes (the teacher's forward
    # pass costs more steps than its soft targets give back; BENCHMARKS.md "Recovery's KD weight")
    kd: str = field(default="none", metadata={"choices": KD_MODES})
    kd_weight: float = 0.5  # the KD term's weight when `kd` is on: (1 − w)·CE + w·KD
    temperature: float = 1.0
    mix_ratio: float = 0.75  # fraction of steps on plain-text windows (calibration prose; chosen on dev.txt)
    max_seq_len: int = 256
    checkpoint_every: int = 50
    seed: int = 0
    # pack each batch's sequences into as few rows as fit max_seq_len (first-fit decreasing), each attending only
    # to itself (position ids restart per sequence; transformers builds the block-diagonal causal mask): the same
    # loss on the same examples as padding each to the longest, with less padding computed (used for a batch only
    # when it computes fewer positions than padding: equal-length text windows stay plain rows)
    pack: bool = True
    # the LM head and the loss fused and computed in row chunks, never materialising the (tokens × vocabulary)
    # logits (exact up to float rounding; False: the plain path, kept for the side-by-side benchmark)
    fused_loss: bool = True
    precision: str = field(
        default="auto", metadata={"choices": PRECISIONS}
    )  # auto: bf16 mixed precision where the hardware has fast bf16, else fp32
    # in bf16 precision, the model computes with bf16 weights and the optimizer steps fp32 masters
    # (`master.TrainWeights`): autocast no longer casts weights and activations at every matrix product (2.5-3% a
    # step on a 2-core AVX512-BF16 CPU); False: fp32 weights under bf16 autocast (the earlier path)
    bf16_weights: bool = True

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens)
        self.budget = parse_duration(self.budget)
        if self.tokens is not None and self.budget is not None:
            raise ZipkdError("give a token budget or a time budget, not both")
        if self.budget is not None and self.warmup_steps < 2:
            raise ZipkdError("a time budget needs at least 2 warm-up steps to measure the speed on")
        if self.method not in METHODS:
            raise ZipkdError(f"unknown training method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.kd not in KD_MODES:
            raise ZipkdError(f"unknown distillation mode {self.kd!r}; choose one of {', '.join(KD_MODES)}")
        if self.precision not in PRECISIONS:
            raise ZipkdError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        checks = [
            (self.steps >= 1, f"steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1, f"batch size must be at least 1 (got {self.batch_size})"),
            (self.lr is None or self.lr > 0, f"learning rate must be positive (got {self.lr})"),
            (self.warmup_steps >= 0, "warmup steps must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (self.lora_rank >= 1 and self.lora_alpha > 0, "LoRA rank must be >= 1 and alpha positive"),
            (0.0 <= self.kd_weight <= 1.0, f"kd weight must be in [0, 1] (got {self.kd_weight})"),
            (self.temperature > 0, f"temperature must be positive (got {self.temperature})"),
            (0.0 <= self.mix_ratio < 1.0, f"mix ratio must be in [0, 1) (got {self.mix_ratio})"),
            (self.max_seq_len >= 8, f"max sequence length must be at least 8 (got {self.max_seq_len})"),
            (self.checkpoint_every >= 1, "checkpoint interval must be at least 1 step"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ZipkdError(msg)

    @property
    def learning_rate(self) -> float:
        """The peak learning rate of a run of `steps` steps: `lr`, else the default by method (and run length)."""
        if self.lr is not None:
            return self.lr
        return default_full_lr(self.steps) if self.method == "full" else 5e-4

    @property
    def uses_teacher(self) -> bool:
        return self.kd != "none" and self.kd_weight > 0


_COUNT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def _number_and_unit(value: str, units: dict, what: str, example: str) -> tuple[float, float]:
    text = value.strip().lower()
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num) :]
    try:
        x = float(num)
    except ValueError:
        x = float("nan")
    if unit not in units or not x > 0 or x == float("inf"):
        raise ZipkdError(f"cannot read {value!r} as {what} (e.g. {example})")
    return x, units[unit]


def parse_count(value: int | str | None) -> int | None:
    """Token counts: 2000000, "2M", "500k" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        x, scale = _number_and_unit(value, _COUNT, "a token count", "2M, 500k, 2000000")
        value = int(round(x * scale))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZipkdError(f"a token budget must be a positive count (got {value!r})")
    return value


def parse_duration(value: float | str | None) -> float | None:
    """Durations in seconds: 1200, "20m", "90s", "1.5h" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        x, scale = _number_and_unit(value, _SECONDS, "a duration", "20m, 90s, 1.5h")
        value = x * scale
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ZipkdError(f"a time budget must be a positive duration (got {value!r})")
    return float(value)


@dataclass
class TrainResult:
    model: Any  # the trained student (LoRA merged in), unwrapped
    steps: int
    final_loss: float  # mean loss of the last 10% of steps
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # tokens through the student (non-padding)
    target_tokens: int = 0  # tokens the loss was computed on
    seconds: float = 0.0  # wall time of the steps run in this process (excludes resumed ones)
    tokens_per_s: float = 0.0
    resumed_from: int = 0
    peak_lr: float = 0.0  # the schedule's peak learning rate (the planned run's, for a time budget)


# ------------------------------------------------------------------------------------------- data order
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio`·lr at the last step (pure function of the step)."""
    base = cfg.learning_rate
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def is_text_step(step: int, ratio: float) -> bool:
    """Spread text steps evenly: step s trains on text when ⌊(s+1)·r⌋ > ⌊s·r⌋."""
    return ratio > 0 and math.floor((step + 1) * ratio + 1e-9) > math.floor(step * ratio + 1e-9)


def batch_indices(
    step: int, n_items: int, batch_size: int, seed: int, stream: int, ratio: float
) -> list[int]:
    """Item indices of the batch at `step` in one data stream (0 = instructions, 1 = text): the stream's k-th
    batch covers positions k·B … k·B+B−1 of its epoch-wise seeded permutations. Pure, hence resumable."""
    text_before = math.floor(step * ratio + 1e-9) if ratio > 0 else 0
    k = text_before if stream == 1 else step - text_before
    out, cache = [], {}
    for pos in range(k * batch_size, (k + 1) * batch_size):
        epoch, i = divmod(pos, n_items)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7919 + epoch)
            cache[epoch] = torch.randperm(n_items, generator=gen).tolist()
        out.append(cache[epoch][i])
    return out


def collate(items: Sequence[TrainSeq], pad_id: int):
    """Right-padded (input_ids, attention_mask, target_mask) tensors; target_mask[b, t] says token t is a
    trained target (predicted from position t−1)."""
    length = max(len(s.ids) for s in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), length), dtype=torch.long)
    target = torch.zeros((len(items), length), dtype=torch.bool)
    for b, s in enumerate(items):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        attn[b, : len(s.ids)] = 1
        target[b, : len(s.ids)] = torch.tensor(s.target)
    return ids, attn, target


def step_batch(step: int, qa, text, cfg: TrainConfig, pad_id: int, rank: int = 0, world: int = 1):
    """This process's rows of step `step`: (ids, attention_mask, target_mask, position_ids or None)."""
    stream = 1 if is_text_step(step, cfg.mix_ratio) else 0
    items = text if stream == 1 else qa
    idx = batch_indices(step, len(items), cfg.batch_size, cfg.seed, stream, cfg.mix_ratio)
    share = cfg.batch_size // world
    mine = [items[i] for i in idx[rank * share : (rank + 1) * share]]
    if cfg.pack:
        rows = pack_rows([len(s.ids) for s in mine], cfg.max_seq_len)
        if len(rows) * _row_length(mine, rows) < len(mine) * max(len(s.ids) for s in mine):  # saves positions
            return pack(mine, pad_id, cfg.max_seq_len, rows)
    return (*collate(mine, pad_id), None)  # e.g. equal-length text windows: plain causal rows are faster


def steps_for_tokens(qa, text, cfg: TrainConfig, max_steps: int = 10**6) -> int:
    """Fewest steps whose batches carry at least `cfg.tokens` student tokens (as the loop counts them)."""
    total = 0
    for step in range(max_steps):
        ids, attn, _, _ = step_batch(step, qa, text, cfg, 0)
        total += int(attn[:, :-1].sum())
        if total >= cfg.tokens:
            return step + 1
    raise ZipkdError(f"a budget of {cfg.tokens:,} tokens needs more than {max_steps:,} steps")


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the sequences in each row of at most `capacity` tokens (a longer
    sequence gets a row of its own); ties keep the input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def _row_length(items: Sequence[TrainSeq], rows: Sequence[Sequence[int]]) -> int:
    return max(sum(len(items[i].ids) for i in row) for row in rows)


def pack(items: Sequence[TrainSeq], pad_id: int, capacity: int, rows: Sequence[Sequence[int]] | None = None):
    """(input_ids, attention_mask, target_mask, position_ids) with the sequences packed into rows (`pack_rows`,
    unless given). Position ids restart at 0 for every sequence and for the padding at a row's end, so the
    decoder's mask keeps the sequences apart; the first token of each sequence is never a target (it would be
    predicted from the previous sequence). attention_mask marks real tokens (for counting; the decoder gets
    position ids instead)."""
    if rows is None:
        rows = pack_rows([len(s.ids) for s in items], capacity)
    length = _row_length(items, rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    target = torch.zeros((len(rows), length), dtype=torch.bool)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = items[i], len(items[i].ids)
            ids[r, at : at + n] = torch.tensor(s.ids)
            attn[r, at : at + n] = 1
            target[r, at : at + n] = torch.tensor(s.target)
            target[r, at] = False
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(length - at)
    return ids, attn, target, pos


def _decode(lm: Any, input_ids, attention_mask, position_ids=None):
    """The decoder's last hidden states: padded rows (attention_mask) or packed rows (position_ids)."""
    if position_ids is not None:
        attention_mask = None  # transformers then derives the packed (block-diagonal) mask from the positions
    return lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


# ------------------------------------------------------------------------------------------- the model
class SelectedLogits(torch.nn.Module):
    """Runs the decoder on the whole sequence but the (large) LM head only at the trained positions; one module
    so DDP/FSDP see every parameter used in `forward`."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, select, position_ids=None):  # noqa: D401
        hidden = _decode(self.lm, input_ids, attention_mask, position_ids)
        logits = self.lm.get_output_embeddings()(hidden[select])
        # the family's own logit transform (Granite's logits scaling, Gemma 2's final soft-cap)
        return adapter_for(self.lm.config).head_logits(self.lm.config, logits)


def _head_scale(lm: Any) -> float | None:
    """The divisor of the family's logits (1.0 for most; Granite's `logits_scaling`), or None when the head
    cannot be fused (a bias, a soft-cap)."""
    ad = adapter_for(lm.config)
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None or (
        ad.final_softcap and getattr(lm.config, ad.final_softcap, None)
    ):
        return None
    return float(getattr(lm.config, ad.logit_scale)) if ad.logit_scale else 1.0


class SelectedHidden(torch.nn.Module):
    """The decoder's last hidden states at the trained positions (the teacher's side of the fused loss)."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, select, position_ids=None):  # noqa: D401
        return _decode(self.lm, input_ids, attention_mask, position_ids)[select]


class FusedStudent(torch.nn.Module):
    """The student's decoder, LM head and loss in one module (DDP sees every parameter used in `forward`); the
    head and the loss run fused (`fused_head_loss`)."""

    def __init__(self, lm: Any, cfg: TrainConfig, scale: float):
        super().__init__()
        self.lm, self.cfg, self.scale = lm, cfg, scale

    def forward(
        self,
        input_ids,
        attention_mask,
        select,
        labels,
        t_hidden=None,
        t_weight=None,
        t_scale=1.0,
        position_ids=None,
    ):
        hidden = _decode(self.lm, input_ids, attention_mask, position_ids)
        weight = self.lm.get_output_embeddings().weight
        c = self.cfg
        return fused_head_loss(
            hidden[select],
            weight,
            labels,
            t_hidden,
            t_weight,
            c.kd,
            c.kd_weight,
            c.temperature,
            scales=(self.scale, t_scale),
        )


def lora_targets(model: Any) -> list[str]:
    return adapter_for(model.config).linear_names()  # fused projections (Phi-3) once


def _wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=lora_targets(model),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


# ------------------------------------------------------------------------------------------- checkpoints
def _checkpoints(work: Path) -> list[tuple[int, Path]]:
    out = []
    for p in work.glob(f"{CKPT_PREFIX}*"):
        if p.is_dir() and (p / "state.json").is_file():
            try:
                out.append((int(p.name[len(CKPT_PREFIX) :]), p))
            except ValueError:
                continue
    return sorted(out)


def prepare_work_dir(work: Path, run_key: str) -> None:
    """Create the work folder; checkpoints of a different run (other inputs or settings) are discarded."""
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "run.json"
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()).get("run_key") == run_key
        except (OSError, ValueError):
            same = False
        if same:
            return
        for _, p in _checkpoints(work):
            shutil.rmtree(p, ignore_errors=True)
    marker.write_text(json.dumps({"run_key": run_key}) + "\n")


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npm = meta["numpy"]
    np.random.set_state((npm[0], np.array(npm[1], dtype=np.uint32), npm[2], npm[3], npm[4]))


def save_checkpoint(
    work: Path, step: int, trainable: dict[str, Any], optimizer: Any, state: dict[str, Any]
) -> Path:
    """Atomically write checkpoint `step` (the trainable weights by name, optimizer, RNG, loop state); keep the
    last two."""
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-tmp-", dir=work))
    try:
        weights = {n: p.detach().to("cpu").contiguous().clone() for n, p in trainable.items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng_tensors, rng_meta = _rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_meta}) + "\n")
        final = work / f"{CKPT_PREFIX}{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoints(work)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Restore the trainable weights (by name), optimizer and RNG from a checkpoint folder; return its loop
    state."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(trainable):
        raise ZipkdError(f"checkpoint {path} does not match the model being trained; delete it to start over")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(weights[n].to(p.device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def fast_bf16(device: str) -> bool:
    """Does `device` run bf16 matrix products faster than fp32? CUDA GPUs with bf16 support, and CPUs with
    bf16 dot-product instructions: AMX tiles (Intel Sapphire Rapids and later: a bf16 autocast step trained
    1.75x faster than fp32 on 2 cores) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake: on 2 cores a
    dense SmolLM2 step 2.6x faster, the 2x student's 1.7x; BENCHMARKS.md). AVX2-only CPUs have neither, and
    there bf16 is slower than fp32."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)  # private probes: an older torch may lack them
        if check is not None and check():
            return True
    return False


def resolve_precision(precision: str, device: str) -> str:
    """`auto` → `bf16` (mixed precision: bf16 compute, fp32 master weights) on fast-bf16 hardware, else `fp32`."""
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device) else "fp32"


# ------------------------------------------------------------------------------------------- the loop
def _accelerator(device: str, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = "bf16" if resolve_precision(precision, device) == "bf16" else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        # accelerate keeps one precision per process and refuses another; a library caller may train twice
        # (fp32, then bf16) in one process. Forget that precision only: the process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=str(device).startswith("cpu"), mixed_precision=mixed)


def train(
    student: Any,
    teacher: Any | None,
    qa: Sequence[TrainSeq],
    text: Sequence[TrainSeq],
    cfg: TrainConfig,
    work_dir: str | os.PathLike,
    pad_id: int,
    run_key: str = "",
    device: str = "cpu",
    progress: Any = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Fine-tune `student` for `cfg.steps` steps; resume from the last checkpoint in `work_dir` when it holds
    one of the same run (`run_key`). `callback(step, metrics)` is called after every step (and checkpoint).
    `deadline` (time.monotonic) ends a time-budgeted run (`cfg.budget`; default: budget seconds from now).
    On a CPU the allocator keeps freed activations for the next step (`allocator.reuse_freed_memory`)."""
    if not qa:
        raise ZipkdError("no instruction examples to train on")
    if cfg.mix_ratio > 0 and not text:
        raise ZipkdError("a text mix ratio was given but there is no text to mix in")
    if cfg.uses_teacher and teacher is None:
        raise ZipkdError(f"distillation mode {cfg.kd!r} needs a teacher model")
    work = Path(work_dir)
    acc = _accelerator(device, cfg.precision)
    if acc.is_main_process:
        prepare_work_dir(work, run_key)
    acc.wait_for_everyone()

    set_seed(cfg.seed)
    model = _wrap_lora(student, cfg) if cfg.method == "lora" else student
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if not cfg.train_embeddings:  # unpruned, and the LM head's weight gradient is the costliest matmul
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                for p in module.parameters() if module is not None else ():
                    p.requires_grad_(False)
    model.train()
    # what the optimizer steps and checkpoints hold: the model's own weights, or fp32 masters of bf16 ones
    model.to(acc.device)  # the masters live where the weights do
    weights = TrainWeights(model, resolve_precision(cfg.precision, device) == "bf16" and cfg.bf16_weights)
    try:  # a setup that fails (prepare, a checkpoint that does not load) hands the model back in fp32 too
        params = weights.params
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        # the fused kernel (CPU and CUDA, fp32 weights: the masters in bf16) steps 40M weights in 33 ms on 2 cores
        # against 170 ms for the per-tensor loop (BENCHMARKS.md "Recovery throughput with bf16 weights")
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
            **({"fused": True} if acc.device.type in ("cpu", "cuda") else {"foreach": False}),
        )
        s_scale = _head_scale(model) if cfg.fused_loss else None
        t_scale = (
            _head_scale(teacher)
            if (s_scale is not None and teacher is not None and cfg.uses_teacher)
            else 1.0
        )
        fused = s_scale is not None and t_scale is not None
        student_module = FusedStudent(model, cfg, s_scale) if fused else SelectedLogits(model)
        wrapped, optimizer = acc.prepare(student_module, optimizer)
        if teacher is not None and cfg.uses_teacher:
            teacher = teacher.to(acc.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher_head = SelectedHidden(teacher) if fused else SelectedLogits(teacher)
        else:
            teacher_head = None

        state: dict[str, Any] = {"losses": [], "tokens": 0, "target_tokens": 0}
        start = 0
        ckpts = _checkpoints(work)
        if ckpts:
            state = load_checkpoint(ckpts[-1][1], weights.named, optimizer)
            weights.push()
            start = int(state["step"])
        rank, world = acc.process_index, acc.num_processes
        if cfg.batch_size % world:
            raise ZipkdError(f"batch size {cfg.batch_size} must be divisible by the {world} processes")
        # the step count: --steps, or planned from a token budget (the data order) or a time budget (the speed of
        # the first steps, fixed before any step whose learning rate depends on it and before the first checkpoint)
        total: int | None = state.get("planned_steps")
        if total is None:
            if cfg.tokens is not None:
                total = steps_for_tokens(qa, text, cfg)
            elif cfg.budget is None:
                total = cfg.steps
    except BaseException:
        weights.restore()
        raise

    # a time budget's step count is fixed at the end of the warm-up (before the first checkpoint) from the speed
    # of the steps after the first; a provisional count halfway through the warm-up sets the peak learning rate
    # the second half of the ramp heads for (the first steps run slow: a count fixed there comes out short)
    decide_at = min(cfg.warmup_steps, cfg.checkpoint_every)
    peak_at = min(max(2, cfg.warmup_steps // 2), decide_at)
    # the warm-up steps run slower than the later ones (caches, the allocator growing), so the count fixed there
    # leaves part of the budget unused (about 9% at 30 minutes); at `extend_at` the count may grow, from the
    # speed of the steps since the plan (only up: a slower pace is the deadline guard's); the cosine stretches to
    # the new count, its peak by the run-length rule. Only a run that made its plan here extends it: a resumed run
    # keeps the count its checkpoint stored.
    extend_at = 4 * decide_at if total is None else None
    if deadline is None and cfg.budget is not None:
        deadline = _clock() + cfg.budget
    # until a time budget's steps are planned (within the warm-up), the ramp heads for the longest run's peak,
    # the smallest default: below every planned peak, so the warm-up only rises when the plan sets its own
    sched = replace(cfg, steps=total if total is not None else FULL_LR_BY_STEPS[-1][0])
    task = None
    if progress is not None and acc.is_main_process:
        task = progress.add_task("recovery training", total=total, completed=start)
    t0, m0, tokens_here, ema = time.perf_counter(), _clock(), 0, None
    ends: list[float] = []  # monotonic end time of each step run here
    step = start

    def main_decides(value: Any) -> Any:
        """The main process's `value` on every process (clocks differ: every process follows one plan)."""
        if world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def plan(done: int) -> tuple[int, TrainConfig]:
        steps = main_decides(_plan_for_deadline(done, [m0, *ends], deadline))
        if task is not None:
            progress.update(task, total=steps)
        return steps, replace(cfg, steps=steps)

    with reuse_freed_memory(acc.device.type == "cpu"), weights:  # fp32 weights again on the way out
        while total is None or step < total:
            if total is None and step >= decide_at:  # resumed from a checkpoint that has no plan
                total, sched = plan(step)
                if step >= total:
                    break
            ids, attn, target, pos = step_batch(step, qa, text, cfg, pad_id, rank, world)
            pos = pos[:, :-1].to(acc.device) if pos is not None else None
            ids, attn, target = ids.to(acc.device), attn.to(acc.device), target.to(acc.device)
            inputs, labels = ids[:, :-1], ids[:, 1:]
            select = target[:, 1:] & attn[:, 1:].bool()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, sched)
            with acc.autocast():
                t_out = None
                if teacher_head is not None:
                    with torch.no_grad():
                        t_out = teacher_head(inputs, attn[:, :-1], select, pos)
                if fused:
                    t_weight = teacher.get_output_embeddings().weight if t_out is not None else None
                    loss, parts = wrapped(
                        inputs,
                        attn[:, :-1],
                        select,
                        labels[select],
                        t_out,
                        t_weight,
                        t_scale,
                        position_ids=pos,
                    )
                else:
                    logits = wrapped(inputs, attn[:, :-1], select, pos)
                    loss, parts = combined_loss(
                        logits, labels[select], t_out, cfg.kd, cfg.kd_weight, cfg.temperature
                    )
            acc.backward(loss)
            weights.take_grads()
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            weights.push()
            n_tok, n_tgt = int(attn[:, :-1].sum()) * world, int(select.sum()) * world
            tokens_here += n_tok
            state["tokens"] += n_tok
            state["target_tokens"] += n_tgt
            state["losses"].append(float(loss.detach()))
            ends.append(_clock())
            ema = state["losses"][-1] if ema is None else 0.9 * ema + 0.1 * state["losses"][-1]
            tps = tokens_here / max(time.perf_counter() - t0, 1e-9)
            if task is not None:
                progress.update(task, advance=1, description=f"recovery · loss {ema:.3f} · {tps:,.0f} tok/s")
            done = step + 1
            step = done
            stop = False
            if total is None and done >= decide_at:
                total, sched = plan(done)
            elif total is None and done == peak_at:
                sched = plan(done)[1]
            elif deadline is not None and done < (total or 0):
                since = ends[max(0, decide_at - start - 1) :] if done == extend_at else []
                if len(since) >= 2:  # the ends of the steps since the plan, at the extension's step
                    pace = (since[-1] - since[0]) / (len(since) - 1)
                    longer = main_decides(_steps_that_fit(done, pace, deadline))
                    if longer > total:
                        total, sched = longer, replace(cfg, steps=longer)
                        if task is not None:
                            progress.update(task, total=total)
                # the plan came from the first steps' speed; when later steps run slower (longer batches, a
                # busier machine), the step that would cross the deadline is not started: the budget holds
                stop = main_decides(_next_step_ends(m0, ends) > deadline)
            if done % cfg.checkpoint_every == 0 and (total is None or done < total) and not stop:
                if acc.is_main_process:
                    keep = {k: state[k] for k in ("losses", "tokens", "target_tokens")}
                    save_checkpoint(work, done, weights.named, optimizer, {**keep, "planned_steps": total})
                acc.wait_for_everyone()
            if callback is not None:
                callback(done, {"loss": state["losses"][-1], "tokens_per_s": tps, **parts})
            if stop:
                if task is not None:
                    progress.update(task, total=done)
                break
    steps_done = step
    seconds = time.perf_counter() - t0
    final = acc.unwrap_model(wrapped).lm  # in fp32 again (LoRA merges into the fp32 base)
    if cfg.method == "lora":
        final = final.merge_and_unload()
    final.eval()
    for p in final.parameters():
        p.requires_grad_(False)
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10) :]
    return TrainResult(
        final,
        steps_done,
        sum(tail) / len(tail),
        losses,
        state["tokens"],
        state["target_tokens"],
        seconds,
        tokens_here / max(seconds, 1e-9),
        start,
        sched.learning_rate,
    )


def _next_step_ends(start: float, ends: Sequence[float]) -> float:
    """When the next step would end if it took as long as the last one (`start`: the loop's start)."""
    previous = ends[-2] if len(ends) > 1 else start
    return 2 * ends[-1] - previous


def _plan_for_deadline(step: int, times: Sequence[float], deadline: float | None) -> int:
    """Total steps that fit before `deadline`, from `times` (the loop's start, then the end of every step run
    here; the first step, which warms caches up, is left out when there are others)."""
    if deadline is None or len(times) < 2:
        return step
    if len(times) >= 3:
        per_step = (times[-1] - times[1]) / (len(times) - 2)
    else:
        per_step = times[1] - times[0]
    return _steps_that_fit(step, per_step, deadline)


def _steps_that_fit(step: int, per_step: float, deadline: float) -> int:
    """`step` plus the steps of `per_step` seconds that end before `deadline`; a 3% reserve covers the final save."""
    left = (deadline - _clock()) * 0.97
    return step + max(0, int(left // max(per_step, 1e-6)))


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    # no peak learning rate here: a default `lr`'s follows the run length, so the result records it (peak_lr)
    return asdict(cfg)
