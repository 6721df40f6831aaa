"""Files of a directory a user handed us, opened only inside it.

A model or adapter directory is hostile input: a file in it may be a symlink to any file the
user can read (``~/.ssh/id_rsa``, ``/proc/self/environ``), an index may name ``../x`` or an
absolute path, and a "file" may be a FIFO or a device. :class:`InputDirectory` is the one way the
export and the checkpoint readers open such files:

* a name is relative, with no ``..`` component, no NUL and not absolute;
* it is resolved with every symlink followed, and the result must lie inside the directory
  (its real path), or inside the ``blobs/`` folder of a Hugging Face hub cache repository when
  the directory is one of its ``snapshots/<revision>`` folders (those files are symlinks into it);
* it is opened without following a final symlink and without blocking, and must be a regular
  file; on Linux the opened descriptor's own path is checked once more, so a component swapped
  for a symlink between the check and the open is caught.

:class:`FileIdentity` remembers which file was read (device, inode, size, modification time), so
a later read of the same file (a tensor streamed after its header was parsed) refuses a file that
was replaced or changed meanwhile.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qadapt.errors import CheckpointError, ConfigError, shorten

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FileIdentity:
    """Which file was read: a later open must find the same file, unchanged."""

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, info: os.stat_result) -> FileIdentity:
        return cls(path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def open(self) -> BinaryIO:
        """The same file, opened again for reading.

        Raises:
            CheckpointError: the path now holds another file, or the file changed (size or
                modification time) since it was first read.
        """
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as exc:
            raise CheckpointError(f"{self.path} cannot be opened again: {exc}") from exc
        info = os.fstat(fd)
        if FileIdentity.of(self.path, info) != self:
            os.close(fd)
            raise CheckpointError(
                f"{self.path} was replaced or changed while it was being read (size {self.size} -> {info.st_size}); "
                "nothing was written; run again once nothing else writes it"
            )
        return os.fdopen(fd, "rb")


def _descriptor_path(fd: int) -> Path | None:
    """The real path of an open descriptor (Linux ``/proc/self/fd``), or None where unknown."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


class InputDirectory:
    """A directory the user handed us (``role``: ``"BASE"``, ``"ADAPTER"``), whose files are read only inside it.

    Raises (on construction):
        CheckpointError: the directory does not exist or is not a directory.
    """

    def __init__(self, path: str | os.PathLike[str], role: str) -> None:
        self.path = Path(path)
        self.role = role
        try:
            self.real = self.path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{role} {str(self.path)!r} does not exist or cannot be resolved: {exc}") from exc
        if not self.real.is_dir():
            raise CheckpointError(f"{role} {str(self.path)!r} is not a directory")
        roots = [self.real]
        if self.real.parent.name == "snapshots" and (self.real.parent.parent / "blobs").is_dir():
            roots.append((self.real.parent.parent / "blobs").resolve())  # a Hugging Face hub cache snapshot
        self.roots = tuple(roots)

    def __str__(self) -> str:
        return str(self.path)

    def check_name(self, name: object, field: str) -> str:
        """``name`` if it is a relative path without ``..`` (as an index or a config may give it).

        Raises:
            CheckpointError: naming ``field``, the value and what is valid.
        """
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CheckpointError(f"{field} must be a file name inside {self.role} {self.path}, got {shorten(name)}")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or name.startswith(("/", "\\")):
            raise CheckpointError(
                f"{field} must name a file inside {self.role} {self.path} (relative, without '..'), got {shorten(name)}"
            )
        return name

    def lexists(self, name: str) -> bool:
        """Whether ``name`` is present (a dangling link too); nothing is followed out of the directory."""
        return os.path.lexists(self.real / name)

    def is_file(self, name: str) -> bool:
        """Whether ``name`` is present and resolves to a regular file inside the directory."""
        try:
            resolved = (self.real / name).resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return _inside(resolved, self.roots) and resolved.is_file()

    def open(self, name: str, field: str | None = None) -> tuple[BinaryIO, FileIdentity]:
        """``name`` opened for reading, and its identity.

        Raises:
            CheckpointError: naming the file: a name that leaves the directory, a missing file, a
                symlink that resolves outside it, or something that is not a regular file.
        """
        self.check_name(name, field or f"{self.role} file name")
        candidate = self.real / name
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{candidate} is missing (or a symlink to nothing)") from exc
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{candidate} cannot be resolved: {exc}") from exc
        if not _inside(resolved, self.roots):
            raise CheckpointError(
                f"{candidate} is a symlink to {resolved}, outside {self.role} {self.path}; qadapt reads only files "
                f"inside the directory it is given (copy the file in, or point {self.role} at the real directory)"
            )
        try:
            fd = os.open(resolved, _OPEN_FLAGS)
        except OSError as exc:
            raise CheckpointError(f"{candidate} cannot be opened: {exc}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
                raise CheckpointError(f"{candidate} is {kind}; only regular files are read from {self.role}")
            opened = _descriptor_path(fd)
            if opened is not None and not _inside(opened, self.roots):
                raise CheckpointError(f"{candidate} moved outside {self.role} {self.path} while it was opened")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb"), FileIdentity.of(resolved, info)

    def read(self, name: str, limit: int | None = None, field: str | None = None) -> bytes:
        """The whole of ``name`` (at most ``limit`` bytes when given), read through one handle.

        Raises:
            CheckpointError: as :meth:`open`, or a file larger than ``limit``.
        """
        handle, identity = self.open(name, field)
        with handle:
            if limit is not None and identity.size > limit:
                raise CheckpointError(
                    f"{self.real / name} holds {identity.size} bytes, more than the {limit} a file of this kind may"
                )
            try:
                data = handle.read() if limit is None else handle.read(limit + 1)
            except OSError as exc:
                raise CheckpointError(f"{self.real / name} cannot be read: {exc}") from exc
        if limit is not None and len(data) > limit:
            raise CheckpointError(f"{self.real / name} is larger than the {limit} bytes a file of this kind may hold")
        return data


def output_problem(out: Path, inputs: dict[str, Path]) -> ConfigError | None:
    """Why ``out`` may not be written (equal to, inside, or containing an input, after links), or None.

    ``inputs``: role -> directory (``{"BASE": ..., "ADAPTER": ...}``).
    """
    target = Path(os.path.realpath(out))
    link = Path(os.path.realpath(out.parent)) / out.name  # the link itself is what --overwrite replaces
    for role, directory in inputs.items():
        real = Path(os.path.realpath(directory))
        for candidate in {target, link}:
            if candidate == real:
                return ConfigError(f"out={str(out)!r} is {role} ({real}); the export never writes over its inputs")
            if candidate.is_relative_to(real):
                return ConfigError(f"out={str(out)!r} is inside {role} ({real}); write the export outside its inputs")
            if real.is_relative_to(candidate):
                return ConfigError(f"out={str(out)!r} contains {role} ({real}); replacing it would delete an input")
    return None
