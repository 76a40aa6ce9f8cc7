"""The paper's claims as rules on measured numbers: each gives a verdict, never a fixed one.

Every rule compares two error rates (or accuracies) measured on ``n`` test images and
uses the binomial standard error of their difference,
``se = 100 * sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)`` percentage points, with
``z = 2`` (about 95%): a difference beyond ``2 se`` is called real, one within it is not
told apart from noise. Voting compares the same images, so it uses McNemar's exact test
on the images only one of the two gets right. Verdicts: ``holds``, ``does not hold``,
``inconclusive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["HOLDS", "INCONCLUSIVE", "NOT", "Claim", "Z", "CLOSE_PP", "SIMILARITY_MARGIN", "mcnemar_p", "se_pp",
           "claim_close_or_better", "claim_eot", "claim_fgsm", "claim_perforated", "claim_random_best",
           "claim_reduction", "claim_similarity", "claim_voting", "comparison_snr"]

HOLDS, NOT, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
Z = 2.0
"""Standard errors a difference must exceed to count."""
CLOSE_PP = 1.0
"""Percentage points within which an error counts as "close" to another."""
SIMILARITY_MARGIN = 0.05
"""Correlation by which random tiling's filters must exceed every other scheme's."""


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
    """holds, does not hold or inconclusive."""
    rule: str
    """How the verdict follows from the numbers."""
    values: dict[str, Any] = field(default_factory=dict)
    """The numbers, for the JSON."""


def se_pp(p1: float, n1: int, p2: float, n2: int) -> float:
    """Standard error (percentage points) of the difference of two rates given in percent."""
    a, b = p1 / 100.0, p2 / 100.0
    return 100.0 * math.sqrt(max(a * (1 - a), 0.0) / max(n1, 1) + max(b * (1 - b), 0.0) / max(n2, 1))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` vs ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _missing(key: str, paper: str, what: str) -> Claim:
    return Claim(key, paper, f"not measured: {what}", INCONCLUSIVE, "needs the runs named")


def claim_close_or_better(random_err: float | None, untiled_err: float | None, n: int,
                          enlarged_err: float | None = None) -> Claim:
    """Random tiling's best test error (%) is at most :data:`CLOSE_PP` above the untiled net's."""
    paper = "Random tiling comes close to or beats the untiled ConvNet (§3.1, Table 1)."
    if random_err is None or untiled_err is None:
        return _missing("random_vs_untiled", paper, "the random and untiled runs")
    d, se = random_err - untiled_err, se_pp(random_err, n, untiled_err, n)
    verdict = HOLDS if d <= CLOSE_PP else (NOT if d - Z * se > CLOSE_PP else INCONCLUSIVE)
    measured = (f"random {random_err:.2f}% vs untiled {untiled_err:.2f}% (difference {d:+.2f} pp, se {se:.2f})"
                + ("" if enlarged_err is None else f"; enlarged untiled {enlarged_err:.2f}%"))
    return Claim("random_vs_untiled", paper, measured, verdict,
                 f"holds if random - untiled <= {CLOSE_PP:g} pp; does not hold if it exceeds {CLOSE_PP:g} pp "
                 f"by more than {Z:g} se", {"random": random_err, "untiled": untiled_err, "diff": d, "se": se,
                                            "enlarged": enlarged_err})


def claim_random_best(errors: Mapping[str, float | None], n: int) -> Claim:
    """Random tiling's error is the lowest of the tiling schemes (``errors``: label -> %)."""
    paper = "Random tiling achieves the best performance among the tiling schemes (§3.1, Table 1)."
    rnd = errors.get("random")
    others = {k: v for k, v in errors.items() if k != "random" and v is not None}
    if rnd is None or not others:
        return _missing("random_best", paper, "random and other tiled runs")
    best_other = min(others, key=others.__getitem__)
    d = others[best_other] - rnd  # > 0: random is better
    se = se_pp(rnd, n, others[best_other], n)
    verdict = HOLDS if d > 0 else (NOT if -d > Z * se else INCONCLUSIVE)
    measured = f"random {rnd:.2f}%; best other: {best_other} {others[best_other]:.2f}% ({-d:+.2f} pp, se {se:.2f}); " \
        + ", ".join(f"{k} {v:.2f}%" for k, v in sorted(others.items(), key=lambda kv: kv[1]))
    return Claim("random_best", paper, measured, verdict,
                 f"holds if random has the lowest error; does not hold if another scheme is lower by more than "
                 f"{Z:g} se", {"random": rnd, "others": dict(others), "se": se})


