"""The ``rapa train``, ``rapa eval``, ``rapa demo`` and ``rapa bench train`` commands, and the
parsers the commands share (``rapa.cli.common``)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from rapa.cli import build_parser, main
from rapa.cli.common import float_list, int_list, list_type, name_list, parse_list
from rapa.cli.train import config_from_args
from rapa.config import TrainConfig
from rapa.data import dataset_info, load_dataset
from rapa.errors import RapaError
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
                 "--momentum", "0.5", "--eval-batch-size", "7", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((out / "config.json").read_text())
    assert config["scheme"] == "none" and config["tiles"] is None and config["channels"] == [54, 64, 64]
    assert config["momentum"] == 0.5 and config["eval_batch_size"] == 7
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
    (["train", "--momentum", "1"], "momentum=1.0 is out of range"),
    (["train", "--adaptive-threshold", "2"], "adaptive_threshold=2.0 is out of range"),
    (["train", "--eval-batch-size", "0"], "eval_batch_size must be an integer >= 1, got 0"),
    (["train", "--init", "xavier"], "unknown init 'xavier'"),
    (["train", "--tile-init", "shared"], "unknown tile_init 'shared'; choose one of independent, replicate"),
    (["train", "--wd-factor", "0.1"], "both set; give weight_decay only"),
    (["train", "--tile-lr-power", "5"], "tile_lr_power=5.0 is out of range: give a number from 0 to 2"),
    (["train", "--analog-options", "desired_bl=100"], "analog_options=desired_bl=100 needs analog"),
    (["train", "--layer-lr-scale", "fc=-1"], "layer_lr_scale item 'fc=-1': the factor must be a finite number > 0"),
    (["train", "--analog", "rpu-baseline", "--analog-options", "bl=100"], "preset 'rpu-baseline' has no field 'bl'"),
    (["train", "--analog", "rpu-baseline", "--analog-options", "conv4.dw_min=0.0001"], "the net has no layer 'conv4'"),
    (["train", "--analog", "rpu-baseline", "--digital-layers", "fc", "--analog-options", "fc.out_noise=0"],
     "layer fc is digital"),
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


def test_bench_names_a_bad_device_in_one_line(capsys):
    assert main(["bench", "train", "--device", "tpu", "--batch", "4", "--images", "8", "--repeats", "1"]) == 2
    assert capsys.readouterr().err == "rapa bench: error: unknown device 'tpu'; use auto, cpu, cuda or cuda:N\n"


def test_bench_train_prints_the_ratio(capsys):
    assert main(["bench", "train", "--batch", "4", "--images", "8", "--repeats", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "untiled" in text and "random 16,4,1" in text and "slowdown" in text and "target <= 1.1" in text


def test_bench_train_profile_splits_the_step(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "train", "--batch", "2", "--images", "2", "--repeats", "1", "--device", "cpu",
                 "--profile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for part in ("convolution", "LRN", "ReLU", "max pooling", "FC + loss", "optimizer", "assignment draws"):
        assert part in text
    prof = json.loads(out.read_text())["profiles"][0]
    for name in ("untiled", "random 16,4,1"):  # both nets' convolutions are found by their op names
        assert prof["parts_ms"][name]["convolution"] > 0 and prof["parts_ms"][name]["LRN"] > 0
        assert sum(prof["parts_ms"][name].values()) <= 1.5 * prof["step_ms_profiled"][name]
    assert prof["draw_ms"] > 0


def test_time_interleaved_lets_every_case_follow_every_other_equally_often():
    """Every timed function follows every other one equally often (a fixed order made
    nn.Conv2d always follow the naive layer); each runs at least warmup + repeats times;
    torch's generator is left alone; shuffle=False keeps the fixed order."""
    from collections import Counter

    from rapa.bench.common import balanced_order, time_interleaved

    for n in (2, 3, 5):
        order = balanced_order(n, random.Random(n))
        assert sorted(order) == sorted(list(range(n)) * (n - 1))
        pairs = Counter(zip(order, order[1:] + order[:1]))
        assert pairs == Counter({(a, b): 1 for a in range(n) for b in range(n) if a != b})
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    state = torch.get_rng_state()
    secs = time_interleaved(fns, torch.device("cpu"), repeats=7, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(secs) == set("abcd") and all(s >= 0 for s in secs.values())
    assert calls[:4] == list("abcd") and Counter(calls[4:]) == Counter("abcd" * 9)  # 3 circuits of 12
    every_pair = Counter({(p, n): 1 for p in "abcd" for n in "abcd" if p != n})
    for k in range(3):  # each circuit: every ordered pair adjacent once (its last and first too)
        c = calls[4 + 12 * k: 16 + 12 * k]
        assert Counter(zip(c, c[1:] + c[:1])) == every_pair
    calls.clear()
    time_interleaved(fns, torch.device("cpu"), repeats=3, shuffle=False)
    assert calls == list("abcd") * 4


def test_bench_conv_summary_against_the_targets():
    from rapa.bench.conv import ConvCase, format_conv_bench

    def case(shape, batch, nt, ratio, fmt, groups=1, mem=1.0):
        secs = {"conv2d": 1e-3, "none": 1e-3, "random": ratio * 1e-3, "random-pt": 2e-3, "naive": 8e-3}
        return ConvCase(shape, batch, nt, secs, {"conv2d": 100, "random": int(100 * mem), "naive": 300}, groups, fmt)

    cases = [case("a", 10, 16, 1.0, "NCHW"), case("b", 10, 4, 1.21, "NCHW", mem=1.05), case("c", 10, 1, 1.0, "NCHW"),
             case("a", 10, 16, 1.02, "NHWC"), case("b", 10, 4, 1.04, "NHWC"), case("c", 10, 1, 1.0, "NHWC", mem=1.2),
             case("d dw", 10, 4, 3.0, "NHWC", groups=64)]
    text = format_conv_bench(cases, "cpu")
    # NCHW: geomean (1 * 1.21 * 1)^(1/3) = 1.066 misses 1.05, the worst layer 1.21 misses 1.10
    assert "NCHW batch 10: random/conv2d geomean 1.07x (NOT met), worst layer 1.21x (NOT met)" in text
    assert "peak memory up to 1.05x (met)" in text
    # NHWC: geomean 1.02 and worst 1.04 meet theirs; the depthwise layer is not in the geomean
    assert "NHWC batch 10: random/conv2d geomean 1.02x (met), worst layer 1.04x (met)" in text
    assert "peak memory up to 1.20x (NOT met)" in text
    assert "NHWC batch 10, depthwise: random/conv2d = 3.00x (target <= 1.5)" in text
    assert "NCHW batch 10, 16 tiles: naive/random = 8.0x" in text


def test_bench_conv_formats_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "conv", "--formats", "nchw,xx"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--formats" in err and "unknown xx" in err


# ------------------------------------------------------------- rapa train: one option per field

# every TrainConfig field but version (config.json's format, not a setting): an option as a
# user types it and the value the field must get (never the field's default)
FIELD_OPTIONS = {
    "dataset": (["--dataset", "svhn"], "svhn"),
    "data_dir": (["--data-dir", "/data/sets"], "/data/sets"),
    "download": (["--download"], True),
    "scheme": (["--scheme", "alternate"], "alternate"),
    "tiles": (["--tiles", "4, 4,1"], (4, 4, 1)),
    "channels": (["--channels", "8,16,32"], (8, 16, 32)),
    "pooling": (["--pooling", "avg"], "avg"),
    "epochs": (["--epochs", "3"], 3),
    "batch_size": (["--batch-size", "32"], 32),
    "lr": (["--lr", "0.5"], 0.5),
    "warmup_epochs": (["--warmup-epochs", "5"], 5),
    "warmup_divisor": (["--warmup-divisor", "4"], 4.0),
    "lr_step": (["--lr-step", "7"], 7),
    "gamma": (["--gamma", "0.5"], 0.5),
    "weight_decay": (["--weight-decay", "0"], 0.0),
    "wd_factor": (["--wd-factor", "0.01"], 0.01),
    "momentum": (["--momentum", "0.9"], 0.9),
    "augment": (["--augment", "strong"], "strong"),
    "mirror": (["--no-mirror"], False),
    "seed": (["--seed", "5"], 5),
    "device": (["--device", "cpu"], "cpu"),
    "limit_train": (["--limit-train", "100"], 100),
    "limit_test": (["--limit-test", "50"], 50),
    "votes": (["--votes", "3"], 3),
    "adaptive_threshold": (["--adaptive-threshold", "0.5"], 0.5),
    "eval_batch_size": (["--eval-batch-size", "64"], 64),
    "eval_every": (["--eval-every", "2"], 2),
    "analog": (["--analog", "ideal"], "ideal"),
    "init": (["--init", "lsuv"], "lsuv"),
    "tile_init": (["--tile-init", "replicate"], "replicate"),
    "digital_layers": (["--digital-layers", "fc, conv1"], ("fc", "conv1")),
    "tile_lr_power": (["--tile-lr-power", "0.5"], 0.5),
    "layer_lr_scale": (["--layer-lr-scale", "conv3=0.5,fc=0.5"], ("conv3=0.5", "fc=0.5")),
    "analog_options": (["--analog-options", "desired_bl=100, out_noise=0"], ("desired_bl=100", "out_noise=0")),
}


def train_config(*argv: str) -> TrainConfig:
    """The config ``rapa train ARGV`` would train (not validated)."""
    return config_from_args(build_parser(["train"]).parse_args(["train", *argv]))


def test_every_config_field_has_a_train_option_that_sets_it_alone(capsys):
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(FIELD_OPTIONS) == set(fields) - {"version"}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    default = TrainConfig()
    assert train_config() == default
    for name, (argv, value) in FIELD_OPTIONS.items():
        assert re.search(rf"{argv[0]}\b", help_text), argv[0]
        assert getattr(default, name) != value
        config = train_config(*argv)
        assert getattr(config, name) == value and type(getattr(config, name)) is type(value), name
        assert dataclasses.replace(config, **{name: getattr(default, name)}) == default, name  # that field only


def test_none_sets_a_field_that_may_be_none_and_balanced_tiles():
    config = train_config("--tiles", "none", "--weight-decay", "none", "--wd-factor", "0.002", "--analog", "none",
                          "--lr", "none", "--mirror")
    assert config.tiles is None and config.weight_decay is None and config.analog is None and config.mirror is True
    config.validate(check_device=False)
    assert config.resolved_weight_decay() == pytest.approx(0.002 * 0.005)  # legacy: wd_factor * the untiled lr
    assert train_config("--dataset", "cifar10", "--tiles", "balanced").tiles == (16, 4, 1)  # README, 32x32 images


def test_train_help_is_the_field_docstrings_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--eval-batch-size EVAL_BATCH_SIZE images per forward pass in evaluation (default 500)" in text
    assert "--momentum MOMENTUM SGD momentum (the paper: plain SGD, 0) (default 0)" in text
    assert "(the paper: 20) (default 20)" in text and "--mirror, --no-mirror random mirroring" in text
    assert "--lr-step LR_STEP step decay: the rate is multiplied by --gamma every --lr-step epochs" in text
    options = text.split("training config:", 1)[1]
    assert "``" not in options and "None" not in options  # reST and Python's None are not what a user types


@pytest.mark.parametrize("argv, message", [
    (["--tiles", "16,x,1"], "argument --tiles: '16,x,1': give comma-separated integers"),
    (["--channels", ","], "argument --channels: ',': empty list; give comma-separated integers"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--limit-train", "many"], "argument --limit-train: invalid int value: 'many'"),
    (["--gamma", "half"], "argument --gamma: invalid float value: 'half'"),
])
def test_unparsable_train_values_are_one_line_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rapa train: error: {message}") and "rapa train --help" in err


# ------------------------------------------------------------------------------ list parsers


@pytest.mark.parametrize("call, message", [
    (lambda: int_list("--tiles", "16,x,1"), "--tiles '16,x,1': give comma-separated integers"),
    (lambda: int_list("--tiles", " , "), "--tiles ' , ': empty list; give comma-separated integers"),
    (lambda: int_list("--input-size", "3,32", length=3), "--input-size '3,32': give 3 numbers, got 2"),
    (lambda: int_list("--tiles", "16,0,1"), "--tiles '16,0,1': every number must be >= 1"),
    (lambda: int_list("--tiles", "1.5"), "--tiles '1.5': give comma-separated integers"),
    (lambda: float_list("--snr", "10,ten", unit="dB"), "--snr '10,ten': give comma-separated numbers (dB)"),
    (lambda: name_list("--methods", "norm,magic", ("norm", "random")),
     "--methods 'norm,magic': unknown magic; choose among norm, random"),
    (lambda: name_list("--methods", ",", ("norm",)), "--methods ',': empty list; choose among norm"),
    (lambda: parse_list("a,b", str, option="--x", length=1), "--x 'a,b': give 1 names, got 2"),
])
def test_list_parser_errors_are_one_line_naming_option_and_value(call, message):
    with pytest.raises(RapaError) as info:
        call()
    assert str(info.value) == message


def test_list_parsers_read_what_users_type():
    assert int_list("--tiles", " 16, 4 ,1,") == (16, 4, 1)
    assert int_list("--x", "0,-3", minimum=None) == (0, -3)
    assert float_list("--snr", "10,2.5e1") == (10.0, 25.0)
    assert name_list("--methods", "random, norm", ("norm", "random")) == ("random", "norm")
    assert list_type(int)("1,2") == (1, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="'1,x': give comma-separated integers"):
        list_type(int)("1,x")


def test_sweep_seeds_are_a_list_and_bad_ones_exit_2(capsys):
    from rapa.cli.sweep import budget

    args = build_parser(["sweep"]).parse_args(["sweep", "quick", "--seeds", "0, 2", "--datasets", "digits"])
    assert budget(args) == {"seeds": [0, 2], "datasets": ["digits"]}  # lists, as the state file records them
    with pytest.raises(SystemExit) as info:
        main(["sweep", "quick", "--seeds", "0,x"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == ("rapa sweep: error: argument --seeds: '0,x': give comma-separated integers "
                                            "(see rapa sweep --help)\n")


@pytest.mark.parametrize("argv, message", [
    (["--nets", "vgg"], "--nets: unknown vgg; choose among resnet, separable"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
])
def test_modern_refuses_bad_options_in_one_line_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "modern"
    assert main(["modern", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"rapa modern: error: {message}\n" and not out.exists()


def test_rapa_commands_keep_the_heap(tmp_path):
    """rapa.heap.keep_heap (called by every rapa command) raises glibc's thresholds: memory
    freed and allocated again is reused instead of faulted in again; RAPA_KEEP_HEAP=0 leaves
    the defaults, under which it is faulted in again (counted by the kernel, in a fresh process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import rapa.heap

    script = (
        "import importlib.util, resource, sys\n"
        f"spec = importlib.util.spec_from_file_location('heap', {str(Path(rapa.heap.__file__))!r})\n"
        "heap = importlib.util.module_from_spec(spec); spec.loader.exec_module(heap)\n"
        "kept = heap.keep_heap()\n"
        "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "b = b'\\x01' * (8 << 20); del b\n"   # 8 MB touched, then freed
        "f0 = faults(); b = b'\\x01' * (8 << 20); f1 = faults()\n"
        "print(kept, f1 - f0)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    kept, faults = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                  text=True, check=True).stdout.split()
    if kept != "True":
        pytest.skip("not glibc: rapa leaves the allocator alone")
    assert int(faults) < 200  # 2048 pages of 4 KB reused
    kept, faults = subprocess.run([sys.executable, "-c", script], env={**env, "RAPA_KEEP_HEAP": "0"},
                                  capture_output=True, text=True, check=True).stdout.split()
    assert kept == "False" and int(faults) > 1000
