"""The reliability record: what each fault, bad-input family and intrusion test did, as a table.

Tests call `record(...)`; every row is kept in memory (the fault suite prints the table at the end
of the run) and, when RELIABILITY_REPORT names a file, appended to it as one JSON line. The file is
started afresh by the first record of each test run. `python -m tests.faults.report FILE` turns
such a file into the Markdown table that docs/reliability.md shows.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RECORDS: list[dict[str, Any]] = []
_started_files: set[Path] = set()


def record(
    family: str,
    tried: str,
    cases: int,
    statuses: Mapping[Any, int] | None = None,
    did: str = "",
    recovery_s: float | None = None,
) -> None:
    """Keep one row of the reliability table (and append it to RELIABILITY_REPORT if set)."""
    row: dict[str, Any] = {
        "family": family,
        "tried": tried,
        "cases": cases,
        "statuses": {str(k): v for k, v in sorted((statuses or {}).items(), key=_status_key)},
        "did": did,
        "recovery_s": None if recovery_s is None else round(recovery_s, 3),
    }
    RECORDS.append(row)
    target = os.environ.get("RELIABILITY_REPORT")
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if path in _started_files else "w"
        _started_files.add(path)
        with path.open(mode) as out:
            out.write(json.dumps(row) + "\n")


def status_counts(statuses: Iterable[int | None]) -> Counter[Any]:
    """Status codes counted; None (no HTTP answer at all) counts as "no answer"."""
    return Counter("no answer" if status is None else status for status in statuses)


def merged(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one family, tried thing and outcome added up (cases, status counts)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["family"], row["tried"], row["did"])
        if key not in out:
            out[key] = {**row, "statuses": dict(row["statuses"])}
            continue
        into = out[key]
        into["cases"] += row["cases"]
        for code, count in row["statuses"].items():
            into["statuses"][code] = into["statuses"].get(code, 0) + count
        into["statuses"] = dict(sorted(into["statuses"].items(), key=_status_key))
        if row["recovery_s"] is not None:
            into["recovery_s"] = max(into["recovery_s"] or 0.0, row["recovery_s"])
    return list(out.values())


def markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table: faults by number, then bad input, then intrusions."""
    lines = [
        "| Family | What was tried | Cases | Status codes seen | What the service did | Recovery |",
        "| --- | --- | ---: | --- | --- | ---: |",
    ]
    for row in sorted(merged(rows), key=_family_key):
        statuses = ", ".join(f"{code}: {count}" for code, count in row["statuses"].items())
        recovery = "" if row["recovery_s"] is None else f"{row['recovery_s']:.2f} s"
        cells = [row["family"], row["tried"], str(row["cases"]), statuses, row["did"], recovery]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a RELIABILITY_REPORT file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _family_key(row: Mapping[str, Any]) -> tuple[int, str]:
    family = str(row["family"])
    for rank, prefix in enumerate(("Fault", "Bad input", "Intrusion")):
        if family.startswith(prefix):
            return rank, family  # stable sort keeps the recorded order within a family
    return 3, family


def _status_key(item: tuple[Any, int]) -> tuple[int, str]:
    code = str(item[0])
    return (0, code.zfill(3)) if code.isdigit() else (1, code)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.faults.report RELIABILITY_JSONL")
    print(markdown(read_jsonl(Path(sys.argv[1]))))
