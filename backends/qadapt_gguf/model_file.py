"""GGUF files in and out: a checked reader, ``load_model`` (a transformers model over the file's own blocks)
and ``write_model`` (the file streamed to a new one with some layers rewritten in their own type).

The file is hostile: every header, tensor entry, shape, type and byte range is checked before any tensor is
read (:func:`open_gguf`), and the file is only ever memory-mapped read-only. Names follow transformers' own
GGUF reader (``get_gguf_hf_weights_map`` and its tensor processors), so a layer's name is the one
``from_pretrained(..., gguf_file=...)`` gives it. A processor may only permute a linear's rows (Llama's
rotary order for q/k); the permutation is applied to the rows of blocks and undone when writing.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from qadapt.errors import CheckpointError, ConfigError
from qadapt.protocols import LayerRewrite, QuantizedWeight
from qadapt_gguf.quants import BY_ID

#: Types read into float tensors (not linears' blocks), as transformers reads them.
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
_MAX_DIM = 1 << 31
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class GgufTensor:
    """One checked tensor entry: ``shape`` as torch sees it (``[rows, row]``), bytes at ``offset``."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GgufFile:
    """A checked GGUF file: its resolved path, size, architecture and tensors (in file order)."""

    path: Path
    size: int
    architecture: str
    tensors: dict[str, GgufTensor]
    #: the ``gguf`` reader's entries by name (their ``data``: read-only memory maps)
    entries: dict[str, Any]


def _file_path(path: str | os.PathLike[str]) -> Path:
    given = Path(path)
    try:
        real = given.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"GGUF file {str(given)!r} cannot be opened: {exc}") from None
    if not real.is_file():
        raise CheckpointError(f"GGUF file {str(given)!r} is not a regular file (a directory, FIFO or device)")
    return real


def open_gguf(path: str | os.PathLike[str]) -> GgufFile:
    """Parse and check ``path``; raise :class:`CheckpointError` naming the file and the field."""
    import gguf

    real = _file_path(path)
    size = real.stat().st_size
    try:
        reader = gguf.GGUFReader(str(real), "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"GGUF file {str(real)!r}: header or tensor table unreadable ({what})") from None
    arch = reader.fields.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"GGUF file {str(real)!r}: no general.architecture field")
    try:
        architecture = bytes(arch.parts[arch.data[0]]).decode("utf-8")
    except (IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"GGUF file {str(real)!r}: general.architecture unreadable ({exc})") from None
    tensors = {t.name: _checked(real, size, t) for t in reader.tensors}
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise CheckpointError(f"GGUF file {str(real)!r}: tensors {first!r} and {second!r} overlap")
    return GgufFile(real, size, architecture, tensors, {t.name: t for t in reader.tensors})


def _checked(path: Path, size: int, tensor: Any) -> GgufTensor:
    """One tensor entry checked against the file: known type, sane dims, whole blocks, bytes inside the file."""
    import gguf

    where = f"GGUF file {str(path)!r}, tensor {tensor.name!r}"
    type_id = int(tensor.tensor_type)
    dims = [int(d) for d in tensor.shape]
    if not dims or any(d <= 0 or d >= _MAX_DIM for d in dims):
        raise CheckpointError(f"{where}: shape {dims} (every dimension must be between 1 and 2^31)")
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    if dims[0] % block:
        raise CheckpointError(f"{where}: rows of {dims[0]} are not whole blocks of {block} ({tensor.tensor_type.name})")
    numel = int(np.prod(dims, dtype=np.float64))
    nbytes = numel // block * type_size
    offset = int(tensor.data_offset)
    if offset < 0 or offset + nbytes > size or tensor.data.nbytes != nbytes:
        raise CheckpointError(
            f"{where}: data at offset {offset} of {nbytes} bytes lies outside the file ({size} bytes)"
        )
    return GgufTensor(tensor.name, type_id, tuple(reversed(dims)), offset, nbytes)


# ---------------------------------------------------------------------- names (as transformers reads them)


def _config(file: GgufFile) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(file.path.parent), gguf_file=file.path.name)
    except (ValueError, KeyError, TypeError, IndexError, NotImplementedError) as exc:
        raise CheckpointError(f"GGUF file {str(file.path)!r}: transformers cannot read its config ({exc})") from None


def _skeleton(config: Any) -> nn.Module:
    """The model class transformers builds for ``config``, with weights on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _processor(file: GgufFile, config: Any) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(file.architecture, TensorProcessor)(config=config.to_dict())


class _Flat(nn.Module):
    """A module with ``model``'s parameter names and config but no children: transformers' name mapper
    recurses into every submodule and builds gguf's whole name table each time (hundreds of times for an
    LLM); one level deep is where the names it finds live."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__()
        self.config = config
        object.__setattr__(self, "_names", list(model.state_dict()))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, None]:  # type: ignore[override]
        return dict.fromkeys(self._names)


