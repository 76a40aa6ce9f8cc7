"""Tables, figures and claim verdicts from hand-written run directories (no training, no Ray)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import rapa
from rapa.config import TrainConfig
from rapa.sweep.experiments import run_name
from rapa.sweep.report import MISSING, build_report
from rapa.sweep.analyses import Analyses

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_error", "test_error", "seconds")


def make_run(root: Path, summary: dict | None = None, test_curve=(0.5, 0.4, 0.3), **settings) -> Path:
    """A run directory as rapa.train writes it: config.json, metrics.csv, summary.json if finished."""
    config = TrainConfig(**{"dataset": "cifar10", "pooling": "max", "augment": "moderate", **settings})
    run_dir = root / run_name(config)
    run_dir.mkdir(parents=True)
    meta = {"torch_version": "2.x", "rapa_version": rapa.__version__}
    (run_dir / "config.json").write_text(json.dumps({**config.to_dict(), **meta}))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(METRIC_FIELDS)
        for i, t in enumerate(test_curve, 1):
            w.writerow([i, 0.025, 1.0, t + 0.05, t, 1.0])
    if summary is not None:
        full = {"dataset": config.dataset, "scheme": config.scheme, "tiles": None, "epochs": len(test_curve),
                "best5_test_error": None, "best5_train_error": None, "best5_first_epoch": 1, "best5_last_epoch": 3,
                "final_train_error": 0.1, "final_test_error": 0.2, "vote_test_error": 0.2, "votes": 9,
                "adaptive_test_error": 0.2, "adaptive_mean_passes": 1.0, "conv_weights": 1, "output_pixels": [1, 1, 1],
                "analog_speedup": 16.0, "wall_seconds": 1.0, "train_seconds": 1.0, "images_per_s": 100.0, **summary}
        (run_dir / "summary.json").write_text(json.dumps(full))
    return run_dir


def done(test: float, train: float = 0.05, vote: float | None = None) -> dict:
    return {"best5_test_error": test, "best5_train_error": train, "vote_test_error": test if vote is None else vote}


def parse(md: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and rows (by first cell) of the Markdown table under the heading containing ``title``."""
    block = md.split(title, 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, done(0.20, 0.10), scheme="none", tiles=None)
    make_run(root, done(0.19, 0.09), scheme="none", tiles=None, channels=(54, 64, 64))
    make_run(root, done(0.18, 0.12, vote=0.16), scheme="random")
    make_run(root, {**done(0.17, 0.13, vote=0.15), "final_test_error": 0.16}, scheme="random", seed=1)  # best
    make_run(root, None, scheme="random", analog="rpu-baseline")  # still running: RPU column, empty cell
    make_run(root, done(0.30, 0.20), scheme="none", tiles=None, analog="rpu-baseline")
    make_run(root, done(0.25, 0.01), scheme="alternate", dataset="svhn")
    # strong augmentation: Table 2
    make_run(root, done(0.40, vote=0.35), scheme="random", augment="strong", pooling="avg")
    make_run(root, done(0.45), scheme="none", tiles=None, augment="strong", pooling="avg")
    make_run(root, done(0.50), scheme="image_pad", augment="strong", pooling="mixed")
    # a run the sweep state knows as failed, never started
    failed = TrainConfig(dataset="cifar100", scheme="perforated", augment="moderate")
    (root / "sweep-t1.json").write_text(json.dumps({"experiment": "t1", "runs": {
        run_name(failed): {"config": failed.to_dict(), "status": "failed", "error": "RuntimeError: out of memory"}}}))
    return root


