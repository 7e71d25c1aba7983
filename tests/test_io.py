"""The file-system seams of io.py: atomic writes and directory swaps leave nothing behind."""

import os
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
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path, b"new")  # written, then refused by the rename
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_output_file_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RQAEError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(RQAEError, match="is a file, not a directory"):
        check_output_file(tmp_path / "f" / "deeper" / "out.json")
    check_output_file(tmp_path / "new" / "deeper" / "out.json")


def test_staging_removes_what_a_killed_builder_left_and_keeps_a_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    out = tmp_path / "dash"
    for name in (f".dash.tmp{dead}", f".dash.old{dead}", ".dash.tmp1", f".dashboard.tmp{dead}"):
        (tmp_path / name).mkdir()
    tmp = staging_dir(out)
    (tmp / "index.html").write_text("new")
    swap_in(tmp, out)
    # pid 1 is alive; `.dashboard.*` belongs to another output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dash.tmp1", f".dashboard.tmp{dead}", "dash"]
    assert (out / "index.html").read_text() == "new" and os.getpid() != int(dead)
