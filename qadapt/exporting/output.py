"""OUT, the export's one output directory: checked against the inputs, written beside, swapped in.

An export writes into a hidden temporary directory beside OUT (``.OUT.qadapt-export-<token>``)
and moves it into place at the end. Beside it lies a lock file (``.OUT.qadapt-lock-<token>``)
that the exporting process holds (``flock``) for as long as it runs; the kernel drops the lock
when the process dies, however it dies (``kill -9`` too). The lock file is created before the
temporary directory and removed after it, so a temporary directory without a held lock belongs
to no running export: the next export to the same OUT removes it (:func:`recover_stale`).

Replacing an existing OUT (``overwrite``) is one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux;
where the kernel or file system lacks it, two renames with the old OUT parked in
``.OUT.qadapt-old-<token>/`` under the same lock. A process killed between those two renames
leaves OUT missing and the old copy parked; the next export to OUT puts it back first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import IO

from qadapt.errors import ConfigError
from qadapt.formats.local_files import output_problem

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, so nothing is ever taken for stale
    fcntl = None  # type: ignore[assignment]

TEMP_TAG = "qadapt-export"
OLD_TAG = "qadapt-old"
LOCK_TAG = "qadapt-lock"
#: a lock file in the making (created, then locked, then renamed to its LOCK_TAG name).
NEW_TAG = "qadapt-newlock"
#: a NEW_TAG file older than this, unlocked, was left by a process killed while making its lock.
_NEW_LOCK_GRACE_S = 60.0
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(source, target, flags)``; False where the system does not offer it (then nothing moved).

    Raises:
        OSError: the call exists and failed (``EEXIST`` for ``RENAME_NOREPLACE`` onto an existing path).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _name(out: Path, tag: str, token: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{token}"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _try_lock(path: Path) -> IO[bytes] | None:
    """The existing file ``path`` opened and locked, or None when another process holds its lock (or it is
    gone, or locks do not exist here). Never creates the file: a lock file is created locked (:class:`OutputSlot`)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _new_lock(path: Path) -> IO[bytes] | None:
    """A lock file at ``path`` that is locked from the moment it has that name (made under another name,
    locked, then renamed, so no cleaner can take it for stale in between)."""
    if fcntl is None:
        return None
    hidden = path.with_name(path.name.replace(LOCK_TAG, NEW_TAG, 1))
    fd = os.open(hidden, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, path)
    except BaseException:
        os.close(fd)
        hidden.unlink(missing_ok=True)
        raise
    return os.fdopen(fd, "rb")


def recover_stale(out: Path) -> list[str]:
    """Clean what dead exports to ``out`` left beside it; returns what was done, one line each.

    A parked old OUT (a kill between the two renames of an overwrite) is put back when OUT is
    missing; temporary directories, parked copies and lock files of no running export are removed.
    Those of a running export (its lock held) are left alone.
    """
    if not out.parent.is_dir():
        return []
    prefix = f".{out.name}."
    tokens: set[str] = set()
    for path in out.parent.iterdir():
        name = path.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        for tag in (TEMP_TAG, OLD_TAG, LOCK_TAG, NEW_TAG):
            if rest.startswith(tag + "-"):
                tokens.add(rest[len(tag) + 1 :])
    done: list[str] = []
    for token in sorted(tokens):
        making = _name(out, NEW_TAG, token)
        if os.path.lexists(making):
            held = _try_lock(making)
            if held is None:
                continue  # an export making its lock right now
            with contextlib.suppress(OSError):
                if time.time() - making.lstat().st_mtime > _NEW_LOCK_GRACE_S:
                    making.unlink()
            held.close()
            if os.path.lexists(making):
                continue
        lock_path = _name(out, LOCK_TAG, token)
        lock = None
        if lock_path.exists():
            lock = _try_lock(lock_path)
            if lock is None:
                continue  # a running export, or no locks on this system
        try:
            parked = _name(out, OLD_TAG, token) / out.name
            if os.path.lexists(parked) and not os.path.lexists(out):
                os.replace(parked, out)
                done.append(f"put back {out} from an export killed while replacing it")
            for tag in (TEMP_TAG, OLD_TAG):
                leftover = _name(out, tag, token)
                if os.path.lexists(leftover):
                    _remove(leftover)
                    done.append(f"removed {leftover.name}, left by an export that did not finish")
            lock_path.unlink(missing_ok=True)
        finally:
            if lock is not None:
                lock.close()
    return done


def check_out(out: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Refuse an ``out`` that is, holds or lies inside an input, an existing one without ``overwrite``,
    or an existing one that is not a directory or a symlink (a file is never replaced)."""
    problem = output_problem(out, inputs)
    if problem is not None:
        raise problem
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConfigError(f"out={str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.is_symlink() and not out.is_dir():
        raise ConfigError(
            f"out={str(out)!r} exists and is not a directory; overwrite replaces an earlier export directory "
            "(or a symlink), never a file: move it away first"
        )


class OutputSlot:
    """The temporary directory of one export to ``out``, its lock, and the final move into place."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.token = secrets.token_hex(6)
        self._lock: IO[bytes] | None = None
        self.tmp = _name(out, TEMP_TAG, self.token)

    def __enter__(self) -> OutputSlot:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        lock_path = _name(self.out, LOCK_TAG, self.token)
        self._lock = _new_lock(lock_path)
        if self._lock is None:
            lock_path.touch(exist_ok=False)
        try:
            self.tmp.mkdir()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _remove(self.tmp)
        _remove(_name(self.out, OLD_TAG, self.token))
        self._release()

    def _release(self) -> None:
        _name(self.out, LOCK_TAG, self.token).unlink(missing_ok=True)
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None

    def commit(self, overwrite: bool) -> None:
        """Move the finished temporary directory onto ``out`` (replacing it only with ``overwrite``).

        Raises:
            ConfigError: ``out`` appeared during the export and ``overwrite`` is off.
        """
        out, tmp = self.out, self.tmp
        if not os.path.lexists(out):
            try:
                if not _renameat2(tmp, out, _RENAME_NOREPLACE):
                    os.rename(tmp, out)
                return
            except FileExistsError:
                pass  # appeared meanwhile: as below
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if not overwrite:
            raise ConfigError(f"out={str(out)!r} appeared during the export; pass overwrite=True to replace it")
        if _renameat2(tmp, out, _RENAME_EXCHANGE):
            return  # the old OUT now lies at tmp and goes with it on exit
        parked = _name(out, OLD_TAG, self.token)
        parked.mkdir()
        os.replace(out, parked / out.name)
        os.replace(tmp, out)
