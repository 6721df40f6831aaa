"""A catalogue of bad inputs: each gives a clear qadapt error and leaves the model bit-identical.

Every row builds a model (or a single layer), fingerprints it (every parameter and buffer, the
backends' quantized storage, the module tree, ``requires_grad`` flags, merge states), does one bad
thing, and checks the exact error class, the key words of its message, and the fingerprint.

Documented behaviour for inputs that are *not* errors (float64 / bfloat16 input, meta input on a
meta layer) is tested at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import float_linear, model_checksum, tensor_checksum
from methods_for_tests import AddDelta, KnownOptions
from safetensors.torch import save_file
from tiny_models import perturb_adapters, tiny_llama
from torch import nn

import qadapt
from qadapt.checkpoint import WEIGHTS_FILE
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

TARGETS = ["q_proj", "v_proj"]
OFT16 = {"block_size": 16}


# ------------------------------------------------------------------------------------ fingerprint


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


def foreign_safetensors(directory: Path) -> Path:
    """A valid safetensors file that save_adapter did not write."""
    target = directory / "ckpt"
    target.mkdir()
    save_file({"x": torch.zeros(2)}, str(target / WEIGHTS_FILE))
    return target


def config_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Bad:
    id: str
    build: Callable[[], nn.Module]
    act: Callable[[nn.Module, Path], object]
    error: type[Exception]
    #: regexes that must all be found in the message
    words: tuple[str, ...]


def _save_then(build_saved: Callable[[], nn.Module], damage: Callable[[Path], None] | None = None):
    """``act`` that saves a checkpoint from another model, optionally damages it, and loads it onto ``model``."""

    def act(model: nn.Module, tmp: Path) -> object:
        directory = saved(tmp, build_saved())
        if damage is not None:
            damage(directory / WEIGHTS_FILE)
        return qadapt.load_adapter(model, directory)

    return act


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
        ("cannot merge while an adapter is merged", r"qadapt\.unmerge\(model\) first"),
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
        _save_then(wrapped),
        CheckpointError,
        ("does not fit this model", r"64 -> 64 in the checkpoint, 32 -> 32 in the model"),
    ),
    Bad(
        "checkpoint-other-shapes-onto-wrapped-model",
        lambda: wrapped(model=narrow_llama),
        _save_then(wrapped),
        CheckpointError,
        ("does not fit this model", r"64 -> 64 in the checkpoint, 32 -> 32 in the model"),
    ),
    Bad(
        "checkpoint-of-another-method",
        wrapped,
        _save_then(wrapped_randlora),
        CheckpointError,
        ("the checkpoint holds method 'randlora'", "the layer has 'oft'"),
    ),
    Bad(
        "checkpoint-other-method-options",
        wrapped,
        _save_then(lambda: wrapped(options={"block_size": 32})),
        CheckpointError,
        ("method options differ", "block_size=32 saved vs 16"),
    ),
    Bad(
        "checkpoint-truncated",
        llama,
        _save_then(wrapped, truncate),
        CheckpointError,
        ("not a readable safetensors file",),
    ),
    Bad(
        "checkpoint-header-corrupted",
        wrapped,
        _save_then(wrapped, scramble_header),
        CheckpointError,
        ("not a readable safetensors file",),
    ),
    Bad(
        "checkpoint-not-written-by-qadapt",
        llama,
        lambda m, tmp: qadapt.load_adapter(m, foreign_safetensors(tmp)),
        CheckpointError,
        ("no qadapt description in its header", "not written by save_adapter"),
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
        lambda m, tmp: qadapt.wrap(m, config=config_file(tmp, "c.yaml", "method: oft\ntargetz: [q_proj]\n")),
        ConfigValidationError,
        ("c.yaml: targetz", "unknown key 'targetz'", "did you mean 'targets'"),
    ),
    Bad(
        "config-wrong-type",
        llama,
        lambda m, tmp: qadapt.wrap(
            m, config=config_file(tmp, "c.json", json.dumps({"method": {"name": "oft", "options": {"r": "four"}}}))
        ),
        ConfigValidationError,
        (r"c\.json: method\.options\.r", "valid integer", "'four'"),
    ),
    Bad(
        "config-unknown-plugin",
        llama,
        lambda m, tmp: qadapt.wrap(m, config=config_file(tmp, "c.toml", 'method = "oft"\nbackend = "bnb5"\n')),
        ConfigValidationError,
        (r"c\.toml: backend\.name", "unknown backend plugin 'bnb5'", "Did you mean"),
    ),
    Bad(
        "config-not-yaml",
        llama,
        lambda m, tmp: qadapt.wrap(m, config=config_file(tmp, "c.yaml", "method: [oft\n")),
        ConfigError,
        ("c.yaml: not valid YAML", "line"),
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


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_gives_a_clear_error_and_changes_nothing(case: Bad, tmp_path: Path):
    subject = case.build()
    before = fingerprint(subject)
    with pytest.raises(Exception) as info:
        case.act(subject, tmp_path)
    assert info.type is case.error, f"{info.type.__name__}: {info.value}"
    assert isinstance(info.value, qadapt.QAdaptError)
    for words in case.words:
        assert any(_search(words, str(info.value))), f"{words!r} not in: {info.value}"
    assert fingerprint(subject) == before


def _search(pattern: str, text: str) -> list:
    import re

    return re.findall(pattern, text)


def test_catalogue_is_large_enough_and_ids_are_unique():
    assert len(CATALOGUE) >= 25
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
