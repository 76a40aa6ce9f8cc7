"""Bad inputs and faults, driven as a user would: the ``rapa`` command in a subprocess.

One case per item of issue 14: every user error ends in one line on stderr and exit status
2 (a write that fails after the outputs were checked: status 1), never a traceback; outputs
are checked before anything is computed; nothing already saved is lost (a training run
killed while it writes a checkpoint resumes bit-identically).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest
import torch

from rapa.checkpoint import load_checkpoint
from rapa.config import TrainConfig
from rapa.train import train

TINY = ["--dataset", "digits", "--limit-train", "60", "--limit-test", "30", "--device", "cpu", "--channels", "4,4,4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def rapa(*args: str, cwd: Path | None = None, env: dict | None = None, stdout=subprocess.PIPE,
         stderr=subprocess.PIPE, timeout: float = 300) -> subprocess.CompletedProcess:
    """``rapa ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "rapa.cli", *map(str, args)], cwd=cwd, env=env or ENV, text=True,
                          stdout=stdout, stderr=stderr, timeout=timeout)


def one_line(r: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The single stderr line of a failed command, checked for status, traceback and words."""
    err = r.stderr.strip()
    assert r.returncode == status, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


def not_a_folder(tmp_path: Path) -> Path:
    """A path no one can create a folder at (under a regular file; root ignores permissions)."""
    f = tmp_path / "a-file"
    f.write_text("x")
    return f / "out"


@pytest.fixture()
def run_copy(digits_runs, tmp_path):
    """A private copy of the tiny tiled digits run (tests may break its files)."""
    def copy(name: str = "tiled") -> Path:
        dst = tmp_path / f"copy-{name}"
        shutil.copytree(digits_runs / name, dst)
        return dst
    return copy


# --------------------------------------------------------------- outputs checked first


@pytest.mark.parametrize("command", [
    ["similarity", "{run}"], ["reduce", "{run}", "--device", "cpu"], ["attack", "{run}", "--device", "cpu"],
    ["theory"], ["speedup"], ["demo", "--dataset", "digits"], ["report", "{root}"], ["train", *TINY],
    ["sweep", "quick"], ["reproduce", "--quick"],
])
def test_an_unwritable_out_fails_before_computing(command, digits_runs, tmp_path):
    bad = not_a_folder(tmp_path)
    args = [a.format(run=digits_runs / "tiled", root=digits_runs) for a in command] + ["--out", bad]
    t0 = time.perf_counter()
    r = rapa(*args, cwd=tmp_path)
    one_line(r, 2, "--out", str(bad), "cannot write there")
    assert time.perf_counter() - t0 < 30  # no training, no attack, no Ray started
    assert r.stdout == ""


@pytest.mark.parametrize("bench", [["conv", "--no-memory"], ["train", "--images", "2"]])
def test_bench_json_is_checked_first_and_a_failed_write_exits_1(bench, tmp_path):
    missing = tmp_path / "no-such-folder" / "b.json"
    one_line(rapa("bench", *bench, "--batch", "2", "--repeats", "1", "--device", "cpu", "--json", missing), 2,
             "--json", str(missing))
    # /dev/full opens but every write fails (a full disk): found after the measurement, one line, status 1
    r = rapa("bench", *bench, "--batch", "2", "--repeats", "1", "--device", "cpu", "--json", "/dev/full")
    one_line(r, 1, "/dev/full", "No space left")


def test_a_full_stdout_exits_1_in_one_line(digits_runs, tmp_path):
    with open("/dev/full", "w") as full:
        r = rapa("similarity", digits_runs / "tiled", "--out", tmp_path, "--json", stdout=full)
    one_line(r, 1, "standard output", "No space left")


# ----------------------------------------------------------------- training faults


def test_a_failed_checkpoint_write_leaves_no_metrics_row_without_it(tmp_path, monkeypatch, one_thread):
    import rapa.train as rt

    calls = []
    real = rt.save_checkpoint

    def failing(state, path):
        calls.append(state["epoch"])
        if state["epoch"] == 2:
            raise OSError(28, "No space left on device", str(path))
        real(state, path)

    monkeypatch.setattr(rt, "save_checkpoint", failing)
    config = TrainConfig(dataset="digits", epochs=3, limit_train=40, limit_test=20, channels=(4, 4, 4), votes=1,
                         device="cpu")
    with pytest.raises(OSError):
        train(config, tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert calls == [1, 2] and [r["epoch"] for r in rows] == ["1"]  # epoch 2's row was not written
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    monkeypatch.setattr(rt, "save_checkpoint", real)
    summary = train(config, tmp_path, resume=True, progress=False)
    assert summary["epochs"] == 3
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == ["1", "2", "3"]


_KILL_IN_WRITE = """
import os, signal, sys
import torch
import rapa.checkpoint as ck

calls = [0]
real_save = torch.save

def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:  # epoch 2's checkpoint: half of it reaches the disk, then the process dies
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

ck.torch.save = save
from rapa.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_bit_identically(tmp_path, one_thread):
    args = ["train", "--dataset", "digits", "--tiles", "4,4,1", "--channels", "4,4,4", "--augment", "moderate",
            "--epochs", "3", "--limit-train", "100", "--limit-test", "20", "--votes", "1", "--seed", "5",
            "--device", "cpu", "--lr", "0.05", "--quiet"]
    run_dir = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", _KILL_IN_WRITE, *args, "--out", str(run_dir)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1  # the torn write never replaced it
    assert [r["epoch"] for r in csv.DictReader(open(run_dir / "metrics.csv"))] == ["1"]

    r = rapa("train", "--resume", run_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    reference = tmp_path / "whole"
    train(TrainConfig(dataset="digits", tiles=(4, 4, 1), channels=(4, 4, 4), augment="moderate", epochs=3,
                      limit_train=100, limit_test=20, votes=1, seed=5, device="cpu", lr=0.05), reference,
          progress=False)
    got, want = load_checkpoint(run_dir / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert got["epoch"] == want["epoch"] == 3
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), key
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in want["history"]]


def test_resume_refuses_a_folder_with_results_but_no_checkpoint(run_copy):
    run = run_copy()
    (run / "checkpoint.pt").unlink()
    (run / "summary.json").unlink()
    before = (run / "metrics.csv").read_text()
    one_line(rapa("train", "--resume", run), 2, "no checkpoint.pt", "--overwrite")
    assert (run / "metrics.csv").read_text() == before  # nothing overwritten


def test_resume_of_a_finished_run_says_so(run_copy):
    run = run_copy()
    one_line(rapa("train", "--resume", run), 2, "already finished", "--epochs")


def test_the_advice_after_a_non_finite_loss_can_be_followed(tmp_path):
    run = tmp_path / "nan"
    err = one_line(rapa("train", *TINY, "--epochs", "1", "--lr", "1e12", "--warmup-epochs", "0", "--votes", "1",
                        "--quiet", "--out", run), 2, "loss became", f"rapa train --resume {run} --lr", "--overwrite")
    assert "Lower --lr" not in err
    r = rapa("train", "--resume", run, "--lr", "0.01", "--quiet")  # the advice, followed
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01
    assert "train afresh into --out even if it holds a run" in rapa("train", "--help").stdout  # --overwrite documented


# -------------------------------------------------------------- bad run directories


@pytest.mark.parametrize("command, field, value, words", [  # every reader, each with another bad value
    (["eval", "--device", "cpu"], "tiles", "sixteen", ["config.json", "tiles"]),
    (["similarity"], "scheme", "magic", ["config.json", "unknown scheme 'magic'"]),
    (["reduce", "--device", "cpu"], "epochs", "3", ["config.json", "epochs must be an integer"]),
    (["attack", "--device", "cpu"], "lr", [1], ["config.json", "lr must be a positive number"]),
])
def test_invalid_config_values_are_one_line_for_every_reader(command, field, value, words, run_copy):
    run = run_copy()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, field: value}))
    one_line(rapa(command[0], run, *command[1:]), 2, *words)


