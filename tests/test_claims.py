"""Claim verdicts and the battery report from hand-written results (no training, no Ray):
seed-level Student-t intervals, paired comparisons, symmetric rules, chance-level nets."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import rapa
from rapa.config import TrainConfig
from rapa.sweep import claims as C
from rapa.sweep.experiments import run_name
from rapa.sweep.analyses import Analyses
from rapa.sweep.runs import collect_runs
from rapa.sweep.stats import near_chance, paired, seed_stats, t_quantile

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_error", "test_error", "seconds")
SCHEMES = {"no tiling": ("none", None), "enlarged": ("none", (54, 64, 64)), "perforated": ("perforated", None),
           "random": ("random", None), "random fixed": ("random_fixed", None), "alternate": ("alternate", None),
           "image w/overlap": ("image_overlap", None), "image w/pad": ("image_pad", None)}
SNRS = [10.0, 15.0, 20.0, 25.0, 30.0, 33.0, 35.0, 40.0, 45.0, 50.0]


def make_run(root: Path, label: str, seed: int, error: float, vote: float | None = None,
             curve: tuple[float, ...] = (0.6, 0.4), trivial: float = 0.9) -> Path:
    """A finished run directory (config, metrics, summary) of Table 1's row ``label``; errors as fractions."""
    scheme, channels = SCHEMES[label]
    config = TrainConfig(dataset="fashion-mnist", scheme=scheme, tiles=None if scheme == "none" else (16, 4, 1),
                         channels=channels or (32, 32, 64), augment="moderate", seed=seed, epochs=len(curve) + 1)
    run_dir = root / run_name(config)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**config.to_dict(), "torch_version": "2.x",
                                                     "rapa_version": rapa.__version__}))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(METRIC_FIELDS)
        for i, t in enumerate(curve + (error,), 1):
            w.writerow([i, 0.025, 1.0, t, t, 10.0])
    (run_dir / "summary.json").write_text(json.dumps({
        "epochs": len(curve) + 1, "best5_test_error": error, "best5_train_error": error, "final_test_error": error,
        "vote_test_error": error if vote is None else vote, "test_images": 10000, "train_images": 60000,
        "trivial_test_error": trivial}))
    return run_dir


def battery(root: Path, errors: dict[str, list[float]], **kw) -> dict[tuple[str, int], Path]:
    """Runs of every row with per-seed errors (percent)."""
    return {(label, s): make_run(root, label, s, e / 100.0, **kw) for label, errs in errors.items()
            for s, e in enumerate(errs)}


def evaluate(root: Path, **kw) -> dict[str, C.Claim]:
    from rapa.sweep.reproduce import evaluate_claims

    return {c.key: c for c in evaluate_claims(collect_runs(root), Analyses(compute=False), **kw)}


# ------------------------------------------------------------------------ statistics


def test_t_quantiles_match_the_tables():
    # textbook two-sided 95% values of Student's t
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 50):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_seed_interval_and_paired_difference_by_hand():
    s = seed_stats({0: 10.0, 1: 12.0, 2: 14.0})  # mean 12, sd 2, half = 4.303 * 2 / sqrt(3)
    assert (s.n, s.mean, s.sd) == (3, 12.0, 2.0)
    assert s.half == pytest.approx(4.3027 * 2 / math.sqrt(3), rel=1e-4)
    d = paired({0: 10.0, 1: 12.0, 2: 14.0, 3: 99.0}, {0: 9.0, 1: 11.5, 2: 12.5})  # seed 3 has no partner
    assert d.n == 3 and d.seeds == (0, 1, 2) and d.mean == pytest.approx(1.0)
    assert math.isnan(seed_stats([5.0]).half) and seed_stats([5.0]).text() == "5.00"


def test_near_chance_against_the_trivial_classifier():
    assert near_chance(89.0, 90.0) and near_chance(81.0, 90.0)  # within 10 pp
    assert not near_chance(70.0, 90.0)
    assert near_chance(60.0, 70.0, n_test=10)  # 2 binomial se on 10 images: 29 pp
    assert not near_chance(15.0, 90.0, n_test=10000)


# ---------------------------------------------------------------------------- rules


