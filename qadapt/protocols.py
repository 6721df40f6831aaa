"""The two plugin contracts: :class:`Backend` (a quantizer) and :class:`Method` (an adapter).

A plugin subclasses one of these, sets ``Options`` to its own pydantic options model, and is
registered under the entry-point group ``qadapt.backends`` or ``qadapt.methods``. The registry
checks ``api_version`` and the abstract members when the plugin is loaded.

Shapes follow ``nn.Linear``: a weight is ``[out_features, in_features]``, inputs are
``[..., in_features]``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qadapt.errors import ArgumentTypeError, CapabilityError

#: The protocol version this qadapt implements. A plugin declares the version it was written for.
API_VERSION = 1


class PluginOptions(BaseModel):
    """Base of every plugin's options model: unknown keys are rejected, instances are frozen, and no
    float option is NaN or infinite (a plugin that means "no limit" says so with None, not ``inf``).

    Bound every numeric option on both sides (``ge``/``gt`` and ``le``/``lt``): an option's value
    comes from config files and checkpoints, and sizes allocations (``r=2**40``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class QuantizedWeight:
    """A layer's quantized storage, detached from any module.

    ``tensors`` holds every tensor the backend needs (packed codes, scales, ...); ``meta`` holds
    plain values (shape, block size, quantization type). Backends never write into these tensors
    in place: a merge builds a new ``QuantizedWeight`` and swaps it in, so an old one stays valid.
    """

    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def clone(self) -> QuantizedWeight:
        """A deep copy of the tensors (same device and dtype)."""
        return QuantizedWeight({k: v.detach().clone() for k, v in self.tensors.items()}, dict(self.meta))

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def equal(self, other: QuantizedWeight) -> bool:
        """True when both hold bit-identical tensors and the same metadata."""
        if self.tensors.keys() != other.tensors.keys() or dict(self.meta) != dict(other.meta):
            return False
        return all(_bits_equal(self.tensors[k], other.tensors[k]) for k in self.tensors)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so NaN equals the same NaN), dtype and shape included."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do. The core checks these before asking, and says why it declines."""

    #: Can write a new float weight back into quantized storage (needed to merge).
    requantize: bool = True
    #: Can snapshot and restore its storage (needed for exact unmerge).
    snapshot: bool = True
    #: Gradients flow through its forward to the input (needed to train adapters before it).
    train_forward: bool = True
    #: Implements :meth:`Backend.requantize_keep_state`: codes are chosen against ``like``'s own
    #: scales, which stay bit for bit (the default merge when available).
    keep_state: bool = False
    #: Implements :meth:`Backend.requantize_calibrated`: codes (and scales) chosen against the
    #: layer's input statistics ``H = sum x x^T``.
    calibrated: bool = False
    #: Implements :meth:`Backend.group_layout`, :meth:`Backend.get_group_scales` and
    #: :meth:`Backend.with_group_scales` (per-group scales, read and written).
    group_scales: bool = False
    #: Implements :meth:`Backend.group_layout`, :meth:`Backend.get_group_offsets` and
    #: :meth:`Backend.with_group_offsets` (per-group zero points, read and written, as the additive
    #: offset each group's zero point gives its weights): the twin of ``group_scales``.
    group_offsets: bool = False
    #: Implements :meth:`Backend.from_checkpoint`, :meth:`Backend.to_checkpoint`,
    #: :meth:`Backend.checkpoint_config` and :meth:`Backend.storage_options`: storage to and from
    #: the key layout transformers writes, so an export streams checkpoint tensors without modules.
    checkpoint: bool = False
    #: Implements :meth:`Backend.load_model_file`, :meth:`Backend.model_file_layers` and
    #: :meth:`Backend.write_model_file` for the whole-model files named by
    #: :attr:`Backend.model_file_suffixes` (a GGUF file): ``qadapt.load_model_file`` and an export
    #: whose BASE is such a file go through them.
    model_files: bool = False


#: ``rewrite(name, storage, bias) -> (new storage, new bias or None) | None`` (:meth:`Backend.write_model_file`):
#: ``name`` the layer's canonical module name, ``storage`` its weight as the file holds it, ``bias`` its float32
#: bias ``[out]`` or None; None keeps the layer's bytes as they are.
LayerRewrite = Callable[
    [str, "QuantizedWeight", "torch.Tensor | None"], "tuple[QuantizedWeight, torch.Tensor | None] | None"
]