def _name_map(file: GgufFile, model: nn.Module, processor: Any) -> dict[str, str]:
    """``{gguf tensor name: parameter name}`` as ``get_gguf_hf_weights_map`` gives it (the whole model's
    names first, then each direct child's under its prefix, the first found kept)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    config = model.config
    names = get_gguf_hf_weights_map(_Flat(model, config), processor, config.model_type, config.num_hidden_layers)
    for prefix, child in model.named_children():
        flat = _Flat(child, config)
        found = get_gguf_hf_weights_map(flat, processor, config.model_type, config.num_hidden_layers, f"{prefix}.")
        names.update({k: v for k, v in found.items() if k not in names})
    return names


def _row_order(processor: Any, tensor: GgufTensor) -> np.ndarray:
    """The file rows in the order transformers' reader puts them (a permutation), or a clear error."""
    rows = tensor.shape[0]
    probe = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    result = processor.process(weights=probe, name=tensor.name, tensor_key_mapping={}, parsed_parameters={})
    order = np.asarray(result.weights).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        raise CheckpointError(
            f"transformers' reader changes {tensor.name!r} beyond a row permutation; GGUF blocks of this "
            "architecture's linears are not kept as stored"
        )
    return order


@dataclass(frozen=True)
class _Layer:
    module: str
    tensor: GgufTensor
    order: np.ndarray
    bias: GgufTensor | None


def _layers(file: GgufFile, model: nn.Module, processor: Any) -> tuple[dict[str, _Layer], dict[str, str]]:
    """``({module: layer}, {gguf tensor: hf parameter})``: the linears whose weight is in a block type."""
    names = _name_map(file, model, processor)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found: dict[str, _Layer] = {}
    for tensor in file.tensors.values():
        hf = names.get(tensor.name)
        if hf is None or not hf.endswith(".weight") or tensor.type_id not in BY_ID:
            continue
        module = hf.removesuffix(".weight")
        if module not in linears or len(tensor.shape) != 2:
            continue
        bias = file.tensors.get(tensor.name.removesuffix(".weight") + ".bias")
        if bias is not None and bias.type_id not in _FLOAT_TYPES:
            bias = None
        found[module] = _Layer(module, tensor, _row_order(processor, tensor), bias)
    return found, names


def linear_layers(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the file's linears held in a block type."""
    file = open_gguf(path)
    config = _config(file)
    found, _ = _layers(file, _skeleton(config), _processor(file, config))
    return {name: (layer.tensor.shape[1], layer.tensor.shape[0]) for name, layer in found.items()}


# ---------------------------------------------------------------------- load


def _raw(file: GgufFile, tensor: GgufTensor) -> np.ndarray:
    """The tensor's bytes, read-only memory-mapped ``[nbytes]`` uint8."""
    return np.memmap(file.path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.nbytes,))


def _float(file: GgufFile, tensor: GgufTensor, processor: Any, dtype: torch.dtype) -> torch.Tensor:
    """A tensor dequantized (by the ``gguf`` package, as transformers does) and processed, in ``dtype``."""
    import gguf

    data = file.entries[tensor.name].data
    weights = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(tensor.type_id))
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping={}, parsed_parameters={})
    return torch.from_numpy(np.array(result.weights)).to(dtype)


def _blocks(file: GgufFile, layer: _Layer) -> torch.Tensor:
    """The layer's blocks ``[out, row bytes]`` uint8, rows in transformers' order (a copy, not a float)."""
    rows = layer.tensor.shape[0]
    raw = _raw(file, layer.tensor).reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(raw[layer.order]))


def load_model(path: str | os.PathLike[str], dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """A transformers model of the file: linears in block types are :class:`GgufLinear` over the file's
    blocks, every other tensor dequantized to ``dtype``; the tokenizer on ``model.qadapt_tokenizer``."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoTokenizer

    from qadapt_gguf.backend import GgufLinear

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a float torch dtype, got {dtype!r}")
    file = open_gguf(path)
    config = _config(file)
    model = _skeleton(config)
    processor = _processor(file, config)
    found, names = _layers(file, model, processor)
    for layer in found.values():
        t = BY_ID[layer.tensor.type_id]
        out_f, in_f = layer.tensor.shape
        bias = None if layer.bias is None else _float(file, layer.bias, processor, torch.float32)
        module = GgufLinear(_blocks(file, layer), t.name, in_f, out_f, bias)
        parent, _, child = layer.module.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    taken = {f"{m}.weight" for m in found} | {f"{m}.bias" for m, layer in found.items() if layer.bias is not None}
    params = dict(model.named_parameters())
    for tensor in file.tensors.values():
        hf = names.get(tensor.name)
        if hf is None or hf in taken or hf not in params:
            continue
        value = _float(file, tensor, processor, dtype)
        if tuple(value.shape) != tuple(params[hf].shape):
            raise CheckpointError(
                f"GGUF file {str(file.path)!r}, tensor {tensor.name!r}: shape {tuple(value.shape)}, the model's "
                f"{hf} is {tuple(params[hf].shape)}"
            )
        set_module_tensor_to_device(model, hf, "cpu", value=value)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"GGUF file {str(file.path)!r} holds no tensor for {', '.join(missing[:8])}")
    model.eval()
    model.qadapt_tokenizer = AutoTokenizer.from_pretrained(str(file.path.parent), gguf_file=file.path.name)
    return model


# ---------------------------------------------------------------------- write


def _copy(handle: BinaryIO, out: BinaryIO, start: int, stop: int) -> None:
    handle.seek(start)
    left = stop - start
    while left > 0:
        chunk = handle.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise CheckpointError("the GGUF file ended while it was being copied (was it changed meanwhile?)")
        out.write(chunk)
        left -= len(chunk)


def _rewritten(
    file: GgufFile, layer: _Layer, processor: Any, rewrite: LayerRewrite
) -> tuple[bytes, bytes | None] | None:
    """The layer's new bytes (file row order) and its bias' (or None), or None when ``rewrite`` keeps it."""
    t = BY_ID[layer.tensor.type_id]
    blocks = _blocks(file, layer)
    storage = QuantizedWeight({"blocks": blocks}, {"type": t.name, "shape": layer.tensor.shape})
    bias = None if layer.bias is None else _float(file, layer.bias, processor, torch.float32)
    answer = rewrite(layer.module, storage, bias)
    if answer is None:
        return None
    new, new_bias = answer
    data = new.tensors["blocks"]
    if new.meta.get("type") != t.name or tuple(data.shape) != tuple(blocks.shape) or data.dtype != torch.uint8:
        raise CheckpointError(
            f"{layer.module}: the rewritten layer is not {t.name} blocks of shape {tuple(blocks.shape)}"
        )
    inverse = np.argsort(layer.order)
    rows = data.cpu().numpy()[inverse]
    bias_bytes = None
    if new_bias is not None and layer.bias is not None:
        kind = _FLOAT_TYPES[layer.bias.type_id]
        if kind == "BF16":
            raise CheckpointError(f"{layer.module}: a bfloat16 bias in a GGUF file is not rewritten")
        np_dtype = np.float32 if kind == "F32" else np.float16
        bias_bytes = new_bias.detach().float().cpu().numpy().astype(np_dtype).tobytes()
    return np.ascontiguousarray(rows).tobytes(), bias_bytes


def write_model(base: str | os.PathLike[str], out: BinaryIO, rewrite: LayerRewrite) -> list[str]:
    """Stream ``base`` into ``out``, each block-type linear offered to ``rewrite`` (see
    :meth:`qadapt.protocols.Backend.write_model_file`)."""
    file = open_gguf(base)
    config = _config(file)
    processor = _processor(file, config)
    found, _ = _layers(file, _skeleton(config), processor)
    by_tensor = {layer.tensor.name: layer for layer in found.values()}
    biases = {layer.bias.name: layer for layer in found.values() if layer.bias is not None}
    pending: dict[str, bytes] = {}
    done: list[str] = []
    position = 0
    with open(file.path, "rb") as handle:
        for tensor in sorted(file.tensors.values(), key=lambda t: t.offset):
            data: bytes | None = None
            if tensor.name in by_tensor:
                answer = _rewritten(file, by_tensor[tensor.name], processor, rewrite)
                if answer is not None:
                    data, bias_bytes = answer
                    layer = by_tensor[tensor.name]
                    done.append(layer.module)
                    if bias_bytes is not None and layer.bias is not None:
                        pending[layer.bias.name] = bias_bytes
            elif tensor.name in biases:
                data = pending.pop(tensor.name, None)
            if data is None:
                continue
            _copy(handle, out, position, tensor.offset)
            out.write(data)
            position = tensor.offset + tensor.nbytes
        if pending:  # a bias stored before its weight: written in a second pass over the output
            for name, data in pending.items():
                out.flush()
                out.seek(file.tensors[name].offset)
                out.write(data)
            out.seek(0, os.SEEK_END)
        _copy(handle, out, position, file.size)
    return done