@pytest.mark.parametrize("random, untiled, verdict", [
    ([9.0, 9.2, 9.1], [9.6, 9.7, 9.5], C.HOLDS),            # better in every seed
    ([10.2, 10.3, 10.2], [9.6, 9.7, 9.5], C.HOLDS),         # 0.6 pp worse, tight: close
    ([12.0, 12.2, 12.1], [9.6, 9.7, 9.5], C.NOT),           # 2.5 pp worse, tight
    ([12.0, 8.0, 13.0], [9.6, 9.7, 9.5], C.INCONCLUSIVE),  # the seeds disagree
])
def test_close_or_better_uses_the_seed_interval(random, untiled, verdict):
    claim = C.claim_close_or_better(dict(enumerate(random)), dict(enumerate(untiled)))
    assert claim.verdict == verdict and claim.n_seeds == 3


def test_rules_are_symmetric():
    """Mirrored numbers give the mirrored verdict: the same evidence is needed both ways."""
    a, b = {0: 20.0, 1: 21.0, 2: 20.5}, {0: 15.0, 1: 15.5, 2: 15.2}
    assert C.claim_perforated(a, b).verdict == C.HOLDS and C.claim_perforated(b, a).verdict == C.NOT
    close = {0: 14.9, 1: 15.4, 2: 15.3}
    assert C.claim_perforated(close, b).verdict == C.claim_perforated(b, close).verdict == C.INCONCLUSIVE
    # random best: one scheme significantly better than random refutes it, as significance confirms it
    best = C.claim_random_best({"random": b, "alternate": a, "perforated": a})
    worst = C.claim_random_best({"random": a, "alternate": b, "perforated": {0: 30.0, 1: 31.0, 2: 30.0}})
    assert best.verdict == C.HOLDS and worst.verdict == C.NOT
    # a lower point estimate alone is not "holds" (the old rule): the interval must exclude 0
    assert C.claim_random_best({"random": {0: 15.0, 1: 17.0, 2: 13.0},
                                "alternate": {0: 16.0, 1: 14.0, 2: 15.5}}).verdict == C.INCONCLUSIVE
    sims_hi, sims_lo = {0: 0.8, 1: 0.82, 2: 0.79}, {0: 0.1, 1: 0.12, 2: 0.09}
    assert C.claim_similarity({"random": sims_hi, "alternate": sims_lo}).verdict == C.HOLDS
    assert C.claim_similarity({"random": sims_lo, "alternate": sims_hi}).verdict == C.NOT
    assert C.claim_reduction({"random": b, "alternate": a}).verdict == C.HOLDS
    assert C.claim_reduction({"random": a, "alternate": b}).verdict == C.NOT


def test_voting_fgsm_and_eot_rules():
    single, vote = {0: 10.0, 1: 11.0, 2: 10.5}, {0: 9.5, 1: 10.4, 2: 10.0}
    assert C.claim_voting(single, vote).verdict == C.HOLDS
    assert C.claim_voting(vote, single).verdict == C.NOT
    fgsm = C.claim_fgsm({0: 62.0, 1: 60.0, 2: 61.0}, {0: 25.0, 1: 26.0, 2: 24.0})
    assert fgsm.verdict == C.HOLDS and fgsm.values["snr_db"] == 33.0
    # gap reduction per seed, then the mean: (62-25)/75, (60-26)/74, (61-24)/76
    assert fgsm.values["gap_reduction"]["mean"] == pytest.approx(100 * (37 / 75 + 34 / 74 + 37 / 76) / 3)
    assert C.claim_fgsm({0: 24.0, 1: 25.0, 2: 23.0}, {0: 25.0, 1: 26.0, 2: 24.5}).verdict == C.NOT
    assert C.claim_eot({0: 26.0, 1: 20.0, 2: 30.0}, {0: 25.0, 1: 26.0, 2: 24.0}).verdict == C.INCONCLUSIVE


def test_one_seed_or_missing_numbers_are_inconclusive_with_the_reason():
    claim = C.claim_close_or_better({0: 9.0}, {0: 20.0})
    assert claim.verdict == C.INCONCLUSIVE and "at least 2" in claim.reason and claim.n_seeds == 1
    claim = C.claim_fgsm({}, {0: 25.0})
    assert claim.verdict == C.INCONCLUSIVE and claim.reason.startswith("not measured")


