"""``--to w4a16`` / ``w8a16``: compressed-tensors ``pack-quantized`` exports, loaded by transformers (with
compressed-tensors) on CPU and by compressed-tensors' own decompressor, against the in-memory merge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from safetensors.torch import load_file
from tiny_models import perturb_adapters, tiny_llama, token_ids
from transformers import AutoModelForCausalLM

import qadapt
from qadapt.errors import CheckpointError, ConfigError
from qadapt.exporting import export, export_targets
from qadapt_compressed import CompressedBackend
from qadapt_compressed.packing import pack, unpack

HIDDEN = 128  # every linear's in_features (128, 256) is a multiple of the schemes' group size 128


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base") / "float"
    tiny_llama(hidden_size=HIDDEN).save_pretrained(root)
    return root


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(path.name.encode() + (path.read_bytes() if path.is_file() else b""))
    return h.hexdigest()


def adapted(base: Path, bits: int, directory: Path) -> torch.nn.Module:
    """A LoRA on the base quantized in memory as the target stores it, perturbed and saved; returns it merged."""
    options = {"num_bits": bits, "group_size": 128}
    model = qadapt.wrap(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        method="lora",
        backend="compressed",
        backend_options=options,
        method_options={"r": 4},
    )
    perturb_adapters(model)
    qadapt.save_adapter(model.eval(), directory)
    return qadapt.unwrap(model, merge=True).eval()


@pytest.mark.parametrize("bits", [4, 8])
@torch.no_grad()
def test_the_export_loads_in_transformers_and_equals_the_in_memory_merge(base: Path, tmp_path: Path, bits: int):
    reference = adapted(base, bits, tmp_path / "adapter")
    before = digest(base)

    report = export(base, tmp_path / "adapter", tmp_path / "out", to=f"w{bits}a16", progress=False)

    assert len(report.layers) == 14 and digest(base) == before
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"] and config["quantization_status"] == "compressed"
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    expected = preset_name_to_scheme(f"W{bits}A16", ["Linear"]).weights.model_dump()
    assert group["weights"] == expected  # llm-compressor's scheme, field for field
    QuantizationConfig.model_validate(config)  # compressed-tensors reads it
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    layer = "model.layers.0.mlp.down_proj"
    assert tensors[f"{layer}.weight_packed"].dtype == torch.int32
    assert tensors[f"{layer}.weight_packed"].shape == (HIDDEN, 2 * HIDDEN * bits // 32)
    assert tensors[f"{layer}.weight_scale"].shape == (HIDDEN, 2 * HIDDEN // 128)
    assert tensors[f"{layer}.weight_shape"].tolist() == [HIDDEN, 2 * HIDDEN]
    assert not any(k.endswith(("weight_zero_point", f"{layer}.weight")) for k in tensors)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    ids = token_ids(length=8)
    torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_own_codec_agrees_with_the_backend(bits: int):
    backend = CompressedBackend({"num_bits": bits, "group_size": 32})
    linear = torch.nn.Linear(96, 40)
    storage = backend.get_storage(backend.quantize(linear))
    scheme = preset_name_to_scheme(f"W{bits}A16", ["Linear"])
    scheme.weights.group_size = 32
    written = backend.to_checkpoint(storage)
    decompressed = PackedQuantizationCompressor.decompress(dict(written), scheme)["weight"]
    assert torch.equal(decompressed.float(), backend.dequantize(storage))
    weight = backend.dequantize(storage)
    state = {"weight": weight, "weight_scale": storage.tensors["weight_scale"]}
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    assert torch.equal(compressed["weight_packed"], storage.tensors["weight_packed"])


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_every_code(bits: int):
    half = 1 << (bits - 1)
    codes = torch.arange(-half, half, dtype=torch.int8).repeat(3, 64 // (2 * half) + 1)[:, :64].contiguous()
    assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)


def test_targets_and_bad_options_are_refused_before_anything_is_written(base: Path, tmp_path: Path):
    targets = export_targets()
    assert targets["w4a16"].backend == targets["w8a16"].backend == "compressed"
    adapted(base, 4, tmp_path / "adapter")
    before, adapter_before = digest(base), digest(tmp_path / "adapter")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="group_size"):
        export(base, tmp_path / "adapter", out, to="w4a16", backend_options={"group_size": 100}, progress=False)
    with pytest.raises(ConfigError, match="num_bits"):
        export(base, tmp_path / "adapter", out, to="w4a16", backend_options={"num_bits": 3}, progress=False)
    unfit = r"14 layer\(s\) do not fit(.|\n)*down_proj: .*group_size=96 must divide in_features=256"
    with pytest.raises(ConfigError, match=unfit):
        export(base, tmp_path / "adapter", out, to="w4a16", backend_options={"group_size": 96}, progress=False)
    assert not out.exists() and digest(base) == before and digest(tmp_path / "adapter") == adapter_before


def test_hostile_checkpoint_layers_are_refused_with_the_field_named():
    backend = CompressedBackend({"group_size": 16})
    storage = backend.get_storage(backend.quantize(torch.nn.Linear(32, 8)))
    tensors, config = backend.to_checkpoint(storage), backend.checkpoint_config(storage)
    weights = config["config_groups"]["group_0"]["weights"]

    def with_weights(**changes: object) -> dict:
        group = {**config["config_groups"]["group_0"], "weights": {**weights, **changes}}
        return {**config, "config_groups": {"group_0": group}}

    cases = [
        (tensors, with_weights(symmetric=False), "must be symmetric static int per group"),
        (tensors, with_weights(num_bits=3), "num_bits must be one of"),
        (tensors, with_weights(group_size=12), "group_size must be a multiple of 8"),
        (tensors, {**config, "format": "int-quantized"}, "format must be 'pack-quantized'"),
        ({**tensors, "weight_zero_point": torch.zeros(8, 2, dtype=torch.int8)}, config, "exactly"),
        ({**tensors, "weight_shape": torch.tensor([8, 2**40])}, config, "at most"),
        ({**tensors, "weight_shape": torch.tensor([8, 24])}, config, "not a multiple of group_size"),
        ({**tensors, "weight_scale": -tensors["weight_scale"]}, config, "negative"),
        ({**tensors, "weight_packed": tensors["weight_packed"].to(torch.int64)}, config, "weight_packed must be int32"),
    ]
    for damaged, cfg, message in cases:
        with pytest.raises(CheckpointError, match=message):
            backend.from_checkpoint(damaged, cfg)
    assert backend.from_checkpoint(tensors, {"quant_method": "bitsandbytes"}) is None
    assert backend.from_checkpoint(tensors, config).equal(storage)


def test_scales_follow_the_layer_dtype_unless_given():
    linear = torch.nn.Linear(32, 8).to(torch.bfloat16)
    assert CompressedBackend({"group_size": 16}).quantize(linear).weight_scale.dtype == torch.bfloat16
    chosen = CompressedBackend({"group_size": 16, "scale_dtype": "float16"}).quantize(linear)
    assert chosen.weight_scale.dtype == torch.float16


@torch.no_grad()
def test_a_loaded_export_is_refused_until_compressed_tensors_decompressed_it(base: Path, tmp_path: Path):
    adapted(base, 4, tmp_path / "adapter")
    export(base, tmp_path / "adapter", tmp_path / "out", to="w4a16", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    # Until its first forward the model holds compressed-tensors' packed linears (no `weight`): none is owned.
    with pytest.raises(qadapt.TargetError, match="no installed backend owns a Linear"):
        qadapt.wrap(loaded, method="lora", backend="auto", method_options={"r": 4})
    loaded(token_ids(length=4))  # compressed-tensors decompresses the whole model to float
    qadapt.wrap(loaded, method="lora", backend="auto", method_options={"r": 4})
    assert qadapt.summary(loaded).backends == {"none": 14}
