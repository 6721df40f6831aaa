"""The torchao and hqq backends with layers their libraries built, and install hints for missing libraries."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_checksum
from torch import nn

import qadapt
from qadapt import registry
from qadapt.errors import ConfigError, MissingDependencyError, PluginLoadError
from qadapt.registry.reference import FloatBackend

torchao_quant = pytest.importorskip("torchao.quantization")
hqq_quantize = pytest.importorskip("hqq.core.quantize")
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: E402


def two_layer_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def user_quantized(kind: str) -> nn.Sequential:
    """A model quantized by the user with torchao's own API, before qadapt sees it."""
    model = two_layer_model()
    if kind == "int8":
        torchao_quant.quantize_(model, torchao_quant.Int8WeightOnlyConfig())
    elif kind == "int4-asymmetric":
        config = torchao_quant.IntxWeightOnlyConfig(
            weight_dtype=torch.int4,
            granularity=torchao_quant.PerGroup(16),
            mapping_type=torchao_quant.MappingType.ASYMMETRIC,
        )
        torchao_quant.quantize_(model, config)
    else:  # nf4, as torchtune builds it
        for index in (0, 2):
            weight = model[index].weight.detach()
            model[index].weight = nn.Parameter(to_nf4(weight, 64, 16), requires_grad=False)
    return model


def torch_state(model: nn.Module) -> dict:
    """What the user's torchao tensors hold: subclass, attributes and inner tensors per layer."""
    state = {}
    for index in (0, 2):
        weight = model[index].weight
        names, attributes = weight.__tensor_flatten__()
        state[index] = (type(weight).__name__, repr(attributes), {n: getattr(weight, n).clone() for n in names})
    return state


@pytest.mark.parametrize("kind", ["int8", "int4-asymmetric", "nf4"])
def test_a_model_quantized_with_torchao_is_adopted_by_auto_and_merges_in_its_own_format(kind):
    model = user_quantized(kind)
    before = torch_state(model)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_base = model(x)
    assert not FloatBackend().owns(model[0]), "the float backend must not claim a torchao layer"

    qadapt.wrap(model, method="oft", backend="auto", targets=["0", "2"], method_options={"block_size": 16})
    assert qadapt.summary(model).backends == {"torchao": 2}
    layer = model[0]
    with torch.no_grad():
        layer.adapters["default"].weight.normal_(0, 0.02)
        model[2].adapters["default"].weight.normal_(0, 0.02)
        unmerged = model(x)
        qadapt.disable_adapters(model)
        assert torch.equal(model(x), expected_base)
        qadapt.enable_adapters(model)

    report = qadapt.merge(model)
    merged_state = {i: model[i].base.weight for i in (0, 2)}
    for index in (0, 2):
        name, attributes, tensors = before[index]
        weight = merged_state[index]
        # Same subclass and settings the user chose (block size, bit width, mapping), new codes.
        assert type(weight).__name__ == name
        assert repr(weight.__tensor_flatten__()[1]) == attributes
        assert {n: getattr(weight, n).dtype for n in tensors} == {n: t.dtype for n, t in tensors.items()}
    if kind == "int4-asymmetric":
        assert bool(merged_state[0].zero_point.any()), "the asymmetric mapping was lost in the merge"
    with torch.no_grad():
        merged = model(x)
    error = float((merged - unmerged).norm() / unmerged.norm())
    assert error <= 3 * max(r.error for r in report.layers.values()) + 1e-4

    qadapt.unmerge(model)
    after = torch_state(nn.Sequential(model[0].base, nn.ReLU(), model[2].base))
    for index in (0, 2):
        assert after[index][:2] == before[index][:2]
        for n, tensor in before[index][2].items():
            bits = after[index][2][n].reshape(-1).view(torch.uint8)
            assert torch.equal(bits, tensor.reshape(-1).view(torch.uint8)), (index, n)


@pytest.mark.parametrize("kind", ["int8", "int4-asymmetric", "nf4"])
def test_summary_counts_torchao_weights_like_float_ones(kind):
    """torchao keeps a layer's weight as a wrapper tensor with no storage of its own: summary counts
    the weights it represents as float ones, and each inner tensor's bytes once."""
    plain = two_layer_model()
    float_params = sum(p.numel() for p in plain.parameters())
    float_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    model = qadapt.wrap(user_quantized(kind), method="lora", backend="auto", targets=["0", "2"])
    info = qadapt.summary(model)
    assert info.backends == {"torchao": 2}
    assert info.total_params == float_params + info.trainable_params
    weights = sum(model[i].base.in_features * model[i].base.out_features * 4 for i in (0, 2))
    assert 0 < info.quantized_bytes < weights
    # Everything else the model holds is float32: the biases and the adapters.
    assert info.total_bytes == float_bytes - weights + info.quantized_bytes + 4 * info.trainable_params