def test_not_reproduced_names_the_recipe():
    claim = C.claim_perforated({0: 9.0, 1: 9.1, 2: 9.2}, {0: 12.0, 1: 12.1, 2: 12.3}, recipe="6 epochs")
    assert claim.verdict == C.NOT and claim.verdict_text == "not reproduced under 6 epochs"
    assert C.NOT == "not reproduced" and C.claim_perforated({0: 9.0}, {0: 12.0}, recipe="x").verdict_text == \
        C.INCONCLUSIVE


# ------------------------------------------------------------- claims from run folders


def test_a_battery_of_nets_at_chance_is_inconclusive_everywhere(tmp_path):
    """1 epoch on 200 images: every net at about 90% on 10 classes. The former rules scored
    "random vs untiled" at 90% vs 90% as holding; every claim must be inconclusive."""
    root = tmp_path / "runs"
    errors = {label: [90.0 + 0.1 * s for s in range(2)] for label in SCHEMES}
    errors["perforated"] = [90.2, 90.3]
    dirs = battery(root, errors)
    for s in range(2):
        (dirs[("random", s)] / "voting.json").write_text(json.dumps(
            {"limit": None, "images": 10000, "votes": 9, "single_error": 90.0, "vote_error": 89.0,
             "only_single_right": 100, "only_vote_right": 200}))
    claims = evaluate(root)
    assert len(claims) == 8
    for c in claims.values():
        assert c.verdict == C.INCONCLUSIVE, c.key
    assert "did not learn" in claims["random_vs_untiled"].reason and "random s0 90.0%" in \
        claims["random_vs_untiled"].reason
    assert "did not learn" in claims["voting"].reason


def test_seed_variation_makes_a_single_lucky_seed_inconclusive(tmp_path):
    """The former rules took the best seed of each scheme and a binomial se over test images:
    random's lucky seed (8%) against untiled's best (9.5%) "held" at 10,000 images. Paired over
    the three seeds the difference is +1.0 pp +- 14 pp: inconclusive."""
    root = tmp_path / "runs"
    battery(root, {"random": [8.0, 15.0, 13.0], "no tiling": [9.5, 10.0, 13.5]})
    claim = evaluate(root)["random_vs_untiled"]
    assert claim.verdict == C.INCONCLUSIVE and claim.n_seeds == 3
    assert claim.values["diff"]["mean"] == pytest.approx(1.0)


def test_claims_from_a_sweep_folder_with_analyses(tmp_path):
    root = tmp_path / "runs"
    errors = {"no tiling": [10.0, 10.5, 10.2], "enlarged": [9.8, 10.0, 9.9], "perforated": [18.0, 18.5, 18.2],
              "random": [9.8, 10.1, 10.0], "random fixed": [11.0, 11.4, 11.2], "alternate": [11.5, 11.9, 11.6],
              "image w/overlap": [12.0, 12.3, 12.1], "image w/pad": [12.5, 12.9, 12.6]}
    dirs = battery(root, errors)
    for s in range(3):
        (dirs[("random", s)] / "voting.json").write_text(json.dumps(
            {"limit": 5000, "images": 5000, "votes": 9, "single_error": 10.0 + 0.1 * s, "vote_error": 9.0 + 0.2 * s,
             "only_single_right": 2, "only_vote_right": 50}))
        for label, sim in (("random", 0.8), ("random fixed", 0.1), ("alternate", 0.05), ("image w/overlap", 0.0),
                           ("image w/pad", 0.02)):
            (dirs[(label, s)] / "similarity.json").write_text(json.dumps({"overall": sim + 0.01 * s, "layers": {}}))
            (dirs[(label, s)] / "reduce.json").write_text(json.dumps(
                {"methods": {"norm": 12.0}, "best_method": "norm", "tiled_error": 10.0,
                 "best_error": (12.0 if label == "random" else 70.0) + s}))
        for label, acc in (("random", 60.0), ("no tiling", 20.0), ("enlarged", 25.0)):
            curve = {"snr_db": SNRS, "snr_space": "pixel", "correct": 4500, "images": 5000, "clean_accuracy": 90.0,
                     "accuracy": {"fgsm": [acc + s + 2 * (x - 33.0) for x in SNRS],
                                  "fgsm_eot": [acc / 2 + 12 + s + 2 * (x - 33.0) for x in SNRS]}}
            (dirs[(label, s)] / "attack.json").write_text(json.dumps(
                {"limit": 5000, "test_images": 5000, "curves": {"model": curve}}))
    from rapa.sweep.reproduce import evaluate_claims

    analyses = Analyses(compute=False, attack_limit=5000, snrs=SNRS)
    claims = {c.key: c for c in evaluate_claims(collect_runs(root), analyses, recipe="6 epochs")}
    assert {k: c.verdict for k, c in claims.items()} == {
        "random_vs_untiled": C.HOLDS, "random_best": C.HOLDS, "voting": C.HOLDS, "perforated": C.HOLDS,
        "similarity": C.HOLDS, "reduction": C.HOLDS, "fgsm": C.HOLDS, "eot": C.HOLDS}
    # scored at 33 dB exactly: random 60+s, untiled 20+s
    assert claims["fgsm"].values["diff"]["mean"] == pytest.approx(40.0)
    assert all(c.n_seeds == 3 for c in claims.values())


