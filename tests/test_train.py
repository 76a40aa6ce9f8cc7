"""rapa.config, rapa.checkpoint, rapa.train: validation, run directories, reproducibility,
resume after a real kill, non-finite losses, the paper's reported figure."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rapa.checkpoint import load_checkpoint, save_checkpoint
from rapa.config import CONFIG_VERSION, TrainConfig, output_pixels
from rapa.data import dataset_info, load_dataset
from rapa.errors import RapaError
from rapa.runtime import analog_speedup, runtime_model
from rapa.train import best_moving_average, evaluate, load_run, lr_at, read_config, train

# tiny runs on the offline digits set: about a second per epoch
TINY = dict(dataset="digits", limit_train=60, limit_test=30, votes=3, device="cpu", eval_batch_size=30)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def conv_weights_reference(cin: int, channels, tiles) -> int:
    """Weights + biases of the three 5x5 conv layers, counted by hand."""
    ins = (cin, channels[0], channels[1])
    nts = tiles or (1, 1, 1)
    return sum(nt * (co * ci * 25 + co) for nt, ci, co in zip(nts, ins, channels))


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="mnist-fancy"), "unknown dataset 'mnist-fancy'"),
    (dict(scheme="diagonal"), "unknown scheme 'diagonal'"),
    (dict(tiles=(16, 4, 64)), "conv3 has 64 tiles but only 49 output pixels"),  # digits: 28x28 -> np3 = 7*7
    (dict(tiles=(1024, 4, 1)), "conv1 has 1024 tiles but only 784"),
    (dict(scheme="alternate", tiles=(16, 4, 2)), "square number of tiles.*conv3 has 2"),
    (dict(scheme="image_pad", tiles=(8, 4, 1)), "square number of tiles.*conv1 has 8"),
    (dict(tiles=(16, 4)), "tiles must be 3 numbers"),
    (dict(tiles=(16, 4, 1, 1)), "tiles must be 3 numbers"),
    (dict(tiles=(16, 0, 1)), "tiles must be positive"),
    (dict(channels=(32, 32)), "channels must be 3 numbers"),
    (dict(pooling="median"), "unknown pooling"),
    (dict(augment="wild"), "unknown augmentation"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(lr=-0.1), "lr must be a positive number"),
    (dict(device="tpu"), "unknown device"),
])
def test_validate_refuses_bad_configs_before_training(tmp_path, kwargs, match):
    config = TrainConfig(**{**TINY, **kwargs})
    with pytest.raises(RapaError, match=match):
        config.validate()
    with pytest.raises(RapaError, match=match):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_validate_accepts_the_paper_configs():
    TrainConfig(dataset="cifar10", tiles=(16, 4, 1)).validate()
    TrainConfig(dataset="cifar10", tiles=(1024, 256, 64)).validate()  # one patch per tile
    TrainConfig(dataset="cifar10", scheme="alternate", tiles=(16, 4, 1)).validate()
    TrainConfig(dataset="svhn", scheme="none", tiles=None, channels=(54, 64, 64)).validate()
    TrainConfig(dataset="digits", scheme="none", tiles=(16, 4, 1)).validate()  # untiled: tiles ignored


def test_resolved_fills_in_the_paper_rates_and_normalises_untiled():
    assert TrainConfig(tiles=(16, 4, 1)).resolved().lr == 0.025
    assert TrainConfig(tiles=(16, 4, 1), lr=0.1).resolved().lr == 0.1
    for kw in (dict(tiles=None), dict(scheme="none"), dict(scheme="none", tiles=None)):
        r = TrainConfig(dataset="fmnist", device="cpu", **kw).resolved()
        assert (r.scheme, r.tiles, r.lr, r.dataset, r.device) == ("none", None, 0.005, "fashion-mnist", "cpu")


def test_config_json_round_trip_and_version():
    config = TrainConfig(dataset="cifar10", tiles=(64, 16, 4), channels=(54, 64, 64), lr=0.01, analog="idealized")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == CONFIG_VERSION
    assert TrainConfig.from_dict(data) == config
    assert TrainConfig.from_dict({**data, "torch_version": "x", "rapa_version": "y"}) == config
    with pytest.raises(RapaError, match="version 99 is not supported"):
        TrainConfig.from_dict({**data, "version": 99})
    with pytest.raises(RapaError, match="unknown config key"):
        TrainConfig.from_dict({**data, "learning_rate": 1})


def test_output_pixels_follow_the_pooling_sizes():
    assert output_pixels(32) == (1024, 256, 64)
    assert output_pixels(28) == (784, 196, 49)


# ----------------------------------------------------------------- recipe and reporting


def test_lr_schedule_warmup_then_step_decay():
    c = TrainConfig(tiles=(16, 4, 1), lr=0.02, warmup_epochs=2, lr_step=3, gamma=0.5)
    expected = [0.001, 0.001, 0.02, 0.01, 0.01, 0.01, 0.005]  # epochs 0..6 by hand
    assert [lr_at(c, e) for e in range(7)] == pytest.approx(expected)


def test_best_moving_average_by_hand():
    test = [0.50, 0.40, 0.30, 0.35, 0.25, 0.20, 0.30, 0.40]
    train_ = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    # windows of 5: epochs 1-5: 0.36, 2-6: 0.30, 3-7: 0.28, 4-8: 0.30
    best = best_moving_average(test, train_)
    assert best["test_error"] == pytest.approx(0.28)
    assert best["train_error"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.4 + 0.3) / 5)
    assert (best["first_epoch"], best["last_epoch"]) == (3, 7)
    few = best_moving_average([0.5, 0.3], [0.6, 0.2])  # fewer than 5 epochs: one window over all
    assert few == {"test_error": pytest.approx(0.4), "train_error": pytest.approx(0.4),
                   "first_epoch": 1, "last_epoch": 2}
    nan = math.nan  # not measured (eval_every > 1): skipped
    gaps = best_moving_average([nan, 0.4, nan, 0.2], [0.9, 0.8, 0.7, 0.6], window=2)
    assert gaps["test_error"] == pytest.approx(0.3) and gaps["train_error"] == pytest.approx(0.7)
    assert best_moving_average([nan], [0.5])["test_error"] is None


def test_analog_speedup_is_the_pipelined_bottleneck():
    assert analog_speedup((1024, 256, 64), (16, 4, 1)) == 16  # 1024 / 64
    assert analog_speedup((784, 196, 49), (16, 4, 1)) == 16
    assert analog_speedup((1024, 256, 64), (4, 4, 1)) == 4  # conv1 keeps 256 patches per tile
    assert analog_speedup((1024, 256, 64), (128, 32, 8)) == 128
    assert analog_speedup((1024, 256, 64), (3, 1, 1)) == 1024 / 342  # ceil(1024/3)
    assert analog_speedup((1024, 256, 64), None) == 1
    # the run-time model's pipelined speed-up is the same number (one owner: rapa.runtime)
    report = runtime_model([(1024, 27, 32), (256, 288, 32), (64, 288, 64)], tiles=(3, 1, 1), scheme="random")
    assert report.speedup_pipelined == 1024 / 342


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"format": 1, "epoch": 1, "model": {"a": torch.arange(3)}, "rng": torch.get_rng_state(),
                     "h": [{"x": 1.0}]}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["a"], torch.arange(3)) and state["h"] == [{"x": 1.0}]
    path.write_bytes(b"torn")
    with pytest.raises(RapaError, match="not a rapa checkpoint"):
        load_checkpoint(path)
    with pytest.raises(RapaError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# -------------------------------------------------------------------------- training


def test_run_directory_contents(tmp_path):
    config = TrainConfig(**TINY, epochs=2)
    summary = train(config, tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "metrics.csv", "checkpoint.pt", "summary.json"}

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lr"] == 0.025 and saved["device"] == "cpu" and saved["version"] == CONFIG_VERSION
    assert saved["torch_version"] == torch.__version__ and "rapa_version" in saved

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.025 / 20, 0.025])
    test_errors = [float(r["test_error"]) for r in rows]
    train_errors = [float(r["train_error"]) for r in rows]
    assert all(0 <= e <= 1 for e in test_errors + train_errors)

    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "conv1.weight" in ckpt["model"]
    assert ckpt["rng_cpu"].dtype == torch.uint8 and ckpt["rng_data"].dtype == torch.uint8

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["best5_test_error"] == pytest.approx(sum(test_errors) / 2)  # 2 epochs: one window
    assert summary["best5_train_error"] == pytest.approx(sum(train_errors) / 2)
    assert summary["conv_weights"] == conv_weights_reference(1, (32, 32, 64), (16, 4, 1)) == 167104
    assert summary["analog_speedup"] == 16
    assert summary["votes"] == 3 and 1 <= summary["adaptive_mean_passes"] <= 3
    for key in ("final_test_error", "vote_test_error", "adaptive_test_error"):
        assert 0 <= summary[key] <= 1
    assert summary["images_per_s"] > 0 and summary["wall_seconds"] >= summary["train_seconds"] > 0
    # provenance: which implementation of the tiled layers ran (they round differently)
    from rapa import native

    expected = "native kernels" if native.available() else "PyTorch path"
    assert summary["tiled_conv"].startswith(expected)

    with pytest.raises(RapaError, match="already holds a run"):
        train(config, tmp_path, progress=False)


def test_paper_weight_counts_for_cifar10():
    from rapa.models import ConvNet

    for channels, tiles, expected in (((32, 32, 64), None, 79328), ((32, 32, 64), (16, 4, 1), 192704),
                                      ((54, 64, 64), None, 193032)):
        assert conv_weights_reference(3, channels, tiles) == expected  # SPEC §2
        net = ConvNet(10, 3, channels, tiles, "random" if tiles else "none", device="meta")
        assert net.conv_weight_count() == expected


def test_seed_makes_a_cpu_run_reproducible(tmp_path):
    config = TrainConfig(**{**TINY, "votes": 1}, epochs=1, augment="moderate")
    weights = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(TrainConfig(**{**config.to_dict(), "seed": seed}), tmp_path / name, progress=False)
        weights.append(load_checkpoint(tmp_path / name / "checkpoint.pt")["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["conv1.weight"], weights[2]["conv1.weight"])


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.02)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Kill `rapa train` mid-epoch 2, resume it, compare with an uninterrupted run."""
    args = ["--dataset", "digits", "--scheme", "random", "--tiles", "16,4,1", "--augment", "moderate",
            "--epochs", "3", "--limit-train", "200", "--limit-test", "30", "--votes", "1", "--seed", "5",
            "--device", "cpu", "--quiet"]
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rapa.cli", "train"]
    proc = subprocess.Popen(cmd + args + ["--out", str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.csv"
    ckpt = run_dir / "checkpoint.pt"
    _wait_for(lambda: ckpt.is_file() and len(metrics.read_text().splitlines()) >= 2, 120, proc)
    epoch1_seconds = float(metrics.read_text().splitlines()[1].split(",")[-1])
    time.sleep(0.3 * epoch1_seconds)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1, "the kill came too late"
    assert not (run_dir / "summary.json").exists()

    done = subprocess.run(cmd + ["--resume", str(run_dir), "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list(csv.DictReader(open(metrics)))) == 3

    reference = tmp_path / "uninterrupted"
    train(TrainConfig(dataset="digits", scheme="random", tiles=(16, 4, 1), augment="moderate", epochs=3,
                      limit_train=200, limit_test=30, votes=1, seed=5, device="cpu"), reference, progress=False)
    got = load_checkpoint(run_dir / "checkpoint.pt")
    want = load_checkpoint(reference / "checkpoint.pt")
    assert got["epoch"] == want["epoch"] == 3
    assert got["model"].keys() == want["model"].keys()
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), key
    assert [r["train_loss"] for r in got["history"]] == [r["train_loss"] for r in want["history"]]


def test_resume_refuses_a_changed_config(tmp_path):
    tiny = {**TINY, "votes": 1}
    train(TrainConfig(**tiny, epochs=1), tmp_path, progress=False)
    with pytest.raises(RapaError, match="seed differ"):  # lr may change (after a non-finite loss)
        train(TrainConfig(**tiny, epochs=2, lr=0.5, seed=9), tmp_path, resume=True, progress=False)
    summary = train(TrainConfig(**tiny, epochs=2), tmp_path, resume=True, progress=False)
    assert summary["epochs"] == 2  # more epochs is a valid change


def test_non_finite_loss_stops_naming_the_epoch_and_keeps_the_last_checkpoint(tmp_path):
    # epoch 1 (warm-up) at lr 1e9 / 1e11 = 0.01 is fine, epoch 2 at 1e9 blows up
    config = TrainConfig(**TINY, epochs=3, lr=1e9, warmup_divisor=1e11)
    with pytest.raises(RapaError, match=r"loss became (nan|inf|-inf) in epoch 2.*checkpoint of epoch 1"):
        train(config, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    model, _, summary = load_run(tmp_path)
    assert summary is None  # unfinished
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(RapaError, match="in epoch 1 .*no checkpoint was written"):
        train(TrainConfig(**TINY, epochs=1, lr=1e12, warmup_epochs=0), tmp_path / "b", progress=False)


def test_load_run_and_evaluate_match_a_plain_computation(tmp_path):
    train(TrainConfig(**{**TINY, "scheme": "none", "tiles": None}, epochs=1, lr=0.05, warmup_epochs=0),
          tmp_path, progress=False)
    model, config, summary = load_run(tmp_path, device="cpu")
    assert config.scheme == "none" and not model.training
    data = load_dataset("digits", "test", limit=30)
    info = dataset_info("digits")
    x = (data.images.float() / 255 - info.mean[0]) / info.std[0]  # normalised by hand
    with torch.no_grad():
        expected = (model(x).argmax(1) != data.labels).float().mean().item()
    res = evaluate(model, data, votes=5, device="cpu")
    assert res["single"] == pytest.approx(expected)
    assert res["vote"] == res["adaptive"] == res["single"]  # deterministic net: voting changes nothing
    assert summary["final_test_error"] == pytest.approx(expected)


def test_load_run_errors(tmp_path):
    with pytest.raises(RapaError, match="no run directory"):
        load_run(tmp_path / "nope")
    with pytest.raises(RapaError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "version": 0}))
    with pytest.raises(RapaError, match="version 0 is not supported"):
        read_config(tmp_path)


def test_analog_without_aihwkit_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "aihwkit", None)  # import aihwkit -> ImportError, as if absent
    with pytest.raises(RapaError, match=r'analog training needs aihwkit: pip install "rapa\[analog\]"'):
        train(TrainConfig(**TINY, epochs=1, analog="idealized"), tmp_path, progress=False)


# --------------------------------------------------------------------- weight decay (SPEC §3)


def _one_step(config: TrainConfig) -> tuple[dict, dict, dict]:
    """Weights before and after one SGD step of ``config``'s optimizer, and the gradients."""
    from rapa.train import make_model_and_optimizer

    torch.manual_seed(0)
    model, opt = make_model_and_optimizer(config, dataset_info("digits"), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}, grads


def test_weight_decay_is_the_caffe_per_step_shrink():
    """w1 = w0 - lr * (g + 1e-4 * w0): Caffe's weight_decay 0.0001 (not 1e-4 * lr)."""
    config = TrainConfig(dataset="digits", scheme="none", tiles=None, lr=0.5, warmup_epochs=0)
    assert config.resolved_weight_decay() == 1e-4
    before, after, grads = _one_step(config)
    for n in before:
        expected = before[n] - 0.5 * (grads[n] + 1e-4 * before[n])
        torch.testing.assert_close(after[n], expected, rtol=0, atol=1e-7)
    # the shrink is visible on a weight with no gradient: fc's weights of a zero input channel would move,
    # here checked as the difference against the same step without weight decay
    _, plain, _ = _one_step(TrainConfig(**{**config.to_dict(), "weight_decay": 0.0}))
    delta = after["fc.weight"] - plain["fc.weight"]
    torch.testing.assert_close(delta, -0.5 * 1e-4 * before["fc.weight"], rtol=1e-3, atol=5e-9)


def test_tile_init_defaults_to_replicate_on_analog_arrays_only():
    from rapa.train import make_model_and_optimizer

    digital = TrainConfig(dataset="digits", scheme="random", tiles=(4, 2, 1), init="he")
    assert digital.resolved().tile_init == "independent"
    assert TrainConfig(dataset="digits", analog="rpu-baseline").resolved().tile_init == "replicate"
    assert TrainConfig(dataset="digits", analog="rpu-baseline", tile_init="independent").resolved_tile_init() == \
        "independent"
    for tile_init, alike in (("independent", False), ("replicate", True)):
        torch.manual_seed(0)
        config = dataclasses.replace(digital, tile_init=tile_init)
        model, _ = make_model_and_optimizer(config.resolved(), dataset_info("digits"), "cpu")
        for layer in (model.conv1, model.conv2):
            assert all(torch.equal(w, layer.weight[0]) for w in layer.weight[1:]) == alike


def test_legacy_configs_keep_their_weight_decay(tmp_path):
    """A config.json written before weight_decay existed (wd_factor only) loads, resumes and
    trains with its old weight decay wd_factor * lr."""
    new = TrainConfig(dataset="digits", scheme="none", tiles=None, lr=0.5, epochs=1, limit_train=50, limit_test=50,
                      warmup_epochs=0)
    # a config.json as rapa wrote it then: resolved, without the fields added since
    legacy = {k: v for k, v in new.resolved().to_dict().items() if k not in ("weight_decay", "init", "tile_init")}
    legacy["wd_factor"] = 1e-4
    old = TrainConfig.from_dict(legacy)
    assert old.tile_init == "independent"  # what every run made before tile_init had
    assert old.weight_decay is None and old.resolved_weight_decay() == pytest.approx(1e-4 * 0.5)
    before, after, grads = _one_step(old)
    for n in before:
        torch.testing.assert_close(after[n], before[n] - 0.5 * (grads[n] + 0.5e-4 * before[n]), rtol=0, atol=1e-7)
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**legacy, "torch_version": "2.x", "rapa_version": "0"}))
    config = read_config(run)
    assert config.wd_factor == 1e-4 and config.weight_decay is None
    summary = train(dataclasses.replace(config, epochs=1), run, resume=True, progress=False)
    assert summary["epochs"] == 1 and json.loads((run / "config.json").read_text())["wd_factor"] == 1e-4
    with pytest.raises(RapaError, match="weight_decay"):
        TrainConfig(wd_factor=1e-4, weight_decay=1e-4).validate()
    with pytest.raises(RapaError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0).validate()


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_tile_lr_power_scales_each_tiled_layers_step_by_nk_to_the_power(power):
    """w1 = w0 - lr * nk**p * (g + wd * w0) in a layer with nk replicas; lr in the untiled ones."""
    config = TrainConfig(dataset="digits", scheme="random", tiles=(16, 4, 1), lr=0.05, warmup_epochs=0,
                         tile_lr_power=power)
    before, after, grads = _one_step(config)
    rates = {"conv1": 0.05 * 16 ** power, "conv2": 0.05 * 4 ** power, "conv3": 0.05, "fc": 0.05}
    assert {n.split(".")[0] for n in before} == set(rates)
    for n in before:
        expected = before[n] - rates[n.split(".")[0]] * (grads[n] + 1e-4 * before[n])
        torch.testing.assert_close(after[n], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_layer_lr_scale_multiplies_the_named_layers_rates(power):
    """w1 = w0 - lr * nk**p * s * (g + wd * w0) with s the layer's factor of layer_lr_scale."""
    config = TrainConfig(dataset="digits", scheme="random", tiles=(16, 4, 1), lr=0.05, warmup_epochs=0,
                         tile_lr_power=power, layer_lr_scale=("conv1=0.5", "fc=0.25"))
    before, after, grads = _one_step(config)
    rates = {"conv1": 0.05 * 16 ** power * 0.5, "conv2": 0.05 * 4 ** power, "conv3": 0.05, "fc": 0.05 * 0.25}
    for n in before:
        expected = before[n] - rates[n.split(".")[0]] * (grads[n] + 1e-4 * before[n])
        torch.testing.assert_close(after[n], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (("fc",), "give LAYER=FACTOR"), (("fc9=1",), "give LAYER=FACTOR with LAYER among conv1"),
    (("fc=0",), "finite number > 0"), (("fc=x",), "finite number > 0"), (("fc=inf",), "finite number > 0"),
    (("fc=1", "fc=2"), "fc is given twice")])
