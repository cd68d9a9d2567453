"""Nothing lost, nothing silent: one test per defect of the adversarial sweep (issue #16), each through the real
CLI, each failing on the code before the fix. Inputs are hashed before and after; refusals that need no model
work are checked to happen before it (the expensive function is replaced by one that fails the test)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_prune import TEXT, table, tiny
from test_recover_utils import make_chain
from typer.testing import CliRunner

from zipkd.cli import app
from zipkd.errors import ZipkdError
from zipkd.manifest import content_hash
from zipkd.models.tiny import char_tokenizer

runner = CliRunner()


@pytest.fixture
def dense(tmp_path):
    from zipkd.models.io import save_model

    return save_model(tiny(), char_tokenizer(), tmp_path / "dense", stage="convert")


@pytest.fixture
def table_file(tmp_path):
    from zipkd.latency.profile import model_fingerprint

    tab = table()
    tab.fingerprint = model_fingerprint(tiny().config)
    return tab.save(tmp_path / "table.json")


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT[0] + "\n\nAnother paragraph of calibration text.\n")
    return path


def _prune_args(dense, table_file, calib, out, *extra):
    return [
        "prune",
        str(dense),
        "--table",
        str(table_file),
        "--calib",
        str(calib),
        "--samples",
        "4",
        "--calib-len",
        "32",
        "-o",
        str(out),
        *extra,
    ]


def _one_line(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def _text(res) -> str:
    """The output with Rich's error box and wrapping undone."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split())


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration (the expensive part of pruning) starts."""
    import zipkd.prune.api as api

    def boom(*a, **k):
        raise AssertionError("calibration started before the refusal")

    monkeypatch.setattr(api, "build", boom)


def _tiny_recipe(tmp_path, dense, table_file, output, steps=6):
    recipe = {
        "name": "tiny",
        "model": str(dense),
        "output": str(output),
        "seed": 0,
        "hardware": {"device": "cpu", "regime": "prefill", "batch": 1, "seq_len": 512},
        "profile": {"table": str(table_file)},
        "prune": {"target_speedup": "1.5x", "samples": 4, "calib_len": 32},
        "recover": {
            "examples": 4,
            "steps": steps,
            "batch_size": 2,
            "max_new_tokens": 4,
            "max_seq_len": 64,
            "checkpoint_every": 2,
        },
        "quantize": False,
        "eval": False,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ------------------------------------------------------------------ 1. run into a foreign folder


def test_run_refuses_a_folder_zipkd_did_not_write(tmp_path, dense, table_file):
    user = tmp_path / "mine"
    (user / "1-profile").mkdir(parents=True)
    (user / "recipe.yaml").write_text("my own notes, not a recipe\n")
    (user / "1-profile" / "notes.txt").write_text("keep me\n")
    before = content_hash(user)
    path = _tiny_recipe(tmp_path, dense, table_file, user)
    msg = _one_line(runner.invoke(app, ["run", str(path)]))
    assert "zipkd did not write" in msg and "--force" in msg
    assert content_hash(user) == before and (user / "1-profile" / "notes.txt").read_text() == "keep me\n"
    msg = _one_line(runner.invoke(app, ["run", str(path), "--force"]))  # a stage folder of the user's: never
    assert "1-profile is a folder that zipkd did not write" in msg and content_hash(user) == before


def test_run_accepts_a_folder_holding_only_its_own_recipe(tmp_path, dense, table_file):
    from zipkd.pipeline import check_run_folder
    from zipkd.recipe import load_recipe

    out = tmp_path / "exp"
    out.mkdir()
    path = _tiny_recipe(tmp_path, dense, table_file, out)
    (out / "recipe.yaml").write_text(path.read_text())
    assert check_run_folder(load_recipe(out / "recipe.yaml")) == out.resolve()


# ------------------------------------------------------------------ 2. one writer per output


HOLD = """
import sys, time
from zipkd.outputs import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, dense, table_file, calib):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = _tiny_recipe(tmp_path, dense, table_file, out)
        msg = _one_line(runner.invoke(app, ["run", str(path)]))
        assert f"process {holder.pid}" in msg and "being written" in msg
        msg = _one_line(runner.invoke(app, _prune_args(dense, table_file, calib, out)))
        assert f"process {holder.pid}" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from zipkd.outputs import output_lock

    with output_lock(out) as held:  # the killed holder's lock is free: taken over
        assert held == out.resolve()


# ------------------------------------------------------------------ 3. recover a quantized model


