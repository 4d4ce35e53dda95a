"""Atomic output: a file or folder appears whole or not at all (SPEC 4, 7)."""

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from co-workers
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
