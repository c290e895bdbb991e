"""Writing files so that nothing half-written is ever taken for whole, and nothing is left
behind: a write goes to `<path>.tmp-<pid>` and is renamed over `path` when complete; on any
failure (an exception, Ctrl-C, a full disk) the temporary file is removed. A process killed
outright cannot clean up, so `remove_stale_temporaries` removes the temporaries of processes
that no longer run (every writer calls it on the directory it writes to)."""
import contextlib
import errno
import glob
import hashlib
import os
import re
import tempfile
from typing import Dict, Iterator, List, Optional

_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


def temporary_path(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields the temporary path to write; renames it to `path` when the block succeeds,
    removes it when the block fails.

    The data reaches the disk before the rename, and the rename after it (fsync of the file,
    then of its directory): otherwise a power cut could leave `path` renamed but empty, the
    previous version already gone."""
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    # Some filesystems refuse to open or sync a directory: the file itself is safe by now.
    with contextlib.suppress(OSError):
        _fsync(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)


def sha256_of_file(path: str) -> str:
    """The file's SHA-256, hex (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str) -> Dict[str, object]:
    """What a cache's meta.json keeps of a file it wrote: its size and SHA-256."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_of_file(path)}


def file_problem(path: str, record: Dict[str, object]) -> Optional[str]:
    """None when the file at `path` is the one `record` (file_record) describes, else which
    check failed: "missing", "size" (truncated or partial) or "checksum" (corrupt). The size
    is checked first: it needs no read of the file."""
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) != record.get("bytes"):
        return "size"
    if sha256_of_file(path) != record.get("sha256"):
        return "checksum"
    return None


def check_can_write_in(directory: str) -> None:
    """An OSError unless a file could be written in `directory`, which is not created: its
    nearest existing ancestor must be a directory that takes a file (tried, and removed), so
    that a command refused later leaves no empty directories behind."""
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
    with tempfile.TemporaryFile(dir=existing):
        pass


def make_writable_dir(directory: str) -> None:
    """Create `directory` if needed and prove a file can be written there (OSError if not)."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove the `*.tmp-<pid>` files in `directory` whose writer no longer runs; returns
    their paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*.tmp-*")):
        match = _TEMPORARY.search(path)
        if match and not _running(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed
