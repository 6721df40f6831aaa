"""Import torchao without the log lines a CPU-only torch cannot act on."""

from __future__ import annotations

import logging

import torch


class _DropRecords(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(fragment in message for fragment in self.fragments)


def import_torchao() -> None:
    """Import torchao once, dropping two kinds of log records it emits on a CPU-only torch.

    torchao tries to load its compiled CUDA kernels (``_C_*.so``) and logs a warning for each
    one that cannot load: on a torch build without CUDA none can, so the warnings are dropped
    there (and only there). torch logs a deprecation of ``register_constant`` on Enum
    subclasses that torchao's import triggers. Everything else torchao logs still shows.
    """
    filters = []
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        filters.append((logging.getLogger("torchao"), _DropRecords("Failed to load", ".so")))
    filters.append((logging.getLogger("torch.utils._pytree"), _DropRecords("register_constant", "Enum subclass")))
    for logger, record_filter in filters:
        logger.addFilter(record_filter)
    try:
        import torchao  # noqa: F401
    finally:
        for logger, record_filter in filters:
            logger.removeFilter(record_filter)
