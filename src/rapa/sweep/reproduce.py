"""``rapa reproduce --quick``: a reduced battery on Fashion-MNIST and the paper's claims with verdicts.

The ``quick`` experiment (every tiling scheme of Table 1 and the enlarged untiled net,
floating point) is swept on Ray, then the analyses run on the finished nets: majority
voting (per image, against one pass), filter similarity, reduction to one kernel per
layer, and FGSM / EOT-FGSM robustness. ``REPORT.md`` puts each claim of the paper next to
what was measured, with a verdict computed by the rules of :mod:`rapa.sweep.claims`,
followed by the tables and figures of :mod:`rapa.sweep.report`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from rapa.errors import RapaError
from rapa.sweep import claims as C
from rapa.sweep.report import build_report
from rapa.sweep.runs import Analyses, RunRecord, collect_runs, scheme_label

__all__ = ["QUICK_EXPERIMENT", "analysis_jobs", "evaluate_claims", "reproduce_quick", "run_analyses",
           "write_claims_report"]

QUICK_EXPERIMENT = "quick"
_TILED = ("random", "random fixed", "alternate", "image w/overlap", "image w/pad")


def _best(records: Sequence[RunRecord], label: str) -> RunRecord | None:
    done = [r for r in records if r.finished and scheme_label(r.config) == label
            and r.summary.get("best5_test_error") is not None]
    return min(done, key=lambda r: r.summary["best5_test_error"]) if done else None


def _err(rec: RunRecord | None) -> float | None:
    return None if rec is None else 100.0 * rec.summary["best5_test_error"]


def _rates(records: Sequence[RunRecord]) -> str:
    untiled = sorted({r.config.resolved_lr() for r in records if r.config.scheme == "none"})
    tiled = sorted({r.config.resolved_lr() for r in records if r.config.scheme != "none"})
    return " / ".join(f"{','.join(f'{v:g}' for v in vals)} {kind}" for kind, vals in
                      (("untiled", untiled), ("tiled", tiled)) if vals)


def evaluate_claims(records: Sequence[RunRecord], analyses: Analyses) -> list[C.Claim]:
    """Every claim, from the finished FP runs of one dataset in ``records`` (computing the
    analyses it needs through ``analyses``)."""
    from rapa.analysis.attack import HUMAN_THRESHOLD_DB, accuracy_at

    runs = {label: _best(records, label) for label in
            ("no tiling", "no tiling enlarged", "perforated") + _TILED}
    any_run = next((r for r in runs.values() if r is not None), None)
    n = len(analyses.dataset(any_run.config, "test", any_run.config.limit_test)) if any_run else 0
    err = {k: _err(r) for k, r in runs.items()}
    out = [C.claim_close_or_better(err["random"], err["no tiling"], n, err["no tiling enlarged"]),
           C.claim_random_best({k: err[k] for k in ("perforated",) + _TILED}, n)]

    vote = analyses.voting(runs["random"]) if runs["random"] else None
    if vote is None:
        out.append(C.claim_voting(None, None))
    else:
        out.append(C.claim_voting(vote["single_error"], vote["vote_error"], vote["only_single_right"],
                                  vote["only_vote_right"], vote["images"]))
    out.append(C.claim_perforated(err["perforated"], err["random"], n, err["no tiling"]))

    sims = {}
    for label in _TILED:
        s = analyses.similarity(runs[label]) if runs[label] else None
        sims[label] = None if s is None else s["overall"]
    out.append(C.claim_similarity(sims))

    reduced = {}
    for label in _TILED:
        r = analyses.reduction(runs[label]) if runs[label] else None
        reduced[label] = None if r is None else r["best_error"]
    out.append(C.claim_reduction(reduced, n, err["no tiling"]))

    curves = {k: analyses.robustness(runs[k]) if runs[k] else None
              for k in ("random", "no tiling", "no tiling enlarged")}

    base = curves["no tiling"]
    snr = HUMAN_THRESHOLD_DB if base is None else C.comparison_snr(base["snr_db"], base["accuracy"]["fgsm"],
                                                                   HUMAN_THRESHOLD_DB)

    def at(key: str, attack: str, where: float = snr) -> float | None:
        c = curves[key]
        return None if c is None or attack not in c["accuracy"] else accuracy_at(c["snr_db"], c["accuracy"][attack],
                                                                                 where)

    def correct(key: str) -> int:
        return 0 if curves[key] is None else int(curves[key]["correct"])

    at_33 = ""
    if snr != HUMAN_THRESHOLD_DB and at("random", "fgsm", HUMAN_THRESHOLD_DB) is not None:
        at_33 = (f"At {HUMAN_THRESHOLD_DB:g} dB: random {at('random', 'fgsm', HUMAN_THRESHOLD_DB):.2f}%, untiled "
                 f"{at('no tiling', 'fgsm', HUMAN_THRESHOLD_DB):.2f}%")
    out.append(C.claim_fgsm(at("random", "fgsm"), correct("random"), at("no tiling", "fgsm"), correct("no tiling"),
                            at("no tiling enlarged", "fgsm"), snr, at_33))
    out.append(C.claim_eot(at("random", "fgsm_eot"), correct("random"), at("no tiling", "fgsm"), correct("no tiling"),
                           at("random", "fgsm"), snr))
    return out


def write_claims_report(path: Path, claims: Sequence[C.Claim], header: Sequence[str], tables_md: str,
                        report_rel: str) -> None:
    """REPORT.md: the claims with verdicts, the rules, then the tables (figure links made relative)."""
    lines = list(header) + ["", "## Claims of the paper and what was measured", "",
                            "| # | the paper | measured here | verdict |", "|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c.paper} | {c.measured} | **{c.verdict}** |")
    lines += ["", "Verdict rules (se: binomial standard error of the difference, in percentage points):", ""]
    lines += [f"{i}. {c.key}: {c.rule}." for i, c in enumerate(claims, 1)]
    body = tables_md.replace("](", f"]({report_rel}/").replace("# Results of", "## Tables and figures:")
    lines += ["", body]
    path.write_text("\n".join(lines).rstrip() + "\n")


def _analyse(kind: str, rec: RunRecord, options: dict[str, Any], cpus: float) -> str:
    """Body of a Ray task: one analysis of one run, cached in its run directory."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    getattr(Analyses(**options), kind)(rec)
    return f"{kind} of {rec.name}"


def analysis_jobs(records: Sequence[RunRecord]) -> list[tuple[str, RunRecord]]:
    """The expensive analyses the claims and the report need, longest first."""
    runs = {label: _best(records, label) for label in ("no tiling", "no tiling enlarged") + _TILED}
    jobs = [("robustness", runs["random"]), ("robustness", runs["no tiling enlarged"])]
    jobs += [("reduction", runs[label]) for label in _TILED]
    jobs += [("voting", runs["random"]), ("robustness", runs["no tiling"])]
    return [(kind, rec) for kind, rec in jobs if rec is not None]


def run_analyses(jobs: Sequence[tuple[str, RunRecord]], options: dict[str, Any], cpus: float = 1,
                 gpus: float = 0, log: Callable[[str], None] | None = None) -> None:
    """Compute ``jobs`` as Ray tasks (Ray must be initialised); their results land in the
    run directories' caches. A failed job is logged and left to the caller."""
    import ray

    say = log or (lambda msg: None)
    remote = ray.remote(_analyse).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    pending = {remote.remote(kind, rec, options, cpus): f"{kind} of {rec.name}" for kind, rec in jobs}
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            what = pending.pop(ref)
            done += 1
            try:
                ray.get(ref)
                say(f"[{done}/{len(jobs)} analyses] done {what}")
            except Exception as exc:  # noqa: BLE001 - any failure: the claim becomes "not measured"
                say(f"[{done}/{len(jobs)} analyses] FAILED {what}: {type(exc).__name__}: "
                    f"{str(getattr(exc, 'cause', exc)).strip().splitlines()[-1:]}")