@pytest.mark.parametrize("content, words", [
    (b"", ["is empty", "not a rapa checkpoint"]),
    (os.urandom(4096), ["not a rapa checkpoint"]),
    (None, ["not a rapa checkpoint", "lacks"]),  # a valid torch file of something else
])
def test_a_foreign_checkpoint_is_named_without_unsafe_advice(content, words, run_copy):
    run = run_copy()
    if content is None:
        torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").write_bytes(content)
    err = one_line(rapa("eval", run, "--device", "cpu"), 2, *words)
    assert "weights_only" not in err


# ---------------------------------------------------------------- other bad inputs


@pytest.mark.parametrize("bench", [["conv"], ["train"], ["analog"]])
def test_bench_refuses_a_zero_batch(bench):
    one_line(rapa("bench", *bench, "--batch", "0", "--device", "cpu"), 2, "--batch must be >= 1, got 0")


@pytest.mark.parametrize("tiles, scheme", [(4, "random"), (1, "random"), (1, "none")])
def test_a_dtype_mismatch_names_both_dtypes(tiles, scheme):
    import rapa as r

    layer = r.TiledConv2d(3, 4, 3, tiles=tiles, scheme=scheme)  # one tile: the untiled path, nn.Conv2d's conv
    with pytest.raises(ValueError, match="input of dtype torch.float64 on cpu does not match the layer's weights "
                                         r"\(torch.float32 on cpu\)") as info:
        layer(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert len(str(info.value).splitlines()) == 1


def test_train_accepts_balanced_tiles(tmp_path):
    run = tmp_path / "balanced"
    r = rapa("train", *TINY, "--tiles", "balanced", "--epochs", "1", "--votes", "1", "--quiet", "--out", run)
    assert r.returncode == 0, r.stderr
    # digits at 28x28: np = 784, 196, 49; the fewest tiles with at most 49 patches each
    assert json.loads((run / "config.json").read_text())["tiles"] == [784 // 49, 196 // 49, 1]


def test_report_of_a_folder_without_runs_fails_saying_what_it_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line(rapa("report", tmp_path / "empty"), 2, "holds no runs", "config.json", "sweep-")
    assert not (tmp_path / "empty" / "report").exists()


def test_an_unreachable_ray_address_is_one_line_at_once(tmp_path):
    t0 = time.perf_counter()
    one_line(rapa("sweep", "quick", "--out", tmp_path / "s", "--address", "127.0.0.1:1"), 2, "127.0.0.1:1")
    assert time.perf_counter() - t0 < 15


@pytest.mark.ray
def test_a_server_that_is_no_ray_head_is_one_line(tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as server:  # accepts connections, answers nothing
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        t0 = time.perf_counter()
        one_line(rapa("sweep", "quick", "--out", tmp_path / "s", "--address", address), 2, address, "no Ray head")
        assert time.perf_counter() - t0 < 60  # Ray alone waits 40 s and prints a warning a second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_ray_processes(marker: str) -> None:
    """Stop the processes of one `ray start --head` (their command lines name its temp dir), by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                        pids.append(int(proc.name))
                except OSError:
                    pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not pids:
            return
        time.sleep(2)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_joins_a_ray_start_head_cluster_with_token_authentication(tmp_path):
    """A head started as Ray documents it, with token authentication on: without a token here
    the sweep stops at once in one line; with the token's file in RAY_AUTH_TOKEN_PATH it runs."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("no ray command next to this Python")
    base = Path(tempfile.mkdtemp(prefix="rapa-ray-"))  # short: Ray's socket paths must stay < 108 chars
    token = base / "token"
    token.write_text("rapa-test-token-" + os.urandom(8).hex())
    home = base / "home"  # no ~/.ray/auth_token of the user's
    home.mkdir()
    port = _free_port()
    head_env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "HOME": str(home)}
    try:
        started = subprocess.run([str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus", "1",
                                  "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir",
                                  str(base / "t")],
                                 env=head_env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-2000:]
        experiment = tmp_path / "tiny.yaml"
        experiment.write_text("base: {dataset: digits, epochs: 1, limit_train: 20, limit_test: 10, "
                              "channels: [4, 4, 4], votes: 1, device: cpu}\nruns:\n  - {scheme: none}\n")
        user_env = {k: v for k, v in ENV.items() if not k.startswith("RAY_")}
        address = f"127.0.0.1:{port}"
        t0 = time.perf_counter()
        r = rapa("sweep", experiment, "--out", tmp_path / "s1", "--address", address, env={**user_env, "HOME": str(home)})
        one_line(r, 2, address, "token", "RAY_AUTH_TOKEN_PATH")
        assert time.perf_counter() - t0 < 30  # Ray alone retries for 20 s, a warning a second, then fails

        r = rapa("sweep", experiment, "--out", tmp_path / "s2", "--address", address,
                 env={**user_env, "HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token)})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "1 trained" in r.stdout and "InvalidAuthToken" not in r.stderr
        assert len(list((tmp_path / "s2").glob("*/summary.json"))) == 1
    finally:
        _kill_ray_processes(str(base / "t"))
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------- silent or slow waits


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run ``rapa ARGS`` with stderr on a pseudo-terminal (where progress bars show)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 24x100 terminal, not 0x0
    proc = subprocess.Popen([sys.executable, "-m", "rapa.cli", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    proc.wait()
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("command, label", [
    (["eval", "{tiled}", "--votes", "3"], "test error, 3 votes"),
    (["attack", "{tiled}", "--snr", "20,40", "--attacks", "fgsm", "--batch-size", "10", "--out", "{tmp}"], "attacking"),
    (["reduce", "{tiled}", "--methods", "norm", "--batch-size", "10", "--out", "{tmp}"], "tiled net:"),
    (["train", *TINY, "--epochs", "1", "--votes", "3", "--out", "{tmp}/run"], "test error, 3 votes"),
])
def test_long_steps_show_progress_on_stderr_unless_quiet(command, label, digits_runs, tmp_path):
    args = [a.format(tiled=digits_runs / "tiled", tmp=tmp_path) for a in command] + ["--device", "cpu"]
    if command[0] == "train":
        args = args[:-2]  # TINY names the device
    status, out, err = _on_a_terminal(*args)
    assert status == 0, err[-2000:]
    assert label in err and label not in out
    if command[0] == "train":
        shutil.rmtree(tmp_path / "run")
    status, out, err = _on_a_terminal(*args, "--quiet")
    assert status == 0 and label not in err


@pytest.mark.parametrize("command", [["train"], ["eval"], ["bench", "conv"], ["bench", "train"], ["attack"],
                                     ["reduce"], ["similarity"], ["theory"], ["report"], ["demo"]])
def test_every_computing_command_takes_threads(command, capsys):
    from rapa.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "--threads N" in text and "auto" in text


def test_auto_threads_leave_the_busy_cpus_alone(monkeypatch):
    from rapa.cli.options import apply_threads, auto_threads

    cpus = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (float(cpus), 0.0, 0.0))  # every CPU busy
        assert auto_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
        assert auto_threads() == min(cpus, before)
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_help_comes_back_within_a_second_without_torch():
    code = ("import sys, contextlib, io\nfrom rapa.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True).stdout.strip() \
        == "False"
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = rapa("--help")
        times.append(time.perf_counter() - t0)
        assert r.returncode == 0 and "COMMAND" in r.stdout
    assert min(times) < 1.0, times


def test_version():
    from rapa import __version__

    r = rapa("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rapa {__version__}"


# ------------------------------------------------------------ smaller things users notice


def test_train_json_is_one_document_and_eval_agrees_with_the_summary(tmp_path):
    run = tmp_path / "run"
    r = rapa("train", *TINY, "--tiles", "4,4,1", "--epochs", "1", "--lr", "0.05", "--warmup-epochs", "0",
             "--votes", "3", "--out", run)  # without --quiet: progress goes to stderr
    assert r.returncode == 0, r.stderr
    assert any(ln.endswith(", 1 epoch") for ln in r.stdout.splitlines()) and "1 epochs" not in r.stdout
    r = rapa("train", *TINY, "--tiles", "4,4,1", "--epochs", "1", "--lr", "0.05", "--warmup-epochs", "0",
             "--votes", "3", "--out", run, "--overwrite", "--json")
    summary = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert "epoch 1/1" in r.stderr
    ev = json.loads(rapa("eval", run, "--device", "cpu", "--json").stdout)
    # the same images, the same tile draws: the same errors (fractions, named *_error in both)
    assert ev["single_error"] == summary["final_test_error"]
    assert ev["vote_error"] == summary["vote_test_error"] and ev["votes"] == summary["votes"] == 3
    assert ev["adaptive_error"] == summary["adaptive_test_error"]
    assert 0 <= ev["single_error"] <= 1
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "summary.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # 0644 under umask 022


def test_plots_have_whole_epoch_ticks_and_attack_titles(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from rapa.analysis.attack import plot_robustness
    from rapa.analysis.more_tiles import plot_more_tiles
    from rapa.cli.demo import plot_curves

    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: seen.append(fig))
    plot_curves({"untiled": [0.5, 0.3], "random": [0.6, 0.4]}, tmp_path / "d.png", "digits")
    plot_more_tiles({"runs": [{"dataset": "digits", "tiles": [4, 4, 1], "epochs": [1, 2], "test_error": [0.5, 0.4],
                               "relative_best": 1.0}], "reference": {"digits": [4, 4, 1]}},
                    tmp_path / "m.png")
    for fig in seen:
        ax = fig.axes[0]
        ax.figure.canvas.draw()
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    seen.clear()
    curve = {"snr_db": [10.0, 30.0, 50.0], "accuracy": {"fgsm": [10, 50, 90], "pgd_eot": [5, 40, 80]}}
    plot_robustness({"net": curve}, tmp_path / "a.png")
    title = seen[0].axes[0].get_title()
    assert "FGSM" in title and "EOT-PGD" in title and "SNR 10-50 dB" in title


def test_reduce_table_is_aligned(digits_runs, tmp_path):
    r = rapa("reduce", digits_runs / "tiled", "--device", "cpu", "--batch-size", "10", "--limit-train", "20",
             "--out", tmp_path, "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if "tiled net (1 pass)" in ln or ln.startswith("  reduced, ")]
    assert len(rows) == 6
    assert len({ln.index("%") for ln in rows}) == 1, rows


def test_attack_outside_the_measured_snrs_is_omitted_not_nan(digits_runs, tmp_path):
    r = rapa("attack", digits_runs / "tiled", "--snr", "10,20", "--attacks", "fgsm", "--device", "cpu",
             "--out", tmp_path, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout.lower() and "not measured" in r.stdout


def test_dataset_errors_suggest_what_the_command_can_do(run_copy, tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    run = run_copy()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dataset": "fashion-mnist", "data_dir": str(empty)}))
    err = one_line(rapa("eval", run, "--device", "cpu"), 2, "Fashion-MNIST", str(empty), "--download",
                   "drop --data-dir")
    assert "--download" in rapa("eval", "--help").stdout  # the option it suggests exists there
    assert "/usr/share/datasets" not in err


def test_data_dir_is_never_mixed_with_the_debian_copy(tmp_path):
    from rapa.data import DatasetError, load_dataset
    from rapa.data.fashion_mnist import FashionMNIST

    dirs = FashionMNIST(data_dir=tmp_path).search_dirs()
    assert all(str(d).startswith(str(tmp_path)) for d in dirs), dirs
    with pytest.raises(DatasetError, match=str(tmp_path)):  # even where /usr/share/datasets has a copy
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, limit=1)


def test_a_corrupt_file_is_not_answered_with_a_download_that_would_not_happen(tmp_path):
    from rapa.data import DatasetError, load_dataset

    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="Delete it, then"):
        load_dataset("svhn", "test", data_dir=tmp_path)


# ---------------------------------------------------------------- leftovers of issue 14


def test_reproduce_checks_its_results_tree_before_computing(tmp_path):
    bad = not_a_folder(tmp_path)
    t0 = time.perf_counter()
    r = rapa("reproduce", "--quick", "--out", tmp_path / "work", "--results", bad)
    one_line(r, 2, "--results", str(bad), "cannot write there")
    assert time.perf_counter() - t0 < 30 and r.stdout == ""  # no Ray started, nothing trained


def test_convert_json_is_checked_first_and_a_failed_write_exits_1(tmp_path):
    missing = tmp_path / "no-such-folder" / "c.json"
    r = rapa("convert", "--net", "resnet", "--json", missing)
    one_line(r, 2, "--json", str(missing), "cannot write there")
    assert r.stdout == ""  # nothing converted or printed before the check
    one_line(rapa("convert", "--net", "resnet", "--json", "/dev/full"), 1, "/dev/full", "No space left")
    good = tmp_path / "c.json"
    assert rapa("convert", "--net", "resnet", "--json", good).returncode == 0
    assert json.loads(good.read_text())


def test_reproduce_warns_up_front_when_the_budget_is_too_small_to_learn(tmp_path):
    # An unreachable Ray address stops the battery right after the warning: what comes before starting is seen.
    small = rapa("reproduce", "--epochs", "1", "--limit-train", "300", "--seeds", "0,1", "--address", "127.0.0.1:1",
                 "--out", tmp_path / "w1", "--results", tmp_path / "r1")
    assert small.returncode == 2 and "Traceback" not in small.stderr, small.stderr
    warning, error = small.stderr.strip().splitlines()
    # 1 epoch of 300 images in minibatches of 10 (fmnist.yaml): 30 steps, far below the ~3,000 needed
    assert warning.startswith("rapa reproduce: warning:") and "30 SGD steps" in warning and "3,000" in warning
    assert "inconclusive" in warning and "127.0.0.1:1" in error
    # the standard battery (6 epochs of 60,000 images) and one of exactly 3,000 steps: no warning
    for budget in ([], ["--epochs", "1", "--limit-train", "30000"]):
        r = rapa("reproduce", *budget, "--address", "127.0.0.1:1", "--out", tmp_path / "w2", "--results",
                 tmp_path / "r2")
        one_line(r, 2, "127.0.0.1:1")


def test_help_summarises_reproduce_as_the_reproduction_battery():
    text = " ".join(rapa("--help").stdout.split())  # argparse may wrap the summary onto the next line
    assert "reproduce the reproduction battery on Fashion-MNIST, the paper's claims checked" in text
    assert "quick battery" not in text


def _unit_problems(value, where: str = "") -> list[str]:
    """Keys holding errors or accuracies whose name does not say the unit: ``*_percent`` (0-100),
    ``*_fraction``, or ``*_error`` / ``*_error_ci`` (fractions, 0-1, as summary.json)."""
    def numbers(v):
        if isinstance(v, bool):
            return []
        if isinstance(v, (int, float)):
            return [v]
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else []
        return [x for item in items for x in numbers(item)]

    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            found = [x for x in numbers(v) if x is not None]
            if ("error" in k or "accuracy" in k) and found:
                if k.endswith("_percent"):
                    bad = not all(0 <= x <= 100 for x in found)
                elif k.endswith(("_error", "_error_ci")):
                    bad = not all(0 <= x <= 1 for x in found)
                else:
                    bad = not k.endswith("_fraction")
                if bad:
                    out.append(f"{where}{k}")
            out += _unit_problems(v, f"{where}{k}.")
    elif isinstance(value, list):
        for item in value:
            out += _unit_problems(item, where)
    return out


def test_json_files_say_in_the_key_whether_a_number_is_a_fraction_or_a_percentage(run_copy, digits_runs,
                                                                                   tmp_path):
    from rapa.sweep import claims as C
    from rapa.sweep.evidence import claims_json
    from rapa.sweep.analyses import Analyses
    from rapa.sweep.runs import collect_runs

    out = tmp_path / "out"
    for command in (["reduce", digits_runs / "tiled", "--limit-train", "20", "--batch-size", "10"],
                    ["attack", digits_runs / "tiled", "--baseline", digits_runs / "base", "--snr", "30,35",
                     "--attacks", "fgsm", "--limit", "20", "--batch-size", "10"]):
        r = rapa(*command, "--device", "cpu", "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
    r = rapa("theory", "--epochs", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    theory_json = json.loads((out / "theory.json").read_text())
    assert {"train_error", "test_error", "error_gap_fraction"} <= set(theory_json["single"])
    reduce_json = json.loads((out / "reduce.json").read_text())
    attack_json = json.loads((out / "attack.json").read_text())
    assert {"tiled_error_percent", "method_error_percent", "best_error_percent"} <= set(reduce_json)
    assert {"accuracy_percent", "clean_accuracy_percent"} <= set(attack_json["curves"]["model"])
    assert {"model_accuracy_percent", "baseline_accuracy_percent", "gap_reduction_fraction"} == \
        set(attack_json["at_threshold"]["fgsm"])
    run = run_copy()
    rec = collect_runs(run.parent)[0]
    voting = Analyses(device="cpu", attack_limit=20).voting(rec, votes=3)
    voting_json = json.loads((run / "voting.json").read_text())
    assert voting_json["single_error_percent"] == voting["single_error"]  # the file says percent, as read
    ev = rapa("eval", digits_runs / "tiled", "--device", "cpu", "--json", "--quiet")
    assert ev.returncode == 0, ev.stderr
    summary = json.loads((digits_runs / "tiled" / "summary.json").read_text())
    assert 0 <= summary["final_test_error"] <= 1  # summary.json stays in fractions
    claims = claims_json([C.claim_voting({0: 12.0, 1: 11.0}, {0: 10.0, 1: 9.5}),
                          C.claim_similarity({"random": {0: 0.8, 1: 0.7}, "alternate": {0: 0.1, 1: 0.2}})])
    assert [c["unit"] for c in claims] == ["percent", "correlation"]
    for name, doc in (("reduce.json", reduce_json), ("attack.json", attack_json), ("voting.json", voting_json),
                      ("eval --json", json.loads(ev.stdout)), ("summary.json", summary), ("theory.json", theory_json)):
        assert _unit_problems(doc) == [], name


def test_json_files_written_before_the_units_were_in_the_keys_read_the_same(run_copy):
    from rapa.sweep.analyses import Analyses
    from rapa.sweep.runs import collect_runs

    run = run_copy()
    snrs = [30.0, 35.0]
    curve = {"snr_db": snrs, "snr_space": "pixel", "correct": 18, "images": 20, "clean_accuracy": 90.0,
             "accuracy": {"fgsm": [40.0, 60.0], "fgsm_eot": [30.0, 50.0]}}
    old = {"reduce.json": {"methods": {"norm": 41.0}, "best_method": "norm", "best_error": 41.0, "tiled_error": 30.0},
           "voting.json": {"limit": 20, "images": 20, "votes": 9, "single_error": 35.0, "vote_error": 30.0,
                           "only_single_right": 1, "only_vote_right": 2},
           "attack.json": {"limit": 20, "test_images": 20, "curves": {"model": curve}}}
    for name, doc in old.items():  # as the rapa of the committed results/quick tree wrote them
        (run / name).write_text(json.dumps(doc))
    rec = collect_runs(run.parent)[0]
    a = Analyses(compute=False, attack_limit=20, snrs=snrs)
    assert a.reduction(rec)["best_error"] == 41.0 and a.reduction(rec)["tiled_error"] == 30.0
    assert a.reduction(rec)["methods"] == {"norm": 41.0}
    assert (a.voting(rec)["single_error"], a.voting(rec)["vote_error"]) == (35.0, 30.0)
    assert a.robustness(rec)["accuracy"]["fgsm"] == [40.0, 60.0] and a.robustness(rec)["clean_accuracy"] == 90.0


def test_report_fig7_csv_names_percentages_and_the_gap_fraction(digits_runs, tmp_path):
    """fig7.csv held accuracies in percent beside gap reductions as fractions under plain names;
    the untiled net's attack.json in the old spelling, the random one's in the new."""
    from rapa.analysis.attack import DEFAULT_SNRS

    root = tmp_path / "sweep"
    acc = {"random": 60.0, "none": 20.0}  # FGSM accuracy at every SNR: 60% and 20% at 33 dB
    for name in ("tiled", "base"):
        run = root / name
        shutil.copytree(digits_runs / name, run)
        config = json.loads((run / "config.json").read_text())
        paper = {"channels": [32, 32, 64], "tiles": None if config["tiles"] is None else [16, 4, 1]}
        (run / "config.json").write_text(json.dumps({**config, **paper}))  # Table 1's rows (read from the caches)
        a = acc[config["scheme"]]
        curve = {"snr_db": list(DEFAULT_SNRS), "snr_space": "pixel", "correct": 27, "images": 30,
                 "accuracy": {"fgsm": [a] * 9, "fgsm_eot": [a] * 9}, "clean_accuracy": 90.0}
        if name == "tiled":
            curve["accuracy_percent"], curve["clean_accuracy_percent"] = curve.pop("accuracy"), \
                curve.pop("clean_accuracy")
        (run / "attack.json").write_text(json.dumps({"limit": 30, "test_images": 30, "curves": {"model": curve}}))
    r = rapa("report", root, "--no-analysis", "--quiet", "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    rows = {row["net"]: row for row in csv.DictReader(open(tmp_path / "report" / "fig7.csv"))}
    assert float(rows["random"]["clean_accuracy_percent"]) == 90.0
    assert float(rows["random"]["fgsm_accuracy_percent"]) == 60.0
    assert float(rows["no tiling"]["fgsm_accuracy_percent"]) == 20.0
    assert float(rows["random"]["fgsm_gap_reduction_fraction"]) == pytest.approx((60 - 20) / (100 - 20))
