"""optimum-quanto's C++ extension, built on first use, and the lock a killed build leaves behind.

quanto registers a CPU kernel for its 2/4-bit unpacking that compiles a C++ extension the first time
it runs (``torch.utils.cpp_extension.load`` into the package's ``cpp/build`` folder). While it
builds, ``build/lock`` exists; a build that was killed leaves that file, and every later build waits
on it forever without a word. qadapt's ``quanto`` backend never runs that kernel: it unpacks codes
in plain torch (:mod:`qadapt_quanto.storage`), so wrapping, training, merging and unmerging never
build or wait. quanto's *own* forward of a qint4/qint2 layer (a model unwrapped after a merge, say)
and its ``load_state_dict`` still do: :func:`check_build_lock` names a lock left behind before that
happens.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

from qadapt.errors import CapabilityError

#: The name quanto registers its CPU extension under.
EXTENSION = "quanto_cpp"


class QuantoBuildLockWarning(UserWarning):
    """optimum-quanto's extension build folder holds a lock file (a killed or running build)."""


def build_directory() -> Path | None:
    """Where quanto builds its CPU extension (None when this quanto has none)."""
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if not is_extension_available(EXTENSION):
        return None
    return Path(get_extension(EXTENSION).build_directory)


def build_lock(directory: Path | None = None) -> Path | None:
    """The lock file in ``directory`` (default: quanto's extension build folder) when it exists, else None."""
    directory = directory if directory is not None else build_directory()
    if directory is None:
        return None
    lock = Path(directory) / "lock"
    return lock if lock.exists() else None


def _message(lock: Path) -> str:
    return (
        f"optimum-quanto's C++ extension build lock {lock} exists: a build of its CPU kernel was killed (or is "
        "running now). qadapt's quanto backend never uses that kernel (it unpacks in plain torch), but quanto's "
        "own forward or load_state_dict of a qint4/qint2 layer on CPU waits on this file forever; if no build "
        "is running, delete it"
    )


def check_build_lock(directory: Path | None = None) -> None:
    """Raise :class:`~qadapt.errors.CapabilityError` naming quanto's build lock when one is left behind
    (``directory``: the build folder, default quanto's own).

    Call it before running quanto's own qint4/qint2 CPU kernels (which would wait on the lock forever).
    """
    lock = build_lock(directory)
    if lock is not None:
        raise CapabilityError(_message(lock))


@functools.cache
def warn_once_about_lock() -> None:
    """A :class:`QuantoBuildLockWarning` naming the lock, once per process, when one exists."""
    lock = build_lock()
    if lock is not None:
        warnings.warn(_message(lock), QuantoBuildLockWarning, stacklevel=3)
