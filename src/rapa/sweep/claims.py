"""The paper's claims as rules on measured numbers: each gives a verdict, never a fixed one.

Every scheme is trained with the same seeds, and every rule compares two schemes seed by
seed: the 95% Student-t interval of the per-seed differences (:func:`rapa.sweep.stats.paired`).
The rules are symmetric: a claim ``holds`` when the interval lies entirely on the claimed
side of its margin, is ``not reproduced`` (under the battery's recipe: a short recipe
cannot refute the paper) when it lies entirely on the other side, and is ``inconclusive``
otherwise. It is also ``inconclusive``, with the reason, when

* a net it rests on did not learn: its test error is near the trivial classifier's
  (:func:`rapa.sweep.stats.near_chance`); two nets at chance are "equal" for no reason;
* fewer than two seeds are common to the schemes compared (no seed-level interval);
* something it needs was not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rapa.sweep.stats import SeedStats, paired, seed_stats

__all__ = ["CLOSE_PP", "HOLDS", "INCONCLUSIVE", "METRICS", "NOT", "PAPER_GAP_REDUCTION", "Claim", "claim_close_or_better",
           "claim_eot", "claim_fgsm", "claim_perforated", "claim_random_best", "claim_reduction", "claim_similarity",
           "claim_voting", "mcnemar_p"]

HOLDS, NOT, INCONCLUSIVE = "holds", "not reproduced", "inconclusive"
CLOSE_PP = 1.0
"""Percentage points within which random tiling's error counts as "close" to the untiled net's."""
PAPER_GAP_REDUCTION = 41.0
"""The paper's FGSM gap reduction by random tiling at 33 dB on CIFAR-10 (percent, §3.6)."""
PerSeed = Mapping[int, float]
METRICS = {"best5_test_error": "best-5 test error", "final_test_error": "final test error (one pass)"}
"""Error measures the scheme comparisons can use, with their names in the rules."""


