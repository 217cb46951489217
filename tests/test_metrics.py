"""Metric streams continued after a restart (``JsonlSink(path, resume_at)``): nothing of the finished run is lost
until the resumed run has passed it, and nothing of it is lost at the resume point."""

from __future__ import annotations

import json

import pytest

from dif_maml_dist.run.sinks import JsonlSink


def _train(it: int, loss: float) -> dict:
    """A logged record of the loop (training loss, timings), with test figures at eval points."""
    return {"iteration": it, "meta_train_loss": loss, "compute_s": 0.5 * it, "exchange_s": 0.1 * it,
            "bytes_sent": 100 * it, "wall_s": 1.0 * it, "test_loss_post": loss / 2}


def _resumed(it: int) -> dict:
    """The resumed run's first record: test figures only, at the checkpoint's iteration."""
    return {"iteration": it, "resumed": True, "bytes_sent": 100 * it, "test_loss_post": 9.0}


CUT = '{"iteration": 50, "meta_tra'  # the last line of a run killed mid-write


def _old_stream(path, iterations=(0, 10, 20, 30, 40), cut=True) -> bytes:
    text = "".join(json.dumps(_train(i, 1.0 + i)) + "\n" for i in iterations) + (CUT if cut else "")
    path.write_text(text)
    return path.read_bytes()


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_abandoned_resume_leaves_the_old_stream_byte_identical(tmp_path):
    """A resumed run that writes records and then fails (diverges, a peer dies) and is abandoned leaves the old
    stream exactly as it was, cut line included, and no shadow behind; the old file is untouched while the
    resumed run runs, too. Catches a resume that truncates the finished run's records at the start and loses
    them when it fails."""
    path = tmp_path / "agent0.jsonl"
    before = _old_stream(path)
    sink = JsonlSink(path, resume_at=20)
    sink.write(_resumed(20))
    sink.write(_train(30, 0.3))
    assert path.read_bytes() == before  # not yet past the old stream's last iteration (40)
    sink.abandon()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent0.jsonl"]
    sink.abandon()  # twice, or after close: nothing more happens
    sink.close()
    assert path.read_bytes() == before


def test_resume_that_passes_the_old_stream_replaces_it(tmp_path):
    """Once the resumed run logs an iteration past the old stream's last, the file becomes the old records before
    the resume point, the merged record of the resume point, then the new records (the crash-cut line gone), and
    later records are appended; a failure after that keeps what was written. Catches records lost or duplicated
    around the resume point, and a stream that never leaves the shadow file."""
    path = tmp_path / "agent0.jsonl"
    _old_stream(path)
    sink = JsonlSink(path, resume_at=20)
    sink.write(_resumed(20))
    sink.write(_train(30, 0.3))
    sink.write(_train(40, 0.4))
    sink.write(_train(41, 0.41))  # past 40: committed now, not at close
    assert [r["iteration"] for r in _records(path)] == [0, 10, 20, 30, 40, 41]
    assert not (tmp_path / "agent0.jsonl.resuming").exists()
    sink.write(_train(42, 0.42))
    sink.abandon()  # a failure after the commit: the records written stay, as a crash would leave them
    records = _records(path)
    assert [r["iteration"] for r in records] == [0, 10, 20, 30, 40, 41, 42]
    assert records[:2] == [_train(0, 1.0), _train(10, 11.0)]
    assert records[3:] == [_train(30, 0.3), _train(40, 0.4), _train(41, 0.41), _train(42, 0.42)]


def test_merged_resume_record_keeps_the_training_loss(tmp_path):
    """The resumed run's first record (test figures only, at the checkpoint's iteration) is merged over the old
    record of that iteration: its training loss and timings stay, the new test figures and "resumed" win.
    Catches every resume dropping meta_train_loss, compute_s, exchange_s and wall_s at the resume point."""
    path = tmp_path / "agent0.jsonl"
    _old_stream(path)
    sink = JsonlSink(path, resume_at=20)
    sink.write(_resumed(20))
    sink.write(_train(50, 0.5))
    sink.close()
    merged = _records(path)[2]
    assert merged == {**_train(20, 21.0), "resumed": True, "test_loss_post": 9.0}
    assert merged["meta_train_loss"] == 21.0 and merged["compute_s"] == 10.0 and merged["wall_s"] == 20.0


def test_crash_cut_line_is_skipped(tmp_path):
    """A last line cut short by the crash is neither kept nor counted: the stream commits once past the last
    complete record (40), without it. Catches a resume that fails on, copies, or waits for a half-written
    record."""
    path = tmp_path / "agent0.jsonl"
    _old_stream(path)
    sink = JsonlSink(path, resume_at=40)
    sink.write(_resumed(40))
    sink.write(_train(41, 0.41))
    assert CUT not in path.read_text()
    assert [r["iteration"] for r in _records(path)] == [0, 10, 20, 30, 40, 41]
    sink.close()


