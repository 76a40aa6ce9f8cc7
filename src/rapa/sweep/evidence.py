"""The numbers the claims rest on, per scheme and seed, read from the runs of a battery.

:func:`per_seed` groups the finished floating-point runs of one dataset by scheme (the
rows of Table 1) and seed; :func:`evaluate_claims` reads each claim's numbers from them
(best-5 test errors from ``summary.json``, the analyses through
:class:`rapa.sweep.analyses.Analyses`) and hands them to the rules of :mod:`rapa.sweep.claims`,
with the nets that did not learn (:func:`rapa.sweep.stats.near_chance`) named.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

from rapa.analysis.attack import accuracy_at
from rapa.data import dataset_info
from rapa.rundir import json_safe
from rapa.sweep import claims as C
from rapa.sweep.analyses import Analyses
from rapa.sweep.runs import RunRecord, scheme_label
from rapa.sweep.stats import near_chance

__all__ = ["ALL_ROWS", "COMPARISON_DB", "TILED", "chance_notes", "evaluate_claims", "error_of", "per_seed",
           "recipe_text", "trivial_error"]

TILED = ("random", "random fixed", "alternate", "image w/overlap", "image w/pad")
"""The tiled rows of Table 1 (random first)."""
ALL_ROWS = ("no tiling", "no tiling enlarged", "perforated") + TILED
COMPARISON_DB = 33.0
"""The SNR at which the adversarial claims are scored (the paper's, about human perception)."""
Groups = Mapping[str, Mapping[int, RunRecord]]


def per_seed(records: Sequence[RunRecord], metric: str = "best5_test_error") -> dict[str, dict[int, RunRecord]]:
    """Finished FP runs with a ``metric`` error, by Table 1 row and seed (the first run by name
    where a row has two runs of one seed)."""
    out: dict[str, dict[int, RunRecord]] = {}
    for r in sorted(records, key=lambda r: r.name):
        if not r.finished or r.config.analog is not None or r.summary.get(metric) is None:
            continue
        out.setdefault(scheme_label(r.config), {}).setdefault(int(r.config.seed), r)
    return out


def trivial_error(rec: RunRecord) -> tuple[float, int | None]:
    """The trivial classifier's test error (%) on the run's test set and the test images:
    from its summary, else ``1 - 1/classes`` (balanced classes) and ``limit_test``."""
    s = rec.summary or {}
    if s.get("trivial_test_error") is not None:
        return 100.0 * float(s["trivial_test_error"]), s.get("test_images")
    classes = dataset_info(rec.config.dataset).num_classes
    return 100.0 * (1.0 - 1.0 / classes), rec.config.limit_test


def error_of(rec: RunRecord, metric: str = "best5_test_error") -> float:
    """The run's ``metric`` test error in percent."""
    return 100.0 * float(rec.summary[metric])  # type: ignore[index]


def chance_notes(groups: Groups, rows: Sequence[str], metric: str = "best5_test_error") -> list[str]:
    """``row s0 E0%, s2 E2% (trivial T%)`` per row of ``rows`` with nets whose ``metric`` error is near chance."""
    notes = []
    for row in rows:
        bad, trivial = [], None
        for seed, rec in sorted(groups.get(row, {}).items()):
            trivial, n = trivial_error(rec)
            if near_chance(error_of(rec, metric), trivial, n):
                bad.append(f"s{seed} {error_of(rec, metric):.1f}%")
        if bad:
            notes.append(f"{row} {', '.join(bad)} (trivial {trivial:.1f}%)")
    return notes


def recipe_text(records: Sequence[RunRecord]) -> str:
    """A short description of the training recipe of ``records`` (for ``not reproduced under ...``)."""
    done = [r for r in records if r.finished]
    if not done:
        return ""
    c = done[0].config
    epochs = sorted({r.config.epochs for r in done})
    images = sorted({(r.summary or {}).get("train_images") or r.config.limit_train or 0 for r in done})
    seeds = sorted({r.config.seed for r in done})
    untiled = sorted({r.config.resolved_lr() for r in done if r.config.scheme == "none"})
    tiled = sorted({r.config.resolved_lr() for r in done if r.config.scheme != "none"})
    rates = " / ".join(",".join(f"{v:g}" for v in vals) for vals in (untiled, tiled) if vals)
    n_img = "all" if images == [0] else "/".join(str(i) if i else "all" for i in images)
    warm = sorted({r.config.warmup_epochs for r in done})
    steps = sorted({r.config.lr_step for r in done if r.config.lr_step < r.config.epochs})
    decay = f", x{c.gamma:g} every {'/'.join(map(str, steps))} epochs" if steps else ""
    return (f"{'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''} on {n_img} {c.dataset} training "
            f"images, lr {rates}" + (f" ({'/'.join(map(str, warm))} warm-up epoch(s) at lr/{c.warmup_divisor:g})"
                                     if any(warm) else "")
            + f"{decay}, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}")


def _values(groups: Groups, row: str, fn: Callable[[RunRecord], float | None]) -> dict[int, float]:
    out = {}
    for seed, rec in groups.get(row, {}).items():
        v = fn(rec)
        if v is not None:
            out[seed] = float(v)
    return out


def evaluate_claims(records: Sequence[RunRecord], analyses: Analyses, recipe: str | None = None,
                    snr: float = COMPARISON_DB, metric: str = "best5_test_error") -> list[C.Claim]:
    """Every claim, from the finished FP runs of one dataset in ``records`` (the analyses it
    needs computed or read from their caches through ``analyses``). ``metric``: the error
    the schemes are compared by (a key of :data:`rapa.sweep.claims.METRICS`)."""
    if metric not in C.METRICS:
        raise ValueError(f"metric={metric!r}; choose one of {', '.join(C.METRICS)}")
    groups = per_seed(records, metric)
    recipe = recipe_text(records) if recipe is None else recipe
    err = {row: _values(groups, row, lambda r: error_of(r, metric)) for row in ALL_ROWS}

    def gate(*rows: str) -> list[str]:
        return chance_notes(groups, rows, metric)

    out = [C.claim_close_or_better(err["random"], err["no tiling"], err["no tiling enlarged"],
                                   gate("random", "no tiling"), recipe, metric),
           C.claim_random_best({k: err[k] for k in ("perforated",) + TILED}, gate("perforated", *TILED), recipe,
                               metric)]

    votes = {s: analyses.voting(r) for s, r in groups.get("random", {}).items()}
    votes = {s: v for s, v in votes.items() if v is not None}
    out.append(C.claim_voting({s: v["single_error"] for s, v in votes.items()},
                              {s: v["vote_error"] for s, v in votes.items()},
                              {s: C.mcnemar_p(v["only_single_right"], v["only_vote_right"]) for s, v in votes.items()},
                              gate("random"), recipe))
    out.append(C.claim_perforated(err["perforated"], err["random"], err["no tiling"], gate("perforated", "random"),
                                  recipe, metric))

    def sim(rec: RunRecord) -> float | None:
        s = analyses.similarity(rec)
        return None if s is None else s["overall"]

    def red(rec: RunRecord) -> float | None:
        r = analyses.reduction(rec)
        return None if r is None else r.get("best_error")

    out.append(C.claim_similarity({k: _values(groups, k, sim) for k in TILED}, gate(*TILED), recipe))
    out.append(C.claim_reduction({k: _values(groups, k, red) for k in TILED}, err["no tiling"], gate(*TILED), recipe))

    def acc(attack: str) -> Callable[[RunRecord], float | None]:
        def at(rec: RunRecord) -> float | None:
            c = analyses.robustness(rec)
            if c is None or attack not in c.get("accuracy", {}):
                return None
            v = accuracy_at(c["snr_db"], c["accuracy"][attack], snr)
            return None if v != v else v  # NaN: the SNR is outside the measured range
        return at

    fgsm = {k: _values(groups, k, acc("fgsm")) for k in ("random", "no tiling", "no tiling enlarged")}
    out.append(C.claim_fgsm(fgsm["random"], fgsm["no tiling"], fgsm["no tiling enlarged"], snr,
                            gate("random", "no tiling"), recipe))
    out.append(C.claim_eot(_values(groups, "random", acc("fgsm_eot")), fgsm["no tiling"], fgsm["random"], snr,
                           gate("random", "no tiling"), recipe))
    return out


def claims_json(claims: Sequence[C.Claim]) -> list[dict[str, Any]]:
    """The claims as JSON entries (every one with ``n_seeds``, ``verdict`` and its ``reason``)."""
    return [json_safe({**asdict(c), "verdict_text": c.verdict_text}) for c in claims]