@dataclass
class Claim:
    """A claim of the paper next to what was measured."""

    key: str
    """Short identifier."""
    paper: str
    """What the paper says (section)."""
    measured: str
    """The numbers measured here."""
    verdict: str
    """holds, not reproduced or inconclusive."""
    rule: str
    """How the verdict follows from the numbers."""
    values: dict[str, Any] = field(default_factory=dict)
    """The numbers, for the JSON."""
    n_seeds: int = 0
    """Seeds the comparison rests on (common to every scheme it compares)."""
    reason: str = ""
    """Why the verdict is what it is (always given for inconclusive)."""
    recipe: str = ""
    """The training recipe the numbers come from (``not reproduced under RECIPE``)."""
    unit: str = "percent"
    """What the numbers in ``values`` are: ``percent`` (errors, accuracies and the gap reduction;
    their differences in percentage points; ``snr_db`` in dB, ``mcnemar_p`` a probability) or
    ``correlation`` (filter similarity)."""

    @property
    def verdict_text(self) -> str:
        """The verdict as the report prints it: ``not reproduced under RECIPE``."""
        if self.verdict == NOT and self.recipe:
            return f"{NOT} under {self.recipe}"
        return self.verdict


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` vs ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


# --------------------------------------------------------------------------- plumbing


def _side(d: SeedStats, margin: float = 0.0) -> str:
    """HOLDS if the interval of ``d`` lies above ``margin``, NOT if below, else INCONCLUSIVE."""
    if d.lo > margin:
        return HOLDS
    if d.hi < margin:
        return NOT
    return INCONCLUSIVE


def _finish(key: str, paper: str, measured: str, rule: str, values: dict[str, Any], n: int,
            untrained: Sequence[str], recipe: str, decide: Callable[[], tuple[str, str]]) -> Claim:
    """The claim with its verdict: gated on trained nets and two seeds, then ``decide()``."""
    if untrained:
        verdict, reason = INCONCLUSIVE, ("rests on nets that did not learn (test error near the trivial "
                                         "classifier's): " + "; ".join(untrained))
    elif n < 2:
        verdict, reason = INCONCLUSIVE, (f"{n} seed(s) common to the schemes compared: a seed-level interval "
                                         "needs at least 2")
    else:
        verdict, reason = decide()
    values = {**values, "n_seeds": n}
    return Claim(key, paper, measured, verdict, rule, values, n, reason, recipe)


def _missing(key: str, paper: str, what: str, recipe: str) -> Claim:
    return Claim(key, paper, f"not measured: {what}", INCONCLUSIVE, "needs the runs named", {"n_seeds": 0}, 0,
                 f"not measured: {what}", recipe)


def _pp(d: SeedStats, unit: str = " pp") -> str:
    if d.n == 0:
        return "–"
    if d.n < 2:
        return f"{d.mean:+.2f}{unit} (1 seed)"
    return f"{d.mean:+.2f}{unit}, 95% interval [{d.lo:+.2f}, {d.hi:+.2f}]"


def _stats(values: Mapping[str, PerSeed]) -> dict[str, dict[str, Any]]:
    return {k: seed_stats(v).as_dict() for k, v in values.items()}


def _all_better(key: str, paper: str, random: PerSeed, others: Mapping[str, PerSeed], lower_is_better: bool,
                what: str, unit: str, digits: int, untrained: Sequence[str], recipe: str) -> Claim:
    """Random is better than every other scheme: per other scheme the paired interval of
    (other - random) for errors, (random - other) for similarities."""
    diffs = {k: (paired(v, random) if lower_is_better else paired(random, v)) for k, v in others.items()}
    common = set(random)
    for v in others.values():
        common &= set(v)
    n = len(common)
    rs = seed_stats(random)
    measured = (f"random {rs.text(digits)}{unit}; " + "; ".join(
        f"{k} {seed_stats(v).text(digits)}{unit} (advantage of random {_pp(diffs[k], '')})"
        for k, v in sorted(others.items(), key=lambda kv: seed_stats(kv[1]).mean * (1 if lower_is_better else -1))))
    sign = "other - random" if lower_is_better else "random - other"

    def decide() -> tuple[str, str]:
        worse = [k for k, d in diffs.items() if _side(d) == NOT]
        if worse:
            return NOT, f"{', '.join(sorted(worse))} significantly better than random"
        unclear = [k for k, d in diffs.items() if _side(d) != HOLDS]
        if unclear:
            return INCONCLUSIVE, f"not told apart from random: {', '.join(sorted(unclear))}"
        return HOLDS, "random significantly better than every other scheme"

    return _finish(key, paper, measured,
                   f"per other scheme, the 95% interval over seeds of ({sign}) {what}; holds if every interval is "
                   f"above 0, not reproduced if one is below 0, else inconclusive",
                   {"random": rs.as_dict(), "others": _stats(others),
                    "advantage": {k: d.as_dict() for k, d in diffs.items()}}, n, untrained, recipe, decide)


# ----------------------------------------------------------------------------- claims


def claim_close_or_better(random: PerSeed, untiled: PerSeed, enlarged: PerSeed | None = None,
                          untrained: Sequence[str] = (), recipe: str = "", metric: str = "best5_test_error") -> Claim:
    """Random tiling's test error (%, per seed) is at most :data:`CLOSE_PP` above the untiled net's."""
    paper = "Random tiling comes close to or beats the untiled ConvNet (§3.1, Table 1)."
    if not random or not untiled:
        return _missing("random_vs_untiled", paper, "the random and untiled runs", recipe)
    d = paired(random, untiled)
    measured = (f"random {seed_stats(random).text()}% vs untiled {seed_stats(untiled).text()}% "
                f"(random - untiled {_pp(d)})"
                + ("" if not enlarged else f"; enlarged untiled {seed_stats(enlarged).text()}%"))

    def decide() -> tuple[str, str]:
        v = _side(SeedStats(d.n, -d.mean, d.sd, d.half), -CLOSE_PP)  # claimed side: random - untiled < +1 pp
        return v, {HOLDS: f"the whole interval is below +{CLOSE_PP:g} pp",
                   NOT: f"the whole interval is above +{CLOSE_PP:g} pp",
                   INCONCLUSIVE: f"the interval contains +{CLOSE_PP:g} pp"}[v]

    return _finish("random_vs_untiled", paper, measured,
                   f"95% interval over seeds of (random - untiled) {METRICS[metric]}; holds if it lies below "
                   f"+{CLOSE_PP:g} pp, not reproduced if above, else inconclusive",
                   {"random": seed_stats(random).as_dict(), "untiled": seed_stats(untiled).as_dict(),
                    "diff": d.as_dict(), "enlarged": None if not enlarged else seed_stats(enlarged).as_dict()},
                   d.n, untrained, recipe, decide)


def claim_random_best(errors: Mapping[str, PerSeed], untrained: Sequence[str] = (), recipe: str = "",
                      metric: str = "best5_test_error") -> Claim:
    """Random tiling's error is the lowest of the tiling schemes (``errors``: label -> per-seed %)."""
    paper = "Random tiling achieves the best performance among the tiling schemes (§3.1, Table 1)."
    rnd = errors.get("random")
    others = {k: v for k, v in errors.items() if k != "random" and v}
    if not rnd or not others:
        return _missing("random_best", paper, "random and other tiled runs", recipe)
    return _all_better("random_best", paper, rnd, others, True, METRICS[metric], "%", 2, untrained, recipe)


def claim_voting(single: PerSeed, vote: PerSeed, mcnemar: Mapping[int, float] | None = None,
                 untrained: Sequence[str] = (), recipe: str = "") -> Claim:
    """The 9-vote majority beats one pass of the same net (``single``, ``vote``: per-seed errors in %)."""
    paper = "Majority voting over 9 random assignments lowers random tiling's test error (§3.1, Table 1)."
    if not single or not vote:
        return _missing("voting", paper, "voting on the random runs", recipe)
    d = paired(single, vote)
    ps = "" if not mcnemar else "; McNemar p per seed: " + ", ".join(
        f"s{s} {p:.2g}" for s, p in sorted(mcnemar.items()))
    measured = (f"one pass {seed_stats(single).text()}%, 9-vote {seed_stats(vote).text()}% on the same nets "
                f"and images (single - vote {_pp(d)}){ps}")

    def decide() -> tuple[str, str]:
        v = _side(d)
        return v, {HOLDS: "the vote is better in the whole interval", NOT: "the vote is worse in the whole interval",
                   INCONCLUSIVE: "the interval contains 0"}[v]

    return _finish("voting", paper, measured,
                   "95% interval over seeds of (single pass - 9-vote) test error of the final random net on the "
                   "same images; holds if above 0, not reproduced if below 0, else inconclusive",
                   {"single": seed_stats(single).as_dict(), "vote": seed_stats(vote).as_dict(), "diff": d.as_dict(),
                    "mcnemar_p": dict(mcnemar or {})}, d.n, untrained, recipe, decide)


def claim_perforated(perforated: PerSeed, random: PerSeed, untiled: PerSeed | None = None,
                     untrained: Sequence[str] = (), recipe: str = "", metric: str = "best5_test_error") -> Claim:
    """Perforated convolution is worse than random tiling (per-seed test errors in %)."""
    paper = "The perforated scheme performs poorly, so subsampling does not explain random tiling (§3.1, Table 1)."
    if not perforated or not random:
        return _missing("perforated", paper, "the perforated and random runs", recipe)
    d = paired(perforated, random)
    measured = (f"perforated {seed_stats(perforated).text()}% vs random {seed_stats(random).text()}% "
                f"(perforated - random {_pp(d)})" + ("" if not untiled else f"; untiled {seed_stats(untiled).text()}%"))

    def decide() -> tuple[str, str]:
        v = _side(d)
        return v, {HOLDS: "perforated is worse in the whole interval", NOT: "perforated is better in the whole "
                   "interval", INCONCLUSIVE: "the interval contains 0"}[v]

    return _finish("perforated", paper, measured,
                   f"95% interval over seeds of (perforated - random) {METRICS[metric]}; holds if above 0, not "
                   "reproduced if below 0, else inconclusive",
                   {"perforated": seed_stats(perforated).as_dict(), "random": seed_stats(random).as_dict(),
                    "diff": d.as_dict()}, d.n, untrained, recipe, decide)


def claim_similarity(similarity: Mapping[str, PerSeed], untrained: Sequence[str] = (), recipe: str = "") -> Claim:
    """Random tiling's filters are the most similar across tiles (``similarity``: label -> per-seed correlation)."""
    paper = "With max pooling only random tiling learns similar filters across tiles (§3.4, Fig. 6A)."
    clean = {k: {s: x for s, x in v.items() if x is not None and not math.isnan(x)} for k, v in similarity.items()
             if v}
    rnd = clean.get("random")
    others = {k: v for k, v in clean.items() if k != "random" and v}
    if not rnd or not others:
        return _missing("similarity", paper, "similarity of random and other tiled runs", recipe)
    claim = _all_better("similarity", paper, rnd, others, False, "filter similarity", "", 3, untrained, recipe)
    claim.unit = "correlation"
    return claim


def claim_reduction(reduced: Mapping[str, PerSeed], untiled: PerSeed | None = None, untrained: Sequence[str] = (),
                    recipe: str = "") -> Claim:
    """The reduced random net has a lower error than every other reduced tiled net (label -> per-seed %)."""
    paper = "Only randomly tiled nets reduce to one kernel per layer with acceptable error (§3.4.3, Table 3)."
    rnd = reduced.get("random")
    others = {k: v for k, v in reduced.items() if k != "random" and v}
    if not rnd or not others:
        return _missing("reduction", paper, "reductions of random and other tiled runs", recipe)
    claim = _all_better("reduction", paper, rnd, others, True, "test error of the reduced nets (best method)", "%",
                        2, untrained, recipe)
    if untiled:
        claim.measured += f"; trained untiled {seed_stats(untiled).text()}%"
    return claim


def claim_fgsm(random: PerSeed, untiled: PerSeed, enlarged: PerSeed | None = None, snr: float = 33.0,
               untrained: Sequence[str] = (), recipe: str = "") -> Claim:
    """Random tiling keeps more accuracy under FGSM at ``snr`` dB than the untiled net (per-seed accuracies, %)."""
    paper = (f"Random tiling is more robust to FGSM than the untiled net (§3.6, Fig. 7: the gap to perfect "
             f"robustness cut by {PAPER_GAP_REDUCTION:g}% on CIFAR-10 at 33 dB).")
    if not random or not untiled:
        return _missing("fgsm", paper, "attacks on the random and untiled runs", recipe)
    d = paired(random, untiled)
    gaps = {s: 100.0 * (random[s] - untiled[s]) / (100.0 - untiled[s]) for s in set(random) & set(untiled)
            if untiled[s] < 100.0}
    g = seed_stats(gaps)
    measured = (f"accuracy at {snr:g} dB (pixel-space SNR): random {seed_stats(random).text()}% vs untiled "
                f"{seed_stats(untiled).text()}% (random - untiled {_pp(d)}); gap reduction {g.text(1)}% "
                f"(paper: {PAPER_GAP_REDUCTION:g}% on CIFAR-10)"
                + ("" if not enlarged else f"; enlarged {seed_stats(enlarged).text()}%"))

    def decide() -> tuple[str, str]:
        return _more_accuracy(d)

    return _finish("fgsm", paper, measured,
                   f"at {snr:g} dB, 95% interval over seeds of (random - untiled) FGSM accuracy on the images each "
                   "net classified correctly; holds if above 0, not reproduced if below 0, else inconclusive",
                   {"random": seed_stats(random).as_dict(), "untiled": seed_stats(untiled).as_dict(),
                    "diff": d.as_dict(), "gap_reduction": g.as_dict(), "snr_db": snr,
                    "enlarged": None if not enlarged else seed_stats(enlarged).as_dict()},
                   d.n, untrained, recipe, decide)


def _more_accuracy(d: Any) -> tuple[str, str]:
    """Verdict and reason for "random keeps more accuracy" from the paired interval ``d``."""
    v = _side(d)
    return v, {HOLDS: "random keeps more accuracy in the whole interval",
               NOT: "random keeps less accuracy in the whole interval", INCONCLUSIVE: "the interval contains 0"}[v]


def claim_eot(random_eot: PerSeed, untiled: PerSeed, random_fgsm: PerSeed | None = None, snr: float = 33.0,
              untrained: Sequence[str] = (), recipe: str = "") -> Claim:
    """The robustness of random tiling survives EOT-FGSM at ``snr`` dB (per-seed accuracies, %)."""
    paper = "(check, not in the paper) The robustness of random tiling survives an EOT attack (Athalye et al. 2018)."
    if not random_eot or not untiled:
        return _missing("eot", paper, "EOT attack on the random runs", recipe)
    d = paired(random_eot, untiled)
    kept = "" if not random_fgsm else f"; FGSM (one draw) on random {seed_stats(random_fgsm).text()}%"
    measured = (f"accuracy at {snr:g} dB under EOT-FGSM: random {seed_stats(random_eot).text()}% vs untiled "
                f"{seed_stats(untiled).text()}% (difference {_pp(d)}){kept}")

    def decide() -> tuple[str, str]:
        return _more_accuracy(d)

    return _finish("eot", paper, measured,
                   f"at {snr:g} dB, 95% interval over seeds of (random under EOT-FGSM - untiled under FGSM) accuracy; "
                   "holds if above 0, not reproduced if below 0, else inconclusive",
                   {"random_eot": seed_stats(random_eot).as_dict(), "untiled": seed_stats(untiled).as_dict(),
                    "diff": d.as_dict(), "snr_db": snr,
                    "random_fgsm": None if not random_fgsm else seed_stats(random_fgsm).as_dict()},
                   d.n, untrained, recipe, decide)
