from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from coffea_otcal.atomic import atomic_path, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_get_the_umask_permissions_not_mkstemp_ones(tmp_path: Path, umask_027):
    out = atomic_write_text(tmp_path / "sub" / "bundle.json", "{}")
    assert out.read_text() == "{}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # 0o666 & ~0o027 (mkstemp alone: 0o600)
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path):
    out = atomic_write_bytes(tmp_path / "store.parquet", b"old")

    def interrupted_write() -> None:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half-writ")
            msg = "disk full"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="disk full"):
        interrupted_write()
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.parquet"]


def test_the_temporary_name_keeps_a_suffix_for_writers_that_need_it(tmp_path: Path):
    with atomic_path(tmp_path / "a.npy", suffix=".npy", fsync=True) as tmp:
        assert tmp.suffix == ".npy"
        assert tmp.parent == tmp_path
        np.save(tmp, np.arange(4))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(4))
