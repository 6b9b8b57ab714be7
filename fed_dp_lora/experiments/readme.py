"""Generated README sections: a script's output replaces what sits between its markers."""

from __future__ import annotations

from pathlib import Path

from fed_dp_lora.files import write_atomic


def write_section(readme: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` with body."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} markers to write between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_atomic(readme, f"{head}{begin}\n{body}{end}{tail}".encode())
