"""Log lines third-party imports print that a CPU machine cannot act on, dropped for the command line.

Narrow by construction: each rule names one logger and the fragments its message must all hold;
every other record of those loggers still shows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

#: ``(logger, fragments)``: torchao's CUDA kernel libraries that a CPU-only torch cannot load (imported by
#: transformers whenever torchao is installed); torch's deprecation of ``register_constant`` on Enum
#: subclasses, which that import triggers; bitsandbytes' note that the optional ``kernels`` package
#: (a faster CPU 4-bit kernel from the Hub) is not installed.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torchao", ("Failed to load", ".so")),
    ("torch.utils._pytree", ("register_constant", "Enum subclass")),
    ("bitsandbytes.backends.cpu.ops", ("kernels-community", "pip install kernels")),
)


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(fragment in message for fragment in self.fragments)


def _cpu_only() -> bool:
    import torch

    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Drop :data:`RULES`' records while the block runs (the CUDA-library rule only on a CPU-only torch)."""
    installed = []
    cpu = _cpu_only()
    for name, fragments in RULES:
        if name == "torchao" and not cpu:
            continue
        logger, rule = logging.getLogger(name), _Drop(fragments)
        logger.addFilter(rule)
        installed.append((logger, rule))
    try:
        yield
    finally:
        for logger, rule in installed:
            logger.removeFilter(rule)
