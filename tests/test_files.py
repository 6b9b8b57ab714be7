"""Durable writes: a failed write leaves the old file or folder, never a torn one or a stray sibling."""

from __future__ import annotations

import pytest

from fed_dp_lora.files import write_atomic, write_dir_atomic


def test_a_failed_file_write_keeps_the_old_content(tmp_path):
    path = write_atomic(tmp_path / "summary.json", b"old")

    def half(handle):
        handle.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert write_atomic(path, b"new").read_bytes() == b"new"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "round-1"

    def adapter(value: str):
        def fill(target):
            target.mkdir()
            (target / "adapter_config.json").write_text(value)
            (target / "adapter_model.safetensors").write_text(value)
        return fill

    write_dir_atomic(folder, adapter("one"))
    write_dir_atomic(folder, adapter("two"))  # over an existing folder
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"adapter_config.json": "two",
                                                                  "adapter_model.safetensors": "two"}

    def crash(target):
        target.mkdir()
        (target / "adapter_config.json").write_text("three")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        write_dir_atomic(folder, crash)
    assert (folder / "adapter_config.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1"]