def test_requantize_follows_the_layer_not_the_backend_options():
    model = user_quantized("int4-asymmetric")
    qadapt.wrap(
        model, "oft", "torchao", targets=["0"], backend_options={"config": "int8"}, method_options={"block_size": 16}
    )
    layer = model[0]
    with torch.no_grad():
        layer.adapters["default"].weight.normal_(0, 0.02)
    layer.merge()
    weight = layer.base.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert tuple(weight.block_size) == (1, 16) and weight.target_dtype == torch.int4


def test_an_hqq_layer_built_by_hqq_is_adopted_and_keeps_its_settings():
    model = two_layer_model()
    config = hqq_quantize.hqq_base_quant_config(nbits=3, group_size=32, axis=1)
    model[0] = hqq_quantize.HQQLinear(model[0], config, compute_dtype=torch.float32, device="cpu")
    assert not FloatBackend().owns(model[0])
    qadapt.wrap(model, "oft", "auto", targets=["0", "2"], method_options={"block_size": 16})
    assert qadapt.summary(model).backends == {"hqq": 1, "none": 1}
    layer = model[0]
    before = layer.backend.snapshot(layer.base)
    with torch.no_grad():
        layer.adapters["default"].weight.normal_(0, 0.02)
    layer.merge()
    storage = layer.backend.get_storage(layer.base)
    assert (storage.meta["nbits"], storage.meta["group_size"], storage.meta["axis"]) == (3, 32, 1)
    assert not storage.equal(before)
    layer.unmerge("exact")
    assert layer.backend.get_storage(layer.base).equal(before)


@pytest.mark.parametrize(
    ("backend", "options", "message"),
    [
        ("torchao", {"config": "int4", "group_size": 24}, "group_size=24 must divide in_features=64"),
        ("torchao", {"config": "nf4"}, "nf4_scaler_block_size=256 must divide the number of blocks"),
        ("hqq", {"nbits": 4, "group_size": 12}, "group_size=12 must be a multiple of 8"),
        ("hqq", {"nbits": 1, "group_size": 512}, r"number of groups \(2048 / 512 = 4\) must be a multiple of 8"),
    ],
)
def test_options_that_do_not_fit_a_layer_are_config_errors_and_leave_the_model_as_it_was(backend, options, message):
    model = two_layer_model()
    checksum = model_checksum(model)
    with pytest.raises(ConfigError, match=message):
        qadapt.wrap(model, "oft", backend, backend_options=options, method_options={"block_size": 16})
    assert model_checksum(model) == checksum
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))


def test_options_that_contradict_the_config_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="group_size does not apply to config='nf4'"):
        qadapt.wrap(two_layer_model(), "oft", "torchao", backend_options={"config": "nf4", "group_size": 32})
    with pytest.raises(ConfigError, match="mapping='asymmetric' applies to config='int4' only"):
        qadapt.wrap(two_layer_model(), "oft", "torchao", backend_options={"mapping": "asymmetric"})


KEEP_STATE_SPECS = [
    ("torchao", {"config": "int8"}),
    ("torchao", {"config": "int8", "group_size": 16}),
    ("torchao", {"config": "int4", "group_size": 32}),
    ("torchao", {"config": "int4", "group_size": 16, "mapping": "asymmetric"}),
    ("torchao", {"config": "nf4", "nf4_scaler_block_size": 8}),
    ("hqq", {"nbits": 4, "group_size": 64}),
    ("hqq", {"nbits": 3, "group_size": 32, "axis": 0}),
    ("hqq", {"nbits": 8, "group_size": None}),
]


@pytest.mark.parametrize(("name", "options"), KEEP_STATE_SPECS, ids=lambda v: str(v))
def test_keep_state_requantize_keeps_the_scales_and_chooses_nearest_codes(name, options):
    backend = registry.backend_class(name)(options)
    assert backend.capabilities.keep_state
    module = backend.quantize(two_layer_model()[0])
    storage = backend.get_storage(module)
    kept = storage.clone()
    weight = backend.dequantize(storage)
    # On the grid already: the same codes and scales, bit for bit (unlike torchao's fresh symmetric int4).
    assert backend.requantize_keep_state(weight, storage).equal(storage)
    target = weight * 1.1 + 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    moved = backend.requantize_keep_state(target, storage)
    assert storage.equal(kept), "requantize_keep_state() modified `like`"
    code_names = {"W_q", "qdata", "quantized_data"}
    for key, tensor in storage.tensors.items():
        same = torch.equal(moved.tensors[key], tensor)
        assert same != (key in code_names), f"{key}: codes must change and everything else stay"
    assert dict(moved.meta) == dict(storage.meta)
    # Nearest codes on the kept grid are never farther from the target than the old codes.
    new_error = float((backend.dequantize(moved) - target).norm())
    old_error = float((weight - target).norm())
    assert new_error <= old_error * (1 + 1e-6), (new_error, old_error)


