"""Atomic output: a file or folder appears whole or not at all (SPEC 4, 7).

A full disk (or quota) while writing is reported as one :class:`KaryoError` line naming the
folder, how much the write needed and how much is free; the partial file or folder is removed.
"""

import contextlib
import errno
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from karyo.errors import KaryoError

#: errno values of a full device or an exhausted quota.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc):
    """Whether ``exc``, or an exception it was raised from, reports a full disk or quota.

    Writers such as h5py and matplotlib wrap the ``OSError``, or only keep its text.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "errno = 28" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(folder, what, needed, at_least=False):
    """The one-line error for a write of ``needed`` bytes (``at_least``: more) that did not fit."""
    folder = Path(folder)
    try:
        free = _size_text(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    amount = f"more than {_size_text(needed)}" if at_least else _size_text(needed)
    return KaryoError(f"{folder}: disk full: writing {what} needed {amount}, {free} free there; "
                      "free some space and rerun (nothing partial was kept)")


def _size_text(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _tree_size(path):
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from co-workers
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full_error(path.parent, path.name, len(data)) from None
        raise


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    For writers that insist on a file name (``model.save``, ``fig.savefig``). The temporary
    name ends like the real one (``.weights.h5``, ``.keras``, ``.png``) so that such writers
    pick the right format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(path.parent, path.name, _tree_size(tmp), at_least=True) from None
        raise
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    An existing folder at ``path`` is replaced (callers decide whether it may be: see
    ``karyo.data.manifest.check_output_folder``); a file there is refused, never renamed away. On
    failure nothing is left behind.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder (the CLI prints it as one line).
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise NotADirectoryError(20, "exists and is not a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(path.parent, f"{path.name}/", _tree_size(tmp), at_least=True) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_csv(path, rows, columns):
    """Write ``rows`` under the header ``columns`` as a CSV file, atomically: every CSV karyo writes.

    UTF-8, ``\\n`` line ends, Python's ``csv`` quoting (only where a value needs it); a missing
    value or ``None`` is an empty field, and keys not in ``columns`` are left out.

    Args:
        path: the file to write.
        rows: dicts (keyed by column) or sequences (in the order of ``columns``).
        columns: the header, in order.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    columns = list(columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        writer.writerow(["" if v is None else v for v in values])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)