def test_finished_resume_is_the_stream_even_short_of_the_old_one(tmp_path):
    """A resumed run that finishes (close) before passing the old stream's last iteration commits anyway: the
    finished run is the truth, and old records beyond what it wrote are dropped; a stale shadow of an earlier
    resume that was killed outright is overwritten, not appended to. Catches a finished run's records left
    in the shadow, and records of two attempts mixed."""
    path = tmp_path / "agent0.jsonl"
    _old_stream(path)
    (tmp_path / "agent0.jsonl.resuming").write_text(json.dumps(_train(99, 9.9)) + "\n")
    sink = JsonlSink(path, resume_at=10)
    sink.write(_resumed(10))
    sink.write(_train(20, 0.2))
    sink.close()
    assert [r["iteration"] for r in _records(path)] == [0, 10, 20]
    assert _records(path)[2] == _train(20, 0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent0.jsonl"]


def test_new_stream_never_appends_and_resume_without_a_stream_starts_one(tmp_path):
    """A fresh stream refuses an existing file (two jobs sharing a run directory); a resume with no stream yet (a
    restart before anything was logged) creates it with the first record, and one abandoned before writing
    leaves nothing. Catches appending to another run's stream and a resume that needs an old file."""
    path = tmp_path / "agent0.jsonl"
    _old_stream(path)
    with pytest.raises(FileExistsError):
        JsonlSink(path)
    fresh = tmp_path / "fresh" / "network.jsonl"
    JsonlSink(fresh, resume_at=0).abandon()
    assert not any(fresh.parent.iterdir())
    sink = JsonlSink(fresh, resume_at=0)
    sink.write({"iteration": 0, "disagreement": 0.0})
    assert _records(fresh) == [{"iteration": 0, "disagreement": 0.0}]
    sink.close()


def test_tensorboard_event_files_hold_every_agents_and_the_networks_records(tmp_path):
    """``metrics.tensorboard=true``: each agent's folder under RUN/tensorboard/ holds its training and test scalars
    at the iterations of its JSONL records, with the same values, and network/ the centroid's and the
    disagreement. Catches records sent to the wrong agent's writer, steps taken from the wrong field, and
    event files left unflushed at the end of the run."""
    import subprocess
    import sys

    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="the tensorboard package is not installed (pip install -e '.[dev]')")
    from tests.helpers import REPO

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.threads=1",
                           "train.iterations=20", "train.eval_every=10", "train.log_every=5", "task.eval_tasks=20",
                           "maml.final_adapt_steps=1", "metrics.tensorboard=true", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, tags in (("agent3", ("meta_train_loss", "test_loss_post", "bytes_sent")),
                       ("network", ("centroid_test_loss_post", "disagreement"))):
        events = accumulator.EventAccumulator(str(run / "tensorboard" / name))
        events.Reload()
        records = [json.loads(line) for line in (run / "metrics" / f"{name}.jsonl").read_text().splitlines()]
        for tag in tags:
            assert tag in events.Tags()["scalars"], (name, tag)
            expected = [(r["iteration"], r[tag]) for r in records if tag in r]
            got = [(e.step, e.value) for e in events.Scalars(tag)]
            assert [s for s, _ in got] == [s for s, _ in expected]
            assert all(abs(g - e) <= 1e-6 * max(1.0, abs(e)) for (_, g), (_, e) in zip(got, expected))


def test_tensorboard_without_its_package_is_refused_in_one_line(monkeypatch):
    """Without the tensorboard package the flag stops the run before anything starts, naming the extra."""
    import importlib.util

    from dif_maml_dist.config import Config
    from dif_maml_dist.run.context import check_tensorboard

    cfg = Config()
    cfg.metrics.tensorboard = True
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"^metrics.tensorboard=true needs the tensorboard package: pip install -e "
                                         r"'\.\[tensorboard\]'"):
        check_tensorboard(cfg)
    cfg.metrics.tensorboard = False
    check_tensorboard(cfg)


def test_tensorboard_that_fails_to_import_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A tensorboard package that is installed but raises on import (e.g. a protobuf it does not work with) is
    found by the checks of ``train.prepare``, in one line naming the error and the fix, before the run directory
    exists. Catches the check that only looked the package up (``find_spec``) and let the run start, to fail with
    a traceback once the run folder and its metric streams were there."""
    import sys

    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.launch import prepare

    broken = tmp_path / "site" / "tensorboard"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise TypeError('Descriptors cannot be created directly')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in list(sys.modules):  # a tensorboard imported earlier in this process would hide the broken one
        if name.split(".")[0] == "tensorboard" or name.startswith("torch.utils.tensorboard"):
            monkeypatch.delitem(sys.modules, name)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        prepare(["runtime=simulate", "metrics.tensorboard=true", f"hydra.run.dir={run_dir}"], ProcessEnv())
    message = str(refused.value)
    assert message == ("metrics.tensorboard=true, but the tensorboard package fails to import (TypeError: "
                       "Descriptors cannot be created directly): reinstall it (pip install -e '.[tensorboard]') or "
                       "drop metrics.tensorboard"), message
    assert not run_dir.exists()
