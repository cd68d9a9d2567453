"""Bench for bad input (issue #16): every bad-input case of the issue, plus the ones the tests already cover,
run through the real CLI (`python -m zipkd.cli …`, a child process per case) in a fresh temporary workspace.

For each case it records the exit code, whether a Python traceback was printed, the seconds until the command
ended (the error, for a refusal), whether every input (model folders, recipes, calibration files, latency tables,
reports, folders the user owns) is byte-for-byte unchanged, and the first stderr line; refusals must also say
why (a pattern per case) and leave no output behind. Cases use tiny random-weight models (zipkd.models.tiny) so
they take seconds; the few that need the embedded SmolLM2 read it from the user's zipkd cache (linked into a
temporary cache, so no latency table or other cache entry of these runs lands in the user's cache).

Targets (headline, printed last): 0 tracebacks, 0 inputs modified, every refusal that needs no model work in
≤ 5 s, no case accepted (exit 0) that should be refused, every refusal's message says what is wrong. Exits 1 on
any miss. Cases of kind "fault" interrupt a run (SIGTERM during the final save) and check what it leaves.

Unwritable output folders are made with chmod 0o500, or, when running as root (whom chmod does not stop), with
`chattr +i` (immutable; those cases are skipped when chattr is not available).

Times are wall seconds (what a user waits); the table also shows each zipkd process's CPU seconds, and
`--clock cpu` holds the limits to those instead (steadier when others load the shared machine).

    .venv/bin/python scripts/bench_reliability.py [--only NAME[,NAME]] [--list] [--json OUT] [--timeout 300]
        [--clock wall|cpu] [--keep DIR] [--cache DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python -m zipkd.cli` is what the `zipkd` console script runs
ZIPKD = [sys.executable, "-m", "zipkd.cli"]
NO_MODEL_WORK_S = 5.0
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
)
OTHER = {**TINY, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}  # "another model"
STACK_LINE = re.compile(r'^\s*File "[^"]+", line \d+', re.M)
BOX = str.maketrans({c: " " for c in "│╭╮╰╯─┃━"})
NOISE = re.compile(
    r"^(Loading weights|Writing model shards|Fetching|Generating|Map|\s*[━─]+)|it/s\]|\d+/\d+ \d+:\d\d:\d\d"
)
LOCKED: list[Path] = []  # folders made unwritable (restored at exit)
CLOCK = "wall"  # what the time limits hold: wall seconds (default) or the child's CPU seconds (--clock cpu)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    args: list[str]  # after `zipkd`
    src: str  # where the case comes from: "16.N" (issue #16 item) or a tests/ file
    expect: str = "refuse"  # refuse | ok | gate-or-refuse | refuse-or-fast | progress | fault
    model_work: bool = False  # a refusal that needs no model work is held to NO_MODEL_WORK_S
    inputs: list[Path] = field(default_factory=list)  # hashed before and after
    absent: list[Path] = field(default_factory=list)  # a refusal must not create these
    want: str | None = None  # regex the output must match (what the message must say)
    reject: str | None = None  # regex the output must not match
    code: int | None = None  # exact exit code wanted
    max_s: float | None = None  # time limit (default NO_MODEL_WORK_S for a no-model-work refusal)
    needs: tuple[str, ...] = ()  # fixtures
    prepare: Callable[[], None] | None = None  # writes the case's own files
    unwritable: Path | None = None  # made unwritable after prepare, restored after the case
    runner: Callable[..., dict] | None = None  # special cases (locks, signals)
    skip: str | None = None
    note: str = ""


@dataclass
class Result:
    name: str
    src: str
    command: str
    expect: str
    model_work: bool
    exit: int | str | None = None
    traceback: bool = False
    seconds: float | None = None
    cpu_seconds: float | None = None  # user + system CPU time of the zipkd process
    inputs_unchanged: bool = True
    modified: list[str] = field(default_factory=list)
    first_line: str = ""
    verdict: str = "PASS"  # PASS | FAIL | SKIP
    why: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    load_average: float | None = None  # 1-minute load when the case started (the CPU is shared)


class Fixtures:
    """Shared inputs, built on demand (only those the selected cases need)."""

    def __init__(self, root: Path, env: dict[str, str], timeout: float):
        self.root, self.env, self.timeout = root, env, timeout
        self.dir = root / "fixtures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.built: dict[str, Path] = {}
        self.broken: dict[str, str] = {}
        self.tiny = self.dir / "tiny"
        self.tiny2 = self.dir / "tiny-other"
        self.table = self.dir / "table.json"
        self.other_table = self.dir / "table-other-model.json"
        self.otherdev_table = self.dir / "table-other-device.json"
        self.calib = self.dir / "calib.txt"
        self.pruned = self.dir / "pruned"
        self.q8 = self.dir / "quanto-int8"
        self.report = self.dir / "report"
        self.smol_table = self.dir / "table-smollm2-synthetic.json"
        self.cut_gguf = self.dir / "cut.gguf"

    def ws(self, name: str) -> Path:
        return self.root / "cases" / name

    # each builder raises on failure
    def _cli(self, *args: str) -> None:
        rc, out, err, _, _ = run_cli([str(a) for a in args], self.dir, self.env, self.timeout)
        if rc != 0:
            raise RuntimeError(f"zipkd {' '.join(map(str, args[:2]))} exited {rc}: {error_line(out, err)}")

    def _py(self, code: str, *argv: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=self.timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(error_line(proc.stdout, proc.stderr))

    def build(self, name: str) -> None:
        if name in self.built or name in self.broken:
            return
        for dep in DEPS.get(name, ()):
            self.build(dep)
            if dep in self.broken:
                self.broken[name] = f"needs {dep}, which failed"
                return
        t0 = time.perf_counter()
        try:
            getattr(self, f"_make_{name}")()
            self.built[name] = self.dir
            log(f"fixture {name}: {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # a fixture that cannot be built skips (and misses) its cases
            self.broken[name] = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
            log(f"fixture {name} FAILED: {self.broken[name]}")

    def _make_tiny(self) -> None:
        code = (
            "import json, sys\n"
            "from zipkd.models.io import save_model\n"
            "from zipkd.models.tiny import char_tokenizer, random_llama\n"
            "for out, shape in json.loads(sys.argv[1]):\n"
            "    save_model(random_llama(0, weight_std=0.25, **shape), char_tokenizer(), out, stage='convert')\n"
        )
        self._py(code, json.dumps([[str(self.tiny), TINY], [str(self.tiny2), OTHER]]))

    def _make_calib(self) -> None:
        words = "the cat sat near a river and the old dog slept under a tree while birds sang".split()
        rng = random.Random(0)
        paras = [" ".join(rng.choice(words) for _ in range(60)).capitalize() + "." for _ in range(40)]
        self.calib.write_text("\n\n".join(paras) + "\n")

    def _make_table(self) -> None:
        self._cli("profile", self.tiny, "--seq-len", "16", "--repeats", "1", "-o", self.table)

    def _make_other_table(self) -> None:
        self._cli("profile", self.tiny2, "--seq-len", "16", "--repeats", "1", "-o", self.other_table)

    def _make_otherdev_table(self) -> None:
        d = json.loads(self.table.read_text())
        d["fingerprint"]["device_name"] = "Another CPU (bench_reliability)"
        self.otherdev_table.write_text(json.dumps(d, indent=2) + "\n")

    def _make_pruned(self) -> None:
        self._cli("prune", self.tiny, "-t", "1.5x", *self.prune_opts(), "-o", self.pruned)

    def _make_q8(self) -> None:
        self._cli("quantize", self.tiny, "-m", "quanto-int8", "--no-measure", "-o", self.q8)

    def _make_report(self) -> None:
        self._cli("eval", self.tiny, *EVAL_FAST, "-o", self.report)

    def _make_smol_table(self) -> None:
        """A synthetic prefill table with the embedded model's real fingerprint (as tests/test_pipeline.py
        makes one): `prune smollm2-135m --table` then needs no profiling."""
        code = (
            "import sys\n"
            "from transformers import AutoConfig\n"
            "from zipkd.latency.profile import device_fingerprint, mlp_grid, model_fingerprint\n"
            "from zipkd.latency.table import LatencyTable, Regime\n"
            "from zipkd.models.io import resolve_model\n"
            "cfg = AutoConfig.from_pretrained(resolve_model('smollm2-135m'))\n"
            "reg = Regime(device='cpu', regime='prefill', batch=1, seq_len=64)\n"
            "LatencyTable(regime=reg, fingerprint={**model_fingerprint(cfg), **device_fingerprint(reg)},\n"
            "    rest_ms=40.0, attention_ms={k: 4.0 * k + (0.5 if k else 0.0) for k in range(4)},\n"
            "    mlp_ms={w: 12.0 * w / 1536 + (0.5 if w else 0.0) for w in mlp_grid(1536)},\n"
            "    num_layers=30).save(sys.argv[1])\n"
        )
        self._py(code, str(self.smol_table))

    def _make_cut_gguf(self) -> None:
        code = (
            "import sys\n"
            "from zipkd.models.embedded import embedded_gguf\n"
            "src = embedded_gguf()\n"
            "with open(src, 'rb') as f:\n"
            "    data = f.read(src.stat().st_size // 2)\n"
            "open(sys.argv[1], 'wb').write(data)\n"
        )
        self._py(code, str(self.cut_gguf))

    def prune_opts(self, table: Path | None = None, calib: Path | None = None) -> list[str]:
        return [
            "--table",
            str(table or self.table),
            "--seq-len",
            "16",
            "--calib",
            str(calib or self.calib),
            "--samples",
            "4",
            "--calib-len",
            "32",
        ]


DEPS = {
    "table": ("tiny",),
    "other_table": ("tiny",),
    "otherdev_table": ("table",),
    "pruned": ("tiny", "table", "calib"),
    "q8": ("tiny",),
    "report": ("tiny",),
}
EVAL_FAST = ["--tasks", "arc_easy", "--limit", "4", "--no-perplexity", "--no-speed"]
RECOVER_FAST = [
    "--steps",
    "2",
    "--max-examples",
    "4",
    "--max-new-tokens",
    "8",
    "--batch-size",
    "2",
    "--max-seq-len",
    "64",
]
WRITE_ERR = r"(?i)writ|permission|denied|read-only|not permitted|not allowed"


def recipe_text(fx: Fixtures, output: Path, slow: bool = False) -> str:
    """A recipe on the tiny model: profile from the fixture table, a small prune; with `slow`, a recovery of
    100,000 steps (a run that stays busy until it is killed)."""
    lines = [
        "name: bench-reliability",
        f"model: {fx.tiny}",
        f"output: {output}",
        "seed: 0",
        "hardware: {device: cpu, regime: prefill, batch: 1, seq_len: 16}",
        f"profile: {{table: {fx.table}}}",
        "prune: {target_speedup: 1.5x, samples: 4, calib_len: 32}",
        "eval: false",
    ]
    if slow:
        lines.append(
            "recover: {max_examples: 4, max_new_tokens: 8, steps: 100000, batch_size: 2, max_seq_len: 64, "
            "checkpoint_every: 100000}"
        )
    else:
        lines.append("recover: false")
    return "\n".join(lines) + "\n"


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


def junk(n: int = 4096, seed: int = 0) -> bytes:
    """Random bytes, with NULs and invalid UTF-8 for sure."""
    return b"\x00\xff\xfe" + random.Random(seed).randbytes(n)


def build_cases(fx: Fixtures) -> list[Case]:
    T, P, Q = str(fx.tiny), str(fx.pruned), str(fx.q8)
    cases: list[Case] = []

    def add(name: str, args: list, **kw) -> Case:
        c = Case(name, [str(a) for a in args], **kw)
        cases.append(c)
        return c

    # ------------------------------------------------------------------ issue #16
    w = fx.ws("run-output-not-created-by-zipkd")
    mine, rec = w / "my-folder", w / "recipe.yaml"

    def prep_mine(w=w, mine=mine, rec=rec):
        write(mine / "recipe.yaml", "# my own recipe, not zipkd's\nmodel: something-else\n")
        write(mine / "1-profile" / "notes.txt", "my notes\n")
        write(rec, recipe_text(fx, mine))

    add(
        "run-output-not-created-by-zipkd",
        ["run", rec],
        src="16.1",
        inputs=[mine, rec, fx.tiny, fx.table],
        want=r"(?i)exist|not created|--force|not a zipkd",
        needs=("tiny", "table", "calib"),
        prepare=prep_mine,
        note="output: an existing folder holding the user's recipe.yaml and 1-profile/notes.txt",
    )

    w = fx.ws("run-concurrent-same-recipe")
    add(
        "run-concurrent-same-recipe",
        ["run", w / "recipe.yaml"],
        src="16.2",
        inputs=[w / "recipe.yaml", fx.tiny, fx.table],
        needs=("tiny", "table", "calib"),
        prepare=lambda w=w: write(w / "recipe.yaml", recipe_text(fx, w / "out", slow=True)),
        runner=run_concurrent,
        note="second run while the first holds the output; must name the first's pid",
    )
    w = fx.ws("run-stale-lock-taken-over")
    add(
        "run-stale-lock-taken-over",
        ["run", w / "recipe.yaml"],
        src="16.2",
        expect="progress",
        model_work=True,
        inputs=[w / "recipe.yaml", fx.tiny, fx.table],
        needs=("tiny", "table", "calib"),
        prepare=lambda w=w: write(w / "recipe.yaml", recipe_text(fx, w / "out", slow=True)),
        runner=run_stale_lock,
        note="first run SIGKILLed (its lock names a dead pid); the rerun must take over and run",
    )

    w = fx.ws("recover-quantized-model")
    add(
        "recover-quantized-model",
        ["recover", Q, "-o", w / "rec", *RECOVER_FAST],
        src="16.3",
        inputs=[fx.q8],
        absent=[w / "rec"],
        want=r"(?i)quantiz",
        needs=("q8",),
    )

    add(
        "eval-min-speedup-without-baseline",
        ["eval", P, "--min-speedup", "1.5", "--tasks", "arc_easy", "--limit", "4", "--no-perplexity"]
        + ["--repeats", "1"],
        src="16.4",
        expect="gate-or-refuse",
        model_work=True,
        inputs=[fx.pruned, fx.tiny],
        needs=("pruned",),
        note="exit 0 with no gate line = the option was silently ignored",
    )
    add(
        "eval-max-drop-without-baseline",
        ["eval", T, "--max-drop", "0.1", *EVAL_FAST],
        src="16.4",
        inputs=[fx.tiny],
        want=r"--baseline",
        needs=("tiny",),
    )

    for cmd in ("prune", "eval", "quantize", "recover", "run"):
        w = fx.ws(f"{cmd}-unwritable-output-parent")
        locked, out = w / "locked", w / "locked" / "out"
        args = {
            "prune": ["prune", T, "-t", "1.5x", *fx.prune_opts(), "-o", out],
            "eval": ["eval", T, *EVAL_FAST, "-o", out],
            "quantize": ["quantize", T, "-m", "quanto-int8", "--no-measure", "-o", out],
            "recover": ["recover", P, "-o", out, *RECOVER_FAST],
            "run": ["run", w / "recipe.yaml"],
        }[cmd]
        needs = {
            "prune": ("tiny", "table", "calib"),
            "recover": ("pruned",),
            "run": ("tiny", "table", "calib"),
        }
        add(
            f"{cmd}-unwritable-output-parent",
            args,
            src="16.5",
            inputs=[fx.tiny, locked] + ([fx.pruned] if cmd == "recover" else []),
            want=WRITE_ERR,
            needs=needs.get(cmd, ("tiny",)),
            prepare=(lambda w=w, out=out: write(w / "recipe.yaml", recipe_text(fx, out)))
            if cmd == "run"
            else (lambda locked=locked: locked.mkdir(parents=True, exist_ok=True)),
            unwritable=locked,
            note="output parent made unwritable; refused before any work",
        )

    w = fx.ws("prune-unreachable-target-1e9")
    add(
        "prune-unreachable-target-1e9",
        ["prune", T, "-t", "1e9", *fx.prune_opts(), "-o", w / "x"],
        src="16.6",
        inputs=[fx.tiny, fx.table, fx.calib],
        absent=[w / "x"],
        want=r"largest reachable speedup",
        needs=("tiny", "table", "calib"),
        note="refused before calibration",
    )
    w = fx.ws("prune-force-table-of-another-model")
    add(
        "prune-force-table-of-another-model",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(table=fx.other_table), "--force-table", "-o", w / "x"],
        src="16.6",
        inputs=[fx.tiny, fx.other_table, fx.calib],
        absent=[w / "x"],
        want=r"(?i)another model|other model|model.*(differ|match)|hidden_size|num_layers|shape",
        needs=("tiny", "other_table", "calib"),
        note="--force-table accepts another device, not another model's shapes",
    )

    w = fx.ws("prune-calib-fake-parquet")
    add(
        "prune-calib-fake-parquet",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(calib=w / "fake.parquet"), "-o", w / "x"],
        src="16.7",
        inputs=[fx.tiny, fx.table, w / "fake.parquet"],
        absent=[w / "x"],
        want=r"(?i)parquet",
        needs=("tiny", "table"),
        prepare=lambda w=w: write(w / "fake.parquet", junk()),
    )
    w = fx.ws("run-binary-recipe")
    add(
        "run-binary-recipe",
        ["run", w / "recipe.yaml"],
        src="16.7",
        inputs=[w / "recipe.yaml"],
        want=r"(?i)recipe|yaml",
        prepare=lambda w=w: write(w / "recipe.yaml", junk(seed=1)),
    )
    w = fx.ws("profile-output-is-a-folder-force")
    add(
        "profile-output-is-a-folder-force",
        ["profile", T, "--seq-len", "16", "--repeats", "1", "-o", w / "tables", "--force"],
        src="16.7",
        inputs=[fx.tiny, w / "tables"],
        want=r"(?i)folder|director",
        needs=("tiny",),
        prepare=lambda w=w: write(w / "tables" / "keep.txt", "the user's file\n"),
        note="-o names an existing folder (with a file in it)",
    )

    w = fx.ws("prune-sigterm-during-final-save")
    add(
        "prune-sigterm-during-final-save",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(), "-o", w / "out"],
        src="16.8",
        expect="fault",
        model_work=True,
        inputs=[fx.tiny, fx.table, fx.calib],
        needs=("tiny", "table", "calib"),
        runner=run_sigterm_save,
        note="SIGTERM once the hidden .out.tmp-* folder appears; nothing hidden may be left",
    )

    w = fx.ws("prune-output-inside-input-model")
    add(
        "prune-output-inside-input-model",
        ["prune", w / "model", "-t", "1.5x", *fx.prune_opts(), "-o", w / "model" / "sub"],
        src="16.9",
        inputs=[w / "model", fx.table, fx.calib],
        want=r"(?i)input|inside",
        needs=("tiny", "table", "calib"),
        prepare=lambda w=w: shutil.copytree(fx.tiny, w / "model"),
    )

    w = fx.ws("prune-table-mismatch-names-force-table")
    add(
        "prune-table-mismatch-names-force-table",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(table=fx.otherdev_table), "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny, fx.otherdev_table],
        absent=[w / "x"],
        want=r"--force-table",
        needs=("tiny", "otherdev_table", "calib"),
        note="a table of another device: the hint must name --force-table, not --force",
    )
    w = fx.ws("prune-force-table-other-device-accepted")
    add(
        "prune-force-table-other-device-accepted",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(table=fx.otherdev_table), "--force-table", "-o", w / "x"],
        src="16.10",
        expect="ok",
        model_work=True,
        inputs=[fx.tiny, fx.otherdev_table, fx.calib],
        needs=("tiny", "otherdev_table", "calib"),
        note="control: what --force-table is for",
    )
    w = fx.ws("prune-target-inf")
    add(
        "prune-target-inf",
        ["prune", T, "-t", "inf", *fx.prune_opts(), "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny],
        absent=[w / "x"],
        reject=r"at least 1x",
        needs=("tiny", "table", "calib"),
    )
    w = fx.ws("prune-target-1x-embedded")
    add(
        "prune-target-1x-embedded",
        ["prune", "smollm2-135m", "-t", "1x", "--table", fx.smol_table, "--seq-len", "64"]
        + ["--samples", "4", "--calib-len", "64", "-o", w / "x"],
        src="16.10",
        expect="refuse-or-fast",
        inputs=[fx.smol_table],
        max_s=15.0,
        needs=("smol_table",),
        note="refused, or a copy without calibration (≤ 15 s); not minutes of OBS for the dense model",
    )
    add(
        "eval-limit-0",
        ["eval", T, "--limit", "0", "--tasks", "arc_easy", "--no-perplexity", "--no-speed"],
        src="16.10",
        inputs=[fx.tiny],
        want=r"(?i)limit",
        needs=("tiny",),
    )
    w = fx.ws("prune-calib-binary-txt")
    add(
        "prune-calib-binary-txt",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(calib=w / "binary.txt"), "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny, w / "binary.txt"],
        absent=[w / "x"],
        want=r"binary\.txt",
        needs=("tiny", "table"),
        prepare=lambda w=w: write(w / "binary.txt", junk(seed=2)),
    )
    w = fx.ws("prune-table-negative-entries")

    def prep_negative(w=w):
        d = json.loads(fx.table.read_text())
        d["attention_ms"]["1"] = -0.5
        first_w = sorted(d["mlp_ms"], key=int)[1]
        d["mlp_ms"][first_w] = -1.0
        write(w / "negative.json", json.dumps(d, indent=2))

    add(
        "prune-table-negative-entries",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(table=w / "negative.json"), "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny, w / "negative.json"],
        absent=[w / "x"],
        want=r"(?i)malformed|negative",
        needs=("tiny", "table", "calib"),
        prepare=prep_negative,
    )
    w = fx.ws("prune-table-without-fingerprint")

    def prep_nofp(w=w):
        d = json.loads(fx.table.read_text())
        d.pop("fingerprint")
        write(w / "nofp.json", json.dumps(d, indent=2))

    add(
        "prune-table-without-fingerprint",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(table=w / "nofp.json"), "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny, w / "nofp.json"],
        absent=[w / "x"],
        want=r"nofp\.json",
        reject=r"(?m)^error: 'fingerprint'\s*$",
        needs=("tiny", "table", "calib"),
        prepare=prep_nofp,
    )
    w = fx.ws("eval-baseline-without-models")

    def prep_nomodels(w=w):
        d = json.loads((fx.report / "report.json").read_text())
        d.pop("models")
        write(w / "nomodels.json", json.dumps(d, indent=2))

    add(
        "eval-baseline-without-models",
        ["eval", T, "--baseline", w / "nomodels.json", *EVAL_FAST],
        src="16.10",
        inputs=[fx.tiny, w / "nomodels.json"],
        want=r"nomodels\.json",
        reject=r"(?m)^error: 'models'\s*$",
        needs=("report",),
        prepare=prep_nomodels,
    )
    w = fx.ws("quantize-dtype-int3")
    add(
        "quantize-dtype-int3",
        ["quantize", T, "-m", "quanto-int8", "--dtype", "int3", "--no-measure", "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny],
        absent=[w / "x"],
        code=2,
        needs=("tiny",),
        note="same exit code as --method foo (usage error)",
    )
    w = fx.ws("quantize-method-foo")
    add(
        "quantize-method-foo",
        ["quantize", T, "-m", "foo", "--no-measure", "-o", w / "x"],
        src="16.10",
        inputs=[fx.tiny],
        absent=[w / "x"],
        code=2,
        needs=("tiny",),
    )
    w = fx.ws("info-symlink-loop")
    add(
        "info-symlink-loop",
        ["info", w / "m"],
        src="16.10",
        inputs=[w / "m"],
        want=r"(?i)symlink|symbolic link|loop",
        reject=r"not found",
        prepare=lambda w=w: (w.mkdir(parents=True, exist_ok=True), os.symlink(w / "m", w / "m")),
        note="m -> m",
    )

    # ------------------------------------------------------------------ already covered by tests/
    w = fx.ws("info-missing-path")
    add("info-missing-path", ["info", w / "missing"], src="test_cli_foundation", want="not found")
    w = fx.ws("info-folder-without-config")
    add(
        "info-folder-without-config",
        ["info", w / "empty"],
        src="test_cli_foundation",
        inputs=[w / "empty"],
        want="not a model folder",
        prepare=lambda w=w: (w / "empty").mkdir(parents=True),
    )
    w = fx.ws("info-text-file")
    add(
        "info-text-file",
        ["info", w / "x.txt"],
        src="test_cli_foundation",
        inputs=[w / "x.txt"],
        want=r"not a \.gguf",
        prepare=lambda w=w: write(w / "x.txt", "hi"),
    )
    w = fx.ws("info-unsupported-architecture")
    add(
        "info-unsupported-architecture",
        ["info", w / "bert"],
        src="test_cli_foundation",
        inputs=[w / "bert"],
        want="unsupported architecture",
        prepare=lambda w=w: write(w / "bert" / "config.json", json.dumps({"model_type": "bert"})),
    )
    w = fx.ws("info-corrupt-weights")

    def prep_corrupt(w=w):
        shutil.copytree(fx.tiny, w / "m")
        (w / "m" / "model.safetensors").write_bytes(b"\x00" * 20)

    add(
        "info-corrupt-weights",
        ["info", w / "m"],
        src="test_cli_foundation",
        inputs=[w / "m"],
        want="corrupt weights",
        needs=("tiny",),
        prepare=prep_corrupt,
    )
    w = fx.ws("eval-not-a-gguf")
    add(
        "eval-not-a-gguf",
        ["eval", w / "fake.gguf"],
        src="test_llamacpp",
        inputs=[w / "fake.gguf"],
        want="not a GGUF",
        prepare=lambda w=w: write(w / "fake.gguf", b"not a gguf at all" * 10),
    )
    add(
        "profile-truncated-gguf",
        ["profile", fx.cut_gguf, "--runtime", "llama.cpp"],
        src="test_llamacpp",
        inputs=[fx.cut_gguf],
        want=r"cut\.gguf",
        needs=("cut_gguf",),
    )
    add(
        "profile-llamacpp-with-torch-quantization",
        ["profile", "--runtime", "llama.cpp", "--quantization", "bnb-int8"],
        src="test_llamacpp",
        want="GGUF type",
    )
    w = fx.ws("export-unknown-format")
    add(
        "export-unknown-format",
        ["export", "--format", "onnx", "-o", w / "y.gguf"],
        src="test_llamacpp",
        absent=[w / "y.gguf"],
        want="gguf",
    )
    w = fx.ws("export-unknown-quantization")
    add(
        "export-unknown-quantization",
        ["export", "-q", "q9_9", "-o", w / "z.gguf"],
        src="test_llamacpp",
        absent=[w / "z.gguf"],
        want="q8_0",
    )
    w = fx.ws("export-existing-output")
    add(
        "export-existing-output",
        ["export", "-o", w / "x.gguf"],
        src="test_llamacpp",
        inputs=[w / "x.gguf"],
        want="already exists",
        prepare=lambda w=w: write(w / "x.gguf", b"GGUF"),
    )
    add(
        "eval-unknown-task",
        ["eval", T, "--tasks", "arc_esay"],
        src="test_eval",
        inputs=[fx.tiny],
        code=2,
        want="arc_easy",
        needs=("tiny",),
    )
    add(
        "eval-no-cuda-device",
        ["eval", T, "--device", "cuda", *EVAL_FAST],
        src="test_eval",
        inputs=[fx.tiny],
        want="no CUDA device",
        needs=("tiny",),
        skip="a CUDA device is present" if shutil.which("nvidia-smi") else None,
    )
    add(
        "eval-baseline-other-tasks",
        ["eval", T, "--tasks", "boolq", "--baseline", fx.report, "--limit", "4", "--no-perplexity"]
        + ["--no-speed"],
        src="test_eval",
        inputs=[fx.tiny, fx.report],
        want="scores tasks",
        needs=("report",),
    )
    w = fx.ws("eval-baseline-schema-0")

    def prep_v0(w=w):
        d = json.loads((fx.report / "report.json").read_text())
        write(w / "v0.json", json.dumps({**d, "schema_version": 0}))

    add(
        "eval-baseline-schema-0",
        ["eval", T, "--baseline", w / "v0.json", *EVAL_FAST],
        src="test_eval",
        inputs=[fx.tiny, w / "v0.json"],
        want="schema version 0",
        needs=("report",),
        prepare=prep_v0,
    )
    w = fx.ws("recipe-invalid-yaml")
    add(
        "recipe-invalid-yaml",
        ["run", w / "x.yaml"],
        src="test_recipe",
        inputs=[w / "x.yaml"],
        want="not valid YAML",
        prepare=lambda w=w: write(w / "x.yaml", "model: a\n  - b: [\n"),
    )
    w = fx.ws("recipe-three-problems")
    add(
        "recipe-three-problems",
        ["run", w / "bad.yaml"],
        src="test_recipe",
        inputs=[w / "bad.yaml"],
        absent=[w / "out"],
        want=r"3 problem",
        prepare=lambda w=w: write(
            w / "bad.yaml", "output: out\nhardware:\n  batch: 0\n  device: tpu\nseed: x\n"
        ),
    )
    w = fx.ws("recipe-missing-output")
    add(
        "recipe-missing-output",
        ["run", w / "r.yaml"],
        src="test_recipe",
        inputs=[w / "r.yaml"],
        want="output: missing",
        prepare=lambda w=w: write(w / "r.yaml", "model: smollm2-135m\n"),
    )
    w = fx.ws("run-unknown-stage")
    add(
        "run-unknown-stage",
        ["run", w / "r.yaml", "--from", "nostage"],
        src="test_pipeline",
        inputs=[w / "r.yaml"],
        absent=[w / "out"],
        want="unknown stage",
        needs=("tiny", "table"),
        prepare=lambda w=w: write(w / "r.yaml", recipe_text(fx, w / "out")),
    )
    add(
        "profile-unknown-device",
        ["profile", T, "--device", "tpu"],
        src="test_latency",
        inputs=[fx.tiny],
        want="unknown device 'tpu'",
        needs=("tiny",),
    )
    add(
        "profile-batch-0",
        ["profile", T, "--batch", "0"],
        src="test_latency",
        inputs=[fx.tiny],
        code=2,
        want="batch",
        needs=("tiny",),
    )
    add(
        "profile-unknown-method",
        ["profile", T, "--method", "fast"],
        src="test_latency",
        inputs=[fx.tiny],
        code=2,
        want="unknown method 'fast'",
        needs=("tiny",),
    )
    add(
        "profile-table-of-another-model",
        ["profile", T, "--table", fx.other_table],
        src="test_latency",
        inputs=[fx.tiny, fx.other_table],
        want=r"(?i)does not match|another model",
        needs=("tiny", "other_table"),
    )
    w = fx.ws("profile-existing-output")
    add(
        "profile-existing-output",
        ["profile", T, "--seq-len", "16", "--repeats", "1", "-o", w / "t.json"],
        src="test_latency",
        inputs=[fx.tiny, w / "t.json"],
        want="--force",
        needs=("table",),
        prepare=lambda w=w: (w.mkdir(parents=True, exist_ok=True), shutil.copy(fx.table, w / "t.json")),
    )
    for label, t in (("below-1", "0.5"), ("abc", "abc")):
        w = fx.ws(f"prune-target-{label}")
        add(
            f"prune-target-{label}",
            ["prune", T, "-t", t, *fx.prune_opts(), "-o", w / "x"],
            src="test_prune",
            inputs=[fx.tiny],
            absent=[w / "x"],
            code=2,
            needs=("tiny", "table", "calib"),
        )
    w = fx.ws("prune-unknown-method")
    add(
        "prune-unknown-method",
        ["prune", T, "--method", "nope", *fx.prune_opts(), "-o", w / "x"],
        src="test_prune",
        inputs=[fx.tiny],
        absent=[w / "x"],
        code=2,
        needs=("tiny", "table", "calib"),
    )
    w = fx.ws("prune-existing-output")
    add(
        "prune-existing-output",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(), "-o", w / "out"],
        src="test_prune",
        inputs=[fx.tiny, w / "out"],
        want="already exists",
        needs=("tiny", "table", "calib"),
        prepare=lambda w=w: write(w / "out" / "keep.txt", "the user's file\n"),
    )
    w = fx.ws("prune-empty-calib")
    add(
        "prune-empty-calib",
        ["prune", T, "-t", "1.5x", *fx.prune_opts(calib=w / "empty.txt"), "-o", w / "x"],
        src="test_prune",
        inputs=[fx.tiny, w / "empty.txt"],
        absent=[w / "x"],
        want="empty",
        needs=("tiny", "table"),
        prepare=lambda w=w: write(w / "empty.txt", "\n"),
    )
    w = fx.ws("prune-unreachable-40x")
    add(
        "prune-unreachable-40x",
        ["prune", T, "-t", "40x", *fx.prune_opts(), "-o", w / "x"],
        src="test_prune",
        inputs=[fx.tiny, fx.table],
        absent=[w / "x"],
        want="largest reachable speedup",
        needs=("tiny", "table", "calib"),
    )
    w = fx.ws("prune-already-pruned")
    add(
        "prune-already-pruned",
        ["prune", P, "-t", "1.5x", "--seq-len", "16", "--calib", fx.calib, "--samples", "4"]
        + ["--calib-len", "32", "-o", w / "x"],
        src="test_prune",
        inputs=[fx.pruned],
        absent=[w / "x"],
        want="already pruned",
        needs=("pruned",),
        note="decidable from config.json alone",
    )
    w = fx.ws("quantize-ambiguous-int8")
    add(
        "quantize-ambiguous-int8",
        ["quantize", T, "-m", "int8", "-o", w / "x"],
        src="test_quantize",
        inputs=[fx.tiny],
        absent=[w / "x"],
        code=2,
        want="ambiguous",
        needs=("tiny",),
    )
    w = fx.ws("quantize-existing-output")
    add(
        "quantize-existing-output",
        ["quantize", T, "-m", "quanto-int8", "--no-measure", "-o", w / "out"],
        src="test_quantize",
        inputs=[fx.tiny, w / "out"],
        want="already exists",
        needs=("tiny",),
        prepare=lambda w=w: write(w / "out" / "keep.txt", "the user's file\n"),
    )
    w = fx.ws("quantize-already-quantized")
    add(
        "quantize-already-quantized",
        ["quantize", Q, "-m", "quanto-int8", "--no-measure", "-o", w / "x"],
        src="test_quantize",
        inputs=[fx.q8],
        absent=[w / "x"],
        want="already quantized",
        needs=("q8",),
    )
    w = fx.ws("recover-unknown-kd")
    add(
        "recover-unknown-kd",
        ["recover", P, "-o", w / "x", "--kd", "js"],
        src="test_recover",
        inputs=[fx.pruned],
        absent=[w / "x"],
        code=2,
        want="js",
        needs=("pruned",),
    )
    w = fx.ws("recover-existing-output")
    add(
        "recover-existing-output",
        ["recover", P, "-o", w / "out", *RECOVER_FAST],
        src="test_recover",
        inputs=[fx.pruned, w / "out"],
        want="already exists",
        needs=("pruned",),
        prepare=lambda w=w: write(w / "out" / "keep.txt", "the user's file\n"),
    )
    w = fx.ws("recover-bad-jsonl")
    add(
        "recover-bad-jsonl",
        ["recover", P, "-o", w / "x", "--data", w / "bad.jsonl", *RECOVER_FAST],
        src="test_recover",
        inputs=[fx.pruned, w / "bad.jsonl"],
        absent=[w / "x"],
        want=r"bad\.jsonl:2",
        needs=("pruned",),
        prepare=lambda w=w: write(
            w / "bad.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n'
        ),
    )
    w = fx.ws("merge-different-shapes")
    add(
        "merge-different-shapes",
        ["merge", T, P, "-o", w / "x"],
        src="test_merge",
        inputs=[fx.tiny, fx.pruned],
        absent=[w / "x"],
        want="different",
        needs=("pruned",),
    )
    w = fx.ws("merge-slerp-out-of-range")
    add(
        "merge-slerp-out-of-range",
        ["merge", T, T, "--slerp", "1.5", "-o", w / "x"],
        src="test_merge",
        inputs=[fx.tiny],
        absent=[w / "x"],
        code=2,
        needs=("tiny",),
    )
    return cases


# ----------------------------------------------------------------------------------------------- running


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[int | str, str, str, float, float | None]:
    """`zipkd ARGS` in `cwd`; (exit code or "timeout", stdout, stderr, wall seconds, CPU seconds of the child).
    Output goes to files, not pipes (a full pipe would stall the child)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*ZIPKD, *args], cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        rc, cpu = wait_rusage(proc, timeout)
        secs = time.perf_counter() - t0
        if rc is None:
            kill_group(proc)
            rc = "timeout"
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), secs, cpu


