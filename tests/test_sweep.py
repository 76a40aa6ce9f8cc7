"""Experiments (YAML expansion, names, budget knobs) and the Ray sweep runner (retries, resume, skip)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from rapa.config import TrainConfig
from rapa.errors import RapaError
from rapa.sweep.experiments import NAME_IGNORES, apply_budget, expand, load_experiment, run_name

TINY = {"dataset": "digits", "epochs": 1, "batch_size": 32, "limit_train": 100, "limit_test": 100,
        "tiles": [4, 4, 1]}


# ------------------------------------------------------------------ experiment files


def test_grid_is_a_product_and_runs_are_extra_entries():
    doc = {"base": {"dataset": "digits", "tiles": [4, 4, 1]},
           "grid": {"scheme": ["random", "alternate"], "pooling": ["max", "avg", "mixed"]},
           "runs": [{"scheme": "none", "channels": [54, 64, 64], "grid": {"seed": [0, 1]}},
                    {"scheme": "random", "pooling": "max"}]}  # a duplicate of a grid run
    runs = expand(doc)
    assert len(runs) == 2 * 3 + 2
    combos = {(r.config.scheme, r.config.pooling, r.config.seed) for r in runs}
    assert ("alternate", "mixed", 0) in combos and ("none", "max", 1) in combos
    enlarged = [r for r in runs if r.config.channels == (54, 64, 64)]
    assert len(enlarged) == 2 and all(r.config.tiles is None for r in enlarged)  # untiled written one way
    assert all(r.config.tiles == (4, 4, 1) for r in runs if r.config.scheme != "none")


@pytest.mark.parametrize("doc, words", [
    ({"grid": {"scheme": ["random"], "colour": ["red"]}}, ["colour"]),
    ({"base": {"dataset": "digits"}, "grid": {"scheme": "random"}}, ["grid.scheme", "list"]),
    ({"base": {"dataset": "digits", "scheme": "alternate", "tiles": [3, 1, 1]}}, ["square"]),
    ({"bases": {}}, ["bases"]),
])
def test_bad_experiments_are_rejected_with_the_reason(doc, words):
    with pytest.raises(RapaError) as info:
        expand(doc, "x.yaml")
    assert "x.yaml" in str(info.value) and all(w in str(info.value) for w in words)


def test_run_names_are_stable_and_follow_the_trajectory():
    a = TrainConfig(dataset="digits", scheme="random", tiles=(4, 4, 1), pooling="avg", seed=3)
    b = TrainConfig.from_dict(dict(reversed(list(a.to_dict().items()))))
    assert run_name(a) == run_name(b)
    assert run_name(a).startswith("digits-random-4x4x1-avg-s3-")
    # epochs, votes, device ... do not change the weights of an epoch: same run
    assert run_name(a) == run_name(TrainConfig(**{**a.to_dict(), "epochs": 99, "votes": 3, "device": "cpu"}))
    # the paper's default rate written out is the same run; another rate, seed or limit is not
    assert run_name(a) == run_name(TrainConfig(**{**a.to_dict(), "lr": 0.025}))
    for change in ({"lr": 0.01}, {"seed": 4}, {"limit_train": 10}, {"weight_decay": 0.0}, {"analog": "rpu-baseline"},
                   {"tile_init": "replicate"}):
        assert run_name(a) != run_name(TrainConfig(**{**a.to_dict(), **change})), change
    # tile_init: the resolved start of the tiles counts (independent written out is the same run; on
    # analog arrays the default is replicate, so writing that out is the same run too)
    assert run_name(a) == run_name(TrainConfig(**{**a.to_dict(), "tile_init": "independent"}))
    analog = TrainConfig(**{**a.to_dict(), "analog": "rpu-baseline"})
    assert run_name(analog) == run_name(dataclasses.replace(analog, tile_init="replicate"))
    assert run_name(analog) != run_name(dataclasses.replace(analog, tile_init="independent"))
    # the hash leaves out exactly the fields a resumed run may change
    assert set(NAME_IGNORES) == {"epochs", "device", "data_dir", "download", "votes", "adaptive_threshold",
                                 "eval_batch_size", "eval_every"}


def test_the_committed_battery_runs_keep_their_names():
    """The run directories of the committed results tree are named as the experiment names them
    today (a changed hash would orphan them and train every run again)."""
    results = Path(__file__).resolve().parents[1] / "results" / "fmnist"
    dirs = {d.name for d in (results / "runs").glob("fashion-mnist-*") if d.is_dir()}
    if not dirs:
        pytest.skip("no committed results/fmnist runs")
    budget = json.loads((results / "battery.json").read_text()).get("budget") or {}
    names = {r.name for r in apply_budget(load_experiment("fmnist").runs, **budget)}
    assert dirs <= names, sorted(dirs - names)


def test_budget_knobs_shrink_without_editing():
    runs = expand({"base": TINY, "grid": {"dataset": ["digits", "fashion-mnist"], "scheme": ["none", "random"]}})
    small = apply_budget(runs, epochs=2, datasets=["digits"], seeds=[0, 1], limit_train=50)
    assert len(small) == 2 * 2
    assert {(r.config.epochs, r.config.limit_train, r.config.dataset) for r in small} == {(2, 50, "digits")}
    assert {r.config.seed for r in small} == {0, 1}
    assert len({r.name for r in small}) == 4
    with pytest.raises(RapaError, match="svhn"):
        apply_budget(runs, datasets=["svhn"])
    with pytest.raises(RapaError, match="--epochs"):
        apply_budget(runs, epochs=0)


def test_the_paper_experiments_have_the_paper_grids():
    names = {n: {r.name for r in load_experiment(n).runs}
             for n in ("table1", "table2", "table3", "fig5", "fig6", "fig7", "quick")}
    assert len(names["table1"]) == 3 * 7 * 2 + 3 * 2  # datasets x schemes x FP/RPU + enlarged
    assert len(names["table2"]) == 3 * 4 * 7 + 3 * 4  # datasets x poolings x schemes + enlarged
    assert len(names["fig5"]) == 3 * 7 and len(names["fig7"]) == 4 and len(names["quick"]) == 8
    assert names["table3"] <= names["table2"] and names["fig6"] <= names["table2"]
    assert len(names["fig7"] & names["table1"]) == 3  # untiled, enlarged, random (16,4,1) are Table 1 runs
    t1 = load_experiment("table1").runs
    assert {r.config.analog for r in t1} == {None, "rpu-baseline"}
    assert all(r.config.epochs == 700 and r.config.batch_size == 10 for r in t1)


def test_unreachable_address_fails_at_once_naming_it(tmp_path):
    from rapa.sweep.runner import run_sweep

    runs = expand({"base": TINY})
    t0 = time.perf_counter()
    with pytest.raises(RapaError, match="127.0.0.1:1"):
        run_sweep(runs, tmp_path, address="127.0.0.1:1", log=lambda m: None)
    assert time.perf_counter() - t0 < 5


def test_cli_lists_an_experiment_without_training(capsys):
    from rapa.cli import main

    assert main(["sweep", "quick", "--list", "--epochs", "1", "--limit-train", "100"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  fashion-mnist-")]
    assert len(lines) == 8 and all("epochs=1" in ln for ln in lines)


# ------------------------------------------------------------------------- Ray runs


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def make_train_fn(log_dir: str):
    """A train function for the workers: logs every call and epoch per run; the run with
    seed 1 crashes its worker after its first epoch once; the run with seed 2 always raises."""

    def train_fn(config, run_dir, resume=False, progress=False):
        import os
        from pathlib import Path

        from rapa.train import train

        import rapa.heap

        log = Path(log_dir) / f"{Path(run_dir).name}.log"
        marker = Path(log_dir) / f"{Path(run_dir).name}.crashed"
        with open(log, "a") as f:
            f.write(f"start resume={resume}\n")
        (Path(log_dir) / f"{Path(run_dir).name}.heap").write_text(str(rapa.heap.kept()))
        if config.seed == 2:
            raise RuntimeError("injected failure")

        def on_epoch(row):
            with open(log, "a") as f:
                f.write(f"epoch {row['epoch']}\n")
            if config.seed == 1 and not marker.exists():
                marker.touch()
                os._exit(3)  # the worker process dies, as in a real crash

        return train(config, run_dir, resume=resume, progress=progress, on_epoch=on_epoch)

    return train_fn


@pytest.mark.ray
def test_sweep_retries_crashes_from_the_checkpoint_and_skips_finished_runs(ray_session, tmp_path):
    from rapa.sweep.runner import run_sweep

    runs = expand({"base": {**TINY, "scheme": "none"},
                   "runs": [{"seed": 0}, {"seed": 1, "epochs": 2}, {"seed": 2}]})
    by_seed = {r.config.seed: r.name for r in runs}
    out, logs = tmp_path / "sweep", tmp_path / "logs"
    logs.mkdir()
    lines: list[str] = []
    result = run_sweep(runs, out, experiment="tiny", max_retries=1, train_fn=make_train_fn(str(logs)),
                       log=lines.append, keep_heap=True)

    ok, crashed, bad = (result.runs[by_seed[s]] for s in (0, 1, 2))
    assert (ok.status, ok.attempts) == ("done", 1)
    assert (crashed.status, crashed.attempts) == ("done", 2)
    # the retry resumed after epoch 1 instead of starting again
    assert (logs / f"{crashed.name}.log").read_text().split("\n")[:-1] == \
        ["start resume=False", "epoch 1", "start resume=True", "epoch 2"]
    metrics = (out / crashed.name / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in metrics[1:]] == ["1", "2"]
    assert json.loads((out / crashed.name / "summary.json").read_text())["epochs"] == 2
    # the run that always fails is recorded with its error; the others went on
    assert (bad.status, bad.attempts) == ("failed", 2) and "injected failure" in bad.error
    state = json.loads((out / "sweep-tiny.json").read_text())
    assert state["runs"][bad.name]["status"] == "failed" and "injected failure" in state["runs"][bad.name]["error"]
    assert state["runs"][ok.name]["status"] == "done"
    assert any("2/3 done" in ln and "1 failed" in ln for ln in lines)
    # every task kept its worker's heap first, as asked (the rapa commands ask: rapa.heap)
    if os.environ.get("RAPA_KEEP_HEAP", "1") != "0" and not any(k.startswith("MALLOC_") for k in os.environ):
        assert {(logs / f"{r.name}.heap").read_text() for r in runs} == {"True"}

    # again: the finished runs are not trained again, the failed one is tried again
    summary = out / ok.name / "summary.json"
    mtime, calls = summary.stat().st_mtime_ns, (logs / f"{ok.name}.log").read_text()
    again = run_sweep(runs, out, experiment="tiny", max_retries=0, train_fn=make_train_fn(str(logs)),
                      log=lambda m: None)
    assert again.runs[ok.name].status == "skipped" and again.runs[crashed.name].status == "skipped"
    assert again.runs[bad.name].status == "failed" and again.runs[bad.name].attempts == 1
    assert summary.stat().st_mtime_ns == mtime and (logs / f"{ok.name}.log").read_text() == calls
