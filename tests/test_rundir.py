"""The run directory (rapa.rundir): one owner of its file names, resume rules, atomic writes, checked reads."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest

from rapa import rundir
from rapa.config import TrainConfig
from rapa.errors import OutputError, RapaError

SRC = Path(__file__).resolve().parents[1] / "src" / "rapa"
RUN_DIR_NAMES = {"config.json", "metrics.csv", "checkpoint.pt", "summary.json", "arrays.json", "reduce.json", "attack.json",
                 "similarity.json", "voting.json", "attack.png", "filters.png", "sweep-errors.log"}
ELSEWHERE = {("modern.py", "summary.json")}
"""Files of the same name that are no run directory's: the aggregate of ``python -m rapa.modern``."""


def test_only_rundir_names_the_run_files():
    assert set(rundir.TRAIN_FILES) | set(rundir.RESULT_FILES.values()) | set(rundir.RESULT_PLOTS.values()) \
        | {rundir.ERRORS_LOG} == RUN_DIR_NAMES
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in RUN_DIR_NAMES and (rel, node.value) not in ELSEWHERE:
                found.append(f"{rel}:{node.lineno}: {node.value}")
    assert not found, found


def _config(**kw) -> TrainConfig:
    return TrainConfig(dataset="digits", epochs=2, limit_train=40, limit_test=20, channels=(4, 4, 4), **kw)


@pytest.mark.parametrize("field,value", [("epochs", 5), ("device", "cuda"), ("data_dir", "/x"), ("download", True),
                                         ("votes", 3), ("adaptive_threshold", 0.5), ("eval_batch_size", 7),
                                         ("eval_every", 2), ("lr", 0.001)])
def test_a_resume_may_change_what_does_not_change_the_weights_so_far(field, value):
    saved = _config()
    rundir.check_resume("DIR", saved, TrainConfig(**{**saved.to_dict(), field: value}))


@pytest.mark.parametrize("field,value", [("seed", 1), ("scheme", "alternate"), ("batch_size", 3), ("augment", "strong"),
                                         ("limit_train", 30), ("momentum", 0.9), ("weight_decay", 0.0)])
def test_a_resume_must_match_everything_else(field, value):
    saved = _config()
    with pytest.raises(RapaError, match=f"cannot resume DIR with a different config: {field} differ"):
        rundir.check_resume("DIR", saved, TrainConfig(**{**saved.to_dict(), field: value}))


