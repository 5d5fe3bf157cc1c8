"""File I/O that cannot damage a user's file or hang on one: atomic writes, bounded reads.

Every file moerun writes (a formatted policy, a trace, a predictor, sweep results) goes through
:func:`atomic_write`: the new bytes go to a temporary file in the target's directory, are forced
to disk (fsync) and renamed over the target. A full disk, a file-size limit or an I/O error leaves
the target as it was and no temporary file behind; the error is one line naming the file.

Reads of user files check the file type first (a FIFO would block, ``/dev/zero`` never ends) and
stop at a size limit. Failures are :class:`OSError` (the file cannot be used) or
:class:`ValueError` (it is not what it claims to be), each one line; callers wrap them in their
own error type. This module knows nothing about what the files mean.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Iterator

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _error(message: str, cause: OSError | None = None) -> OSError:
    """An OSError whose text is exactly ``message`` (no ``[Errno N]`` prefix), the cause's errno kept."""
    err = OSError(message)
    if cause is not None:
        err.errno = cause.errno  # (setting strerror too would make str() "[Errno N] strerror")
    return err


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` when it is an existing regular file (symlinks followed); OSError saying what it is otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _error(f"{what} {path}: {_reason(exc)}", exc) from None
    if not stat.S_ISREG(mode):
        raise _error(f"{what} {path} is {_kind(mode)}, not a regular file")
    return path


def read_text(path: str | os.PathLike, *, limit_bytes: int, what: str = "file") -> str:
    """The UTF-8 text of a regular file of at most ``limit_bytes``; OSError or ValueError otherwise."""
    path = regular_file(path, what)
    try:
        # O_NONBLOCK: if the path became a FIFO since the check, opening it does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise _error(f"{what} {path} is {_kind(mode)}, not a regular file")
            data = f.read(limit_bytes + 1)
    except OSError as exc:
        raise _error(f"cannot read {what} {path}: {_reason(exc)}", exc) from None
    if len(data) > limit_bytes:
        raise _error(f"{what} {path} is larger than {limit_bytes} bytes, more than any {what} needs")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def check_writable(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` when a file can be written there (its directory exists and is writable, and it is
    not a directory); OSError naming the problem otherwise. Call it before long work whose result
    goes to ``path``, so a bad path fails at once."""
    path = Path(path)
    directory = path.parent
    if path.is_dir():
        raise _error(f"cannot write {what} {path}: it is a directory")
    if not directory.is_dir():
        raise _error(f"cannot write {what} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _error(f"cannot write {what} {path}: directory {directory} is not writable")
    return path


class _FdWriter(io.RawIOBase):
    """Raw writes to a file descriptor with ``os.write`` (short writes retried)."""

    def __init__(self, fd: int):
        self.fd = fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        return done

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.close(self.fd)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, text: bool = False, what: str = "file") -> Iterator[IO]:
    """A file object (binary, or UTF-8 text with ``text=True``) whose content replaces ``path``
    when the block ends without an exception, all at once. On any failure ``path`` is untouched,
    the temporary file is removed, and an OSError is one line naming ``path``.

    A symlink is followed (its target is replaced); an existing file keeps its permissions.
    """
    shown = Path(path)
    target = Path(os.path.realpath(shown))
    existed = target.exists()
    unchanged = f"{shown} is unchanged" if existed else f"{shown} was not created"
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode) if existed else _new_file_mode()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _error(f"cannot write {what} {shown}: {_reason(exc)}", exc) from None
    raw = _FdWriter(fd)
    buffered = io.BufferedWriter(raw, buffer_size=1 << 20)
    f: IO = io.TextIOWrapper(buffered, encoding="utf-8", newline="") if text else buffered
    try:
        os.fchmod(fd, mode)
        yield f
        f.flush()
        os.fsync(fd)
        f.close()
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(OSError):
            raw.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _error(f"cannot write {what} {shown}: {_reason(exc)}; {unchanged}", exc) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text(path: str | os.PathLike, text: str, *, what: str = "file") -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (see :func:`atomic_write`)."""
    with atomic_write(path, text=True, what=what) as f:
        f.write(text)


def read_npz(path: str | os.PathLike, what: str, about: str = "") -> tuple[dict, dict]:
    """The arrays of an ``.npz`` file (no pickles) and its ``meta`` array decoded as a JSON object.

    OSError when the file cannot be read; ValueError, one line, when it is not such an npz file
    (not a zip, truncated, corrupt, a plain ``.npy``, meta missing or not a JSON object). A file that
    does not even start as a zip archive is named for what it is (text, empty, one .npy array), with
    ``about`` (what such a file is and what writes one) after it: numpy would read it as a pickle and
    advise allow_pickle, which no moerun file needs.
    """
    import numpy as np  # here: the policy language reads files through this module without numpy

    path = regular_file(path, what)
    kind = _not_a_zip(path)
    if kind is not None:
        raise ValueError(f"{path} is not a moerun {what}: the file is {kind}" + (f"; {about}" if about else ""))
    try:
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("it holds one array, not an .npz archive of named arrays")
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except OSError as exc:
        raise _error(f"cannot read {what} {path}: {_reason(exc)}", exc) from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, MemoryError) as exc:
        raise ValueError(f"{path} is not a moerun {what} (.npz): {type(exc).__name__}: {exc}") from None
    meta = arrays.get("meta")
    if meta is None:
        raise ValueError(f"{path} is not a moerun {what}: it has no 'meta' array")
    if meta.shape != () or meta.dtype.kind not in "US":
        raise ValueError(f"{path}: 'meta' must be a JSON string, got a {meta.dtype} array of shape {meta.shape}")
    try:
        decoded = json.loads(str(meta))
    except ValueError as exc:  # JSONDecodeError, and recursion or size limits
        raise ValueError(f"{path}: 'meta' is not JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: 'meta' is nested too deeply to be moerun's") from None
    if not isinstance(decoded, dict):
        raise ValueError(f"{path}: 'meta' must be a JSON object, got {type(decoded).__name__}")
    return arrays, decoded


_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry; an empty zip's end record
_NPY_MAGIC = b"\x93NUMPY"


def _not_a_zip(path: Path) -> str | None:
    """What ``path`` is when it does not start as a zip archive (an .npz) does; None when it does, or when
    it cannot be read (the read that follows reports that)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in does not block
        with open(fd, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(_ZIP_MAGICS):
        return None
    if head.startswith(_NPY_MAGIC):
        return "one numpy array (.npy): it holds one array, not an archive of named arrays"
    if not head:
        return "empty"
    if _is_text(head):
        return "text"
    return f"not a zip archive (it starts with {head[:8]!r})"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3 and b"\0" not in head  # cut inside a character at the end
    return b"\0" not in head
