"""Where an export may land: never over an existing folder, and nothing left behind by a failed write."""

from __future__ import annotations

import pytest

from diep_lightning.export_dir import atomic_directory


def test_export_never_overwrites_and_leaves_no_partial_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="export_dir"):
        with atomic_directory(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "new", overwrite=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "keep.txt").read_text() == "precious"
