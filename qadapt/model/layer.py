"""``QuantAdapterLinear``: one method's adapters on one backend's quantized linear layer.

Written once for every method x backend pair: the forward, the merge protocol (dequantize, apply
the adapter to the float weight, check, requantize, swap) and both ways back (exact snapshot
restore, or the method's inverse).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from qadapt import registry
from qadapt.config import check_adapter_name
from qadapt.errors import (
    AdapterStateError,
    ArgumentTypeError,
    CapabilityError,
    ConfigError,
    InputError,
    TargetError,
    shorten,
)
from qadapt.merging.aware import merge_aware_storage
from qadapt.merging.engine import merge_storage, merged_bias, unmerge_storage
from qadapt.merging.result import MergeResult, RequantizeMode
from qadapt.model import distributed
from qadapt.model.merge_aware import AwareCall, AwareTarget, aware_forward, aware_target, bias_like
from qadapt.protocols import Backend, BaseLayer, CalibrationStats, Method, QuantizedWeight

__all__ = ["LayerState", "MergeResult", "QuantAdapterLinear", "UnmergeMode", "check_compatible"]

UnmergeMode = Literal["exact", "inverse"]
#: Why merging is refused while adapters are disabled (the layer computes the plain base then).
DISABLED_MERGE = (
    "adapters are disabled, so this computes the plain quantized layer and merging would change that; "
    "enable_adapters() first to merge, or unwrap(model, merge=False) to drop the adapters"
)
#: State-dict key (under the layer's prefix) naming the merged adapter, present only while one is merged.
MERGED_KEY = "qadapt_merged_adapter"
#: State-dict key present (a one-element uint8 tensor) while the merge was reverted by the guard:
#: the storage is the unmerged base, so an inverse unmerge must leave it as it is.
REVERTED_KEY = "qadapt_merge_reverted"


@dataclass
class _MergedState:
    adapter: str
    snapshot: QuantizedWeight | None
    #: digest of the adapter's tensors at merge: an inverse unmerge refuses a changed adapter
    #: (None for a merge loaded from a state dict, whose adapter tensors arrive later).
    digest: str | None
    #: requires_grad of each adapter parameter before the merge froze them.
    grad_flags: dict[str, bool]
    #: the guard kept the old storage (the merge would have been worse than no adapter): the
    #: layer runs the plain base, and unmerging has no weight to change.
    reverted: bool = False
    #: the merge swapped in a new bias (:meth:`Method.merge_bias`); ``old_bias`` is the one it replaced
    #: (the same object, never written), which an exact unmerge puts back.
    bias_changed: bool = False
    old_bias: torch.Tensor | None = None


@dataclass
class LayerState:
    """A layer's changeable state at one moment (see :meth:`QuantAdapterLinear.capture_state`)."""

    storage: QuantizedWeight
    #: how many times the layer had swapped its storage (merge, unmerge) when this was captured.
    storage_writes: int
    merged: _MergedState | None
    adapters: dict[str, nn.Module]
    methods: dict[str, Method]
    active: str | None
    enabled: bool
    grad_flags: list[tuple[nn.Parameter, bool]]
    #: the base's bias object (a merge may swap in another, see :meth:`Method.merge_bias`).
    bias: torch.Tensor | None = None


