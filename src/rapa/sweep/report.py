"""``rapa report``: the paper's tables (Markdown, CSV) and figures from the runs of a sweep folder.

Tables 1-3 (:mod:`rapa.sweep.tables`) and Figures 5, 6A, 7 (:mod:`rapa.sweep.figures`)
from whatever runs have finished, in one ``report.md`` with a CSV per table and the
figures as PNG files. The analyses they need (reduction, attacks, similarity) come from
:class:`rapa.sweep.analyses.Analyses`, which caches them in the run directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rapa.errors import RapaError
from rapa.rundir import CONFIG_FILE, holds_run
from rapa.sweep.analyses import Analyses
from rapa.sweep.figures import more_tiles_table, plot_similarity, robustness_table, similarity_table
from rapa.sweep.runs import RunRecord, collect_runs
from rapa.sweep.tables import MISSING, POOL_ORDER, TABLE_ROWS, Table, table1, table2, table3

__all__ = ["MISSING", "POOL_ORDER", "TABLE_ROWS", "Report", "Table", "build_report", "check_sweep_dir",
           "more_tiles_table",
           "robustness_table", "similarity_table", "table1", "table2", "table3"]


# ----------------------------------------------------------------------------- report


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    markdown: str
    """The whole report."""
    tables: dict[str, Table]
    """Tables by name (table1, table2, table3, fig5, fig6a, fig7)."""
    files: list[Path]
    """Files written."""
    records: list[RunRecord]
    """The runs it read."""


def check_sweep_dir(sweep_dir: str | Path) -> None:
    """RapaError unless ``sweep_dir`` is a folder holding a run directory (a folder with a
    ``config.json``) or a sweep state file (``sweep-*.json``): a report of nothing is an error."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise RapaError(f"no sweep folder {sweep_dir}")
    if any(holds_run(d) for d in root.iterdir()) or any(root.glob("sweep-*.json")):
        return
    hint = " (it is itself a run directory: give the folder above it)" if holds_run(root) else ""
    raise RapaError(f"{sweep_dir} holds no runs{hint}: expected run directories (folders with a {CONFIG_FILE}, "
                    f"as rapa train or rapa sweep --out {sweep_dir} write) or a sweep-*.json state file")


def build_report(sweep_dir: str | Path, out: str | Path | None = None, analyses: Analyses | None = None,
                 log: Callable[[str], None] | None = None) -> Report:
    """Tables and figures of the runs in ``sweep_dir``, written to ``out`` (default
    ``sweep_dir/report``): ``report.md``, ``table*.csv``, ``fig*.csv``, ``fig*.png``."""
    sweep_dir = Path(sweep_dir)
    check_sweep_dir(sweep_dir)
    records = collect_runs(sweep_dir)
    if not records:
        raise RapaError(f"no run in {sweep_dir} could be read (each config.json is invalid; "
                        f"`rapa eval RUN_DIR` on one of them says why)")
    out = Path(out) if out is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    analyses = analyses if analyses is not None else Analyses(log=log)
    say = log or (lambda msg: None)
    tables: dict[str, Table] = {}
    figures: dict[str, list[Path]] = {}
    for name, make in (("table1", lambda: table1(records)), ("table2", lambda: table2(records)),
                       ("table3", lambda: table3(records, analyses))):
        say(f"report: {name}")
        t = make()
        if t is not None:
            tables[name] = t
    say("report: figure 5")
    t = more_tiles_table(records, out / "fig5.png")
    if t is not None:
        tables["fig5"], figures["fig5"] = t, [out / "fig5.png"]
    say("report: figure 6A")
    t = similarity_table(records, analyses)
    if t is not None and any(c not in (MISSING, "") for row in t.rows for c in row[1:]):
        plot_similarity(t, out / "fig6a.png")
        tables["fig6a"], figures["fig6a"] = t, [out / "fig6a.png"]
    say("report: figure 7")
    t, paths = robustness_table(records, analyses, out)
    if t is not None:
        tables["fig7"], figures["fig7"] = t, paths

    files: list[Path] = []
    for name, t in tables.items():
        t.write_csv(out / f"{name}.csv")
        files.append(out / f"{name}.csv")
    done = sum(r.finished for r in records)
    failed = [r for r in records if r.status == "failed"]
    lines = [f"# Results of {sweep_dir}", "",
             f"{len(records)} runs: {done} finished, {sum(r.status == 'unfinished' for r in records)} unfinished, "
             f"{sum(r.status == 'pending' for r in records)} not started, {len(failed)} failed.", ""]
    for r in failed:
        lines.append(f"- failed: `{r.name}`: {r.error}")
    if failed:
        lines.append("")
    for name, t in tables.items():
        lines.append(t.markdown())
        for path in figures.get(name, []):
            lines += [f"![{path.stem}]({path.name})", ""]
    missing = [n for n in ("table1", "table2", "table3", "fig5", "fig6a", "fig7") if n not in tables]
    if missing:
        lines.append(f"Not in this folder (no runs of the kind): {', '.join(missing)}.")
    text = "\n".join(lines).rstrip() + "\n"
    (out / "report.md").write_text(text)
    files = [out / "report.md"] + files + [p for ps in figures.values() for p in ps]
    return Report(text, tables, files, records)
