"""Atomic publication of files and directories: the one place where an output appears.

Every writer (``io.save``, ``save_sharded``, ``ShardWriter``, ``PlannedShardWriter``, the CLIs) writes
into a temporary sibling and publishes it with one rename:

* the temporary is named ``.{name}.weightlab-partial.{host}.{pid}.{random}.tmp`` (file or directory),
  so it can never be mistaken for the output; readers refuse such names (:func:`is_partial`), and
  the next writer of the same output deletes the ones whose process (on this host) is dead;
* without ``overwrite`` the rename does not replace: Linux ``renameat2(RENAME_NOREPLACE)``, falling
  back (no syscall, unsupported filesystem) to ``link`` + ``unlink`` for files and to ``rename`` for
  directories. If the output appeared meanwhile (another job won the race) we raise
  :class:`OutputExistsError`, delete our temporary and leave the other job's output untouched.
  Residual caveat of the directory fallback only: ``rename`` silently replaces an *empty* directory
  created at the output path after our existence check (it cannot replace a non-empty one, so
  another writer's published checkpoint is never lost);
* with ``overwrite`` a file is replaced by ``os.replace``; a directory is swapped with the old one by
  ``renameat2(RENAME_EXCHANGE)`` (fallback: old moved aside under a partial name, new renamed in),
  then the old one is deleted.

:func:`check_output` is the pre-flight check commands run before doing any work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError, OutputPathError

__all__ = ["atomic_file", "atomic_dir", "refuse_existing", "check_output", "is_partial", "sweep", "PARTIAL_TAG",
           "set_publisher", "is_publisher"]

PARTIAL_TAG = ".weightlab-partial."
_SUFFIX = ".tmp"
_PARTIAL_RE = re.compile(r"^\..+\.weightlab-partial\.[A-Za-z0-9_-]+\.\d+\.[0-9a-f]+\.tmp$", re.S)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


_ROLE = {"publisher": True}


def set_publisher(publisher: bool) -> None:
    """In a multi-process run every process computes the same result; only one (process 0) may
    publish it. ``set_publisher(False)`` makes every writer of this process write and then discard
    its temporary (the CLI sets it on processes other than 0)."""
    _ROLE["publisher"] = bool(publisher)


def is_publisher() -> bool:
    return _ROLE["publisher"]


# ------------------------------------------------------------------------------- temporaries

def _host() -> str:
    """This host's name with everything but ``[A-Za-z0-9_-]`` replaced (no dots: names parse back)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "localhost")


def _partial_path(path: Path) -> Path:
    return path.parent / f".{path.name}{PARTIAL_TAG}{_host()}.{os.getpid()}.{secrets.token_hex(6)}{_SUFFIX}"


def is_partial(path: str | os.PathLike) -> bool:
    """True if ``path`` is named like an unfinished weightlab temporary (never a finished output)."""
    return bool(_PARTIAL_RE.match(Path(path).name))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we would have written; never touch it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def sweep(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of ``path`` left by dead processes of this host; returns them.

    Only names of the form ``.{name}.weightlab-partial.{our host}.{pid}.{random}.tmp`` whose pid no
    longer exists are touched: a live process's temporary (ours included) is never removed.
    Caveat: hosts that share a filesystem must have distinct host names (containers usually do).
    """
    path = Path(path)
    prefix, host, removed = f".{path.name}{PARTIAL_TAG}", _host(), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_SUFFIX)):
            continue
        parts = name[len(prefix):-len(_SUFFIX)].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        _remove(path.parent / name)
        removed.append(path.parent / name)
    return removed


# ------------------------------------------------------------------------------- checks

def refuse_existing(path: str | os.PathLike, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists (even as a dangling link) and not ``overwrite``.

    A process that is not the publisher (see :func:`set_publisher`) never publishes, so it skips the
    check: the publisher may already have written ``path`` while this process was still computing."""
    path = Path(path)
    if os.path.lexists(path) and not overwrite and _ROLE["publisher"]:
        raise OutputExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return path


def _blocking_file(d: Path) -> Path | None:
    """The nearest existing ancestor-or-self of ``d`` if it is not a directory (a file in the way)."""
    for p in (d, *d.parents):
        if os.path.lexists(p):
            return None if p.is_dir() else p
    return None


def _make_parent(path: Path) -> None:
    parent = path.parent
    if parent.is_dir():
        return
    blocker = _blocking_file(parent)
    if blocker is not None:
        raise OutputPathError(f"cannot write {path}: {blocker} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: cannot create directory {parent} ({e.strerror})") from None


def _probe(path: Path) -> None:
    """Create and remove a temporary beside ``path``: the only reliable writability test (root ignores
    permission bits; a read-only filesystem shows only on an attempt)."""
    probe = _partial_path(path)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {path.parent} is not writable ({e.strerror})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The pre-flight check of an output path, run before any work: the parent exists and is a
    directory, ``path`` does not exist (unless ``overwrite``), and a file can actually be created
    beside it. Raises :class:`OutputPathError` / :class:`OutputExistsError`; returns ``Path(path)``."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        blocker = _blocking_file(parent)
        if blocker is not None:
            raise OutputPathError(f"cannot write {path}: {blocker} is a file, not a directory")
        raise OutputPathError(f"cannot write {path}: parent directory {parent} does not exist")
    refuse_existing(path, overwrite)
    _probe(path)
    return path


# ------------------------------------------------------------------------------- publishing

@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc handle, or glibc < 2.28 / musl without the symbol
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False when this system cannot do it (the caller
    falls back); any other failure raises the matching ``OSError`` (``FileExistsError`` ...)."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} appeared while we were writing it (another job?); it was left untouched "
                             "and our copy discarded. Pass overwrite=True (CLI: --overwrite) to replace it")


