"""More tiles (Fig. 5): curves and relative best errors of hand-written run directories."""

from __future__ import annotations

import csv
import json

import pytest

from rapa.analysis.more_tiles import more_tiles_curves, plot_more_tiles, read_metrics
from rapa.config import TrainConfig
from rapa.errors import RapaError


def _run(root, name, tiles, test_errors, dataset="digits", best5=None, scheme="random"):
    """A run directory as rapa.train writes it: config.json, metrics.csv, maybe summary.json."""
    d = root / name
    d.mkdir()
    cfg = TrainConfig(dataset=dataset, tiles=tiles, scheme=scheme, epochs=len(test_errors))
    (d / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_version": "x", "rapa_version": "y"}))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "train_error", "test_error", "seconds"])
        for i, e in enumerate(test_errors):
            w.writerow([i + 1, 0.025, 1.0, 0.5, "" if e is None else e, 1.0])
    if best5 is not None:
        (d / "summary.json").write_text(json.dumps({"best5_test_error": best5}))
    return d


def test_curves_best_and_relative(tmp_path):
    a = _run(tmp_path, "a", (16, 4, 1), [0.5, 0.4, 0.3, 0.2, 0.1, 0.2, 0.3])
    b = _run(tmp_path, "b", (64, 16, 4), [0.6, 0.5, 0.4], best5=0.15)
    c = _run(tmp_path, "c", (128, 32, 8), [0.9, None, 0.3, None, 0.2, 0.1, 0.1, 0.2, 0.3])
    res = more_tiles_curves([c, b, a])
    runs = res["runs"]
    assert [r["tiles"] for r in runs] == [[16, 4, 1], [64, 16, 4], [128, 32, 8]]  # sorted by tiles
    assert runs[0]["epochs"] == [1, 2, 3, 4, 5, 6, 7]
    assert runs[0]["test_error"] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.2, 0.3])
    # 5-epoch windows of a: 0.30, 0.24, 0.22 -> 0.22
    assert runs[0]["best_test_error"] == pytest.approx(0.22)
    assert runs[1]["best_test_error"] == pytest.approx(0.15)  # summary.json wins over metrics.csv
    # c: measured epochs 1,3,5,6,7,8,9 -> windows of 5 measured values: 0.32, 0.18, 0.18 -> 0.18
    assert runs[2]["best_test_error"] == pytest.approx(0.18)
    assert res["reference"] == {"digits": [16, 4, 1]}
    assert [r["relative_best"] for r in runs] == pytest.approx([1.0, 0.15 / 0.22, 0.18 / 0.22])
    assert [r["delta_best"] for r in runs] == pytest.approx([0.0, 0.15 - 0.22, 0.18 - 0.22])
    path = tmp_path / "fig5.png"
    plot_more_tiles(res, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_reference_per_dataset(tmp_path):
    runs = [_run(tmp_path, "d1", (16, 4, 1), [0.2], best5=0.2),
            _run(tmp_path, "d2", (64, 16, 4), [0.1], best5=0.1),
            _run(tmp_path, "f1", (64, 16, 4), [0.3], dataset="fashion-mnist", best5=0.3),
            _run(tmp_path, "f2", (256, 64, 16), [0.6], dataset="fashion-mnist", best5=0.6)]
    res = more_tiles_curves(runs)
    rel = {r["run_dir"].split("/")[-1]: r["relative_best"] for r in res["runs"]}
    assert rel == pytest.approx({"d1": 1.0, "d2": 0.5, "f1": 1.0, "f2": 2.0})
    # no (16,4,1) run of fashion-mnist: its fewest-tiles run is the reference
    assert res["reference"] == {"digits": [16, 4, 1], "fashion-mnist": [64, 16, 4]}
    plot_more_tiles(res, tmp_path / "two.png")


def test_bad_runs(tmp_path):
    with pytest.raises(RapaError, match="no run directory"):
        more_tiles_curves([tmp_path / "missing"])
    old = _run(tmp_path, "old", (16, 4, 1), [0.2])
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "version": 0}))
    with pytest.raises(RapaError, match="version"):
        more_tiles_curves([old])
    nometrics = _run(tmp_path, "nm", (16, 4, 1), [0.2])
    (nometrics / "metrics.csv").unlink()
    with pytest.raises(RapaError, match="metrics.csv"):
        more_tiles_curves([nometrics])
    with pytest.raises(RapaError):
        more_tiles_curves([])


def test_read_metrics_marks_unmeasured_epochs(tmp_path):
    d = _run(tmp_path, "r", (16, 4, 1), [0.4, None, 0.2])
    m = read_metrics(d)
    assert m["epoch"] == [1, 2, 3]
    assert m["test_error"][0] == 0.4 and m["test_error"][1] != m["test_error"][1] and m["test_error"][2] == 0.2