def test_table1_cells_votes_and_missing_markers(sweep):
    rep = build_report(sweep, analyses=Analyses(compute=False))
    header, rows = parse(rep.markdown, "Table 1")
    vote = "final: one pass / vote"
    assert header == ["scheme", "CIFAR-10 FP", vote, "CIFAR-10 RPU", vote, "CIFAR-100 FP", vote, "SVHN FP", vote]
    assert rows["no tiling"][:4] == ["20.00 (10.00)", "", "30.00 (20.00)", ""]
    assert rows["no tiling enlarged"][0] == "19.00 (9.00)"
    # best seed; one pass and vote of its final net; RPU run unfinished
    assert rows["random"][:4] == ["17.00 (13.00)", "16.00 / 15.00", MISSING, MISSING]
    assert rows["perforated"] == [MISSING, ""] * 4  # the failed cifar100 run: a column, no value; no vote
    assert rows["alternate"][6] == "25.00 (1.00)" and rows["alternate"][0] == MISSING
    assert list(rows)[:8] == ["no tiling", "no tiling enlarged", "perforated", "image w/overlap", "image w/pad",
                              "alternate", "random fixed", "random"]
    assert "out of memory" in rep.markdown and "1 failed" in rep.markdown
    with open(sweep / "report" / "table1.csv") as f:
        recs = {(r["scheme"], r["dataset"], r["precision"]): r for r in csv.DictReader(f)}
    assert float(recs[("random", "cifar10", "FP")]["test_error"]) == pytest.approx(17.0)
    assert recs[("random", "cifar10", "FP")]["runs"] == "2"
    assert recs[("random", "cifar10", "RPU")]["test_error"] == ""


def test_table2_by_pooling_with_a_voting_row(sweep):
    rep = build_report(sweep, analyses=Analyses(compute=False))
    header, rows = parse(rep.markdown, "Table 2")
    assert header == ["scheme", "CIFAR-10+ avg", "CIFAR-10+ mixed"]
    assert rows["random"] == ["40.00", MISSING] and rows["no tiling"] == ["45.00", MISSING]
    assert rows["image w/pad"] == [MISSING, "50.00"] and rows["random voting"] == ["35.00", MISSING]


def test_table3_reads_reduce_json(sweep):
    for seed, best in ((0, ("norm", 30.0)), (1, ("first_tile", 25.0))):
        cfg = TrainConfig(dataset="cifar10", scheme="random", augment="moderate", seed=seed)
        methods = {"norm": 30.0, "random_tile": 33.0, "first_tile": 31.0, "random_filters": 40.0,
                   "maxpool_winner": 35.0}
        methods[best[0]] = best[1]
        (sweep / run_name(cfg) / "reduce.json").write_text(json.dumps(
            {"methods": methods, "best_method": best[0], "best_error": best[1], "tiled_error": 18.0}))
    rep = build_report(sweep, analyses=Analyses(compute=False))
    header, rows = parse(rep.markdown, "Table 3")
    col = header.index("CIFAR-10 max") - 1
    assert rows["random"][col] == "25.00 (first_tile)"
    assert rows["no tiling (trained)"][col] == "20.00"
    assert rows["alternate"][col] == MISSING  # the SVHN alternate run has no reduction and no CIFAR-10 run


def test_more_tiles_figure(tmp_path):
    root = tmp_path / "sweep"
    for tiles, err in (((16, 4, 1), 0.20), ((64, 16, 4), 0.18), ((128, 32, 8), 0.22)):
        make_run(root, done(err), scheme="random", tiles=tiles, lr=0.05, gamma=0.5, lr_step=100, weight_decay=0.0)
    rep = build_report(root, analyses=Analyses(compute=False))
    _, rows = parse(rep.markdown, "Figure 5B")
    assert rows["(16,4,1)"] == ["1.000 (20.00)"]
    assert rows["(64,16,4)"] == ["0.900 (18.00)"] and rows["(128,32,8)"] == ["1.100 (22.00)"]
    assert (root / "report" / "fig5.png").stat().st_size > 0


def test_report_command_runs_without_analysis(sweep, capsys):
    from rapa.cli import main

    assert main(["report", str(sweep), "--no-analysis", "--out", str(sweep / "r")]) == 0
    assert "Table 1" in capsys.readouterr().out
    assert (sweep / "r" / "report.md").is_file() and (sweep / "r" / "table2.csv").is_file()
    assert main(["report", str(sweep / "nope")]) == 2


# ------------------------------------------------------------- scripts/analog_table.py