def _publish_new(tmp: Path, path: Path, is_dir: bool) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists (then :class:`OutputExistsError`)."""
    try:
        if _renameat2(tmp, path, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _exists_error(path) from None
    if is_dir:
        if os.path.lexists(path):
            raise _exists_error(path)
        try:
            os.rename(tmp, path)  # fails onto a file or a non-empty directory (see the module docstring)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise _exists_error(path) from None
            raise
        return
    try:
        os.link(tmp, path)  # refuses an existing name, atomically
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as e:  # filesystem without hard links: claim the name exclusively, then replace our claim
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV) and e.errno not in _UNSUPPORTED:
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _publish_replace(tmp: Path, path: Path, is_dir: bool) -> None:
    """Put ``tmp`` at ``path``, replacing what is there (``overwrite=True``)."""
    if not is_dir:
        if path.is_dir() and not path.is_symlink():
            raise OutputExistsError(f"{path} is a directory; refusing to replace it with a file")
        os.replace(tmp, path)
        return
    if not os.path.lexists(path):
        try:
            return _publish_new(tmp, path, True)
        except OutputExistsError:
            pass  # appeared meanwhile: replace it below
    if _renameat2(tmp, path, _RENAME_EXCHANGE):  # atomic swap: tmp now holds the old output
        _remove(tmp)
        return
    aside = _partial_path(path)  # the old output, under a name no reader accepts and the sweep removes
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    _remove(aside)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _start(path: str | os.PathLike, overwrite: bool, is_dir: bool) -> tuple[Path, Path]:
    """Checks, parent creation, sweep of dead temporaries, then create our own temporary."""
    path = refuse_existing(path, overwrite)
    _make_parent(path)
    sweep(path)
    tmp = _partial_path(path)
    try:
        if is_dir:
            os.mkdir(tmp, 0o777)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {path.parent} is not writable ({e.strerror})") from None
    return path, tmp


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit fsync it and publish it as ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Without ``overwrite``,
    an output that appears while we write (another job) is kept and :class:`OutputExistsError` raised.
    """
    path, tmp = _start(path, overwrite, is_dir=False)
    try:
        yield tmp
        if not _ROLE["publisher"]:
            _remove(tmp)
            return
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        (_publish_replace if overwrite else _publish_new)(tmp, path, False)
        _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on normal exit publish it as ``path``.

    With ``overwrite`` an existing ``path`` is swapped out and deleted only after the new directory is
    in place. On an exception the temporary directory is removed. Files written inside should carry a
    ``.part`` suffix until complete (the sharded writers do), so nothing inside looks finished early.
    """
    path, tmp = _start(path, overwrite, is_dir=True)
    try:
        yield tmp
        if not _ROLE["publisher"]:
            _remove(tmp)
            return
        _fsync_dir(tmp)
        (_publish_replace if overwrite else _publish_new)(tmp, path, True)
        _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise
