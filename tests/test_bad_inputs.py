"""A catalogue of bad inputs: each gives a clear qadapt error and leaves the model bit-identical.

Every row builds a model (or a single layer) and any files it needs (a checkpoint, a config),
fingerprints the model (every parameter and buffer, the backends' quantized storage, the module
tree, ``requires_grad`` flags, merge states) and every file on disk, does one bad thing, and checks
the exact error class, the key words of its message, and that model and files are bit-identical.

Documented behaviour for inputs that are *not* errors (float64 / bfloat16 input, meta input on a
meta layer) is tested at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import float_linear, model_checksum, tensor_checksum
from methods_for_tests import AddDelta, KnownOptions
from safetensors.torch import load_file, save_file
from tiny_models import perturb_adapters, tiny_llama
from torch import nn

import qadapt
from qadapt.config import ConfigValidationError
from qadapt.errors import (
    AdapterStateError,
    ArgumentTypeError,
    CheckpointError,
    ConfigError,
    InputError,
    LayerFitError,
    TargetError,
    UnsafeMergeError,
)
from qadapt.persist.adapter import CONFIG_FILE, WEIGHTS_FILE
from qadapt_bnb.bnb8 import Bnb8Backend
from qadapt_oft.method import OFTMethod

TARGETS = ["q_proj", "v_proj"]
OFT16 = {"block_size": 16}


# ------------------------------------------------------------------------------------ fingerprint


def disk_fingerprint(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def fingerprint(model: nn.Module) -> tuple:
    """Everything a failed call must leave as it was."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, qadapt.QuantAdapterLinear)]
    storage = tensor_checksum(
        (f"{n}.{key}", tensor)
        for n, layer in layers
        for key, tensor in sorted(layer.backend.get_storage(layer.base).tensors.items())
    )
    return (
        model_checksum(model),
        storage,
        tuple((n, type(m).__name__) for n, m in model.named_modules()),
        tuple((n, p.requires_grad) for n, p in model.named_parameters()),
        tuple((n, layer.merged_adapter, layer.active_adapter, tuple(layer.adapters)) for n, layer in layers),
    )


# ----------------------------------------------------------------------------------- model makers


def llama() -> nn.Module:
    return tiny_llama()


def narrow_llama() -> nn.Module:
    """Same module names as tiny_llama, hidden size 32 instead of 64."""
    return tiny_llama(hidden_size=32)


def wrapped(method: str = "oft", backend: str = "bnb4", options: dict | None = None, model=llama) -> nn.Module:
    out = qadapt.wrap(model(), method=method, backend=backend, targets=TARGETS, method_options=options or OFT16)
    perturb_adapters(out)
    return out


def wrapped_randlora(backend: str = "bnb4") -> nn.Module:
    return wrapped("randlora", backend, {"r": 8})


def layer(backend: str = "bnb4") -> qadapt.QuantAdapterLinear:
    return qadapt.QuantAdapterLinear(float_linear(64, 32), "oft", backend, method_options=OFT16)


def merged(keep_snapshot: bool = True) -> nn.Module:
    model = wrapped()
    qadapt.merge(model, keep_snapshot=keep_snapshot)
    return model


def merged_layer(keep_snapshot: bool = True) -> qadapt.QuantAdapterLinear:
    out = layer()
    out.merge(keep_snapshot=keep_snapshot)
    return out


def with_bad_value(value: float, layer_index: int = 1) -> Callable[[], nn.Module]:
    """A wrapped model whose adapter on one layer (not the first) holds ``value``: earlier layers merge first."""

    def make() -> nn.Module:
        model = qadapt.wrap(llama(), method=AddDelta(KnownOptions()), backend="bnb8", targets=TARGETS)
        layers = [m for m in model.modules() if isinstance(m, qadapt.QuantAdapterLinear)]
        with torch.no_grad():
            layers[layer_index].adapters["default"].delta[0, 0] = value
        return model

    return make


class TwoLinears(nn.Module):
    def __init__(self, out_second: int) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, out_second)


# ----------------------------------------------------------------------------------- checkpoints


def saved(directory: Path, model: nn.Module) -> Path:
    qadapt.save_adapter(model, directory / "ckpt")
    return directory / "ckpt"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scramble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00\xff" * 16  # inside the JSON header
    path.write_bytes(bytes(data))


def foreign_safetensors(directory: Path) -> None:
    """A valid safetensors file that save_adapter did not write."""
    target = directory / "ckpt"
    target.mkdir()
    save_file({"x": torch.zeros(2)}, str(target / WEIGHTS_FILE))


def rewrite_weights(path: Path, change: Callable[[dict, dict], None]) -> None:
    """Load a safetensors file, let ``change(tensors, metadata)`` edit it, and write it back."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def edit_description(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        def change(tensors: dict, metadata: dict) -> None:
            description = json.loads(metadata["qadapt"])
            edit(description)
            metadata["qadapt"] = json.dumps(description)
            metadata.pop("qadapt_config_sha256", None)
            (path.parent / CONFIG_FILE).unlink()

        rewrite_weights(path, change)

    return damage


def header_not_json(path: Path) -> None:
    def change(tensors: dict, metadata: dict) -> None:
        metadata["qadapt"] = "{not json"

    rewrite_weights(path, change)


def header_length_lies(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def tensor_as_int(path: Path) -> None:
    def change(tensors: dict, metadata: dict) -> None:
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].to(torch.int32)

    rewrite_weights(path, change)


def config_from_another_save(path: Path) -> None:
    """Replace the config file by the one of a different adapter (what a concurrent save leaves)."""
    other = path.parent.parent / "other"
    qadapt.save_adapter(wrapped(options={"block_size": 32}), other)
    (path.parent / CONFIG_FILE).write_bytes((other / CONFIG_FILE).read_bytes())


def saved_checkpoint(build_saved: Callable[[], nn.Module], damage: Callable[[Path], None] | None = None):
    """``disk`` step: save a checkpoint from another model into ``tmp/ckpt``, optionally damaged."""

    def disk(tmp: Path) -> None:
        directory = saved(tmp, build_saved())
        if damage is not None:
            damage(directory / WEIGHTS_FILE)

    return disk


def load_ckpt(model: nn.Module, tmp: Path) -> object:
    return qadapt.load_adapter(model, tmp / "ckpt")


def peft_dir(build_saved: Callable[[], nn.Module] = lambda: wrapped("randlora", "none", {"r": 8}), damage=None):
    """``disk`` step: a PEFT adapter directory in ``tmp/peft``, optionally damaged by ``damage(directory)``."""

    def disk(tmp: Path) -> None:
        qadapt.save_peft_adapter(build_saved(), tmp / "peft")
        if damage is not None:
            damage(tmp / "peft")

    return disk


def load_peft(model: nn.Module, tmp: Path) -> object:
    return qadapt.load_peft_adapter(model, tmp / "peft", backend="none")


def drop_layer_tensor(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors[next(k for k in sorted(tensors) if k.endswith("randlora_gamma"))]
    save_file(tensors, str(path), metadata={"format": "pt"})


def peft_settings_from_another_save(directory: Path) -> None:
    other = directory.parent / "other"
    qadapt.save_peft_adapter(wrapped("randlora", "none", {"r": 4}), other)
    (directory / "adapter_config.json").write_bytes((other / "adapter_config.json").read_bytes())


class UnregisteredOFT(OFTMethod):
    """A subclass computes what it likes, so it is not ``oft``; nobody registered it."""


class UnregisteredBnb8(Bnb8Backend):
    pass


def wrapped_with(method, backend) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return qadapt.wrap(llama(), method=method, backend=backend, targets=TARGETS)

    return make


def disabled() -> nn.Module:
    model = wrapped()
    qadapt.disable_adapters(model)
    return model


def disabled_layer() -> qadapt.QuantAdapterLinear:
    out = layer()
    out.disable_adapters()
    return out


def on_disk(name: str, content: str | bytes) -> Callable[[Path], None]:
    """``disk`` step: a config file ``tmp/name``."""

    def disk(tmp: Path) -> None:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return disk


def wrap_config(name: str) -> Callable[[nn.Module, Path], object]:
    return lambda m, tmp: qadapt.wrap(m, config=tmp / name)


#: 7 levels of 9 values (55 aliases in all): 9**7 values once expanded, from about 250 bytes.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(6)
)
ALIAS_BOMB += "method: {name: oft, options: {block_size: *g}}\n"


# --------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Bad:
    id: str
    build: Callable[[], nn.Module]
    act: Callable[[nn.Module, Path], object]
    error: type[Exception]
    #: regexes that must all be found in the message
    words: tuple[str, ...]
    #: writes the files the case needs under the test's directory (before fingerprints are taken)
    disk: Callable[[Path], None] | None = None


CATALOGUE: list[Bad] = [
    # ---- wrong types
    Bad(
        "wrap-a-state-dict",
        llama,
        lambda m, _: qadapt.wrap(m.state_dict(), method="oft"),
        ArgumentTypeError,
        (r"model must be a torch\.nn\.Module", r"got OrderedDict"),
    ),
    Bad(
        "method-is-an-int",
        llama,
        lambda m, _: qadapt.wrap(m, method=3),
        ArgumentTypeError,
        (r"method must be a plugin name \(str\) or a Method instance", "got int"),
    ),
    Bad(
        "backend-is-a-float",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", backend=4.0),
        ArgumentTypeError,
        (r"backend must be a plugin name \(str\) or a Backend instance", "got float"),
    ),
    Bad(
        "method-options-a-list",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options=[("block_size", 16)]),
        ArgumentTypeError,
        ("method_options must be a dict", "got list"),
    ),
    Bad(
        "targets-an-int",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", targets=5),
        ConfigError,
        ("targets must be a string, a regex or a list", "got int"),
    ),
    Bad(
        "option-wrong-type",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options={"block_size": "big"}),
        ConfigValidationError,
        (r"method\.options\.block_size", "valid integer", "'big'"),
    ),
    Bad(
        "layer-input-not-a-tensor",
        layer,
        lambda m, _: m([[0.0] * 64]),
        ArgumentTypeError,
        ("input must be a torch.Tensor", "got list"),
    ),
    Bad(
        "adapter-name-not-identifier",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", adapter_name="my-adapter"),
        ConfigValidationError,
        ("adapter_name", "Python identifier", "my-adapter"),
    ),
    # ---- options that do not fit
    Bad(
        "oft-block-size-not-dividing-in-features",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", backend="bnb4", targets="q_proj", method_options={"block_size": 24}),
        LayerFitError,
        (r"block_size=24 does not divide", "in_features=64", "closest valid block_size: 16 or 32", "adjust_block_size"),
    ),
    Bad(
        "oft-r-zero",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options={"r": 0}),
        ConfigValidationError,
        (r"method\.options\.r", "greater than or equal to 1", r"got 0"),
    ),
    Bad(
        "oft-r-above-in-features",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", targets="q_proj", method_options={"r": 65}),
        LayerFitError,
        (r"r=65 does not divide", "in_features=64", "closest valid r: 64"),
    ),
    Bad(
        "oft-block-larger-than-layer",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", targets="q_proj", method_options={"block_size": 128}),
        LayerFitError,
        ("block_size=128 does not divide", "in_features=64"),
    ),
    Bad(
        "randlora-r-negative",
        llama,
        lambda m, _: qadapt.wrap(m, method="randlora", method_options={"r": -3}),
        ConfigValidationError,
        (r"method\.options\.r", "greater than or equal to 1", r"got -3"),
    ),
    Bad(
        "bnb4-blocksize-not-allowed",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", backend="bnb4", backend_options={"blocksize": 48}),
        ConfigValidationError,
        (r"backend\.options\.blocksize", "32, 64, 128", r"got 48"),
    ),
    Bad(
        "unknown-option-key",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options={"blocksize": 16}),
        ConfigValidationError,
        (r"method\.options\.blocksize", "unknown key 'blocksize'", "did you mean 'block_size'"),
    ),
    Bad(
        "unknown-method",
        llama,
        lambda m, _: qadapt.wrap(m, method="ofd"),
        ConfigValidationError,
        ("unknown method plugin 'ofd'", "installed: .*oft", "Did you mean 'oft'"),
    ),
    # ---- merge / unmerge state
    Bad(
        "nan-adapter-safe-merge",
        with_bad_value(float("nan")),
        lambda m, _: qadapt.merge(m, safe=True),
        UnsafeMergeError,
        ("non-finite", "NaN/Inf", "nothing was written"),
    ),
    Bad(
        "inf-adapter-safe-merge",
        with_bad_value(float("inf"), layer_index=3),
        lambda m, _: qadapt.merge(m, safe=True, keep_snapshot=False),
        UnsafeMergeError,
        ("1 non-finite value", "nothing was written"),
    ),
    Bad(
        "merge-twice",
        merged,
        lambda m, _: qadapt.merge(m),
        AdapterStateError,
        ("cannot merge while adapter 'default' is merged", r"qadapt\.unmerge\(model\) first"),
    ),
    Bad(
        "layer-merge-twice",
        merged_layer,
        lambda m, _: m.merge(),
        AdapterStateError,
        ("already merged", r"unmerge\(\) first"),
    ),
    Bad(
        "unmerge-when-not-merged",
        wrapped,
        lambda m, _: qadapt.unmerge(m),
        AdapterStateError,
        ("no adapter is merged", "nothing to unmerge"),
    ),
    Bad(
        "layer-unmerge-when-not-merged",
        layer,
        lambda m, _: m.unmerge("inverse"),
        AdapterStateError,
        ("nothing is merged", "nothing to unmerge"),
    ),
    Bad(
        "exact-unmerge-without-snapshot",
        lambda: merged(keep_snapshot=False),
        lambda m, _: qadapt.unmerge(m, mode="exact"),
        AdapterStateError,
        ("no snapshot was kept", "keep_snapshot=False", "mode='inverse'"),
    ),
    Bad(
        "unmerge-unknown-mode",
        merged,
        lambda m, _: qadapt.unmerge(m, mode="approx"),
        ConfigError,
        ("unmerge mode must be 'exact' or 'inverse'", "'approx'"),
    ),
    Bad(
        "merge-unknown-adapter",
        wrapped,
        lambda m, _: qadapt.merge(m, adapter_name="nope"),
        ConfigError,
        ("no adapter named 'nope'", "adapters: default"),
    ),
    # ---- checkpoints
    Bad(
        "checkpoint-other-shapes-onto-plain-model",
        narrow_llama,
        load_ckpt,
        CheckpointError,
        ("does not fit this model", r"64 -> 64 in the checkpoint, 32 -> 32 in the model"),
        disk=saved_checkpoint(wrapped),
    ),
    Bad(
        "checkpoint-other-shapes-onto-wrapped-model",
        lambda: wrapped(model=narrow_llama),
        load_ckpt,
        CheckpointError,
        ("does not fit this model", r"64 -> 64 in the checkpoint, 32 -> 32 in the model"),
        disk=saved_checkpoint(wrapped),
    ),
    Bad(
        "checkpoint-of-another-method",
        wrapped,
        load_ckpt,
        CheckpointError,
        ("the checkpoint holds method 'randlora'", "the layer has 'oft'"),
        disk=saved_checkpoint(wrapped_randlora),
    ),
    Bad(
        "checkpoint-other-method-options",
        wrapped,
        load_ckpt,
        CheckpointError,
        ("method options differ", "block_size=32 saved vs 16"),
        disk=saved_checkpoint(lambda: wrapped(options={"block_size": 32})),
    ),
    Bad(
        "checkpoint-truncated",
        llama,
        load_ckpt,
        CheckpointError,
        ("not a readable safetensors file",),
        disk=saved_checkpoint(wrapped, truncate),
    ),
    Bad(
        "checkpoint-header-corrupted",
        wrapped,
        load_ckpt,
        CheckpointError,
        ("not a readable safetensors file",),
        disk=saved_checkpoint(wrapped, scramble_header),
    ),
    Bad(
        "checkpoint-not-written-by-qadapt",
        llama,
        lambda m, tmp: qadapt.load_adapter(m, tmp / "ckpt"),
        CheckpointError,
        ("no qadapt description in its header", "not written by save_adapter"),
        disk=foreign_safetensors,
    ),
    Bad(
        "checkpoint-directory-missing",
        llama,
        lambda m, tmp: qadapt.load_adapter(m, tmp / "nowhere"),
        CheckpointError,
        ("no qadapt checkpoint in", "qadapt_adapter.safetensors is missing"),
    ),
    # ---- config files
    Bad(
        "config-unknown-key",
        llama,
        wrap_config("c.yaml"),
        ConfigValidationError,
        ("c.yaml: targetz", "unknown key 'targetz'", "did you mean 'targets'"),
        disk=on_disk("c.yaml", "method: oft\ntargetz: [q_proj]\n"),
    ),
    Bad(
        "config-wrong-type",
        llama,
        wrap_config("c.json"),
        ConfigValidationError,
        (r"c\.json: method\.options\.r", "valid integer", "'four'"),
        disk=on_disk("c.json", json.dumps({"method": {"name": "oft", "options": {"r": "four"}}})),
    ),
    Bad(
        "config-unknown-plugin",
        llama,
        wrap_config("c.toml"),
        ConfigValidationError,
        (r"c\.toml: backend\.name", "unknown backend plugin 'bnb5'", "Did you mean"),
        disk=on_disk("c.toml", 'method = "oft"\nbackend = "bnb5"\n'),
    ),
    Bad(
        "config-not-yaml",
        llama,
        wrap_config("c.yaml"),
        ConfigError,
        ("c.yaml: not valid YAML", "line"),
        disk=on_disk("c.yaml", "method: [oft\n"),
    ),
    # ---- targets
    Bad(
        "targets-match-nothing",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", targets=["qproj"]),
        TargetError,
        (r"no module matched targets \['qproj'\]", "closest module names: q_proj"),
    ),
    Bad(
        "non-linear-target",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", targets=["model.norm", "embed_tokens"]),
        TargetError,
        ("model.norm is a LlamaRMSNorm, not a linear layer", "embed_tokens is a Embedding, not a linear layer"),
    ),
    Bad(
        "non-linear-layer",
        lambda: nn.Conv1d(4, 4, 1),
        lambda m, _: qadapt.QuantAdapterLinear(m, "oft", "bnb4"),
        TargetError,
        ("backend 'bnb4' cannot adapt a Conv1d", r"float nn\.Linear"),
    ),
    Bad(
        "wrap-an-already-wrapped-layer",
        wrapped,
        lambda m, _: qadapt.wrap(m, method="oft", targets="q_proj", method_options=OFT16),
        TargetError,
        ("model.layers.0.self_attn.q_proj already has adapters", "add_adapter"),
    ),
    Bad(
        "wrap-a-wrapped-model-again-same-adapter-name",
        wrapped,
        lambda m, _: qadapt.wrap(m, method="randlora", method_options={"r": 8}),
        TargetError,
        ("already has adapter 'default' on 4 layer", "another adapter_name"),
    ),
    Bad(
        "adapt-an-adapter-layer",
        layer,
        lambda m, _: qadapt.QuantAdapterLinear(m, "oft", "bnb4", method_options=OFT16),
        TargetError,
        ("already a QuantAdapterLinear", r"add_adapter\(\)"),
    ),
    Bad(
        "zero-sized-layer-in-model",
        lambda: TwoLinears(out_second=0),
        lambda m, _: qadapt.wrap(m, method="randlora", backend="bnb8"),
        TargetError,
        (r"second \(8 -> 0\)", "zero-sized layer"),
    ),
    Bad(
        "zero-sized-linear",
        lambda: nn.Linear(0, 8),
        lambda m, _: qadapt.QuantAdapterLinear(m, "oft", "none"),
        TargetError,
        ("zero-sized layer", "in_features=0, out_features=8"),
    ),
    # ---- inputs to a layer
    Bad(
        "integer-input",
        layer,
        lambda m, _: m(torch.ones(2, 64, dtype=torch.int64)),
        InputError,
        ("torch.int64 is not a floating-point dtype", "float32, bfloat16, float16 or float64"),
    ),
    Bad(
        "wrong-feature-size",
        lambda: layer("bnb8"),
        lambda m, _: m(torch.randn(2, 63)),
        InputError,
        (r"input shape \(2, 63\)", "in_features=64"),
    ),
    Bad(
        "meta-input-on-a-cpu-layer",
        layer,
        lambda m, _: m(torch.empty(2, 64, device="meta")),
        InputError,
        ("meta device", "weights are on cpu"),
    ),
]


# Cases of the hardening issue (#13); each failed on main before it, silently or with a raw error.
CATALOGUE += [
    # ---- checkpoints: consistent pairs, damaged files, plugin names
    Bad(
        "checkpoint-config-from-another-save",
        llama,
        load_ckpt,
        qadapt.PairMismatchError,
        ("qadapt_config.json was not written with", "another save ran at the same time", "save the adapter again"),
        disk=saved_checkpoint(wrapped, config_from_another_save),
    ),
    Bad(
        "checkpoint-header-description-not-json",
        llama,
        load_ckpt,
        CheckpointError,
        ("qadapt_adapter.safetensors: header field 'qadapt' is not valid JSON",),
        disk=saved_checkpoint(wrapped, header_not_json),
    ),
    Bad(
        "checkpoint-header-layer-shape-damaged",
        llama,
        load_ckpt,
        CheckpointError,
        (r"description is damaged", r"field layers\.model\.layers\.0\.self_attn\.q_proj", "'wide'"),
        disk=saved_checkpoint(
            wrapped, edit_description(lambda d: d["layers"].update({"model.layers.0.self_attn.q_proj": "wide"}))
        ),
    ),
    Bad(
        "checkpoint-header-config-missing",
        llama,
        load_ckpt,
        CheckpointError,
        ("description is damaged", "field config: Field required"),
        disk=saved_checkpoint(wrapped, edit_description(lambda d: d.pop("config"))),
    ),
    Bad(
        "checkpoint-header-aliases-not-a-mapping",
        llama,
        load_ckpt,
        CheckpointError,
        ("description is damaged", "field aliases"),
        disk=saved_checkpoint(wrapped, edit_description(lambda d: d.update(aliases=[1, 2]))),
    ),
    Bad(
        "checkpoint-header-length-field-lies",
        llama,
        load_ckpt,
        CheckpointError,
        ("not a readable safetensors file", "header length field says"),
        disk=saved_checkpoint(wrapped, header_length_lies),
    ),
    Bad(
        "checkpoint-tensor-of-another-dtype",
        wrapped,
        load_ckpt,
        CheckpointError,
        ("does not fit this model", "has dtype torch.int32 in the checkpoint", "holds torch.float32"),
        disk=saved_checkpoint(wrapped, tensor_as_int),
    ),
    Bad(
        "peft-config-not-an-object",
        llama,
        load_peft,
        CheckpointError,
        ("adapter_config.json must hold a JSON object", "got list"),
        disk=peft_dir(damage=lambda d: (d / "adapter_config.json").write_text("[1, 2]")),
    ),
    Bad(
        "peft-config-not-utf8",
        llama,
        load_peft,
        CheckpointError,
        ("adapter_config.json is not UTF-8 text",),
        disk=peft_dir(damage=lambda d: (d / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')),
    ),
    Bad(
        "peft-config-without-peft-type",
        llama,
        load_peft,
        CheckpointError,
        ("field 'peft_type' must be a string", "got None"),
        disk=peft_dir(damage=lambda d: (d / "adapter_config.json").write_text('{"r": 8}')),
    ),
    Bad(
        "peft-layer-tensor-missing",
        llama,
        load_peft,
        CheckpointError,
        ("adapter_model.safetensors: layer model.layers.", "randlora_gamma' is missing"),
        disk=peft_dir(damage=drop_layer_tensor),
    ),
    Bad(
        "peft-config-from-another-save",
        llama,
        load_peft,
        qadapt.PairMismatchError,
        ("holds other method settings than the ones adapter_model.safetensors was saved with",),
        disk=peft_dir(damage=peft_settings_from_another_save),
    ),
    Bad(
        "save-an-unregistered-method-subclass",
        wrapped_with(UnregisteredOFT(OFT16), "bnb4"),
        lambda m, tmp: qadapt.save_adapter(m, tmp / "ckpt"),
        CheckpointError,
        (
            "method UnregisteredOFT is not a registered qadapt plugin",
            r"entry-points\.\"qadapt\.methods\"",
            "pip install",
        ),
    ),
    Bad(
        "save-an-unregistered-backend",
        wrapped_with("oft", UnregisteredBnb8()),
        lambda m, tmp: qadapt.save_adapter(m, tmp / "ckpt"),
        CheckpointError,
        ("backend UnregisteredBnb8 is not a registered qadapt plugin", r"entry-points\.\"qadapt\.backends\""),
    ),
    Bad(
        "load-adapter-named-like-a-module-attribute",
        llama,
        lambda m, tmp: qadapt.load_adapter(m, tmp / "ckpt", adapter_name="training"),
        ConfigError,
        ("adapter name 'training' is taken by a torch.nn.Module attribute",),
        disk=saved_checkpoint(wrapped),
    ),
    # ---- state: merged means frozen; disabled adapters are not merged
    Bad(
        "load-adapter-onto-a-merged-adapter",
        merged,
        load_ckpt,
        AdapterStateError,
        ("cannot load an adapter while adapter 'default' is merged into 4 layer", r"qadapt\.unmerge\(model\) first"),
        disk=saved_checkpoint(lambda: wrapped(options=OFT16)),
    ),
    Bad(
        "load-peft-adapter-onto-a-merged-model",
        merged,
        lambda m, tmp: qadapt.load_peft_adapter(m, tmp / "peft", adapter_name="second"),
        AdapterStateError,
        ("cannot load an adapter while adapter 'default' is merged",),
        disk=peft_dir(),
    ),
    Bad(
        "merge-while-adapters-disabled",
        disabled,
        lambda m, _: qadapt.merge(m),
        AdapterStateError,
        ("adapters are disabled", r"enable_adapters\(\) first", r"merge=False"),
    ),
    Bad(
        "unwrap-merging-while-adapters-disabled",
        disabled,
        lambda m, _: qadapt.unwrap(m, merge=True),
        AdapterStateError,
        ("adapters are disabled", r"unwrap\(model, merge=False\)"),
    ),
    Bad(
        "layer-merge-while-adapters-disabled",
        disabled_layer,
        lambda m, _: m.merge(),
        AdapterStateError,
        ("adapters are disabled",),
    ),
    Bad(
        "layer-add-adapter-while-merged",
        merged_layer,
        lambda m, _: m.add_adapter("second", "oft", method_options=OFT16),
        AdapterStateError,
        ("cannot add adapter 'second' while adapter 'default' is merged", r"unmerge\(\) first"),
    ),
    # ---- config files: bounded readers, located errors
    Bad(
        "config-with-a-thousand-unknown-keys",
        llama,
        wrap_config("many.json"),
        ConfigValidationError,
        (r"1000 errors", r"\.\.\. and 980 more \(see \.issues\)"),
        disk=on_disk("many.json", json.dumps({"method": "oft", **{f"key{i}": i for i in range(1000)}})),
    ),
    Bad(
        "config-yaml-alias-bomb",
        llama,
        wrap_config("bomb.yaml"),
        ConfigError,
        ("bomb.yaml: its aliases expand to more than 100000 values",),
        disk=on_disk("bomb.yaml", ALIAS_BOMB),
    ),
    Bad(
        "config-yaml-too-many-aliases",
        llama,
        wrap_config("many.yaml"),
        ConfigError,
        ("many.yaml: more than 64 YAML aliases", "line 2"),
        disk=on_disk("many.yaml", "a: &a x\nb: [" + ", ".join(["*a"] * 100) + "]\nmethod: oft\n"),
    ),
    Bad(
        "config-yaml-nested-too-deep",
        llama,
        wrap_config("deep.yaml"),
        ConfigError,
        ("deep.yaml: nested more than 32 levels deep at line 2, column 35",),
        disk=on_disk("deep.yaml", "method: oft\nx: " + "[" * 5000 + "]" * 5000 + "\n"),
    ),
    Bad(
        "config-json-nested-too-deep",
        llama,
        wrap_config("deep.json"),
        ConfigError,
        ("deep.json: nested more than 32 levels deep at line 1, column 55",),
        disk=on_disk("deep.json", '{"method": "oft", "x": ' + "[" * 100000 + "]" * 100000 + "}"),
    ),
    Bad(
        "config-toml-nested-too-deep",
        llama,
        wrap_config("deep.toml"),
        ConfigError,
        ("deep.toml: nested more than 32 levels deep at line 2, column 37",),
        disk=on_disk("deep.toml", 'method = "oft"\nx = ' + "[" * 5000 + "]" * 5000 + "\n"),
    ),
    Bad(
        "config-toml-dotted-keys-too-deep",
        llama,
        wrap_config("dotted.toml"),
        ConfigError,
        ("dotted.toml: nested more than 32 levels deep at key x.k.k.k",),
        disk=on_disk("dotted.toml", 'method = "oft"\n[x' + ".k" * 40 + "]\nv = 1\n"),
    ),
    Bad(
        "config-not-utf8",
        llama,
        wrap_config("latin.yaml"),
        ConfigError,
        ("latin.yaml: not UTF-8 text at byte 24 \\(line 2, column 13\\)", "save the file as UTF-8"),
        disk=on_disk("latin.yaml", "method: oft\ntargets: caf\xe9\n".encode("latin-1")),
    ),
    Bad(
        "config-pyproject-tool-not-a-table",
        llama,
        wrap_config("pyproject.toml"),
        ConfigError,
        ("pyproject.toml: has no \\[tool.qadapt\\] table",),
        disk=on_disk("pyproject.toml", "tool = 3\n"),
    ),
    Bad(
        "config-huge-value-is-truncated-in-the-message",
        llama,
        wrap_config("long.json"),
        ConfigValidationError,
        (r"method\.options\.block_size", r"\(got 'x+\.\.\.x+'\)$"),
        disk=on_disk("long.json", json.dumps({"method": {"name": "oft", "options": {"block_size": "x" * 10**6}}})),
    ),
    Bad(
        "adapter-name-is-a-module-instance-attribute",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options=OFT16, adapter_name="training"),
        ConfigValidationError,
        ("adapter_name", "'training' is taken by a torch.nn.Module attribute"),
    ),
    Bad(
        "add-adapter-named-like-a-private-module-attribute",
        wrapped,
        lambda m, _: qadapt.add_adapter(m, "_parameters", "oft", method_options=OFT16),
        ConfigError,
        ("'_parameters' is taken by a torch.nn.Module attribute",),
    ),
    # ---- numeric options that validate but cannot work
    Bad(
        "oft-eps-infinite",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options={"coft": True, "eps": float("inf")}),
        ConfigValidationError,
        (r"method\.options\.eps", "finite number", "inf"),
    ),
    Bad(
        "oft-neumann-terms-unbounded",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options={"num_cayley_neumann_terms": 10**9}),
        ConfigValidationError,
        (r"method\.options\.num_cayley_neumann_terms", "less than or equal to 32"),
    ),
    Bad(
        "oft-r-unbounded",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", method_options={"r": 10**12}),
        ConfigValidationError,
        (r"method\.options\.r", "less than or equal to 65536"),
    ),
    Bad(
        "randlora-alpha-infinite",
        llama,
        lambda m, _: qadapt.wrap(m, method="randlora", method_options={"alpha": float("inf")}),
        ConfigValidationError,
        (r"method\.options\.alpha", "finite number", "inf"),
    ),
    Bad(
        "randlora-r-unbounded",
        llama,
        lambda m, _: qadapt.wrap(m, method="randlora", method_options={"r": 2**40}),
        ConfigValidationError,
        (r"method\.options\.r", "less than or equal to 65536"),
    ),
    Bad(
        "bnb8-threshold-infinite",
        llama,
        lambda m, _: qadapt.wrap(m, method="oft", backend="bnb8", backend_options={"threshold": float("inf")}),
        ConfigValidationError,
        (r"backend\.options\.threshold", "finite number"),
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_gives_a_clear_error_and_changes_nothing(case: Bad, tmp_path: Path):
    subject = case.build()
    if case.disk is not None:
        case.disk(tmp_path)
    files = disk_fingerprint(tmp_path)
    before = fingerprint(subject)
    with pytest.raises(Exception) as info:
        case.act(subject, tmp_path)
    assert info.type is case.error, f"{info.type.__name__}: {info.value}"
    assert isinstance(info.value, qadapt.QAdaptError)
    for words in case.words:
        assert any(_search(words, str(info.value))), f"{words!r} not in: {info.value}"
    assert fingerprint(subject) == before
    assert disk_fingerprint(tmp_path) == files
    assert len(str(info.value)) < 4000, "an error message must stay bounded"


def _search(pattern: str, text: str) -> list:
    import re

    return re.findall(pattern, text)


def test_catalogue_is_large_enough_and_ids_are_unique():
    assert len(CATALOGUE) >= 48 + 30
    assert len({c.id for c in CATALOGUE}) == len(CATALOGUE)


# ------------------------------------------------------------------------- documented non-errors


@pytest.mark.parametrize("backend", ["none", "bnb8", "bnb4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_inputs_run_and_come_back_in_their_dtype(backend: str, dtype: torch.dtype):
    """float64 and bfloat16 inputs are valid: the output has the input's dtype and matches float32."""
    subject = layer(backend)
    perturb_adapters(subject)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = subject(x)
        out = subject(x.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 32)
    tolerance = 1e-5 if dtype == torch.float64 else 0.05
    assert float((out.float() - reference).norm() / reference.norm()) < tolerance


def test_meta_input_on_a_meta_layer_infers_the_shape():
    """A layer built on the meta device takes meta input: shape inference without memory."""
    subject = qadapt.QuantAdapterLinear(nn.Linear(64, 32, device="meta"), "oft", "none", method_options=OFT16)
    out = subject(torch.empty(5, 7, 64, device="meta"))
    assert out.is_meta and out.shape == (5, 7, 32)