def test_prepare_refuses_a_run_unless_overwritten_and_then_deletes_only_the_training_files(tmp_path):
    config = _config()
    rundir.write_config(tmp_path, config, {"rapa_version": "x"})
    for name in ("metrics.csv", "summary.json", "reduce.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(RapaError, match="already holds a run"):
        rundir.prepare(tmp_path, config, resume=False, overwrite=False)
    assert rundir.prepare(tmp_path, config, resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reduce.json"]


def test_prepare_for_a_resume(tmp_path):
    config = _config()
    with pytest.raises(RapaError, match="nothing to resume .*no config.json"):
        rundir.prepare(tmp_path, config, resume=True, overwrite=False)
    rundir.write_config(tmp_path, config, {})
    rundir.write_metrics(tmp_path, [])
    assert rundir.prepare(tmp_path, config, True, False) is None  # killed before its first checkpoint
    rundir.append_metrics(tmp_path, {"epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_error": 0.5,
                                     "test_error": math.nan, "seconds": 1.0})
    with pytest.raises(RapaError, match="holds results but no checkpoint.pt"):
        rundir.prepare(tmp_path, config, True, False)
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert rundir.prepare(tmp_path, config, True, False) == tmp_path / "checkpoint.pt"
    with pytest.raises(RapaError, match="seed differ"):
        rundir.prepare(tmp_path, _config(seed=9), True, False)


def test_metrics_round_trip_with_unmeasured_test_errors(tmp_path):
    rows = [{"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_error": 0.5, "test_error": math.nan, "seconds": 1.5},
            {"epoch": 2, "lr": 0.1, "train_loss": 1.0, "train_error": 0.25, "test_error": 0.3, "seconds": 1.0}]
    rundir.write_metrics(tmp_path, rows[:1])
    rundir.append_metrics(tmp_path, rows[1])
    text = (tmp_path / "metrics.csv").read_text()
    assert text.splitlines() == ["epoch,lr,train_loss,train_error,test_error,seconds", "1,0.1,2.0,0.5,,1.5",
                                 "2,0.1,1.0,0.25,0.3,1.0"]
    back = rundir.read_metrics(tmp_path)
    assert math.isnan(back[0]["test_error"]) and back[1] == {k: float(v) for k, v in rows[1].items()}
    assert rundir.metric_rows(tmp_path) == 2
    (tmp_path / "metrics.csv").write_text("epoch,lr\n1,fast\n")
    with pytest.raises(RapaError, match="metrics.csv is malformed"):
        rundir.read_metrics(tmp_path)
    with pytest.raises(RapaError, match="has no metrics.csv"):
        rundir.read_metrics(tmp_path / "nope")


@pytest.mark.parametrize("content,words", [(None, "no run directory"), ("", "unreadable"), ("[1", "unreadable"),
                                           ('{"version": 1, "dataset": "digits", "epochs": -1}', "epochs")])
def test_read_config_errors_are_one_line(tmp_path, content, words):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        (run / "config.json").write_text(content)
    with pytest.raises(RapaError, match=words) as info:
        rundir.read_config(run)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RapaError, match="not a run directory .no config.json"):
        rundir.read_config(empty)


def test_config_round_trip_keeps_the_versions(tmp_path):
    config = _config(scheme="random", tiles=(2, 2, 1)).resolved()
    rundir.write_config(tmp_path, config, {"torch_version": "t", "rapa_version": "r"})
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["torch_version"] == "t" and doc["rapa_version"] == "r" and doc["tiles"] == [2, 2, 1]
    assert rundir.read_config(tmp_path) == config and rundir.holds_run(tmp_path)


def test_summary_reads(tmp_path):
    assert rundir.read_summary(tmp_path) is None and rundir.read_summary(tmp_path, strict=True) is None
    assert not rundir.is_finished(tmp_path, 1)
    rundir.write_summary(tmp_path, {"epochs": 3})
    assert rundir.is_finished(tmp_path, 3) and not rundir.is_finished(tmp_path, 4)
    (tmp_path / "summary.json").write_text("{torn")
    assert rundir.read_summary(tmp_path) is None and not rundir.is_finished(tmp_path, 1)
    with pytest.raises(RapaError, match="summary.json is unreadable"):
        rundir.read_summary(tmp_path, strict=True)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    rundir.atomic_write_text(path, "old\n")

    def torn(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rundir.atomic_write(path, torn)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    mask = os.umask(0o022)
    try:
        rundir.atomic_write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_results_carry_the_unit_in_the_key_and_old_spellings_read_the_same(tmp_path):
    names = {"tiled_error": "tiled_error_percent"}
    path = rundir.write_result(tmp_path, "reduction", {"tiled_error": 12.5, "worst": math.nan}, names)
    assert path == tmp_path / "reduce.json"
    assert json.loads(path.read_text()) == {"tiled_error_percent": 12.5, "worst": None}
    assert rundir.read_result(tmp_path, "reduction", names) == {"tiled_error": 12.5, "worst": None}
    path.write_text(json.dumps({"tiled_error": 30.0}))  # as written before the units were in the keys
    assert rundir.read_result(tmp_path, "reduction", names) == {"tiled_error": 30.0}
    assert rundir.read_result(tmp_path, "voting") is None


def test_a_result_older_than_the_checkpoint_is_stale(tmp_path):
    rundir.write_result(tmp_path, "similarity", {"overall": 0.5})
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    old = (tmp_path / "similarity.json").stat().st_mtime
    os.utime(tmp_path / "checkpoint.pt", (old + 10, old + 10))
    assert rundir.read_result(tmp_path, "similarity") == {"overall": 0.5}
    assert rundir.read_result(tmp_path, "similarity", fresh=True) is None


def test_a_failed_result_write_is_one_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        rundir.write_result(blocker / "sub", "robustness", {"a": 1})


def test_export_copies_the_small_files_only_and_leaves_unchanged_ones(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "dest"
    run.mkdir()
    for name in ("config.json", "metrics.csv", "summary.json", "checkpoint.pt", "attack.json", "attack.png"):
        (run / name).write_text(name)
    assert sorted(rundir.export_small_files(run, dest)) == ["attack.json", "config.json", "metrics.csv",
                                                            "summary.json"]
    assert sorted(p.name for p in dest.iterdir()) == ["attack.json", "config.json", "metrics.csv", "summary.json"]
    (run / "summary.json").write_text("changed")
    assert rundir.export_small_files(run, dest) == ["summary.json"]
    assert (dest / "summary.json").read_text() == "changed"
