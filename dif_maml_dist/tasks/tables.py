"""Tables read from CSV files for the table family (``tasks.table_tasks``): named columns picked out, every cell
checked, each mistake a ``ValueError`` naming the file (and line and column for a cell).

A file is UTF-8 text (with or without a byte-order mark): a header of column names, then one row per example; blank
lines are skipped and columns without a name (a spreadsheet's trailing comma) are not read. Read with the standard
library's ``csv`` module, so that a mistake can be named by line: no pandas, and no Parquet (it would need pyarrow).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

LAYOUT = "one CSV per task: a header of column names, then one row per example"


@dataclass(frozen=True)
class Table:
    """One file's rows: ``x`` float64 ``[rows, features]``; ``y`` float64 targets (regression) or int64 indices
    into ``labels`` (classification, the file's labels sorted); ``query``: a user's episode file's query rows."""

    path: Path
    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...] = ()
    query: Optional[np.ndarray] = None


def csv_files(folder: Path) -> list[Path]:
    """The ``*.csv`` files of ``folder``, sorted (``ValueError`` naming ``folder`` when it holds none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'} ({LAYOUT})")
    try:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() == ".csv" and not p.name.startswith("."))
    except OSError as err:
        raise ValueError(f"{folder} cannot be read ({err.strerror})") from None
    if not files:
        raise ValueError(f"{folder} holds no .csv files ({LAYOUT})")
    return files


def header(path: Path) -> list[str]:
    """The column names of ``path``'s first line (``ValueError`` naming the file); a column without a name (a
    spreadsheet's trailing comma) is ``""``, and is never read."""
    with _opened(path) as f:
        try:
            names = next(csv.reader(f), None)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text; save it as CSV UTF-8") from None
    if not names:
        raise ValueError(f"{path} is empty ({LAYOUT})")
    names = [n.strip() for n in names]
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path} names column {repeated[0]!r} twice in its header")
    return names


def _opened(path: Path):
    try:
        return open(path, newline="", encoding="utf-8-sig")  # -sig: spreadsheets' "CSV UTF-8" starts with a BOM
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror})") from None


def _number(cell: str, path: Path, line: int, column: str, hint: str = "") -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # float() also takes "nan", "inf" and overflows such as 1e400
        raise ValueError(f"{path}:{line}: column {column!r} holds {cell!r}, not a finite number{hint}")
    return value


def read_table(path: Path, features: Sequence[str], target: str, classification: bool,
               exact: bool = False, split: Optional[str] = None) -> Table:
    """``path``'s ``features`` and ``target`` columns (other columns ignored, or refused when ``exact``: the
    features were taken from another file's header), and with ``split`` the rows whose ``split`` column says
    query. ``ValueError`` naming the file, and line and column for a cell."""
    names = header(path)
    wanted = {**{c: "task.features" for c in features}, target: "task.target",
              **({split: "support or query"} if split else {})}
    missing = [f"{c!r} ({why})" for c, why in wanted.items() if c not in names]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(missing)}; its columns are: "
                         f"{', '.join(n for n in names if n)}")
    extra = [c for c in names if c and c not in wanted]
    if exact and extra:
        raise ValueError(f"{path} has column {', '.join(map(repr, extra))} that the other files lack: name the "
                         f"feature columns to use with task.features=[...]")
    cols, ycol = [names.index(c) for c in features], names.index(target)
    xs: list[list[float]] = []
    ys: list = []
    query: list[bool] = []
    with _opened(path) as f:
        reader = csv.reader(f)
        try:
            next(reader)
            for row in reader:
                if not any(cell.strip() for cell in row):  # blank lines, e.g. a trailing one
                    continue
                line = reader.line_num
                if len(row) != len(names):
                    raise ValueError(f"{path}:{line}: {len(row)} fields, but the header names {len(names)} columns")
                xs.append([_number(row[c], path, line, names[c]) for c in cols])
                if split:
                    part = row[names.index(split)].strip()
                    if part not in ("support", "query"):
                        raise ValueError(f"{path}:{line}: column {split!r} must be support or query, got {part!r}")
                    query.append(part == "query")
                if classification:
                    label = row[ycol].strip()
                    if not label:
                        raise ValueError(f"{path}:{line}: column {target!r} is empty; every row needs a label")
                    ys.append(label)
                else:
                    ys.append(_number(row[ycol], path, line, target,
                                      " (for a target of labels set task.target_type=classification)"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text; save it as CSV UTF-8") from None
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: {err}") from None
    x = np.array(xs, dtype=np.float64).reshape(len(xs), len(features))
    query_rows = np.array(query, dtype=bool) if split else None
    if not classification:
        return Table(path, x, np.array(ys, dtype=np.float64), (), query_rows)
    labels, codes = np.unique(np.array(ys, dtype=str), return_inverse=True)
    return Table(path, x, codes.astype(np.int64).reshape(-1), tuple(labels.tolist()), query_rows)


def standardised(tables: Sequence[Table], mean: np.ndarray, std: np.ndarray) -> list[Table]:
    return [Table(t.path, (t.x - mean) / std, t.y, t.labels, t.query) for t in tables]


def column_stats(tables: Sequence[Table]) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's mean and standard deviation over every row of ``tables`` (a constant column: deviation 1,
    so that it is only centred)."""
    x = np.concatenate([t.x for t in tables])
    std = x.std(axis=0)
    return x.mean(axis=0), np.where(std > 0, std, 1.0)
