"""Load a whole-model file (a GGUF file) as a transformers model ready for ``wrap`` and ``Trainer``.

The backend that declares the file's suffix (``Backend.model_file_suffixes``) builds the model: its
linears are that backend's modules holding the file's own quantized data, so
``qadapt.wrap(model, backend="auto")`` adopts them as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from qadapt.errors import ConfigError
from qadapt.registry.model_files import model_file_backend


def load_model_file(path: str | os.PathLike[str], **options: Any) -> nn.Module:
    """The model in ``path``, built by the backend that opens its suffix (``options`` go to it: ``dtype=``
    for the tensors that are not quantized linears). The tokenizer is on ``model.qadapt_tokenizer``.

    Raises:
        ConfigError: no installed backend opens this suffix.
        CheckpointError: a damaged or hostile file (bad header, shape, offset, path); the file is never written.
    """
    return model_file_backend(path).load_model_file(path, **options)


def load_gguf(path: str | os.PathLike[str], **options: Any) -> nn.Module:
    """:func:`load_model_file` for a ``.gguf`` file: a transformers model (config and tokenizer from the
    file, as transformers reads them) whose linears hold the file's GGUF blocks, not a dequantized copy."""
    if Path(path).suffix.lower() != ".gguf":
        raise ConfigError(f"load_gguf takes a .gguf file, got {str(path)!r} (load_model_file opens other formats)")
    return load_model_file(path, **options)
