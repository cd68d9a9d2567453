"""Task YAMLs for lm-evaluation-harness that read zipkd's offline evaluation data.

The YAMLs hold a placeholder `@ZIPKD_DATA(<name>)@` for their data file; `zipkd.evaluate.harness.materialize_tasks`
writes a copy with real paths (they differ per machine) next to `task_utils.py`, which the YAMLs call."""
