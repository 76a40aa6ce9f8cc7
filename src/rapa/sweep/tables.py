"""The paper's Tables 1-3 from the runs of a sweep folder (Markdown and CSV).

* Table 1: best test (train) error [%] per scheme (rows) and dataset x FP/RPU (columns),
  with the 9-vote error of the randomly tiled nets; max pooling, no strong augmentation.
* Table 2: best test error [%] with strong augmentation per scheme and dataset x pooling,
  with a ``random voting`` row.
* Table 3: test error [%] of the tiled nets reduced to one kernel per layer, best over the
  filter selection methods (which one in brackets); per-method errors in table3.csv.

A cell of a known run that has not finished (or a row the paper has but the folder
lacks) reads ``–``. Where a cell has several runs (seeds, learning rates) the best one is
shown, as in the paper.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rapa.analysis.reduce import METHODS
from rapa.models import PAPER_TILES
from rapa.sweep.analyses import Analyses
from rapa.sweep.runs import DATASET_LABELS, RunRecord, dataset_label, fmt_pct, precision, scheme_label

__all__ = ["MISSING", "POOL_ORDER", "TABLE_ROWS", "Table", "table1", "table2", "table3"]

MISSING = "–"
"""What a missing cell reads."""
TABLE_ROWS = ("no tiling", "no tiling enlarged", "perforated", "image w/overlap", "image w/pad", "alternate",
              "random fixed", "random")
"""The rows of Tables 1 and 2, in the paper's order."""
POOL_ORDER = ("max", "avg", "stochastic", "mixed")
DATASET_ORDER = tuple(DATASET_LABELS)
TILED_ROWS = ("image w/overlap", "image w/pad", "alternate", "random fixed", "random")


@dataclass
class Table:
    """A table: Markdown for people, CSV records for programs."""

    name: str
    """File stem (``table1``)."""
    title: str
    """Caption."""
    header: list[str]
    """Column labels, the row label's first."""
    rows: list[list[str]]
    """Cells as text."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """One dict per cell or run, for the CSV."""
    notes: list[str] = field(default_factory=list)
    """Lines printed under the table."""

    def markdown(self) -> str:
        """The table as GitHub Markdown, caption and notes included."""
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + self.notes
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str | Path) -> None:
        """The records as CSV (empty fields where a value is missing)."""
        keys: list[str] = []
        for rec in self.records:
            keys += [k for k in rec if k not in keys]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, keys, lineterminator="\n")
            writer.writeheader()
            for rec in self.records:
                writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                                 for k, v in rec.items()})


# --------------------------------------------------------------------------- helpers


def pct_of(summary: dict[str, Any] | None, key: str) -> float | None:
    value = None if summary is None else summary.get(key)
    return None if value is None else 100.0 * float(value)


def best_run(records: Iterable[RunRecord]) -> RunRecord | None:
    """The finished run with the lowest best-5-epoch test error."""
    done = [r for r in records if r.summary is not None and r.summary.get("best5_test_error") is not None]
    return min(done, key=lambda r: r.summary["best5_test_error"]) if done else None  # type: ignore[index]


def _paper_tiles(rec: RunRecord) -> bool:
    return rec.config.scheme == "none" or rec.config.tiles is None or tuple(rec.config.tiles) == tuple(PAPER_TILES)


def dataset_key(ds: str) -> int:
    return DATASET_ORDER.index(ds) if ds in DATASET_ORDER else len(DATASET_ORDER)


def table_rows(labels: Iterable[str], standard: Sequence[str]) -> list[str]:
    labels = set(labels)
    return list(standard) + sorted(labels - set(standard))


def _votes_row(label: str) -> bool:
    """Whether a row's nets evaluate randomly (random tiling), so that voting applies."""
    return label == "random" or (label.startswith("random ") and not label.startswith("random fixed"))


def column_key(rec: RunRecord) -> tuple[int, str, int]:
    return (dataset_key(rec.config.dataset), dataset_label(rec.config), POOL_ORDER.index(rec.config.pooling)
            if rec.config.pooling in POOL_ORDER else 9)


# ----------------------------------------------------------------------------- tables


def table1(records: Sequence[RunRecord]) -> Table | None:
    """Table 1: best test (train) error per scheme; columns dataset x FP/RPU, each with a vote column."""
    sel = [r for r in records if r.config.augment != "strong" and r.config.pooling == "max" and _paper_tiles(r)]
    if not sel:
        return None
    cols = sorted({(r.config.dataset, precision(r.config)) for r in sel},
                  key=lambda c: (dataset_key(c[0]), c[1] != "FP", c))
    header = ["scheme"]
    for ds, prec in cols:
        header += [f"{DATASET_LABELS.get(ds, ds)} {prec}", "final: one pass / vote"]
    table = Table("table1", "Table 1: best test (train) error [%], 5-epoch average", header, [])
    for row in table_rows((scheme_label(r.config) for r in sel), TABLE_ROWS):
        cells = [row]
        for ds, prec in cols:
            group = [r for r in sel if scheme_label(r.config) == row and r.config.dataset == ds
                     and precision(r.config) == prec]
            best = best_run(group)
            s = best.summary if best else None
            test, train = pct_of(s, "best5_test_error"), pct_of(s, "best5_train_error")
            voting = _votes_row(row)
            vote = pct_of(s, "vote_test_error") if voting else None
            final = pct_of(s, "final_test_error") if voting else None
            cells.append(MISSING if test is None else f"{test:.2f} ({fmt_pct(train)})")
            cells.append(("" if not voting else MISSING if final is None and vote is None
                          else f"{fmt_pct(final)} / {fmt_pct(vote)}"))
            table.records.append({"scheme": row, "dataset": ds, "precision": prec, "test_error": test,
                                  "train_error": train, "final_test_error": final, "vote_test_error": vote,
                                  "runs": sum(r.finished for r in group), "best_run": best.name if best else None})
        table.rows.append(cells)
    table.notes = ["Cells: best test error over 5 consecutive epochs (train error of the same epochs); "
                   "final: the final net's test error, one pass / 9-vote majority, both on the same net (random "
                   "tiling only; the 5-epoch average is of single passes over earlier nets). "
                   f"{MISSING}: no finished run. RPU: simulated analog arrays (an analog preset other than ideal)."]
    return table


