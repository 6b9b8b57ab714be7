"""An institution's check of its own file before its SuperNode joins: run locally, seen only locally.

`scripts/deploy/supernode.sh` runs it, so a wrong column, a file with more records than declared,
or labels outside the declared set show up on the institution's terminal at start-up, with the
fix, instead of as a refused round later (where the server would see only a code).

    python -m fed_dp_lora.preflight --data FILE --records N [--labels good,bad]
        [--text-column text] [--label-column label] [--feature-columns A,B,...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fed_dp_lora.config import compose_config
from fed_dp_lora.data.sources import DataError, read_file, standardize


def check(
    data: str,
    records: int,
    labels: list[str] | None,
    text_column: str,
    label_column: str,
    feature_columns: Sequence[str] = (),
) -> str:
    """A one-line summary of the file; DataError (with the fix) if it cannot serve this node."""
    raw = read_file(data)  # once: an institution's file may be large
    absent = [c for c in feature_columns if c not in raw.columns]
    if absent:
        raise DataError(
            f"data file {data} has no column(s) {absent} that --feature-columns allows. "
            "Fix: add them to the file, or leave them out of --feature-columns"
        )
    overrides = ["data=file", f"data.text_column={text_column}", f"data.label_column={label_column}"]
    if labels:
        overrides.append(f"data.labels=[{','.join(labels)}]")
    cfg = compose_config(overrides)
    table = standardize(raw, cfg, f"data file {data}") if labels else raw
    if not labels and text_column not in table.columns:
        raise DataError(f"data file {data} has no column {text_column!r}. Fix: pass --text-column")
    usable = len(table)
    if usable > records:
        raise DataError(
            f"data file {data} holds {usable} usable records, more than --records {records}. "
            f"Fix: declare --records {usable} or more (the count you accept to make public)"
        )
    dropped = table.attrs.get("dropped", {})
    return f"{data}: {usable} usable records (declared {records})" + (f", dropped {dropped}" if dropped else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--labels", default="")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--feature-columns", default="")
    args = parser.parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] or None
    allowed = [x.strip() for x in args.feature_columns.split(",") if x.strip()]
    try:
        print(check(args.data, args.records, labels, args.text_column, args.label_column, allowed))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