def _script_module(name: str):
    """scripts/NAME.py, imported."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _analog_table_module():
    return _script_module("analog_table")


def _fake_analog_run(folder: Path, errors: list[float], epochs: int, final: float | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"epochs": epochs}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "train_error", "test_error", "seconds"])
        for i, e in enumerate(errors, 1):
            w.writerow([i, 0.01, 0.5, 0.1, e, 10.0])
    if final is not None:
        (folder / "summary.json").write_text(json.dumps({
            "final_test_error": final, "vote_test_error": final - 0.01, "test_images": 10000,
            "images_per_s": 70.0}))


def test_analog_table_gives_the_gap_and_shows_unfinished_runs(tmp_path):
    """Finished pairs get their gap (RPU - FP in pp, with a normal-approximation interval
    computed here by hand); a run still going shows its curve and how far it is."""
    table = _analog_table_module()
    _fake_analog_run(tmp_path / "fmnist-none-fp", [0.12, 0.09], 2, 0.09)
    _fake_analog_run(tmp_path / "fmnist-none-rpu-baseline", [0.18, 0.14], 2, 0.14)
    _fake_analog_run(tmp_path / "fmnist-random-fp", [0.2], 8)
    text = table.table(tmp_path)
    half = 1.96 * ((0.09 * 0.91 + 0.14 * 0.86) / 10000) ** 0.5 * 100
    assert f"+5.00 [{5 - half:+.1f}, {5 + half:+.1f}]" in text
    assert "12.0, 9.0" in text and "18.0, 14.0" in text
    random_row = next(line for line in text.splitlines() if line.startswith("| random"))
    assert "20.0" in random_row and "running (1 of 8 epochs)" in random_row
    assert table.ranking(tmp_path) == "ranking: not every run has finished"
    assert table.epoch_gaps(tmp_path) == "RPU - FP after each epoch, untiled: +6.0, +5.0 pp"


def test_analog_table_of_a_folder_with_one_net_says_so(tmp_path):
    """A folder of `analog-fmnist.sh ... random` has no untiled runs: no untiled row, and
    the ranking names what is missing instead of waiting for runs that never come."""
    table = _analog_table_module()
    _fake_analog_run(tmp_path / "fmnist-random-fp", [0.2], 1, 0.2)
    _fake_analog_run(tmp_path / "fmnist-random-rpu-baseline", [0.25], 1, 0.25)
    rows = [line for line in table.table(tmp_path).splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| net", "| random (16,4,1)"]
    assert table.ranking(tmp_path) == "ranking: needs both nets (untiled: no runs in this folder)"


def test_analog_table_names_the_analog_options_of_a_run(tmp_path):
    table = _analog_table_module()
    _fake_analog_run(tmp_path / "fmnist-random-fp", [0.2], 1, 0.2)
    _fake_analog_run(tmp_path / "fmnist-random-rpu-baseline", [0.25], 1, 0.25)
    config = tmp_path / "fmnist-random-rpu-baseline" / "config.json"
    config.write_text(json.dumps({"epochs": 1, "analog_options": ["desired_bl=100", "out_noise=0"]}))
    row = next(line for line in table.table(tmp_path).splitlines() if line.startswith("| random"))
    assert row.startswith("| random (16,4,1) (RPU: desired_bl=100, out_noise=0) | 20.0 |")
    config.write_text(json.dumps({"epochs": 1, "analog_options": ["conv1.dw_min=0.0001"],
                                  "digital_layers": ["conv3", "fc"], "layer_lr_scale": ["conv2=0.5"]}))
    row = next(line for line in table.table(tmp_path).splitlines() if line.startswith("| random"))
    assert row.startswith("| random (16,4,1) (RPU: conv1.dw_min=0.0001; digital conv3, fc; rates x conv2=0.5) |")


def test_analog_table_across_runs_gives_the_mean_gap_and_its_t_interval(tmp_path):
    """Three replicate folders (e.g. seeds): the gaps, their mean and sd, and the 95%
    t-interval of the mean (t = 4.30 for 2 degrees of freedom), checked by hand."""
    table = _analog_table_module()
    folders = []
    for i, (fp, rpu) in enumerate(((0.10, 0.13), (0.11, 0.15), (0.09, 0.14))):
        folder = tmp_path / f"s{i}"
        _fake_analog_run(folder / "fmnist-none-fp", [fp], 1, fp)
        _fake_analog_run(folder / "fmnist-none-rpu-baseline", [rpu], 1, rpu)
        folders.append(folder)
    text = table.across(folders)
    gaps = [3.0, 4.0, 5.0]  # mean 4, sd 1, half-width 4.30 / sqrt(3)
    half = 4.30 / 3 ** 0.5
    assert "| untiled | 3 | 10.00, 11.00, 9.00 | 13.00, 15.00, 14.00 | +3.00, +4.00, +5.00 |" in text
    assert f"+4.00 [{4 - half:+.1f}, {4 + half:+.1f}] (1.00)" in text and sum(gaps) / 3 == 4.0
    assert "random" not in text  # no finished random pair


def test_analog_table_shows_what_the_arrays_did_per_epoch(tmp_path):
    """An RPU run's arrays.json (one record per epoch) becomes one row per layer: % of updates
    cut short / % of weights at a bound, each epoch; runs without the file add nothing."""
    table = _analog_table_module()
    _fake_analog_run(tmp_path / "fmnist-none-rpu-baseline", [0.2, 0.15], 2, 0.15)
    assert table.arrays(tmp_path) == ""
    records = [{"epoch": e, "layers": {"conv1": {"at_bound": 0.001 * e}, "fc": {"at_bound": 0.01 * e}},
                "updates": {"conv1": {"saturated": 0.0}, "fc": {"saturated": 0.125 * e}}} for e in (1, 2)]
    (tmp_path / "fmnist-none-rpu-baseline" / "arrays.json").write_text(json.dumps({"epochs": records}))
    lines = table.arrays(tmp_path).splitlines()
    assert lines[0].startswith("untiled, per epoch")
    assert "| conv1 | 0.00 / 0.10 | 0.00 / 0.20 |" in lines
    assert "| fc | 12.50 / 1.00 | 25.00 / 2.00 |" in lines
    assert not any("similarity" in line for line in lines)  # an untiled net: no replicas
    records[1]["similarity"] = {"conv1": 0.5}  # recorded from epoch 2 on (a run resumed by newer code)
    (tmp_path / "fmnist-none-rpu-baseline" / "arrays.json").write_text(json.dumps({"epochs": records}))
    assert "| conv1: replicas' similarity | - | 0.500 |" in table.arrays(tmp_path).splitlines()


# ------------------------------------------------------------- scripts/bench_table.py


def test_bench_table_median_of_conv_runs(tmp_path):
    """The README's conv table: per layer the median ratio over the runs and its range, and the
    median of the runs' geomeans (here worked out by hand from the ratios written)."""
    table = _script_module("bench_table")
    ratios = [(1.0, 1.2, 1.0), (0.9, 1.1, 1.0), (1.1, 1.0, 1.2)]  # conv1, conv2, conv3 of three runs
    shapes = ("3->32 @32x32", "32->32 @16x16", "32->64 @8x8")
    grouped = {"shape": "64->64 @16x16 dw", "batch": 10, "nt": 4, "groups": 64, "memory_format": "NHWC",
               "seconds": {"conv2d": 0.002, "random": 0.009}, "peak_bytes": {}}  # not a paper layer
    runs = []
    for run in ratios:
        runs.append([{"shape": shape, "batch": 10, "nt": 4, "groups": 1, "memory_format": "NHWC",
                      "seconds": {"conv2d": 0.002, "random": 0.002 * r}, "peak_bytes": {}}
                     for shape, r in zip(shapes, run)] + [grouped])
    text = table.conv_median_table(runs)
    row = [ln for ln in text.splitlines() if ln.startswith("| NHWC | 10 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")][2:]
    assert cells[0] == "1.00x (0.90-1.10)" and cells[1] == "1.10x (1.00-1.20)" and cells[2] == "1.00x (1.00-1.20)"
    # geomeans: 1.2^(1/3) = 1.063, (0.99)^(1/3) = 0.997, (1.32)^(1/3) = 1.097
    assert cells[3] == "**1.06x** (1.00-1.10)"
    path = tmp_path / "bench"
    path.mkdir()
    proc = subprocess.run([sys.executable, str(Path(table.__file__)), str(path), "--median", "missing.json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.json" in proc.stderr and "Traceback" not in proc.stderr