def test_recover_refuses_a_quantized_model(tmp_path):
    _, pruned = make_chain(tmp_path)
    q = tmp_path / "q"
    res = runner.invoke(
        app, ["quantize", str(pruned), "--method", "quanto-int8", "--no-measure", "-o", str(q)]
    )
    assert res.exit_code == 0, res.output
    before = content_hash(q)
    msg = _one_line(runner.invoke(app, ["recover", str(q), "-o", str(tmp_path / "r"), "--steps", "1"]))
    assert "quantized (quanto-int8)" in msg and "recover the unquantized model, then quantize" in msg
    assert content_hash(q) == before and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ 5. unwritable outputs, before any work


def _unwritable(tmp_path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: use a read-only place)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        try:
            import tempfile

            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder available to this user")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, dense, table_file, calib, no_calibration):
    locked = _unwritable(tmp_path)
    cases = [
        _prune_args(dense, table_file, calib, locked / "out"),
        ["quantize", str(dense), "--method", "quanto-int8", "--no-measure", "-o", str(locked / "q")],
        ["recover", str(dense), "-o", str(locked / "r"), "--steps", "1"],
        ["export", str(dense), "-o", str(locked / "m.gguf")],
        ["profile", str(dense), "--table", str(table_file), "-o", str(locked / "t.json")],
        ["run", str(_tiny_recipe(tmp_path, dense, table_file, locked / "run"))],
    ]
    for args in cases:
        t0 = time.perf_counter()
        msg = _one_line(runner.invoke(app, args))
        assert "cannot write" in msg and "not writable" in msg, (args[0], msg)
        assert time.perf_counter() - t0 < 30, args[0]
    # A file where a folder should be is the same refusal, and needs no special user.
    (tmp_path / "afile").write_text("x")
    msg = _one_line(runner.invoke(app, _prune_args(dense, table_file, calib, tmp_path / "afile" / "out")))
    assert "is not a folder" in msg


# ------------------------------------------------------------------ 6. unreachable targets before calibration


def test_unreachable_target_is_refused_before_calibration(tmp_path, dense, table_file, calib, no_calibration):
    msg = _one_line(runner.invoke(app, _prune_args(dense, table_file, calib, tmp_path / "o", "-t", "1e9")))
    assert "unreachable" in msg and "largest reachable speedup is" in msg
    msg = _one_line(
        runner.invoke(
            app, _prune_args(dense, table_file, calib, tmp_path / "o", "-t", "1e9", "--method", "shortgpt")
        )
    )
    assert "largest reachable speedup is" in msg
    other = table(layers=5)
    other.save(tmp_path / "other.json")
    msg = _one_line(
        runner.invoke(
            app, _prune_args(dense, tmp_path / "other.json", calib, tmp_path / "o", "--force-table")
        )
    )
    assert "describes another model (5 layers, the model has 3" in msg
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 7. tracebacks left


def test_fake_parquet_calibration_is_one_line_and_leaves_no_cache_lock(
    tmp_path, dense, table_file, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    fake = tmp_path / "calib.parquet"
    fake.write_bytes(os.urandom(4096))
    msg = _one_line(runner.invoke(app, _prune_args(dense, table_file, fake, tmp_path / "o")))
    assert "not a Parquet file" in msg
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.lock"))


def test_binary_inputs_are_one_line(tmp_path, dense, table_file):
    rec = tmp_path / "r.yaml"
    rec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 50)
    assert "binary file" in _one_line(runner.invoke(app, ["run", str(rec)]))
    rec.write_bytes(b"name: \xff\xfe bad\n")
    assert "not UTF-8" in _one_line(runner.invoke(app, ["run", str(rec)]))
    calib = tmp_path / "calib.txt"
    calib.write_bytes(os.urandom(2048) + b"\x00")
    assert "binary file" in _one_line(
        runner.invoke(app, _prune_args(dense, table_file, calib, tmp_path / "o"))
    )


def test_profile_output_folder_and_force_keep_the_cached_table(tmp_path, dense, monkeypatch):
    import zipkd.latency.profile as prof

    monkeypatch.setenv("ZIPKD_CACHE", str(tmp_path / "cache"))
    args = ["profile", str(dense), "--seq-len", "8", "--repeats", "1"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    (tmp_path / "adir").mkdir()
    t0 = time.perf_counter()
    msg = _one_line(runner.invoke(app, [*args, "-o", str(tmp_path / "adir"), "--force"]))
    assert "is a folder" in msg and time.perf_counter() - t0 < 10

    def boom(*a, **k):
        raise AssertionError("--force re-measured the cached table")

    monkeypatch.setattr(prof, "profile_model", boom)
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "t.json"), "--force", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["table"]["meta"]["cached"] is True
    res = runner.invoke(app, [*args, "--remeasure"])  # the flag that does re-measure
    assert res.exit_code != 0 and "re-measured" in str(res.exception)


# ------------------------------------------------------------------ 8. SIGTERM and stale temporaries