def test_layer_lr_scale_items_are_checked(bad, message):
    with pytest.raises(RapaError, match=message):
        TrainConfig(dataset="digits", layer_lr_scale=bad).validate()


def test_tile_lr_power_follows_the_schedule_and_survives_a_resume(tmp_path):
    """Each epoch's rate (warm-up, step decay) times the layer's factor, also after a resume."""
    config = TrainConfig(**TINY, scheme="random", tiles=(4, 4, 1), lr=0.1, epochs=2, warmup_epochs=1,
                         lr_step=1, tile_lr_power=1.0)
    train(dataclasses.replace(config, epochs=1), tmp_path / "run", progress=False)
    train(config, tmp_path / "run", resume=True, progress=False)
    groups = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
    epoch2 = lr_at(config.resolved(), 1)
    assert sorted(g["lr"] for g in groups) == pytest.approx(sorted([epoch2, epoch2 * 4]))
    assert [r["lr"] for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))] == [
        str(lr_at(config.resolved(), 0)), str(epoch2)]


@pytest.mark.parametrize("bad", [-0.5, 3, "sqrt", float("nan")])
def test_tile_lr_power_out_of_range_is_refused(bad):
    with pytest.raises(RapaError, match=f"tile_lr_power={bad!r} is out of range"):
        TrainConfig(dataset="digits", tile_lr_power=bad).validate()


def test_tile_lr_power_is_off_by_default_and_legacy_runs_keep_one_rate():
    assert TrainConfig(dataset="digits", analog="ideal", tiles=(16, 4, 1)).resolved().tile_lr_power == 0.0
    saved = {k: v for k, v in TrainConfig(dataset="digits").resolved().to_dict().items() if k != "tile_lr_power"}
    assert TrainConfig.from_dict(saved).tile_lr_power == 0.0  # a config.json written before it existed