def wait_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float | None]:
    """Reap the child with wait4 (exit code, user + system CPU seconds); (None, None) after `timeout`. The CPU
    time does not depend on what else loads the machine, the wall time does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.005)
    return None, None


def popen_cli(args: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    sink = log_path.open("w")
    proc = subprocess.Popen(
        [*ZIPKD, *args], cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
    )
    sink.close()
    return proc


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the child's own process group (it was started with start_new_session), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def has_traceback(out: str, err: str) -> bool:
    text = out + "\n" + err
    return "Traceback (most recent call last)" in text or len(STACK_LINE.findall(text)) >= 2


def clean_lines(text: str) -> list[str]:
    lines = [" ".join(line.translate(BOX).split()) for line in text.splitlines()]
    return [line for line in lines if line and not NOISE.search(line)]


def error_line(out: str, err: str) -> str:
    """The line that says what went wrong: a traceback's last line, else the first `error:`-like line of stderr,
    else its first line (stdout when stderr is empty)."""
    lines = [line for line in clean_lines(err) or clean_lines(out) if line != "Error"]  # Typer's box title
    if has_traceback(out, err):
        tail = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
        if tail:
            return tail[-1]
    for line in lines:
        if re.match(
            r"(?i)^(error|invalid value|missing|no such|usage error|interrupted|regressed|gate)", line
        ):
            return line
    return lines[0] if lines else ""


def normalized(out: str, err: str) -> str:
    """Output with box drawing removed and wrapped lines joined, so a pattern matches a wrapped message."""
    return " ".join(" ".join(clean_lines(err + "\n" + out)).split())


def fingerprint(path: Path) -> str:
    """Content hash of a file, folder (every entry, hidden ones too: names, types, modes, bytes) or link."""
    if not os.path.lexists(path):
        return "absent"
    h = sha256()

    def entry(p: Path, rel: str) -> None:
        st = p.lstat()
        if p.is_symlink():
            h.update(f"L {rel} {os.readlink(p)}\n".encode())
        elif p.is_dir():
            h.update(f"D {rel} {st.st_mode & 0o7777:o}\n".encode())
            for child in sorted(os.listdir(p)):
                entry(p / child, f"{rel}/{child}")
        else:
            h.update(f"F {rel} {st.st_mode & 0o7777:o} {st.st_size}\n".encode())
            with p.open("rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)

    entry(path, ".")
    return h.hexdigest()


def make_unwritable(path: Path) -> str | None:
    """chmod 0o500; as root also `chattr +i` (root ignores modes). Returns why it cannot, or None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if not shutil.which("chattr"):
            return "running as root (chmod does not stop root) and chattr is not available"
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            return f"running as root and chattr +i failed: {proc.stderr.strip()}"
    else:
        path.chmod(0o500)
    LOCKED.append(path)
    probe = path / ".probe"
    try:
        probe.mkdir()
    except OSError:
        return None
    probe.rmdir()
    restore_writable(path)
    return "could not make a folder unwritable here"