SLOW_SAVE = """
import sys, time
import safetensors.torch as st
real = st.save_file
def slow(*a, **k):
    real(*a, **k)
    print("saving", flush=True)
    time.sleep(120)
st.save_file = slow
from zipkd.cli import main
sys.argv = ["zipkd", *sys.argv[1:]]
main()
"""


def test_sigterm_during_the_final_save_leaves_no_temporaries(tmp_path, dense, table_file, calib):
    out = tmp_path / "out"
    args = _prune_args(dense, table_file, calib, out)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert "saving" in line, proc.stderr.read()[-2000:]
    assert list(tmp_path.glob(".out.tmp-*")), "the save should be in progress"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".out.*")) and not out.exists()


def test_a_dead_process_temporaries_are_swept_on_the_next_write(tmp_path, dense, table_file, calib):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    (stale / "new").mkdir(parents=True)
    (stale / "new" / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getpid()}-keep"  # a live process's temporary stays
    live.mkdir()
    res = runner.invoke(app, _prune_args(dense, table_file, calib, tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------ 9. output inside an input


def test_output_inside_the_input_model_is_refused(tmp_path, dense, table_file, calib, no_calibration):
    before = content_hash(dense)
    msg = _one_line(runner.invoke(app, _prune_args(dense, table_file, calib, dense / "sub")))
    assert "inside the input" in msg
    msg = _one_line(
        runner.invoke(app, ["quantize", str(dense), "--method", "quanto-int8", "-o", str(dense / "q")])
    )
    assert "inside the input" in msg
    assert content_hash(dense) == before


# ------------------------------------------------------------------ 10. smaller


def test_smaller_defects(tmp_path, dense, table_file, calib, no_calibration):
    from zipkd.latency.profile import model_fingerprint

    # The mismatch error names the flag that exists.
    tab = table()
    tab.fingerprint = {**model_fingerprint(tiny().config), "hidden_size": 999}
    tab.save(tmp_path / "mismatch.json")
    msg = _one_line(runner.invoke(app, _prune_args(dense, tmp_path / "mismatch.json", calib, tmp_path / "o")))
    assert "--force-table" in msg and "pass --force " not in msg + " "
    # inf and 1x.
    res = runner.invoke(app, _prune_args(dense, table_file, calib, tmp_path / "o", "-t", "inf"))
    assert res.exit_code == 2 and "finite" in _text(res) and "at least 1x" not in _text(res)
    res = runner.invoke(app, _prune_args(dense, table_file, calib, tmp_path / "o", "-t", "1x"))
    assert res.exit_code == 2 and "nothing to prune" in _text(res)
    # Tables are sanity-checked; a missing field names the file and the field.
    raw = json.loads(Path(table_file).read_text())
    bad = {**raw, "mlp_ms": {**raw["mlp_ms"], "16": -5.0}}
    (tmp_path / "neg.json").write_text(json.dumps(bad))
    msg = _one_line(runner.invoke(app, _prune_args(dense, tmp_path / "neg.json", calib, tmp_path / "o")))
    assert "times must be finite and ≥ 0" in msg and "MLP width 16 = -5 ms" in msg and "inf" not in msg
    del raw["fingerprint"]
    (tmp_path / "nofp.json").write_text(json.dumps(raw))
    msg = _one_line(runner.invoke(app, _prune_args(dense, tmp_path / "nofp.json", calib, tmp_path / "o")))
    assert "nofp.json is not a zipkd latency table: it has no 'fingerprint' field" in msg
    # The same kind of mistake, the same exit code.
    codes = {
        runner.invoke(app, ["profile", str(dense), "--dtype", "int3"]).exit_code,
        runner.invoke(
            app, _prune_args(dense, table_file, calib, tmp_path / "o", "--method", "foo")
        ).exit_code,
        runner.invoke(app, ["prune", "--no-such-option"]).exit_code,
        runner.invoke(app, ["info", str(tmp_path / "missing")]).exit_code,
    }
    assert codes == {2}
    # A symlink loop is named as one.
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    assert "symlink loop" in _one_line(runner.invoke(app, ["info", str(loop)]))
    assert "symlink loop" in _one_line(runner.invoke(app, _prune_args(dense, table_file, calib, loop)))
    assert not (tmp_path / "o").exists()


def test_output_checks_as_a_library(tmp_path):
    from zipkd.outputs import atomic_dir, check_output

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    with pytest.raises(ZipkdError, match="zipkd did not write"):
        check_output(tmp_path / "docs", force=True)
    with pytest.raises(ZipkdError, match="already exists"):
        check_output(tmp_path / "docs", force=False)
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "zipkd.json").write_text("{}")
    with atomic_dir(tmp_path / "model", force=True) as tmp:  # zipkd's own output: replaced
        (tmp / "zipkd.json").write_text('{"second": true}')
    assert json.loads((tmp_path / "model" / "zipkd.json").read_text()) == {"second": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "model"]
