"""The file-system seams of io.py: atomic writes and directory swaps leave nothing behind."""

import os
import socket
import subprocess
import sys

import pytest

from rqae_pipeline import RQAEError
from rqae_pipeline.io import atomic_torch_save, atomic_write_bytes, check_output_file, staging_dir, swap_in


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(AttributeError):
        atomic_torch_save(lambda: None, path)  # a lambda cannot be pickled: fails part way
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path / "d", b"new")  # written beside d, then refused by the rename
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


def test_an_output_file_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RQAEError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(RQAEError, match="is a file, not a directory"):
        check_output_file(tmp_path / "f" / "deeper" / "out.json")
    check_output_file(tmp_path / "new" / "deeper" / "out.json")
    with pytest.raises(RQAEError, match="cannot write .*File name too long"):  # an OSError, not a traceback
        check_output_file(tmp_path / ("x" * 300) / "out.json")


def test_staging_removes_what_a_killed_builder_on_this_host_left_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    out = tmp_path / "dash"
    orphan = f".dash.tmp{dead}.{host}"
    kept = [f".dash.old{dead}",  # a kill between swap_in's renames: the only copy of the old output
            f".dash.tmp1.{host}",  # pid 1 is alive
            f".dash.tmp{dead}.another-host",  # its pid means nothing here
            f".dashboard.tmp{dead}.{host}"]  # another output's
    for name in (orphan, *kept):
        (tmp_path / name).mkdir()
    tmp = staging_dir(out)
    (tmp / "index.html").write_text("new")
    swap_in(tmp, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "dash"])
    assert (out / "index.html").read_text() == "new" and os.getpid() != int(dead)
