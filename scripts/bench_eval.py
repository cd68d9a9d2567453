"""Bench for `zipkd eval`: time the default quick suite on the embedded model, and check that zipkd's task scores
equal the `lm_eval` command line's on the same task files, model folder and limit.

    .venv/bin/python scripts/bench_eval.py [--compare-cli arc_easy,boolq] [--json out.json]

Prints per-stage wall times, the report table, the CLI comparison, and last the headline: wall time of the
quick suite against the 10-minute target. Exits 1 when the suite takes longer than the target or a compared
score differs."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 600.0


class StageClock:
    """A progress sink (the add_task/update/advance subset zipkd uses) that records when each stage ends."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.stages: dict[str, float] = {}
        self._desc: dict[int, str] = {}
        self._n = 0

    def add_task(self, description: str, total: float | None = None, **_: object) -> int:
        self._n += 1
        self._desc[self._n] = description
        return self._n

    def update(
        self, task: int, description: str | None = None, completed: float | None = None, **_: object
    ) -> None:
        if description is not None:
            self._desc[task] = description
        if completed:  # a stage (or a part of one) finished
            self._mark(task)

    def advance(self, task: int, amount: float = 1) -> None:
        self._mark(task)

    def _mark(self, task: int) -> None:
        now = time.perf_counter()
        name = self._desc[task]
        self.stages[name] = self.stages.get(name, 0.0) + now - self.last
        self.last = now


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compare_cli(model_folder: Path, tasks: list[str], limit: int, batch: int, ours: dict) -> list[tuple]:
    """Run `lm_eval run` on the same materialized task folder; return (task, metric, ours, cli, equal) rows."""
    from zipkd.evaluate.harness import materialize_tasks, parse_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = materialize_tasks(Path(tmp) / "tasks", tasks)
        cmd = [
            str(Path(sys.executable).parent / "lm_eval"),
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_folder},dtype=float32",
            "--tasks",
            ",".join("zipkd_" + t for t in tasks),
            "--include_path",
            str(folder),
            "--device",
            "cpu",
            "--batch_size",
            str(batch),
            "--limit",
            str(limit),
            "--output_path",
            str(Path(tmp) / "out"),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit("lm_eval command line failed")
        (result,) = (Path(tmp) / "out").rglob("results_*.json")
        cli = parse_results(json.loads(result.read_text()), tasks)
    for t in tasks:
        for metric, value in sorted(ours[t]["metrics"].items()):
            other = cli[t].metrics.get(metric)
            rows.append((t, metric, value, other, value == other and cli[t].n == ours[t]["n"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--compare-cli",
        default="arc_easy,boolq",
        help="tasks to re-score with the lm_eval command line ('' to skip, 'all')",
    )
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()

    from zipkd.paths import offline_env

    offline_env()
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from zipkd.evaluate import DEFAULT_TASKS, EvalConfig, evaluate
    from zipkd.evaluate.report import markdown
    from zipkd.models.io import resolve_model

    config = EvalConfig()  # the defaults `zipkd eval smollm2-135m` uses
    load0 = os.getloadavg()
    clock = StageClock()
    cpu0 = time.perf_counter(), cpu_seconds()
    report = evaluate("smollm2-135m", config, progress=clock)
    wall = time.perf_counter() - cpu0[0]
    cpu = cpu_seconds() - cpu0[1]
    load1 = os.getloadavg()

    print(
        f"machine: {os.cpu_count()} cores, torch threads {report.hardware.get('torch_threads')}, "
        f"cpu {report.hardware.get('cpu')}; load average at start {load0[0]:.1f}, at end {load1[0]:.1f}"
    )
    print(
        f"suite: tasks {', '.join(config.tasks)}; limit {config.limit} per task; batch {config.batch_size}; "
        f"perplexity {config.ppl_max_tokens} tokens in {config.ppl_max_length}-token windows; speed "
        f"{report.regime['regime']} batch {report.regime['batch']} seq {report.regime['seq_len']}"
    )
    print("\nstage wall times (s):")
    for name, secs in clock.stages.items():
        print(f"  {name:40s} {secs:7.1f}")
    print()
    print(markdown(report))

    compared = []
    tasks = (
        list(DEFAULT_TASKS) if args.compare_cli == "all" else [t for t in args.compare_cli.split(",") if t]
    )
    if tasks:
        ours = report.models[0].quality
        compared = compare_cli(resolve_model("smollm2-135m"), tasks, config.limit, config.batch_size, ours)
        print("zipkd vs `lm_eval run` (same task files, model folder, limit, batch size):")
        for t, metric, a, b, eq in compared:
            print(
                f"  {t:14s} {metric:10s} zipkd {a!r:22s} lm_eval {b!r:22s} {'equal' if eq else 'DIFFERENT'}"
            )
    all_equal = all(r[4] for r in compared)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "load_start": load0[0],
                    "load_end": load1[0],
                    "stages": clock.stages,
                    "report": report.to_json(),
                    "cli_compare": compared,
                    "target_s": TARGET_S,
                },
                indent=2,
            )
        )
    ok = wall <= TARGET_S and all_equal
    print()
    if tasks:
        print(f"lm_eval CLI comparison: {sum(r[4] for r in compared)}/{len(compared)} metrics identical")
    print(
        f"quick suite (8 tasks x {config.limit} docs + perplexity + speed) on smollm2-135m: wall {wall:.0f} s "
        f"(process CPU {cpu:.0f} s), target <= {TARGET_S:.0f} s: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
