#!/usr/bin/env python3
"""The hottest SASS instructions of an Nsight Compute source-page CSV.

    ncu -i prof.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 scripts/ncu_hot.py sass.csv [TOP]

A CSV holds one table per profiled launch (a header row naming "Source" then one row per
instruction). Per table: the TOP (default 40) instructions by warp-stall samples, with every
sample column that is non-zero on them, and the sample totals per column (the stall reasons of
the whole kernel). Unknown layouts are reported with their first lines, never silently skipped.
"""

import csv
import sys


def tables(lines):
    """(header, rows) per table: a table starts at a row whose cells include "Source"."""
    header, rows = None, []
    for row in csv.reader(lines):
        if "Source" in row:
            if header:
                yield header, rows
            header, rows = row, []
        elif header and len(row) == len(header):
            rows.append(row)
    if header:
        yield header, rows


def number(cell: str) -> float:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    found = False
    for index, (header, rows) in enumerate(tables(lines)):
        found = True
        source = header.index("Source")
        samples = [i for i, name in enumerate(header) if "Sampl" in name]
        if not samples:
            print(f"launch {index}: no sample columns in {header}")
            continue
        main_col = max(samples, key=lambda i: sum(number(r[i]) for r in rows))
        totals = {header[i]: sum(number(r[i]) for r in rows) for i in samples}
        print(f"==== launch {index}: {len(rows)} instructions, sorted by {header[main_col]!r}")
        print("totals:", {k: round(v) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
                          if v})
        for r in sorted(rows, key=lambda r: -number(r[main_col]))[:top]:
            cells = {header[i]: r[i] for i in samples if number(r[i])}
            print(f"{r[main_col]:>8s}  {r[source][:70]:70s} {cells}")
    if not found:
        print("no table with a 'Source' column; first lines:")
        print("\n".join(lines[:15]))


if __name__ == "__main__":
    main()