@dataclass(frozen=True)
class GroupLayout:
    """How a backend's per-group scales cover a weight ``[out, in]``.

    The row-major flattened weight is cut into ``num_groups`` runs of ``group_size`` consecutive
    elements (the last may be shorter); every element of a run is multiplied by the same scale.
    bitsandbytes 4-bit: one run per absmax block; int8 row-wise: ``group_size == in_features``.
    """

    group_size: int
    num_groups: int

    def expand(self, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``values [num_groups]`` repeated to a weight-shaped ``[out, in]`` tensor (differentiable)."""
        numel = shape[0] * shape[1]
        return values.repeat_interleave(self.group_size)[:numel].reshape(shape)


@dataclass(frozen=True)
class CalibrationStats:
    """A layer's input statistics, gathered from calibration batches.

    ``hessian``: ``H = sum_rows x x^T``, float32 ``[in, in]`` over ``rows`` input rows (the
    output-space metric: ``||X E^T||^2 = tr(E H E^T)`` for a weight error ``E [out, in]``).
    ``damp``: the relative damping a calibrated quantizer adds to H's diagonal
    (``damp * mean(diag H)``) before inverting it.
    """

    hessian: torch.Tensor
    rows: int
    damp: float = 0.01


def _missing(plugin: object, member: str) -> CapabilityError:
    """The error an optional protocol member raises when a plugin does not implement it."""
    return CapabilityError(f"{type(plugin).__name__} does not implement {member} (an optional protocol member)")


class _Plugin(ABC):  # noqa: B024 (abstract through its two subclasses)
    """What both families share: options, name and protocol version."""

    #: Protocol version the plugin was written against; must equal :data:`API_VERSION`.
    api_version: ClassVar[int] = API_VERSION
    #: The plugin's options model.
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: Set by the registry to the entry-point name the plugin was loaded under.
    name: ClassVar[str] = ""

    def __init__(self, options: PluginOptions | Mapping[str, Any] | None = None) -> None:
        if options is None:
            options = self.Options()
        elif isinstance(options, Mapping):
            options = self.Options.model_validate(dict(options))
        elif not isinstance(options, self.Options):
            raise ArgumentTypeError(
                f"{type(self).__name__} options must be a {self.Options.__name__} or a dict, "
                f"got {type(options).__name__}"
            )
        self.options = options

    def describe(self) -> str:
        """``name(option=value, ...)`` with the options that differ from their defaults."""
        changed = self.options.model_dump(exclude_defaults=True)
        inner = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{self.name or type(self).__name__}({inner})"


class Backend(_Plugin):
    """A quantizer: owns quantized linear modules and moves weights between float and quantized form.

    Storage-level members (``dequantize``, ``requantize``) take a :class:`QuantizedWeight`, not a
    module, so a merge can later run on checkpoint tensors without building modules.
    """

    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities()
    #: Export targets this backend offers (``qadapt export --to NAME``): ``{name: options}``, the
    #: options applied over the base's own format (e.g. ``{"nf4": {"quant_type": "nf4"}}``).
    #: Needs ``capabilities.checkpoint``.
    export_targets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Suffixes of whole-model files this backend opens and writes (``(".gguf",)``), lower case with the
    #: dot. Needs ``capabilities.model_files``; two installed backends may not declare the same suffix.
    model_file_suffixes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def owns(self, module: nn.Module) -> bool:
        """True when ``module`` is a linear layer quantized the way this backend understands."""

    @abstractmethod
    def quantize(self, linear: nn.Linear) -> nn.Module:
        """Quantize a float ``nn.Linear`` into a module this backend owns (bias kept in float)."""

    @abstractmethod
    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of an owned module."""

    @abstractmethod
    def get_storage(self, module: nn.Module) -> QuantizedWeight:
        """The module's current quantized storage (tensors shared with the module, not copied)."""

    @abstractmethod
    def set_storage(self, module: nn.Module, storage: QuantizedWeight) -> None:
        """Make ``storage`` the module's weight (a swap; nothing half written on failure)."""

    @abstractmethod
    def dequantize(self, storage: QuantizedWeight) -> torch.Tensor:
        """The float32 weight ``[out, in]`` that ``storage`` represents."""

    @abstractmethod
    def requantize(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Quantize float ``weight [out, in]`` with the same settings (type, block size, ...) as ``like``."""

    @abstractmethod
    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The quantized layer's output ``[..., out]`` for ``x [..., in]``, safe to modify in place."""

    # ----------------------------------------------------------- optional members

    def check_layer(self, in_features: int, out_features: int) -> None:
        """Raise a :class:`qadapt.errors.ConfigError` when the options cannot quantize a float layer of
        this shape (a group size that does not divide ``in_features``, say). Default: any shape.

        Called for every float layer the backend would quantize, before any module is created;
        ``wrap`` adds the layer's name and reports every layer that does not fit at once.
        """

    # Each member below is declared by a flag in ``capabilities``; the core asks only when it is set.

    def requantize_keep_state(self, weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """Quantize ``weight [out, in]`` keeping ``like``'s scales (and any nested state) bit for bit.

        Only the codes are chosen (nearest). Needs ``capabilities.keep_state``. Returning storage
        whose scale tensors are ``like``'s own objects is allowed (they are never written).
        """
        raise _missing(self, "requantize_keep_state")

    def requantize_calibrated(
        self, weight: torch.Tensor, like: QuantizedWeight, stats: CalibrationStats
    ) -> QuantizedWeight:
        """Quantize ``weight [out, in]`` in ``like``'s format, choosing codes (and scales where the
        format allows) to minimise the output error ``tr(E H E^T)`` under ``stats.hessian``.

        Needs ``capabilities.calibrated``. The result must be in the backend's standard format.
        """
        raise _missing(self, "requantize_calibrated")

    def group_layout(self, storage: QuantizedWeight) -> GroupLayout:
        """How ``storage``'s per-group scales (and zero points) cover its weight. Needs
        ``capabilities.group_scales`` or ``capabilities.group_offsets``; a format whose groups are not runs
        of the row-major weight (hqq's ``axis=0``) raises :class:`CapabilityError` saying so."""
        raise _missing(self, "group_layout")

    def get_group_scales(self, storage: QuantizedWeight) -> torch.Tensor:
        """The effective per-group scales, float32 ``[num_groups]``: each group's weights are its codes'
        values times its scale, in the backend's own units (bnb4: the dequantized absmax of each
        block; bnb8: each row's ``SCB``, the codes being ``CB / 127``). Methods use ratios only."""
        raise _missing(self, "get_group_scales")

    def with_group_scales(self, storage: QuantizedWeight, scales: torch.Tensor) -> QuantizedWeight:
        """New storage with ``storage``'s codes and per-group scales ``scales [num_groups]``.

        ``dequantize`` of the result equals ``dequantize(storage)`` with each group rescaled by
        ``scales / get_group_scales(storage)``, up to the format's rounding of scales (e.g. a
        nested, double-quantized state). ``storage`` is not modified.
        """
        raise _missing(self, "with_group_scales")

    def get_group_offsets(self, storage: QuantizedWeight) -> torch.Tensor:
        """Each group's additive offset, float32 ``[num_groups]``, in weight units: the format stores
        ``W = codes part + offset`` per group (hqq: ``W = (q − zero) · scale``, offset ``−zero · scale``;
        a min-offset format: its ``m``). Needs ``capabilities.group_offsets``."""
        raise _missing(self, "get_group_offsets")

    def with_group_offsets(self, storage: QuantizedWeight, offsets: torch.Tensor) -> QuantizedWeight:
        """New storage with ``storage``'s codes and scales and per-group offsets ``offsets [num_groups]``.

        ``dequantize`` of the result equals ``dequantize(storage)`` with each group shifted by
        ``offsets - get_group_offsets(storage)``, up to the format's rounding of zero points (a
        float16 zero, an integer zero). ``storage`` is not modified. Needs ``capabilities.group_offsets``.
        """
        raise _missing(self, "with_group_offsets")

    def dtype_fixed_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The owned module's parameters and buffers whose dtype is part of the quantized format.

        Keys are names as in ``module.named_parameters()`` / ``named_buffers()``. A module-level
        conversion (``.half()``, ``.to(dtype)``, ``.type()``, ..., all through ``nn.Module._apply``)
        of a :class:`~qadapt.model.layer.QuantAdapterLinear` moves these between devices but keeps their
        dtype and bits. Default: every parameter and buffer that is not floating point (integer
        codes). A backend that packs codes into a float container (bitsandbytes' ``quant_storage``)
        adds that container here.
        """
        named = [*module.named_parameters(), *module.named_buffers()]
        return {name: t for name, t in named if not t.dtype.is_floating_point and not t.dtype.is_complex}

    def from_checkpoint(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> QuantizedWeight | None:
        """One linear layer's weight as a transformers checkpoint stores it, or None when not ours.

        ``tensors``: the layer's checkpoint tensors, keys relative to the layer (``weight``,
        ``weight.absmax``, ``SCB``, ...; never ``bias``). ``config``: the checkpoint's
        ``quantization_config`` (None for a float checkpoint). Needs ``capabilities.checkpoint``.
        Like :meth:`owns`, returning None lets another backend read the layer.
        """
        raise _missing(self, "from_checkpoint")

    def to_checkpoint(self, storage: QuantizedWeight) -> dict[str, torch.Tensor]:
        """``storage`` as transformers saves the layer, keys relative to the layer (the inverse of
        :meth:`from_checkpoint`; ``from_pretrained`` of the written model must load it bit for bit)."""
        raise _missing(self, "to_checkpoint")

    def checkpoint_config(
        self, storage: QuantizedWeight, base_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The ``quantization_config`` transformers writes into ``config.json`` for a model whose
        quantized layers are in ``storage``'s format (None: a float model, no entry).

        ``base_config``: the source checkpoint's ``quantization_config`` when it was already in
        this backend's format; settings the storage does not decide (a compute dtype) are kept.
        """
        raise _missing(self, "checkpoint_config")

    def storage_options(self, storage: QuantizedWeight) -> dict[str, Any]:
        """The options (of :attr:`Options`) under which :meth:`quantize` writes ``storage``'s format.

        An export keeps a base layer as it is when the target's options agree with these.
        """
        raise _missing(self, "storage_options")

    def float_modules_config(self, names: list[str]) -> dict[str, Any]:
        """The ``quantization_config`` fields that make transformers' loader keep the modules ``names``
        in float (and nothing else it would keep otherwise: ``names`` includes those).

        Optional; an export uses it to write a model whose float linears stay float, as they were
        when the adapter was trained.
        """
        raise _missing(self, "float_modules_config")

    def forward_storage(self, module: nn.Module, storage: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of ``module`` as if it held ``storage``: output ``[..., out]`` for ``x [..., in]``.

        Optional; merge-aware layers (``wrap(..., merge_aware=True)``) compute with the storage their
        merge will write through it. It must give exactly what :meth:`forward` gives after
        ``set_storage(module, storage)``, and leave the module's storage as it was. The default swaps
        ``storage`` in with :meth:`set_storage`, runs :meth:`forward`, swaps the old storage back and
        puts back the module's own parameter objects where the swap replaced them (so optimizers and
        tied references stay attached). Not thread-safe; a backend may run its kernel on ``storage``
        directly instead.
        """
        old = self.get_storage(module)
        params = dict(module._parameters)
        self.set_storage(module, storage)
        try:
            return self.forward(module, x)
        finally:
            self.set_storage(module, old)
            for key, param in params.items():
                if module._parameters.get(key) is not param:
                    module._parameters[key] = param
    def load_model_file(self, path: str | os.PathLike[str], **options: Any) -> nn.Module:
        """The model in the file ``path`` (a suffix of :attr:`model_file_suffixes`) as a transformers model
        whose linear layers are modules this backend owns, holding the file's own quantized data (no float
        copy of them); config and tokenizer as transformers reads them from the file (the tokenizer on
        ``model.qadapt_tokenizer``). ``options`` are the backend's own (a float dtype for the other tensors).

        The file is hostile: bad headers, shapes, offsets or paths raise
        :class:`~qadapt.errors.CheckpointError` naming the file and the field; it is never written.
        Needs ``capabilities.model_files``.
        """
        raise _missing(self, "load_model_file")

    def model_file_layers(self, path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
        """``{canonical module name: (in_features, out_features)}`` of the linear layers :meth:`load_model_file`
        would make this backend's modules (the layers an adapter trained on that model can adapt)."""
        raise _missing(self, "model_file_layers")

    def write_model_file(self, base: str | os.PathLike[str], out: BinaryIO, rewrite: LayerRewrite) -> list[str]:
        """Stream the file ``base`` into the open binary file ``out``: every layer of
        :meth:`model_file_layers` is offered to ``rewrite``; a layer it rewrites is written in its own format
        (new storage from this backend's requantize, same type and byte size), everything else (metadata,
        tokenizer, other tensors) is copied byte for byte. Holds at most one layer in memory. Returns the
        names of the layers rewritten. ``out`` is the caller's (a temporary file it moves into place).
        """
        raise _missing(self, "write_model_file")

    def snapshot(self, module: nn.Module) -> QuantizedWeight:
        """A copy of the module's storage that :meth:`restore` puts back bit for bit."""
        return self.get_storage(module).clone()

    def restore(self, module: nn.Module, snapshot: QuantizedWeight) -> None:
        """Put a :meth:`snapshot` back."""
        self.set_storage(module, snapshot)

    def dequantize_module(self, module: nn.Module) -> torch.Tensor:
        """Shortcut: the float32 weight ``[out, in]`` of an owned module."""
        return self.dequantize(self.get_storage(module))


#: ``base_forward(x [..., in]) -> [..., out]``: any callable base (what a :class:`BaseLayer` is; kept for
#: plugins that annotate with it).
BaseForward = Callable[[torch.Tensor], torch.Tensor]
#: ``merge_rows(weight_rows [r, in] float32, rows: slice) -> merged rows [r, in] float32`` (:meth:`Method.row_merger`).
RowMerger = Callable[[torch.Tensor, slice], torch.Tensor]


class BaseLayer:
    """What a method sees of the frozen quantized layer: call it as ``base_forward``, and more.

    ``base(x [..., in]) -> [..., out]`` runs the backend's forward; :meth:`weight` gives the
    dequantized weight for methods whose forward needs it (DoRA's norms, per-group scales).
    Built over a module, or over bare storage (an export merges checkpoint tensors without
    modules; calling such a BaseLayer raises).
    """

    def __init__(
        self, backend: Backend, module: nn.Module | None = None, storage: QuantizedWeight | None = None
    ) -> None:
        if (module is None) == (storage is None):
            raise ArgumentTypeError("BaseLayer takes exactly one of module or storage")
        self.backend = backend
        self.module = module
        self._storage = storage

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is None:
            raise ArgumentTypeError("this BaseLayer holds bare storage (no module); it has no forward")
        return self.backend.forward(self.module, x)

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias ``[out]`` or None (None for bare storage)."""
        return None if self.module is None else getattr(self.module, "bias", None)

    def storage(self) -> QuantizedWeight:
        """The layer's current quantized storage."""
        if self._storage is not None:
            return self._storage
        return self.backend.get_storage(self.module)

    def weight(self) -> torch.Tensor:
        """The dequantized weight, float32 ``[out, in]``, outside autograd."""
        with torch.no_grad():
            return self.backend.dequantize(self.storage()).float()

    def group_layout(self) -> GroupLayout:
        """The backend's per-group scale layout (needs ``capabilities.group_scales``)."""
        return self.backend.group_layout(self.storage())


class Method(_Plugin):
    """An adapter method: creates adapter modules and says how they act on a layer.

    A method instance is stateless apart from its options; trainable state lives in the adapter
    module it creates, so one instance serves every layer of a model.
    """

    #: Backend capability flags (names of :class:`BackendCapabilities` fields) this method needs;
    #: wrapping onto a backend without one of them is refused with the reason.
    requires: ClassVar[frozenset[str]] = frozenset()

    def init_adapter(self, adapter: nn.Module, base: BaseLayer) -> None:
        """Optional: finish a fresh adapter once the quantized layer exists (default: nothing).

        Called right after :meth:`create_adapter` with the layer it will adapt, so an adapter can
        size itself by the backend's groups or read the dequantized weight (DoRA's magnitude).
        """

    def merge_storage(self, adapter: nn.Module, backend: Backend, storage: QuantizedWeight) -> QuantizedWeight | None:
        """Optional: merge straight into ``backend``'s storage, or None for the float path.

        A method whose change the format can represent exactly (per-group scales) returns new
        storage here, and the core skips requantization. ``storage`` is not modified.
        """
        return None

    def merge_bias(self, adapter: nn.Module, bias: torch.Tensor) -> torch.Tensor | None:
        """Optional: the merged layer's bias ``[out]`` float32 for the base's bias ``bias [out]`` float32,
        or None (the default): the merge leaves the bias as it is.

        A method whose adapted output is not ``W' x + b`` for the base's own ``b`` (IA³ scales the whole
        output, bias included) returns the bias a plain linear needs here, so that
        ``linear(x, merge_weight(W), merge_bias(b))`` equals the adapted forward. Called only for a
        layer that has a bias; must not modify ``bias``. A method that implements it implements
        :meth:`unmerge_bias` too.
        """
        return None

    def unmerge_bias(self, adapter: nn.Module, bias: torch.Tensor) -> torch.Tensor | None:
        """Optional: the inverse of :meth:`merge_bias` (float32 ``[out]``), or None (the default: unchanged)."""
        return None

    def for_layer(self, name: str) -> Method:
        """Optional: the method instance that adapts layer ``name`` (default: ``self``).

        ``name`` is the layer's canonical module name (``model.layers.0.mlp.down_proj``, wrapper
        segments removed). A method with per-layer choices (IA³'s feed-forward layers, a rank
        pattern) returns an instance of its own class with the **same options** that makes the
        choice for that layer; ``wrap``, ``add_adapter``, checkpoint loading and the export call it
        once per layer, before :meth:`check_layer`. Must not change ``self``.
        """
        return self

    def row_merger(self, adapter: nn.Module) -> RowMerger | None:
        """Optional: a function that merges a block of rows at a time, or None (merge whole layers).

        The function takes ``(weight_rows [r, in] float32, rows)``, the rows ``rows`` (a slice of
        ``range(out_features)``) of the weight, and returns the merged rows ``[r, in]`` float32: the
        same rows :meth:`merge_weight` gives for the whole weight, up to float rounding. A method
        whose merge treats each output row on its own (OFT's rotation of the inputs, LoRA's
        ``W + s B A``) offers it, so an export holds one block of the weight's rows in float32
        instead of the whole weight. Called once per layer; whatever the adapter needs (rotations,
        factors) may be computed before returning.
        """
        return None

    def create_shared(self, shapes: Sequence[tuple[int, int]]) -> nn.Module | None:
        """State shared by all adapted layers of one model, or None (the default).

        Called once per wrapped model with every target's ``(in_features, out_features)``
        before any :meth:`create_adapter`. RandLora uses it for its random bases.
        """
        return None

    def check_layer(self, in_features: int, out_features: int) -> None:
        """Raise a :class:`qadapt.errors.ConfigError` when the options cannot fit this layer.

        Called before any module is created, so a bad option never leaves a model half wrapped.
        """

    @abstractmethod
    def create_adapter(self, in_features: int, out_features: int, shared: nn.Module | None) -> nn.Module:
        """A fresh adapter module for one layer; its parameters are the trainable ones."""

    @abstractmethod
    def forward(self, adapter: nn.Module, x: torch.Tensor, base_forward: BaseLayer) -> torch.Tensor:
        """The adapted output ``[..., out]`` for ``x [..., in]``.

        ``base_forward`` is a :class:`BaseLayer`: callable on ``x``, and it gives the
        dequantized weight to methods that need it.

        Additive methods return ``base_forward(x) + delta(x)``; input-transform methods (OFT)
        return ``base_forward(transform(x))``.
        """

    @abstractmethod
    def merge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The float32 weight ``[out, in]`` whose plain linear equals the adapted layer.

        Must not modify ``weight`` in place.
        """

    @abstractmethod
    def unmerge_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merge_weight` (up to rounding). Must not modify ``weight`` in place."""


#: The members the registry requires, per family, when it loads a plugin.
REQUIRED_MEMBERS: dict[str, tuple[str, ...]] = {
    "backends": tuple(sorted(Backend.__abstractmethods__)),
    "methods": tuple(sorted(Method.__abstractmethods__)),
}
BASE_CLASSES: dict[str, type[_Plugin]] = {"backends": Backend, "methods": Method}