def claim_voting(single_err: float | None, vote_err: float | None, only_single_right: int = 0,
                 only_vote_right: int = 0, images: int = 0) -> Claim:
    """The 9-vote majority beats one pass on the same images (McNemar's exact test, 5%)."""
    paper = "Majority voting over 9 random assignments lowers random tiling's test error (§3.1, Table 1)."
    if single_err is None or vote_err is None:
        return _missing("voting", paper, "the random run")
    b, c = only_single_right, only_vote_right
    p = mcnemar_p(b, c)
    verdict = HOLDS if c > b and p < 0.05 else (NOT if c <= b else INCONCLUSIVE)
    measured = (f"one pass {single_err:.2f}%, 9-vote {vote_err:.2f}% on {images} images "
                f"({c} images only the vote gets right, {b} only the single pass; McNemar p = {p:.2g})")
    return Claim("voting", paper, measured, verdict,
                 "holds if the vote is right on more images than the single pass and McNemar's p < 0.05; does not "
                 "hold if it is not right on more", {"single": single_err, "vote": vote_err, "b": b, "c": c, "p": p})


def claim_perforated(perforated_err: float | None, random_err: float | None, n: int,
                     untiled_err: float | None = None) -> Claim:
    """Perforated convolution is worse than random tiling."""
    paper = "The perforated scheme performs poorly, so subsampling does not explain random tiling (§3.1, Table 1)."
    if perforated_err is None or random_err is None:
        return _missing("perforated", paper, "the perforated and random runs")
    d, se = perforated_err - random_err, se_pp(perforated_err, n, random_err, n)
    verdict = HOLDS if d > Z * se else (NOT if d < -Z * se else INCONCLUSIVE)
    measured = f"perforated {perforated_err:.2f}% vs random {random_err:.2f}% ({d:+.2f} pp, se {se:.2f})" \
        + ("" if untiled_err is None else f"; untiled {untiled_err:.2f}%")
    return Claim("perforated", paper, measured, verdict,
                 f"holds if perforated - random > {Z:g} se; does not hold if < -{Z:g} se",
                 {"perforated": perforated_err, "random": random_err, "diff": d, "se": se})


def claim_similarity(similarity: Mapping[str, float | None]) -> Claim:
    """Random tiling's filters are the most similar across tiles (``similarity``: label -> correlation)."""
    paper = "With max pooling only random tiling learns similar filters across tiles (§3.4, Fig. 6A)."
    rnd = similarity.get("random")
    others = {k: v for k, v in similarity.items() if k != "random" and v is not None and not math.isnan(v)}
    if rnd is None or math.isnan(rnd) or not others:
        return _missing("similarity", paper, "random and other tiled runs")
    top = max(others, key=others.__getitem__)
    d = rnd - others[top]
    verdict = HOLDS if d >= SIMILARITY_MARGIN else (NOT if d <= 0 else INCONCLUSIVE)
    measured = f"random {rnd:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                 sorted(others.items(), key=lambda kv: -kv[1]))
    return Claim("similarity", paper, measured, verdict,
                 f"holds if random's similarity exceeds every other scheme's by >= {SIMILARITY_MARGIN:g}; does not "
                 f"hold if another scheme's is as high", {"random": rnd, "others": dict(others), "margin": d})


def claim_reduction(reduced: Mapping[str, float | None], n: int, untiled_err: float | None = None) -> Claim:
    """The reduced random net has a lower error than every other reduced tiled net (``reduced``: label -> %)."""
    paper = "Only randomly tiled nets reduce to one kernel per layer with acceptable error (§3.4.3, Table 3)."
    rnd = reduced.get("random")
    others = {k: v for k, v in reduced.items() if k != "random" and v is not None}
    if rnd is None or not others:
        return _missing("reduction", paper, "reductions of random and other tiled runs")
    best_other = min(others, key=others.__getitem__)
    d = others[best_other] - rnd
    se = se_pp(rnd, n, others[best_other], n)
    verdict = HOLDS if d > Z * se else (NOT if d <= 0 else INCONCLUSIVE)
    measured = f"reduced random {rnd:.2f}%; " + ", ".join(f"{k} {v:.2f}%" for k, v in
                                                           sorted(others.items(), key=lambda kv: kv[1])) \
        + ("" if untiled_err is None else f"; trained untiled {untiled_err:.2f}%")
    return Claim("reduction", paper, measured, verdict,
                 f"holds if every other reduced net's error exceeds random's by > {Z:g} se; does not hold if one "
                 f"is as low", {"random": rnd, "others": dict(others), "se": se, "untiled": untiled_err})


