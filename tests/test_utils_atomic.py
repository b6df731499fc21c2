"""mambaclinix.utils.atomic: whole files and folders or nothing, old content kept on failure."""

import json
import os

import numpy as np
import pytest

from mambaclinix.utils import (
    atomic_directory,
    atomic_path,
    atomic_write,
    write_json_atomic,
    write_text_atomic,
)


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_text_and_json_round_trip(tmp_path):
    write_text_atomic(tmp_path / "a" / "x.txt", "hello")
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    write_json_atomic(tmp_path / "y.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "y.json").read_text()) == {"k": [1, 2]}
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "a") == []


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("new, half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_atomic_path_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    seen = []
    with atomic_path(tmp_path / "seg.nii.gz") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert seen[0].startswith(".seg.nii.gz.tmp-") and seen[0].endswith(".nii.gz")
    with atomic_path(tmp_path / "arr.npy") as tmp:
        np.save(tmp, np.arange(3))
    assert np.load(tmp_path / "arr.npy").tolist() == [0, 1, 2]


def test_suffix_can_be_dropped(tmp_path):
    seen = []
    with atomic_write(tmp_path / "last.ckpt", "wb", suffix="") as f:
        seen.append(os.path.basename(f.name))
        f.write(b"x")
    assert seen[0].startswith(".last.ckpt.tmp-") and not seen[0].endswith(".ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == b"x" and _hidden(tmp_path) == []


def test_atomic_path_requires_the_writer_to_create_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not create"), atomic_path(tmp_path / "x.bin"):
        pass
    assert not (tmp_path / "x.bin").exists()


def test_fsync_calls_cover_file_and_folder(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    write_text_atomic(tmp_path / "z.txt", "z")
    assert len(calls) >= 2  # the temporary file, then the folder


def test_directory_appears_whole(tmp_path):
    dest = tmp_path / "entry"
    with atomic_directory(dest) as tmp:
        (tmp / "a.npy").write_bytes(b"1")
        assert not dest.exists()
    assert (dest / "a.npy").read_bytes() == b"1"
    assert _hidden(tmp_path) == []


def test_directory_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt), atomic_directory(dest) as tmp:
        (tmp / "a").write_text("partial")
        raise KeyboardInterrupt
    assert not dest.exists() and _hidden(tmp_path) == []


def test_directory_refuses_non_empty_destination_unless_replace(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"), atomic_directory(dest) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["old"]
    with atomic_directory(dest, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert _hidden(tmp_path) == []


def test_directory_concurrent_writer_kept_when_exists_ok(tmp_path):
    dest = tmp_path / "d"
    with atomic_directory(dest, exists_ok=lambda p: (p / "done").is_file()) as tmp:
        (tmp / "mine").write_text("mine")
        dest.mkdir()  # another process finished first
        (dest / "done").write_text("theirs")
    assert sorted(p.name for p in dest.iterdir()) == ["done"]
    assert _hidden(tmp_path) == []


def test_empty_destination_folder_is_replaced(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    with atomic_directory(dest) as tmp:
        (tmp / "f").write_text("f")
    assert (dest / "f").read_text() == "f"