def reproduce_quick(out: str | Path, budget: dict[str, Any] | None = None, data_dir: str | None = None,
                    sweep_options: dict[str, Any] | None = None, attack_limit: int | None = 5000,
                    eot: int = 8, device: str = "auto", log: Callable[[str], None] | None = None) -> Path:
    """Sweep the quick battery into ``out``, analyse it and write ``out/REPORT.md`` (returned).

    ``budget``: knobs of :func:`rapa.sweep.experiments.apply_budget`; ``sweep_options``:
    keyword arguments of :func:`rapa.sweep.runner.run_sweep` (address, cpus_per_trial, ...);
    ``attack_limit``: test images attacked (and voted on) per net. The expensive analyses
    run as Ray tasks next to each other, like the runs.
    """
    import dataclasses

    import ray

    from rapa.config import resolve_device
    from rapa.sweep.experiments import apply_budget, load_experiment
    from rapa.sweep.runner import connect, run_sweep

    say = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    opts = dict(sweep_options or {})
    exp = load_experiment(QUICK_EXPERIMENT)
    runs = apply_budget(exp.runs, **(budget or {}))
    if data_dir is not None:
        runs = [dataclasses.replace(r, config=dataclasses.replace(r.config, data_dir=data_dir)) for r in runs]
    options: dict[str, Any] = dict(device=device, attack_limit=attack_limit, eot=eot)
    t0 = time.perf_counter()
    started = connect(opts.get("address"), opts.pop("num_cpus", None))
    try:
        result = run_sweep(runs, out, experiment=QUICK_EXPERIMENT, log=say,
                           info={"description": exp.description, "budget": budget or {}}, **opts)
        t_sweep = time.perf_counter() - t0
        names = {r.name for r in runs}
        records = [r for r in collect_runs(out) if r.name in names]
        if not any(r.finished for r in records):
            raise RapaError(f"no run of the quick battery finished (see {out}/sweep-{QUICK_EXPERIMENT}.json)")
        datasets = {r.config.dataset for r in records}
        if len(datasets) != 1:
            raise RapaError(f"the quick battery must be on one dataset, got {', '.join(sorted(datasets))}")
        cached = Analyses(compute=False, **options)
        jobs = [(kind, rec) for kind, rec in analysis_jobs(records) if getattr(cached, kind)(rec) is None]
        say(f"reproduce: {len(jobs)} analyses (voting, reduction, FGSM/EOT) on Ray")
        run_analyses(jobs, options, opts.get("cpus_per_trial", 1), opts.get("gpus_per_trial", 0), say)
    finally:
        if started:
            ray.shutdown()
    analyses = Analyses(**{**options, "device": str(resolve_device(device))}, log=lambda msg: say(msg.strip()))
    claims = evaluate_claims(records, analyses)
    report = build_report(out, out / "report", analyses, log=say)
    t_total = time.perf_counter() - t0

    first = next(r for r in records if r.finished)
    speeds = [float(r.summary["images_per_s"]) for r in records if r.summary and r.summary.get("images_per_s")]
    header = [f"# RAPA-ConvNets: quick reproduction on {first.config.dataset}", "",
              f"{len(runs)} runs ({result.count('done')} trained now, {result.count('skipped')} finished before, "
              f"{result.count('failed')} failed); {first.config.epochs} epochs, "
              f"{first.config.limit_train or 'all'} training and {first.config.limit_test or 'all'} test images, "
              f"minibatch {first.config.batch_size}, learning rate {_rates(records)}, {first.config.warmup_epochs} "
              f"warm-up epochs, x{first.config.gamma:g} every {first.config.lr_step} epochs, "
              f"{first.config.augment} augmentation, {first.config.pooling} pooling, tiles (16,4,1). "
              f"Voting and attacks on the first {attack_limit or 'all'} test images.",
              f"Time: sweep {t_sweep / 60:.1f} min, analyses {(t_total - t_sweep) / 60:.1f} min"
              + (f"; training {min(speeds):.0f}-{max(speeds):.0f} images/s per run" if speeds else "") + "."]
    for r in result.failed:
        header.append(f"Failed: `{r.name}`: {r.error}")
    path = out / "REPORT.md"
    write_claims_report(path, claims, header, report.markdown, "report")
    from rapa.analysis.common import json_safe

    (out / "claims.json").write_text(json.dumps(json_safe([asdict(c) for c in claims]), indent=1) + "\n")
    for c in claims:
        say(f"  {c.verdict:>14}: {c.paper}")
    return path