def comparison_snr(snrs: Sequence[float], base_accuracy: Sequence[float], threshold: float = 33.0) -> float:
    """The SNR (dB) at which the attacks are compared: ``threshold`` (the paper's 33 dB,
    the threshold of human perception on CIFAR images), unless the untiled net keeps
    more than 90% there; then the SNR at which its FGSM accuracy falls to 50%
    (interpolated), where the attack has an effect to reduce. ``threshold`` if it never
    falls to 50% in the measured range."""
    import numpy as np

    s = np.asarray(snrs, dtype=float)
    a = np.asarray(base_accuracy, dtype=float)
    order = np.argsort(s)
    s, a = s[order], a[order]
    if s.size == 0 or not (s[0] <= threshold <= s[-1]) or float(np.interp(threshold, s, a)) <= 90.0:
        return threshold
    for i in range(s.size - 1, 0, -1):  # from the weakest attack down: the first crossing of 50%
        if a[i - 1] < 50.0 <= a[i]:
            return float(s[i - 1] + (50.0 - a[i - 1]) * (s[i] - s[i - 1]) / (a[i] - a[i - 1]))
    return threshold


def claim_fgsm(acc_random: float | None, n_random: int, acc_base: float | None, n_base: int,
               acc_enlarged: float | None = None, snr: float = 33.0, at_33: str = "") -> Claim:
    """Random tiling keeps more accuracy under FGSM at ``snr`` dB than the untiled net."""
    paper = ("Random tiling is more robust to FGSM than the untiled net (§3.6, Fig. 7: the gap to perfect "
             "robustness cut by 41% on CIFAR-10 at 33 dB).")
    if acc_random is None or acc_base is None:
        return _missing("fgsm", paper, "attacks on the random and untiled runs")
    d, se = acc_random - acc_base, se_pp(acc_random, n_random, acc_base, n_base)
    gap = d / (100.0 - acc_base) if acc_base < 100 else float("nan")
    verdict = HOLDS if d > Z * se else (NOT if d <= 0 else INCONCLUSIVE)
    measured = (f"accuracy at {snr:.1f} dB: random {acc_random:.2f}% vs untiled {acc_base:.2f}% ({d:+.2f} pp, "
                f"se {se:.2f}); " + ("gap reduction n/a" if math.isnan(gap) else f"gap reduction {100 * gap:.1f}%")
                + ("" if acc_enlarged is None else f"; enlarged {acc_enlarged:.2f}%") + (f". {at_33}" if at_33 else ""))
    return Claim("fgsm", paper, measured, verdict,
                 f"compared at 33 dB, or where the untiled net's accuracy falls to 50% if it keeps over 90% at 33 dB "
                 f"(see comparison_snr); holds if random - untiled > {Z:g} se; does not hold if <= 0",
                 {"random": acc_random, "untiled": acc_base, "diff": d, "se": se, "gap_reduction": gap, "snr_db": snr})


def claim_eot(acc_eot: float | None, n_random: int, acc_base: float | None, n_base: int,
              acc_fgsm: float | None, snr: float = 33.0) -> Claim:
    """How much of the FGSM gain survives EOT (gradients averaged over random draws)."""
    paper = "(check, not in the paper) The robustness of random tiling survives an EOT attack (Athalye et al. 2018)."
    if acc_eot is None or acc_base is None or acc_fgsm is None:
        return _missing("eot", paper, "EOT attack on the random run")
    d, se = acc_eot - acc_base, se_pp(acc_eot, n_random, acc_base, n_base)
    gain = acc_fgsm - acc_base
    kept = d / gain if gain > 0 else float("nan")
    verdict = HOLDS if d > Z * se else (NOT if d <= 0 else INCONCLUSIVE)
    measured = (f"accuracy at {snr:.1f} dB under EOT-FGSM: random {acc_eot:.2f}% vs untiled {acc_base:.2f}% "
                f"({d:+.2f} pp, se {se:.2f}); " + ("share of the FGSM gain kept: n/a (no gain)" if math.isnan(kept)
                                                    else f"share of the FGSM gain kept: {100 * kept:.0f}%"))
    return Claim("eot", paper, measured, verdict,
                 f"at the SNR of the FGSM claim; holds if random (EOT) - untiled > {Z:g} se; does not hold if <= 0",
                 {"random_eot": acc_eot, "untiled": acc_base, "diff": d, "se": se, "kept": kept, "snr_db": snr})
