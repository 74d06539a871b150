"""Durable atomic writes (kititans/files.py): the new file (or every file under a new folder) is fsynced
before the rename that commits it, the folder after it; importing the module leaves the umask alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kititans import files


@pytest.fixture
def events(monkeypatch):
    """('fsync', path) and ('replace', src, dst) in the order they happen."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced descriptors")
def test_a_file_and_its_folder_are_flushed_around_the_rename(tmp_path, events):
    target = tmp_path / "sub" / "latest"
    files.write_text(target, "step-00000010\n")
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target)]
    assert len(renames) == 1
    r, (_, tmp, _) = renames[0], events[renames[0]]
    assert ("fsync", tmp) in events[:r]  # the data is on disk before its name is
    assert ("fsync", str(target.parent)) in events[r + 1 :]  # the rename is on disk before write_text returns
    assert target.read_text() == "step-00000010\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced descriptors")
def test_a_folder_is_flushed_file_by_file_before_it_is_renamed(tmp_path, events):
    dest = tmp_path / "export"
    with files.atomic_path(dest) as tmp:
        (tmp / "inner").mkdir(parents=True)
        (tmp / "inner" / "a.bin").write_bytes(b"x" * 10)
        (tmp / "b.json").write_text("{}")
    r = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(dest))
    synced = {e[1] for e in events[:r] if e[0] == "fsync"}
    tmp_dir = events[r][1]
    assert {f"{tmp_dir}/inner/a.bin", f"{tmp_dir}/b.json", f"{tmp_dir}/inner", tmp_dir} <= synced
    assert ("fsync", str(tmp_path)) in events[r + 1 :]
    assert (dest / "inner" / "a.bin").read_bytes() == b"x" * 10


def test_importing_files_never_sets_the_umask(tmp_path):
    code = (
        "import os, sys\n"
        "def umask(*a): raise AssertionError('os.umask called')\n"
        "os.umask = umask\n"
        "from kititans import files\n"
        f"files.write_text({str(tmp_path / 'f.txt')!r}, 'x')\n"
        f"print(oct(os.stat({str(tmp_path / 'f.txt')!r}).st_mode & 0o777), oct(files.process_umask()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr
    mode, umask = (int(v, 8) for v in r.stdout.split())
    assert mode == 0o666 & ~umask  # what a plain open() gives, not a temp file's 0600