def adapter_digest(adapter: nn.Module) -> str:
    """A digest of every tensor of ``adapter`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in adapter.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_compatible(method: Method, backend: Backend) -> None:
    """Raise :class:`CapabilityError` when ``backend`` lacks a capability ``method`` requires."""
    missing = sorted(need for need in method.requires if not getattr(backend.capabilities, need, False))
    if missing:
        raise CapabilityError(
            f"method {method.name or type(method).__name__!r} needs backend capabilities {missing} that backend "
            f"{backend.name or type(backend).__name__!r} does not declare; pick a backend that has them "
            "(qadapt.plugins() lists the installed ones)"
        )


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if device_type == "meta":  # torch has no autocast state for meta and raises when asked
        return x.dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class QuantAdapterLinear(nn.Module):
    """A quantized linear layer (``base``) with named adapters of one or more methods.

    Args:
        base: a module the backend owns, or a float ``nn.Linear`` that the backend quantizes.
        method: a method plugin name (``"oft"``) or a :class:`Method` instance.
        backend: a backend plugin name (``"bnb4"``) or a :class:`Backend` instance.
        adapter_name: name of the first adapter.
        method_options / backend_options: options (dict or options model) when names are given.
        shared: shared method state (see :meth:`Method.create_shared`); created for this layer
            alone when omitted.
        merge_aware: compute with the storage the merge will write, straight-through gradient
            (see :attr:`merge_aware` and :mod:`qadapt.model.merge_aware`).

    Input ``[..., in_features]``, output ``[..., out_features]`` in the input's dtype (or the
    autocast dtype under ``torch.autocast``).
    """

    #: Storage swaps so far (merge, unmerge); a rollback swaps back only a layer that wrote. A class
    #: default, so layers pickled before it existed load.
    _storage_writes: int = 0
    #: Class defaults, so layers pickled before merge-aware training existed load.
    _merge_aware: bool = False
    _aware_cache: AwareTarget | None = None

    def __init__(
        self,
        base: nn.Module,
        method: Method | str,
        backend: Backend | str,
        *,
        adapter_name: str = "default",
        method_options: Any = None,
        backend_options: Any = None,
        shared: nn.Module | None = None,
        merge_aware: bool = False,
    ) -> None:
        super().__init__()
        backend_obj: Backend = registry.instance("backends", backend, backend_options)  # type: ignore[assignment]
        method_obj: Method = registry.instance("methods", method, method_options)  # type: ignore[assignment]
        if isinstance(base, QuantAdapterLinear):
            raise TargetError("this layer is already a QuantAdapterLinear; add an adapter with add_adapter()")
        check_compatible(method_obj, backend_obj)
        if not backend_obj.owns(base):
            if type(base) is not nn.Linear:
                raise TargetError(
                    f"backend {backend_obj.name!r} cannot adapt a {type(base).__name__}: "
                    "it takes a float nn.Linear or a layer it quantized itself"
                )
            in_f, out_f = base.in_features, base.out_features
            _check_not_empty(in_f, out_f)
            backend_obj.check_layer(in_f, out_f)
            method_obj.check_layer(in_f, out_f)
            base = backend_obj.quantize(base)
        else:
            _check_not_empty(*backend_obj.features(base))
        self.base = base
        self.base.requires_grad_(False)
        self.backend = backend_obj
        self.in_features, self.out_features = backend_obj.features(base)
        self.adapters = nn.ModuleDict()
        self.methods: dict[str, Method] = {}
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        self._merged: _MergedState | None = None
        self._storage_writes = 0
        self._add_checked_adapter(adapter_name, method_obj, shared)
        self.merge_aware = merge_aware
        # Start in the base layer's mode: some backends' forward depends on it (bnb8).
        self.train(base.training)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantAdapterLinear:
        # Every module-level conversion (.half(), .float(), .to(dtype), .type(), .cuda(), ...) runs
        # through here. A cast must not convert the quantized format's tensors by value (packed
        # codes in a float container would be garbled) nor integer tensors (.type() converts those
        # too: codes, adapter index buffers), so they keep their bits and only follow a device move.
        # The cast is never applied to them (a quantizer's tensor subclass may refuse it, as
        # optimum-quanto's do): what ``fn`` would do is read off an empty tensor of the same dtype
        # and device, and a fixed tensor gets only the device move, if there is one.
        self._aware_cache = None  # it holds the storage's tensors as they were before the move
        fixed = list(self.backend.dtype_fixed_tensors(self.base).values())
        fixed += [t for t in [*self.parameters(), *self.buffers()] if not t.is_floating_point()]
        ids = {id(t) for t in fixed}

        def keep_format(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in ids:
                return fn(t)
            device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
            return t if t.device == device else t.to(device)

        return super()._apply(keep_format, recurse)

    # ----------------------------------------------------------------- adapters

    def add_adapter(
        self, name: str, method: Method | str, *, method_options: Any = None, shared: nn.Module | None = None
    ) -> nn.Module:
        """Create adapter ``name`` with ``method`` and make it active. Returns the adapter module."""
        self._check_new_name(name)
        if self._merged is not None:
            # A new adapter would be initialised from (and later merged onto) the merged weight.
            raise AdapterStateError(
                f"cannot add adapter {name!r} while adapter {self._merged.adapter!r} is merged; unmerge() first"
            )
        method_obj: Method = registry.instance("methods", method, method_options)  # type: ignore[assignment]
        check_compatible(method_obj, self.backend)
        method_obj.check_layer(self.in_features, self.out_features)
        return self._add_checked_adapter(name, method_obj, shared)

    def _check_new_name(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists on this layer; delete_adapter() it first")

    def _add_checked_adapter(self, name: str, method_obj: Method, shared: nn.Module | None) -> nn.Module:
        """Add an adapter whose method already passed ``check_layer`` for this layer."""
        self._check_new_name(name)
        if shared is None:
            shared = method_obj.create_shared([(self.in_features, self.out_features)])
        adapter = method_obj.create_adapter(self.in_features, self.out_features, shared)
        method_obj.init_adapter(adapter, self.base_layer)
        device = next((t.device for t in self.base.parameters()), None)
        if device is not None:
            adapter.to(device)
        self.adapters[name] = adapter
        self.methods[name] = method_obj
        self.active_adapter = name
        return adapter

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter used by forward and merge."""
        self._require_adapter(name)
        if self._merged is not None and self._merged.adapter != name:
            raise AdapterStateError(
                f"adapter {self._merged.adapter!r} is merged; unmerge() before switching to {name!r}"
            )
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        self._require_adapter(name)
        if self._merged is not None and self._merged.adapter == name:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge() before deleting it")
        del self.adapters[name]
        del self.methods[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the adapters on or off in forward (off: the plain quantized layer)."""
        if not enabled and self._merged is not None:
            raise AdapterStateError("cannot disable adapters while one is merged; unmerge() first")
        self.adapters_enabled = enabled

    def disable_adapters(self) -> None:
        """Same as ``enable_adapters(False)``."""
        self.enable_adapters(False)

    def _require_adapter(self, name: str | None) -> str:
        if name is None:
            if self.active_adapter is None:
                raise AdapterStateError("this layer has no adapter")
            return self.active_adapter
        if name not in self.adapters:
            raise ConfigError(f"no adapter named {shorten(name)} on this layer; adapters: {', '.join(self.adapters)}")
        return name

    @property
    def merge_aware(self) -> bool:
        """Whether the layer computes merge-aware: its forward (training and eval) runs the backend's
        quantized forward on the storage :meth:`merge` will write, with a straight-through gradient
        to the adapter, and :meth:`merge` writes exactly that storage (no guard). Settable; needs a
        backend that can requantize."""
        return self._merge_aware

    @merge_aware.setter
    def merge_aware(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"merge_aware must be True or False, got {shorten(value)}")
        if value and not self.backend.capabilities.requantize:
            raise CapabilityError(
                f"merge_aware needs a backend that can requantize, and backend {self.backend.name!r} cannot "
                "(its adapters stay unmerged, so there is no merged storage to train through)"
            )
        self._merge_aware = value
        self._aware_cache = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    @property
    def merged_adapter(self) -> str | None:
        return None if self._merged is None else self._merged.adapter

    # ------------------------------------------------------------------ forward

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen quantized layer alone (with whatever is merged into it)."""
        return self.backend.forward(self.base, x)

    @property
    def base_layer(self) -> BaseLayer:
        """The frozen quantized layer as methods see it (callable, plus its dequantized weight)."""
        return BaseLayer(self.backend, self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        out_dtype = _output_dtype(x)
        base_forward = self.base_layer
        if self._merged is not None or not self.adapters_enabled or self.active_adapter is None:
            out = base_forward(x)
        else:
            name = self.active_adapter
            if self._merge_aware:
                method, adapter = self.methods[name], self.adapters[name]
                out = aware_forward(
                    self._aware_call(name), x, self._swap_bias, lambda: method.forward(adapter, x, base_forward)
                )
            else:
                out = self.methods[name].forward(self.adapters[name], x, base_forward)
        return out.to(out_dtype)

    def _aware_call(self, name: str) -> AwareCall:
        """The merge-aware forward's inputs for adapter ``name``, its target storage cached per step."""
        self._check_not_sharded("run merge-aware")
        method, adapter = self.methods[name], self.adapters[name]
        storage, bias = self.backend.get_storage(self.base), self.bias_tensor
        target = aware_target(self.backend, method, adapter, storage, bias, name=name, cached=self._aware_cache)
        self._aware_cache = target
        params = [p for p in adapter.parameters() if p.requires_grad]
        return AwareCall(self.backend, method, adapter, self.base, storage, bias, target, params)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"input must be a torch.Tensor [..., {self.in_features}], got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise InputError(
                f"input dtype {x.dtype} is not a floating-point dtype; this layer takes float32, bfloat16, "
                "float16 or float64 input"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise InputError(
                f"input shape {tuple(x.shape)} does not fit this layer: its last dimension must be "
                f"in_features={self.in_features}"
            )
        if x.is_meta:
            weight = next(self.base.parameters(), None)
            if weight is not None and not weight.is_meta:
                raise InputError(
                    f"input is on the meta device but the layer's weights are on {weight.device}; "
                    "move the input to that device (meta input runs only on a meta layer)"
                )

    # -------------------------------------------------------------------- merge

    def _check_can_merge(self) -> None:
        caps = self.backend.capabilities
        if not caps.requantize:
            raise CapabilityError(
                f"backend {self.backend.name!r} cannot requantize, so adapters stay unmerged on it "
                "(its forward is kept with the adapter applied on top)"
            )

    def _check_not_sharded(self, doing: str) -> None:
        if distributed.any_sharded(self):
            raise CapabilityError(
                f"cannot {doing} a sharded layer (FSDP2 / DTensor parameters): each rank holds only a shard "
                "of the quantized weight. save_adapter() on every rank (rank 0 writes the whole adapter), then "
                "load_adapter() and merge on an unsharded model (docs/training.md)"
            )

    @torch.no_grad()
    def merge(
        self,
        safe: bool = True,
        adapter_name: str | None = None,
        keep_snapshot: bool = True,
        *,
        requantize: RequantizeMode = "keep",
        stats: CalibrationStats | None = None,
        heldout: torch.Tensor | None = None,
        tune_steps: int = 0,
    ) -> MergeResult:
        """Fold an adapter into the quantized weight (see :func:`qadapt.merging.engine.merge_storage`).

        Dequantizes to float32, applies the method to the weight, checks the result is finite
        (``safe``), requantizes (``requantize``: ``"keep"`` the layer's scales where the backend can,
        ``"calibrated"`` against ``stats``, or ``"fresh"``), keeps the old storage if the result would
        be worse than no adapter, and only then swaps the storage in. With ``keep_snapshot`` the old
        storage is kept for a bit-identical ``unmerge("exact")``. While merged, the adapter's
        parameters are frozen (``requires_grad=False``); unmerge gives their flags back.

        Raises:
            AdapterStateError: an adapter is already merged, or adapters are disabled.
            UnsafeMergeError: ``safe`` and the merged weight has NaN/Inf; nothing was written.
        """
        name = self._require_adapter(adapter_name)
        if self._merged is not None:
            raise AdapterStateError(
                f"adapter {self._merged.adapter!r} is already merged into this layer; unmerge() first"
            )
        if not self.adapters_enabled:
            raise AdapterStateError(DISABLED_MERGE)
        self._check_can_merge()
        self._check_not_sharded("merge")
        if keep_snapshot and not self.backend.capabilities.snapshot:
            raise CapabilityError(
                f"backend {self.backend.name!r} cannot snapshot its storage; merge with keep_snapshot=False"
            )
        storage = self.backend.get_storage(self.base)
        adapter = self.adapters[name]
        method = self.methods[name]
        if self._merge_aware:
            _check_aware_merge(requantize, stats, tune_steps)
            new_storage, result = merge_aware_storage(self.backend, method, adapter, storage, name=name, safe=safe)
        else:
            new_storage, result = merge_storage(
                self.backend,
                method,
                adapter,
                storage,
                name=name,
                requantize_mode=requantize,
                stats=stats,
                heldout=heldout,
                safe=safe,
                tune_steps=tune_steps,
            )
        old_bias = self.bias_tensor
        new_bias = None
        if not result.reverted:  # a reverted merge leaves the layer as it was, bias included
            new_bias = merged_bias(method, adapter, old_bias, name=name, safe=safe)
        new_bias = None if new_bias is None else bias_like(new_bias, old_bias)
        snapshot = storage.clone() if keep_snapshot else None
        self.backend.set_storage(self.base, new_storage)
        self._storage_writes += 1
        if new_bias is not None:
            self._swap_bias(new_bias)
        grad_flags = {key: p.requires_grad for key, p in adapter.named_parameters()}
        self._merged = _MergedState(
            name, snapshot, adapter_digest(adapter), grad_flags, result.reverted, new_bias is not None, old_bias
        )
        adapter.requires_grad_(False)
        return result

    @torch.no_grad()
    def unmerge(self, mode: UnmergeMode = "exact", safe: bool = True) -> None:
        """Take the merged adapter back out of the weight.

        ``"exact"`` restores the storage snapshot taken at merge (bit-identical). ``"inverse"``
        computes ``method.unmerge_weight`` on the dequantized weight and requantizes (no memory
        held while merged; the result carries the quantization error of two round trips). The
        adapter's parameters get their ``requires_grad`` flags back.

        Raises:
            AdapterStateError: nothing is merged, ``"exact"`` without a snapshot, or ``"inverse"``
                after the adapter's tensors changed since the merge.
        """
        if mode not in ("exact", "inverse"):
            raise ConfigError(f"unmerge mode must be 'exact' or 'inverse', got {shorten(mode)}")
        if self._merged is None:
            raise AdapterStateError("nothing is merged into this layer; there is nothing to unmerge")
        self._check_not_sharded("unmerge")
        state = self._merged
        adapter = self.adapters[state.adapter]
        if state.reverted:
            pass  # the storage never changed: it is the unmerged base in either mode
        elif mode == "exact":
            if state.snapshot is None:
                raise AdapterStateError(
                    "no snapshot was kept at merge (keep_snapshot=False); use unmerge(mode='inverse')"
                )
            self.backend.restore(self.base, state.snapshot)
            self._storage_writes += 1
            if state.bias_changed:
                self._swap_bias(state.old_bias)
        else:
            self._check_can_merge()
            if state.digest is not None and adapter_digest(adapter) != state.digest:
                raise AdapterStateError(
                    f"adapter {state.adapter!r} changed since it was merged, so an inverse unmerge would not give "
                    "the base weight back; restore the adapter or unmerge(mode='exact')"
                )
            storage = self.backend.get_storage(self.base)
            method = self.methods[state.adapter]
            restored = unmerge_storage(self.backend, method, adapter, storage, name=state.adapter, safe=safe)
            bias = self.bias_tensor
            restored_bias = merged_bias(method, adapter, bias, name=state.adapter, safe=safe, inverse=True)
            restored_bias = None if restored_bias is None else bias_like(restored_bias, bias)
            self.backend.set_storage(self.base, restored)
            self._storage_writes += 1
            if restored_bias is not None:
                self._swap_bias(restored_bias)
        self._thaw(state)
        self._merged = None

    # ------------------------------------------------------- capture / restore

    @property
    def merged_state(self) -> _MergedState | None:
        """What is merged (adapter, snapshot, reverted), or None; read-only for whole-model operations."""
        return self._merged

    def capture_state(self) -> LayerState:
        """Everything an operation on this layer may change, as it is now (no weight is copied)."""
        return LayerState(
            storage=self.backend.get_storage(self.base),
            storage_writes=self._storage_writes,
            merged=self._merged,
            adapters=dict(self.adapters.items()),
            methods=dict(self.methods),
            active=self.active_adapter,
            enabled=self.adapters_enabled,
            grad_flags=[(p, p.requires_grad) for p in self.adapters.parameters()],
            bias=self.bias_tensor,
        )

    def restore_state(self, state: LayerState) -> None:
        """Put back a :meth:`capture_state` (the storage bit for bit: backends swap, never write in place)."""
        if self._storage_writes != state.storage_writes:  # only a layer that wrote its storage swaps it back
            self.backend.set_storage(self.base, state.storage)
            self._storage_writes = state.storage_writes
        if self.bias_tensor is not state.bias:
            self._swap_bias(state.bias)
        if list(self.adapters.items()) != list(state.adapters.items()):
            for name in list(self.adapters):
                del self.adapters[name]
            for name, adapter in state.adapters.items():
                self.adapters[name] = adapter
        self.methods = dict(state.methods)
        self.active_adapter = state.active
        self.adapters_enabled = state.enabled
        self._merged = state.merged
        for param, flag in state.grad_flags:
            param.requires_grad_(flag)

    # ------------------------------------------------------------------- bias

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        """The base layer's bias ``[out]`` as the backend's module holds it (a parameter or a plain tensor), or None."""
        return getattr(self.base, "bias", None)

    def _swap_bias(self, bias: torch.Tensor | None) -> None:
        """Make ``bias`` the base's bias object (a swap, like storage: the old tensor is never written)."""
        if "bias" in self.base._parameters:
            self.base._parameters["bias"] = bias
        else:
            self.base.bias = bias

    # ----------------------------------------------------------- state dicts

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The merged state travels with the weights: a merged base loaded into an unmerged layer
        # would otherwise get its adapter applied a second time. A uint8 tensor (the adapter
        # name in UTF-8) keeps the state dict savable with safetensors; absent when nothing is merged.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged is not None:
            destination[prefix + MERGED_KEY] = torch.tensor(
                list(self._merged.adapter.encode("utf-8")), dtype=torch.uint8
            )
            if self._merged.reverted:
                destination[prefix + REVERTED_KEY] = torch.ones(1, dtype=torch.uint8)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + MERGED_KEY
        covers = any(k.startswith(prefix + "base.") for k in state_dict)
        incoming = _merged_name(state_dict[key], key) if key in state_dict else None
        reverted_key = prefix + REVERTED_KEY
        reverted = _reverted_flag(state_dict[reverted_key], reverted_key) if reverted_key in state_dict else False
        if reverted and incoming is None:
            raise AdapterStateError(f"{reverted_key} is set but {key} (the merged adapter's name) is missing")
        if incoming is not None and incoming not in self.adapters:
            raise AdapterStateError(
                f"{key}: the state dict was saved with adapter {incoming!r} merged, and this layer has no adapter "
                f"of that name (adapters: {', '.join(self.adapters)}); add it before loading"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for extra in (key, reverted_key):
            if extra in unexpected_keys:
                unexpected_keys.remove(extra)
        current = None if self._merged is None else (self._merged.adapter, self._merged.reverted)
        if covers and (incoming, reverted) != (current or (None, False)):
            # The base weight about to be loaded is merged with ``incoming`` (or with nothing):
            # that is this layer's state from now on. A loaded merge has no snapshot, so it
            # comes out with unmerge("inverse").
            self._set_loaded_merge(incoming, reverted)

    def _set_loaded_merge(self, incoming: str | None, reverted: bool = False) -> None:
        if self._merged is not None:
            self._thaw(self._merged)
        self._merged = None
        if incoming is not None:
            adapter = self.adapters[incoming]
            grad_flags = {key: p.requires_grad for key, p in adapter.named_parameters()}
            # The adapter's tensors load after this hook, so no digest can be taken of them here.
            self._merged = _MergedState(incoming, None, None, grad_flags, reverted)
            adapter.requires_grad_(False)

    def _thaw(self, state: _MergedState) -> None:
        for key, param in self.adapters[state.adapter].named_parameters():
            param.requires_grad_(state.grad_flags.get(key, param.requires_grad))

    # --------------------------------------------------------------- reporting

    def extra_repr(self) -> str:
        methods = ", ".join(f"{name}: {m.describe()}" for name, m in self.methods.items())
        state = f", merged={self._merged.adapter!r}" if self._merged else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"backend={self.backend.describe()}, adapters={{{methods}}}, active={self.active_adapter!r}{state}"
        )


def _merged_name(value: Any, key: str) -> str:
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        try:
            return bytes(value.tolist()).decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise AdapterStateError(
        f"{key} must hold an adapter name as UTF-8 bytes (a 1-D uint8 tensor), got {_describe(value)}"
    )


def _reverted_flag(value: Any, key: str) -> bool:
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == (1,) and int(value) in (0, 1):
        return bool(int(value))
    raise AdapterStateError(f"{key} must be a one-element uint8 tensor holding 0 or 1, got {_describe(value)}")


def _describe(value: Any) -> str:
    """A state-dict value for an error message: dtype and shape (and the value, for one element)."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    text = f"{value.dtype} {tuple(value.shape)}"
    return text + f" holding {value.item()}" if value.numel() == 1 else text


def _check_aware_merge(requantize: RequantizeMode, stats: CalibrationStats | None, tune_steps: int) -> None:
    """Refuse merge options that would store something other than what a merge-aware layer computed."""
    if requantize != "keep" or stats is not None or tune_steps:
        raise ConfigError(
            f"this layer computes merge-aware, so its merge stores exactly the storage it trained with; "
            f"requantize={requantize!r}, calibration and tune_scales would change it. Merge without them, or set "
            "merge_aware = False on the layer first (qadapt.set_merge_aware(model, False)) for an ordinary merge"
        )


def _check_not_empty(in_features: int, out_features: int) -> None:
    if in_features <= 0 or out_features <= 0:
        raise TargetError(
            f"cannot adapt a zero-sized layer (in_features={in_features}, out_features={out_features}); "
            "both must be at least 1"
        )
