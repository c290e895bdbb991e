"""occamnets.files.atomic_path: a write is whole or absent, and on disk before it counts."""
import os

import pytest

from occamnets import files


def test_a_completed_write_is_synced_before_it_replaces_the_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", str(destination)))
        real_replace(source, destination)
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    with files.atomic_path(str(target)) as tmp:
        with open(tmp, "w") as handle:
            handle.write("new")
    assert target.read_text() == "new"
    assert events == [("fsync", files.temporary_path(str(target))),
                      ("replace", str(target)), ("fsync", str(tmp_path))], events


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]
