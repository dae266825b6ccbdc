"""Whole-file writes past the page cache: exact content, fallback, errors that name the file."""

from __future__ import annotations

import errno
import os

import pytest

from lightsheet.io import direct
from lightsheet.io.direct import ALIGN, write_new_file
from tests.flows.test_faults import mounted_tmpfs


def payload(n: int) -> bytes:
    return bytes((i * 7 + n) % 251 for i in range(n))


@pytest.mark.parametrize("n", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 5 * ALIGN + 7, 3_000_001])
@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_file_holds_exactly_the_data(tmp_path, monkeypatch, n, mode):
    monkeypatch.setenv("LIGHTSHEET_DIRECT_IO", "1" if mode == "direct" else "0")
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * (n + 3 * ALIGN))  # a longer file is replaced, not overwritten
    write_new_file(path, payload(n))
    assert path.read_bytes() == payload(n)


def test_several_sizes_from_one_thread_reuse_its_buffer(tmp_path):
    for i, n in enumerate([10 * ALIGN, 3, 40 * ALIGN + 1, 2 * ALIGN]):
        write_new_file(tmp_path / str(i), payload(n))
    for i, n in enumerate([10 * ALIGN, 3, 40 * ALIGN + 1, 2 * ALIGN]):
        assert (tmp_path / str(i)).read_bytes() == payload(n)


def test_file_system_refusing_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    # what open() does on a file system without O_DIRECT support (tmpfs before Linux 6.6)
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct, "_refused", set())
    monkeypatch.setattr(os, "open", refusing_open)
    write_new_file(tmp_path / "a", payload(ALIGN + 5))
    write_new_file(tmp_path / "b", payload(7))
    assert (tmp_path / "a").read_bytes() == payload(ALIGN + 5)
    assert (tmp_path / "b").read_bytes() == payload(7)
    assert str(tmp_path) in direct._refused  # asked once per folder, then remembered


def test_full_disk_raises_enospc_naming_the_file(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=1m") as folder:
        path = folder / "chunk"
        with pytest.raises(OSError) as info:
            write_new_file(path, payload(3 << 20))
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(path)