# ------------------------------------------------------------------------ missing libraries


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


MISSING = [
    ("bnb4", "bitsandbytes", "bnb"),
    ("bnb8", "bitsandbytes", "bnb"),
    ("torchao", "torchao", "torchao"),
    ("hqq", "hqq", "hqq"),
]


def test_a_missing_library_names_the_pip_command():
    # None in sys.modules makes `import library` fail as if it were not installed (one process for all).
    out = _run(
        f"""
        import sys
        for library in {sorted({m[1] for m in MISSING})!r}:
            sys.modules[library] = None
        import qadapt
        for backend in {[m[0] for m in MISSING]!r}:
            try:
                qadapt.registry.load("backends", backend)
            except qadapt.MissingDependencyError as exc:
                print(backend, "|", exc.module, "|", exc.command, "|", isinstance(exc, ModuleNotFoundError), "|", exc)
        """
    )
    lines = out.splitlines()
    assert len(lines) == len(MISSING)
    for line, (backend, library, extra) in zip(lines, MISSING, strict=True):
        name, module, command, is_module_error, message = line.split(" | ")
        assert (name, module, is_module_error) == (backend, library, "True")
        assert command == f"pip install 'qadapt[{extra}]'"
        assert f"backend plugin {backend!r}" in message and command in message


def test_the_hint_comes_from_the_plugin_distributions_extras(make_distribution):
    source = "import qa_absent_lib\n"
    root = make_distribution(
        "qa-hinted",
        "1.0",
        {"qadapt.backends": {"hinted": "qa_hinted:Thing", "plain": "qa_plain:Thing"}},
        {"qa_hinted": source, "qa_plain": "import qa_other_absent\n"},
    )
    metadata = root / "qa_hinted-1.0.dist-info" / "METADATA"
    metadata.write_text(
        metadata.read_text()
        + 'Provides-Extra: absent\nRequires-Dist: qa-absent-lib>=2; extra == "absent"\n'
        + 'Provides-Extra: all\nRequires-Dist: qa-absent-lib>=2; extra == "all"\n'
        + 'Requires-Dist: something-else; extra == "all"\n'
    )
    with pytest.raises(MissingDependencyError) as info:
        registry.load("backends", "hinted")
    assert info.value.command == "pip install 'qa-hinted[absent]'"
    assert "needs the module 'qa_absent_lib'" in str(info.value)
    # Nothing declared: the module name, said to be a guess.
    with pytest.raises(MissingDependencyError, match=r"pip install qa_other_absent .*may differ"):
        registry.load("backends", "plain")


def test_an_import_error_that_is_not_a_missing_module_stays_a_plain_load_error(make_distribution):
    make_distribution("qa-raises", "1.0", {"qadapt.backends": {"raises": "qa_raises:X"}}, {"qa_raises": "1 / 0\n"})
    with pytest.raises(PluginLoadError, match="ZeroDivisionError") as info:
        registry.load("backends", "raises")
    assert not isinstance(info.value, MissingDependencyError)


def test_plugins_import_their_library_only_when_a_layer_needs_it():
    out = _run(
        """
        import sys, torch, qadapt
        libraries = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torchao', 'hqq'})
        qadapt.registry.load('backends', 'torchao'); qadapt.registry.load('backends', 'hqq')
        model = torch.nn.Sequential(torch.nn.Linear(16, 16))
        qadapt.wrap(model, 'oft', 'auto', method_options={'block_size': 4})
        print(libraries(), qadapt.summary(model).backends)
        """
    )
    assert out == "[] {'none': 1}"


def test_summary_counts_the_bias_hqq_keeps_outside_parameters():
    """HQQLinear holds its bias as a plain attribute: it still counts, in parameters and in bytes."""
    plain = two_layer_model()
    float_params = sum(p.numel() for p in plain.parameters())
    model = qadapt.wrap(two_layer_model(), method="lora", backend="hqq", targets=["0", "2"])
    assert not any(n.endswith("bias") for n, _ in model[0].base.named_parameters())
    info = qadapt.summary(model)
    assert info.total_params == float_params + info.trainable_params
    biases = sum(model[i].base.bias.numel() * model[i].base.bias.element_size() for i in (0, 2))
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert info.total_bytes >= info.quantized_bytes + biases + adapters
