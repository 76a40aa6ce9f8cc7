"""The ``rapa train``, ``rapa eval``, ``rapa demo`` and ``rapa bench train`` commands."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from rapa.cli import main
from rapa.data import dataset_info, load_dataset
from rapa.train import load_run

TINY = ["--dataset", "digits", "--limit-train", "60", "--limit-test", "30", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rapa_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rapa.cli", *args], capture_output=True, text=True, env=env)


def test_train_prints_epochs_and_summary_then_eval_reports_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--scheme", "none", "--epochs", "2", "--lr", "0.05", "--votes", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "best test error (5-epoch average)" in text and "analog speed-up: 1x" in text
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05 / 20, 0.05])  # --lr with the warm-up

    assert main(["eval", str(out), "--votes", "5", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model, _, _ = load_run(out)
    data = load_dataset("digits", "test", limit=30)
    info = dataset_info("digits")
    with torch.no_grad():
        pred = model((data.images.float() / 255 - info.mean[0]) / info.std[0]).argmax(1)
    expected = (pred != data.labels).float().mean().item()
    assert res["single_error"] == pytest.approx(expected) and res["test_images"] == 30
    assert res["vote_error"] == pytest.approx(expected)  # untiled: every pass agrees
    assert main(["eval", str(out), "--votes", "5", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "5-vote majority" in text and "adaptive vote" in text


def test_eval_of_a_tiled_run_votes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--votes", "1", "--quiet", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tiles"] == [16, 4, 1] and summary["analog_speedup"] == 16
    assert main(["eval", str(out), "--votes", "3", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["vote_error"] <= 1 and 1 <= res["adaptive_mean_passes"] <= 3


def test_tiles_none_and_enlarged(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tiles", "none", "--enlarged", "--epochs", "1", "--votes", "1", "--quiet",
                 "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((out / "config.json").read_text())
    assert config["scheme"] == "none" and config["tiles"] is None and config["channels"] == [54, 64, 64]
    assert config["lr"] == 0.005
    assert summary["conv_weights"] == (1 * 54 * 25 + 54) + (54 * 64 * 25 + 64) + (64 * 64 * 25 + 64)


def test_resume_flag_continues_and_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--votes", "1", "--quiet", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--seed cannot be changed" in err and len(err.strip().splitlines()) == 1


def test_missing_run_dir_is_one_line_without_traceback_exit_2():
    r = rapa_subprocess("eval", "/nonexistent/run")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "rapa eval: error: no run directory /nonexistent/run"


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "digits", "--tiles", "16,4,64"], "conv3 has 64 tiles but only 49 output pixels"),
    (["train", "--scheme", "alternate", "--tiles", "16,4,2"], "square number of tiles"),
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--tiles", "16,4"], "tiles must be 3 numbers"),
    (["train", "--resume", "/nonexistent/run"], "no run directory"),
    (["train", "--channels", "32,32,64", "--enlarged"], "either --enlarged or --channels"),
    (["eval", "/nonexistent/run", "--votes", "0"], "--votes must be >= 1"),
])
def test_user_errors_are_one_line_with_exit_code_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that did start would land here
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"rapa {args[0]}: error:")
    assert message in err


def test_existing_run_is_not_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--votes", "1", "--quiet", "--out", str(out)]) == 0
    assert main(["train", *TINY, "--epochs", "1", "--votes", "1", "--quiet", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "1", "--votes", "1", "--quiet", "--overwrite", "--out", str(out)]) == 0


def test_demo_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "digits", "--epochs", "2", "--limit-train", "60", "--limit-test", "30",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("rapa demo: data: scikit-learn's digits;")  # the first line names the data
    assert "untiled" in text and "random 16,4,1" in text and "9-vote" in text
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "demo.json").read_text())
    assert results["untiled"]["analog_speedup"] == 1 and results["random 16,4,1"]["analog_speedup"] == 16
    assert results["untiled"]["conv_weights"] < results["random 16,4,1"]["conv_weights"]
    for name in ("untiled", "random"):
        assert (out / name / "summary.json").is_file()


def test_bench_train_prints_the_ratio(capsys):
    assert main(["bench", "train", "--batch", "4", "--images", "8", "--repeats", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "untiled" in text and "random 16,4,1" in text and "slowdown" in text and "target <= 1.5" in text