def restore_writable(path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    try:
        path.chmod(0o700)
    except OSError:
        pass
    if path in LOCKED:
        LOCKED.remove(path)


def shown(args: list[str], root: Path) -> str:
    return "zipkd " + shlex.join(args).replace(str(root), "$W")


def timed(res: Result) -> float | None:
    """The time a limit is held to: wall seconds, or with --clock cpu the child's CPU seconds (a shared machine's
    load stretches wall time, not CPU time); wall where no CPU time was taken."""
    if CLOCK == "cpu" and res.cpu_seconds is not None:
        return res.cpu_seconds
    return res.seconds


def judge(case: Case, res: Result, out: str, err: str) -> None:
    """Verdict of a plain (one command) case from its exit code, output and time."""
    text = out + "\n" + err
    norm = normalized(out, err)
    rc = res.exit
    refused = isinstance(rc, int) and rc != 0
    matches = lambda pat: bool(re.search(pat, text) or re.search(pat, norm))  # noqa: E731
    if rc == "timeout":
        res.why.append(f"still running after {res.seconds:.0f} s (killed)")
    elif isinstance(rc, int) and rc < 0:
        res.why.append(f"killed by signal {-rc}")
    if case.expect == "refuse":
        if rc == 0:
            res.why.append("accepted (exit 0) but should be refused")
    elif case.expect == "ok":
        if rc != 0:
            res.why.append(f"should succeed, exited {rc}")
    elif case.expect == "gate-or-refuse":
        gated = re.search(r"(?im)\bgate (passed|failed)|^\s*regressed:|^\s*ok .*speedup", norm + "\n" + text)
        res.extra["gate_line"] = bool(gated)
        if rc == 0 and not gated:
            res.why.append("option silently ignored: exit 0 with no gate line")
    elif case.expect == "refuse-or-fast":
        t = timed(res)
        if rc == 0 and t is not None and t > (case.max_s or NO_MODEL_WORK_S):
            res.why.append(f"accepted and took {t:.1f} s {CLOCK} (> {case.max_s or NO_MODEL_WORK_S:g} s)")
    if refused and case.expect in ("refuse", "refuse-or-fast", "gate-or-refuse"):
        if case.code is not None and rc != case.code:
            res.why.append(f"exit code {rc}, want {case.code}")
        if case.want and not matches(case.want):
            res.why.append(f"message does not match /{case.want}/")
        if case.reject and matches(case.reject):
            res.why.append(f"message matches /{case.reject}/")
        limit = case.max_s or (None if case.model_work else NO_MODEL_WORK_S)
        t = timed(res)
        if limit is not None and t is not None and t > limit:
            res.why.append(f"refusal took {t:.1f} s {CLOCK} (> {limit:g} s)")
        for p in case.absent:
            if os.path.lexists(p):
                res.why.append(f"refused but created {p.name}")


def run_case(case: Case, fx: Fixtures, timeout: float) -> Result:
    res = Result(case.name, case.src, shown(case.args, fx.root), case.expect, case.model_work)
    if case.skip:
        res.verdict, res.why = "SKIP", [case.skip]
        return res
    broken = [n for n in case.needs if n in fx.broken]
    if broken:
        res.verdict = "SKIP"
        res.why = [f"fixture {n} failed: {fx.broken[n]}" for n in broken]
        res.extra["fixture_failed"] = True
        return res
    ws = fx.ws(case.name)
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    try:
        if case.prepare:
            try:
                case.prepare()
            except Exception as exc:  # the bench could not set the case up: a miss, not zipkd's verdict
                res.verdict, res.why = "SKIP", [f"could not prepare the case: {exc!r}"]
                res.extra["fixture_failed"] = True
                return res
        if case.unwritable is not None:
            why = make_unwritable(case.unwritable)
            if why:
                res.verdict, res.why = "SKIP", [why]
                return res
        before = {str(p): fingerprint(p) for p in case.inputs}
        res.load_average = round(os.getloadavg()[0], 2)
        if case.runner is not None:
            out, err = case.runner(case, fx, res, timeout)
        else:
            res.exit, out, err, res.seconds, res.cpu_seconds = run_cli(case.args, ws, fx.env, timeout)
            judge(case, res, out, err)
        res.traceback = has_traceback(out, err)
        res.first_line = error_line(out, err)
        res.modified = [p for p in before if fingerprint(Path(p)) != before[p]]
    finally:
        if case.unwritable is not None:
            restore_writable(case.unwritable)
    res.inputs_unchanged = not res.modified
    if res.traceback:
        res.why.insert(0, "traceback")
    if res.modified:
        res.why.insert(0, "modified " + ", ".join(Path(p).name for p in res.modified))
    res.verdict = "FAIL" if res.why else "PASS"
    (fx.root / "logs").mkdir(exist_ok=True)
    (fx.root / "logs" / f"{case.name}.txt").write_text(f"$ {res.command}\nexit {res.exit}\n{out}\n{err}")
    return res


# --------------------------------------------------------------------------------------- special runners


def _wait_for(pred: Callable[[], bool], proc: subprocess.Popen, limit: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(step)
    return pred()


def _lock_files(out: Path) -> list[str]:
    found = []
    for d in (out, out.parent):
        if d.is_dir():
            found += [str(p.relative_to(out.parent)) for p in d.iterdir() if "lock" in p.name.lower()]
    return sorted(found)


STAGE_LINE = re.compile(r"(?m)^\s*(profile|prune|recover|quantize|export|eval): (running|skipped|done)")


def run_concurrent(case: Case, fx: Fixtures, res: Result, timeout: float) -> tuple[str, str]:
    """Start a run that stays busy, wait until it is running a stage, start the same recipe again: the second
    must refuse at once, naming the first's pid. Both are stopped afterwards."""
    ws = fx.ws(case.name)
    first_log = ws / "first.log"
    first = popen_cli(case.args, ws, fx.env, first_log)
    try:
        running = _wait_for(lambda: bool(STAGE_LINE.search(first_log.read_text())), first, min(timeout, 120))
        if not running or first.poll() is not None:
            res.exit = "n/a"
            res.why.append(
                f"the first run did not get going (exit {first.poll()}): {first_log.read_text()[-300:]}"
            )
            return "", first_log.read_text()
        res.extra["first_pid"] = first.pid
        res.extra["lock_files"] = _lock_files(ws / "out")
        limit = min(timeout, 90.0)
        rc, out, err, secs, cpu = run_cli(case.args, ws, fx.env, limit)
        res.exit, res.seconds, res.cpu_seconds = rc, secs, cpu
        res.extra["first_still_running"] = first.poll() is None
        if rc == "timeout":
            res.why.append(f"the second run ran alongside the first for {limit:.0f} s (killed)")
        elif rc == 0:
            res.why.append("the second run was accepted (exit 0) while the first held the output")
        else:
            if not re.search(rf"\b{first.pid}\b", out + err):
                res.why.append(f"message does not name the running process (pid {first.pid})")
            t = timed(res)
            if t is not None and t > NO_MODEL_WORK_S:
                res.why.append(f"refusal took {t:.1f} s {CLOCK} (> {NO_MODEL_WORK_S:g} s)")
        return out, err
    finally:
        kill_group(first, signal.SIGTERM)


def run_stale_lock(case: Case, fx: Fixtures, res: Result, timeout: float) -> tuple[str, str]:
    """A run killed with SIGKILL leaves whatever lock it held, naming a dead pid; the same recipe run again must
    take the lock over and get to work (a stage line within the limit), not refuse."""
    ws = fx.ws(case.name)
    first_log = ws / "killed.log"
    first = popen_cli(case.args, ws, fx.env, first_log)
    running = _wait_for(lambda: bool(STAGE_LINE.search(first_log.read_text())), first, min(timeout, 120))
    dead_pid = first.pid
    res.extra["lock_files"] = _lock_files(ws / "out")
    kill_group(first, signal.SIGKILL)
    if not running:
        res.exit = "n/a"
        res.why.append(f"the first run did not get going: {first_log.read_text()[-300:]}")
        return "", first_log.read_text()
    res.extra["dead_pid"] = dead_pid
    res.extra["lock_files_left"] = _lock_files(ws / "out")
    second_log = ws / "rerun.log"
    t0 = time.perf_counter()
    second = popen_cli(case.args, ws, fx.env, second_log)
    try:
        progressed = _wait_for(
            lambda: bool(STAGE_LINE.search(second_log.read_text())), second, min(timeout, 90)
        )
        res.seconds = time.perf_counter() - t0
        res.exit = second.poll() if second.poll() is not None else ("running" if progressed else "timeout")
        if not progressed:
            res.why.append(f"the rerun did not take over the stale lock (exit {res.exit})")
        elif isinstance(res.exit, int) and res.exit != 0:
            res.why.append(f"the rerun exited {res.exit}")
    finally:
        kill_group(second, signal.SIGTERM)
    text = second_log.read_text()
    return "", text


def run_sigterm_save(case: Case, fx: Fixtures, res: Result, timeout: float) -> tuple[str, str]:
    """`zipkd prune` with SIGTERM sent the moment its hidden temporary output folder appears (the final save);
    afterwards nothing hidden may be left beside the output, and the output is absent or complete."""
    ws = fx.ws(case.name)
    out = ws / "out"
    prefix = f".{out.name}.tmp-"  # atomic_dir's temporary sibling (a lock file .out.lock is no save)
    caught, log_text, rc = None, "", None
    for attempt in range(1, 4):
        shutil.rmtree(out, ignore_errors=True)
        for name in os.listdir(ws):
            if name.startswith(prefix):
                shutil.rmtree(ws / name, ignore_errors=True)
        log_path = ws / f"attempt{attempt}.log"
        t0 = time.perf_counter()
        proc = popen_cli(case.args, ws, fx.env, log_path)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            hidden = [n for n in os.listdir(ws) if n.startswith(prefix)]
            if hidden:
                proc.send_signal(signal.SIGTERM)
                caught = hidden[0]
                break
            time.sleep(0.0005)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = "hung after SIGTERM (killed)"
        res.seconds = time.perf_counter() - t0
        log_text = log_path.read_text()
        if caught:
            res.extra["attempts"] = attempt
            break
    res.exit = rc
    res.extra["signalled_at"] = caught
    if not caught:
        res.why.append("the final save was never caught in 3 attempts (not exercised)")
        return "", log_text
    time.sleep(2.0)  # anything still cleaning up has had its chance
    hidden = sorted(n for n in os.listdir(ws) if n.startswith(f".{out.name}."))
    left = [n for n in hidden if ".tmp-" in n or ".old-" in n]  # a lock file (.out.lock) is harmless
    res.extra["hidden_after"] = hidden
    if left:
        res.why.append("left " + ", ".join(left))
    if out.exists() and not (out / "zipkd.json").is_file():
        res.why.append("the output exists but is incomplete (no zipkd.json)")
    if isinstance(rc, str):
        res.why.append(rc)
    return "", log_text


# ------------------------------------------------------------------------------------------------ report


def print_table(results: list[Result]) -> None:
    cols = (
        "case",
        "src",
        "expect",
        "exit",
        "tb",
        "secs",
        "cpu",
        "inputs",
        "work",
        "result",
        "first stderr line",
    )
    rows = []
    for r in results:
        rows.append(
            (
                r.name,
                r.src.replace("test_", "t:"),
                r.expect,
                "—" if r.exit is None else str(r.exit),
                "—" if r.verdict == "SKIP" else ("YES" if r.traceback else "no"),
                "—" if r.seconds is None else f"{r.seconds:.1f}",
                "—" if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}",
                "—" if r.verdict == "SKIP" else ("same" if r.inputs_unchanged else "MODIFIED"),
                "model" if r.model_work else "none",
                r.verdict,
                (r.first_line if r.verdict != "SKIP" else r.why[0])[:90],
            )
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    widths[-1] = len(cols[-1])
    fmt = "  ".join(
        f"{{:{'>' if c in ('exit', 'secs', 'cpu') else '<'}{w}}}" for c, w in zip(cols, widths, strict=True)
    )
    print(fmt.format(*cols).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row).rstrip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", default=None, help="run the cases whose name contains this (comma: any of several)"
    )
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--json", type=Path, default=None, help="write every case's result here")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case (default 300)")
    ap.add_argument(
        "--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp one)"
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="ZIPKD_CACHE for the runs (default: a temporary cache linking the user's converted model and data)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="hold the time limits to wall seconds (default, what a user waits) or to the zipkd process's CPU "
        "seconds (steadier on a loaded shared machine)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="OMP/MKL threads per child (default 1: shared CPU)"
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = args.clock

    root = (args.keep or Path(tempfile.mkdtemp(prefix="zipkd-bench-reliability-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "COLUMNS": "200",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env["ZIPKD_CACHE"] = str(args.cache or temp_cache(root))
    fx = Fixtures(root, env, args.timeout)
    cases = build_cases(fx)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c.name for k in keys)]
    if args.list or not cases:
        for c in cases:
            print(
                f"{c.name:44s} {c.src:20s} {c.expect:15s} {'model' if c.model_work else 'none':6s} {c.note}"
            )
        if not cases:
            print(f"no case matches --only {args.only!r}", file=sys.stderr)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
        return 0 if cases else 2

    results: list[Result] = []
    t_all = time.perf_counter()
    try:
        for name in dict.fromkeys(n for c in cases if not c.skip for n in c.needs):
            fx.build(name)
        for i, case in enumerate(cases, 1):
            log(f"[{i}/{len(cases)}] {case.name}")
            res = run_case(case, fx, args.timeout)
            results.append(res)
            extra = f" ({'; '.join(res.why)})" if res.why else ""
            log(f"    {res.verdict} exit {res.exit} in {res.seconds or 0:.1f} s{extra}")
    finally:
        for p in list(LOCKED):
            restore_writable(p)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t_all

    ran = [r for r in results if r.verdict != "SKIP"]
    tracebacks = [r for r in ran if r.traceback]
    modified = [r for r in ran if not r.inputs_unchanged]
    accepted = [r for r in ran if r.expect == "refuse" and r.exit == 0]
    wrong_msg = [r for r in ran if any(w.startswith(("message", "exit code")) for w in r.why)]
    quick = [
        r
        for r in ran
        if not r.model_work
        and r.expect in ("refuse", "refuse-or-fast")
        and isinstance(r.exit, int)
        and r.exit != 0
    ]
    slowest = max(quick, key=lambda r: timed(r) or 0.0, default=None)
    slow = [
        r
        for r in quick
        if (timed(r) or 0) > next(c.max_s or NO_MODEL_WORK_S for c in cases if c.name == r.name)
    ]
    failed = [r for r in results if r.verdict == "FAIL"]
    fixture_skips = [r for r in results if r.extra.get("fixture_failed")]
    skipped = [r for r in results if r.verdict == "SKIP"]
    ok = not failed and not fixture_skips

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [asdict(r) for r in results],
                    "fixtures_failed": fx.broken,
                    "wall_s": round(wall, 1),
                    "target_s": NO_MODEL_WORK_S,
                    "clock": CLOCK,
                    "pass": ok,
                },
                indent=2,
            )
            + "\n"
        )
    print()
    print_table(results)
    print()
    if failed or skipped:
        print("failures and skips:")
        for r in failed + skipped:
            print(f"  {r.verdict} {r.name}: {'; '.join(r.why)}")
        print()
    notes = [r for r in results if r.extra and r.verdict != "SKIP"]
    if notes:
        print("details:")
        for r in notes:
            print(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.extra.items()))
        print()
    if fx.broken:
        print("fixtures that could not be built: " + "; ".join(f"{k}: {v}" for k, v in fx.broken.items()))
    n = len(ran)
    slow_txt = (
        f"slowest no-model-work refusal {timed(slowest):.1f} s {CLOCK} ({slowest.name}; wall "
        f"{slowest.seconds or 0:.1f} s, CPU {slowest.cpu_seconds or 0:.1f} s; target ≤ {NO_MODEL_WORK_S:g} s, "
        f"{len(slow)} over)"
        if slowest
        else "no no-model-work refusal"
    )
    print(
        f"{n} cases run, {len(skipped)} skipped, {len(failed)} failed, in {wall:.0f} s; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"tracebacks {len(tracebacks)}/{n} · inputs modified {len(modified)}/{n} · {slow_txt} · wrongly accepted "
        f"{len(accepted)} · wrong/unclear messages {len(wrong_msg)} · {'PASS' if ok else 'MISS'}"
    )
    return 0 if ok else 1


def temp_cache(root: Path) -> Path:
    """A zipkd cache that links the user's converted embedded model and exported data (no re-conversion) and
    keeps everything these runs write (latency tables, rewrites) out of the user's cache."""
    from zipkd.paths import cache_dir

    src, cache = cache_dir(), root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("models", "data"):
        if (src / name).is_dir() and not (cache / name).exists():
            (cache / name).symlink_to(src / name, target_is_directory=True)
        elif not (src / name).is_dir():
            log(f"warning: {src / name} is missing (run `make install`); zipkd will build it in {cache}")
    return cache


if __name__ == "__main__":
    sys.exit(main())