def test_attacks_of_another_snr_scale_are_not_read(tmp_path):
    """attack.json written with SNRs on normalised inputs (the former rapa) is not mixed in."""
    root = tmp_path / "runs"
    d = make_run(root, "random", 0, 0.1)
    curve = {"snr_db": SNRS, "accuracy": {"fgsm": [50.0] * 10, "fgsm_eot": [40.0] * 10}, "correct": 10}
    (d / "attack.json").write_text(json.dumps({"limit": 5000, "curves": {"model": curve}}))
    rec = collect_runs(root)[0]
    assert Analyses(compute=False, attack_limit=5000, snrs=SNRS).robustness(rec) is None
    curve["snr_space"] = "pixel"
    (d / "attack.json").write_text(json.dumps({"limit": 5000, "curves": {"model": curve}}))
    assert Analyses(compute=False, attack_limit=5000, snrs=SNRS).robustness(rec) is not None


# ------------------------------------------------------------------- battery report


def test_report_is_rebuilt_from_a_results_tree_without_checkpoints(tmp_path, capsys):
    results = tmp_path / "results"
    dirs = battery(results / "runs", {"random": [9.8, 10.1, 10.0], "no tiling": [10.0, 10.5, 10.2],
                                      "perforated": [18.0, 18.5, 18.2]},
                   vote=0.095, curve=(0.5, 0.3))
    assert not any(p.name == "checkpoint.pt" for p in results.rglob("*"))
    (results / "battery.json").write_text(json.dumps({
        "experiment": "fmnist", "command": "rapa reproduce", "commit": "abc123", "wall_seconds": 5400.0,
        "runs": 24, "error_metric": "final_test_error", "analyses": {"attack_limit": 5000, "eot": 8, "snrs": SNRS}}))
    from rapa.cli import main

    assert main(["report", str(results)]) == 0
    text = (results / "REPORT.md").read_text()
    assert "`rapa reproduce`" in text and "abc123" in text and "90 min" in text and "9 finished of 24" in text
    assert "| random | 9.97 ± " in text  # mean of 9.8, 10.1, 10.0 with its interval
    assert "![learning curves](report/curves.png)" in text and (results / "report" / "curves.png").is_file()
    claims = json.loads((results / "claims.json").read_text())
    assert len(claims) == 8 and all("n_seeds" in c for c in claims)
    by_key = {c["key"]: c for c in claims}
    assert by_key["perforated"]["verdict"] == C.HOLDS and by_key["perforated"]["n_seeds"] == 3
    assert by_key["fgsm"]["verdict"] == C.INCONCLUSIVE and by_key["fgsm"]["reason"].startswith("not measured")
    # Table 1: one pass and vote of the same final nets
    row = next(ln for ln in text.splitlines() if ln.startswith("| random |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("9.97") and cells[4] == "9.50 ± 0.00"


# ------------------------------------------------------------- the battery on Ray


TINY_BATTERY = """
description: tiny digits battery
base: {dataset: digits, epochs: 2, limit_train: 100, limit_test: 100, batch_size: 10, warmup_epochs: 0,
       lr_step: 10, augment: none, tiles: [16, 4, 1]}
runs:
  - {scheme: random, lr: 0.1, grid: {seed: [0, 1]}}
  - {scheme: none, lr: 0.05, grid: {seed: [0, 1]}}
"""


@pytest.mark.ray
def test_battery_resumes_analyses_and_exports_the_small_files(tmp_path):
    """A killed battery continues: a run finished before without its analyses gets them, a run
    stopped after one epoch resumes; every finished run's small files (no checkpoint) land in
    the results tree, and the report is rebuilt from that tree alone."""
    pytest.importorskip("ray")
    from rapa.sweep.experiments import load_experiment
    from rapa.sweep.reproduce import SMALL_FILES, reproduce
    from rapa.train import train

    exp_file = tmp_path / "tiny.yaml"
    exp_file.write_text(TINY_BATTERY)
    runs = load_experiment(str(exp_file)).runs
    work, results = tmp_path / "work", tmp_path / "results"
    # as left by a killed battery: one run finished (no analyses, not exported), one after epoch 1 of 2
    train(runs[0].config, work / runs[0].name, progress=False)
    import dataclasses

    train(dataclasses.replace(runs[2].config, epochs=1), work / runs[2].name, progress=False)
    lines: list[str] = []
    path = reproduce(str(exp_file), work, results, attack_limit=50, eot=2, log=lines.append,
                     sweep_options={"num_cpus": 2}, command="rapa reproduce --experiment tiny.yaml",
                     progress_every=3600)
    text = "\n".join(lines)
    assert "[battery] 0/4 runs done" in text and "[battery] 4/4 runs done" in text and "epochs" in text
    assert "1 finished before" in text and "committed" not in text  # no git commit without commit=True
    assert len((work / runs[2].name / "metrics.csv").read_text().splitlines()) == 3  # header + epochs 1, 2
    for spec in runs:
        dest = results / "runs" / spec.name
        assert not (dest / "checkpoint.pt").exists()
        assert {"config.json", "metrics.csv", "summary.json"} <= {p.name for p in dest.iterdir()} <= set(SMALL_FILES)
    first = results / "runs" / runs[0].name  # the run finished before: its analyses were computed now
    assert {"voting.json", "similarity.json", "reduce.json", "attack.json"} <= {p.name for p in first.iterdir()}
    attack = json.loads((first / "attack.json").read_text())
    assert attack["curves"]["model"]["snr_space"] == "pixel" and 33.0 in attack["snr_db"]
    manifest = json.loads((results / "battery.json").read_text())
    assert manifest["command"] == "rapa reproduce --experiment tiny.yaml" and manifest["wall_seconds"] > 0
    assert manifest["runs"] == 4 and (manifest["commit"] is None or len(manifest["commit"]) == 40)
    claims = json.loads((results / "claims.json").read_text())
    assert len(claims) == 8 and all(c["n_seeds"] in (0, 2) for c in claims)
    report = path.read_text()
    # rebuilt from the results tree alone: the same claims
    import shutil

    copy = tmp_path / "fresh"
    shutil.copytree(results, copy)
    shutil.rmtree(work)
    (copy / "REPORT.md").unlink()
    from rapa.sweep.battery_report import write_battery_report

    write_battery_report(copy)
    assert json.loads((copy / "claims.json").read_text()) == claims
    assert (copy / "REPORT.md").read_text().split("## Claims")[1] == report.split("## Claims")[1]


def test_commit_results_commits_only_the_results_tree(tmp_path):
    import subprocess

    from rapa.sweep.reproduce import commit_results

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "other.txt").write_text("a")
    git("add", "other.txt")
    git("commit", "-q", "-m", "first")
    (tmp_path / "other.txt").write_text("someone else's change, staged")
    git("add", "other.txt")
    results = tmp_path / "results" / "fmnist"
    (results / "runs" / "r1").mkdir(parents=True)
    (results / "runs" / "r1" / "summary.json").write_text("{}")
    said: list[str] = []
    assert commit_results(results, "results: r1", said.append) and not said
    assert git("show", "--name-only", "--format=", "HEAD").split() == ["results/fmnist/runs/r1/summary.json"]
    assert "M  other.txt" in git("status", "--porcelain")  # the other change is still staged, not committed
    assert commit_results(results, "nothing new", said.append)  # nothing to commit is fine
