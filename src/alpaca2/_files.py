"""File checks shared by the loaders: refuse what cannot be read safely before opening it.

Opening a FIFO for reading blocks until a writer appears (forever, for a stray `mkfifo`), and a
character device such as /dev/zero or /dev/urandom never ends, so llama.cpp would read or allocate
without bound.  Models, state files and session files are regular files; everything else is
refused by stat() alone, which never opens (and so never blocks on) the path.
"""
from __future__ import annotations

import os
import stat

from alpaca2.errors import Alpaca2Error, ModelLoadError

def _error(error, errno, message):
    # one-argument OSError, so str(err) is the message itself; errno rides along as an attribute
    err = error(message)
    err.errno = errno
    return err


_KINDS = [
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def check_regular_file(path, what="file", error=ModelLoadError) -> int:
    """Raise error (an Alpaca2Error that is also an OSError) unless path is a regular file.

    what names the file in the message ("model file", "state file"); symlinks are followed.
    Returns the file's size in bytes.  Never opens the path, so a FIFO cannot block.
    """
    assert issubclass(error, Alpaca2Error) and issubclass(error, OSError)
    path = os.fspath(path)
    shown = path if isinstance(path, str) else os.fsdecode(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _error(error, 2, f"{what} not found: {shown}") from None
    except OSError as e:
        raise _error(error, e.errno, f"cannot read {what} {shown}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise _error(error, 21 if stat.S_ISDIR(st.st_mode) else 22,
                     f"{shown} is {kind}, not a regular {what}")
    return st.st_size


def open_regular_file(path, what="file", error=ModelLoadError):
    """open(path, "rb") for a regular file only, checked again on the open descriptor.

    The second check (fstat) closes the window in which the path could be swapped for a FIFO
    after the first; O_NONBLOCK makes that open itself return at once instead of waiting.
    """
    check_regular_file(path, what, error)
    path = os.fspath(path)
    shown = path if isinstance(path, str) else os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _error(error, e.errno, f"cannot read {what} {shown}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(error, 22, f"{shown} is not a regular {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_atomically(path, data) -> int:
    """Write data (bytes or str) to path through a temp file beside it, fsync and rename: a crash
    leaves the old file or the new one, never half of one.  Returns the bytes written."""
    import uuid
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(raw)