def table2(records: Sequence[RunRecord]) -> Table | None:
    """Table 2: best test error with strong augmentation per scheme; columns dataset x pooling."""
    sel = [r for r in records if r.config.augment == "strong" and precision(r.config) == "FP" and _paper_tiles(r)]
    if not sel:
        return None
    cols = sorted({(r.config.dataset, r.config.pooling) for r in sel},
                  key=lambda c: (dataset_key(c[0]), POOL_ORDER.index(c[1]) if c[1] in POOL_ORDER else 9))
    header = ["scheme"] + [f"{DATASET_LABELS.get(ds, ds)}+ {pool}" for ds, pool in cols]
    table = Table("table2", "Table 2: best test error [%] with strong augmentation, by pooling", header, [])
    rows = table_rows((scheme_label(r.config) for r in sel), TABLE_ROWS)
    for row in rows + ["random voting"]:
        cells = [row]
        for ds, pool in cols:
            in_col = [r for r in sel if r.config.dataset == ds and r.config.pooling == pool]
            if row == "random voting":
                group = [r for r in in_col if scheme_label(r.config) == "random"]
                votes = [pct_of(r.summary, "vote_test_error") for r in group if r.finished]
                value = min((v for v in votes if v is not None), default=None)
                best_name = None
            else:
                group = [r for r in in_col if scheme_label(r.config) == row]
                best = best_run(group)
                value, best_name = pct_of(best.summary if best else None, "best5_test_error"), best and best.name
            cells.append(fmt_pct(value))
            table.records.append({"scheme": row, "dataset": ds, "pooling": pool, "test_error": value,
                                  "runs": sum(r.finished for r in group), "best_run": best_name})
        table.rows.append(cells)
    table.notes = [f"Best test error over 5 consecutive epochs; random voting: 9-vote majority error. {MISSING}: "
                   "no finished run."]
    return table


def table3(records: Sequence[RunRecord], analyses: Analyses) -> Table | None:
    """Table 3: error of the tiled nets reduced to one kernel per layer (best method), per dataset x pooling."""
    sel = [r for r in records if precision(r.config) == "FP" and r.config.analog is None
           and r.config.scheme not in ("none", "perforated") and r.config.tiles is not None]
    if not sel:
        return None
    cols = sorted({column_key(r) for r in sel})
    header = ["scheme"] + [f"{label} {POOL_ORDER[p] if p < len(POOL_ORDER) else '?'}" for _, label, p in cols]
    table = Table("table3", "Table 3: test error [%] after reduction to one kernel per layer (best method)",
                  header, [])
    for rec in sel:  # one CSV line per run, every method
        res = analyses.reduction(rec)
        methods = (res or {}).get("methods", {})
        table.records.append({"run": rec.name, "scheme": scheme_label(rec.config), "dataset": rec.config.dataset,
                              "augment": rec.config.augment, "pooling": rec.config.pooling,
                              "tiled_error": (res or {}).get("tiled_error"),
                              **{m: methods.get(m) for m in METHODS},
                              "best_method": (res or {}).get("best_method"),
                              "best_error": (res or {}).get("best_error")})
    by_run = {t["run"]: t for t in table.records}
    untiled = [r for r in records if precision(r.config) == "FP" and r.config.scheme == "none"
               and scheme_label(r.config) == "no tiling"]
    for row in table_rows((scheme_label(r.config) for r in sel), TILED_ROWS) + ["no tiling (trained)"]:
        cells = [row]
        for col in cols:
            if row == "no tiling (trained)":
                trained = best_run(r for r in untiled if column_key(r) == col)
                cells.append(fmt_pct(pct_of(trained.summary if trained else None, "best5_test_error")))
                continue
            found = [by_run[r.name] for r in sel if scheme_label(r.config) == row and column_key(r) == col
                     and by_run[r.name]["best_error"] is not None]
            top = min(found, key=lambda t: t["best_error"]) if found else None
            cells.append(MISSING if top is None else f"{top['best_error']:.2f} ({top['best_method']})")
        table.rows.append(cells)
    table.notes = ["Reduced nets: per channel one tile's filter, chosen by the method in brackets (the best of "
                   + ", ".join(METHODS) + "); no tiling (trained): the untiled net's best test error for comparison. "
                   "Single evaluation pass on the test set; per-method errors in table3.csv."]
    return table
