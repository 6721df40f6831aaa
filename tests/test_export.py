"""``qadapt export``: streamed merges of a tiny Llama on disk against the in-memory merge, and safety."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import perturb_adapters, tiny_llama, token_ids
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

import qadapt
from qadapt.cli.main import main
from qadapt.errors import CheckpointError, ConfigError
from qadapt.exporting import REPORT_FILE, export, export_targets

NF4 = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
)
METHODS = {"oft": {"block_size": 16}, "randlora": {"r": 8, "alpha": 16.0}, "lora": {"r": 4}, "dora": {"r": 4}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float tiny Llama, and the same saved by transformers in nf4 (double quant) and int8."""
    root = tmp_path_factory.mktemp("bases")
    tiny_llama().save_pretrained(root / "float")
    (root / "float" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n', encoding="utf-8")
    for name, quantization in (("nf4", NF4), ("int8", BitsAndBytesConfig(load_in_8bit=True))):
        model = LlamaForCausalLM.from_pretrained(
            root / "float", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
        model.save_pretrained(root / name)
    return {name: root / name for name in ("float", "nf4", "int8")}


def loader(bases: dict[str, Path], base: str, target: str) -> Callable[[], torch.nn.Module]:
    """How the in-memory reference loads the base: as transformers would quantize it for ``target``."""
    if base == "float" and target == "nf4":
        return lambda: LlamaForCausalLM.from_pretrained(
            bases["float"], quantization_config=NF4, device_map="cpu", dtype=torch.float32
        )
    return lambda: LlamaForCausalLM.from_pretrained(bases[base], device_map="cpu", dtype=torch.float32)


def make_adapter(load: Callable[[], torch.nn.Module], method: str, directory: Path) -> torch.nn.Module:
    """A perturbed adapter on the loaded base, saved to ``directory``; returns the adapted model."""
    model = qadapt.wrap(load(), method=method, method_options=METHODS[method])
    perturb_adapters(model)
    qadapt.save_adapter(model.eval(), directory)
    return model


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(path.name.encode() + (path.read_bytes() if path.is_file() else b""))
    return h.hexdigest()


CASES = [
    ("oft", "float", "nf4"),
    ("oft", "nf4", "nf4"),
    ("oft", "int8", "int8"),
    ("oft", "float", "float32"),
    ("randlora", "float", "nf4"),
    ("randlora", "nf4", "nf4"),
    # float to float merges a block of rows at a time (Method.row_merger)
    ("randlora", "float", "float32"),
    ("lora", "float", "float32"),
    ("dora", "float", "float32"),
]


@pytest.mark.parametrize(("method", "base", "target"), CASES, ids=["-".join(c) for c in CASES])
@torch.no_grad()
def test_export_is_bit_identical_to_the_in_memory_merge(
    bases: dict[str, Path], tmp_path: Path, method: str, base: str, target: str
):
    load = loader(bases, base, target)
    make_adapter(load, method, tmp_path / "adapter")
    reference = qadapt.unwrap(qadapt.load_adapter(load(), tmp_path / "adapter"), merge=True).eval()

    report = export(bases[base], tmp_path / "adapter", tmp_path / "out", to=target, progress=False)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = token_ids(length=8)
    assert torch.equal(exported(ids).logits, reference(ids).logits)
    assert len(report.layers) == 14
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert set(saved["layers"]) == set(report.layers)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file() or base != "float"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if target == "float32":
        assert "quantization_config" not in config
    else:  # exactly what transformers wrote for a model quantized the same way
        quantized = bases["nf4" if target == "nf4" else "int8"]
        written = json.loads((quantized / "config.json").read_text())["quantization_config"]
        assert config["quantization_config"] == written


@torch.no_grad()
def test_a_method_that_merges_into_the_bias_exports_the_merged_bias(tmp_path: Path):
    """IA³ scales biased layers' outputs, bias included: the export writes the merged bias (Method.merge_bias)."""
    base_model = tiny_llama(bias=True)
    generator = torch.Generator().manual_seed(8)
    for name, param in base_model.named_parameters():
        if name.endswith(".bias"):  # transformers starts them at zero
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    base_model.save_pretrained(tmp_path / "base")

    def load() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", dtype=torch.float32)

    options = {"feedforward_modules": ["down_proj"]}
    model = qadapt.wrap(load(), method="ia3", targets=["q_proj", "v_proj", "down_proj"], method_options=options)
    perturb_adapters(model, scale=0.2)
    qadapt.save_adapter(model.eval(), tmp_path / "adapter")
    ids = token_ids(length=8)
    adapted = model(ids).logits
    reference = qadapt.unwrap(qadapt.load_adapter(load(), tmp_path / "adapter"), merge=True).eval()
    export(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", to="float32", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(exported(ids).logits, reference(ids).logits)
    torch.testing.assert_close(exported(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    q_bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(written[q_bias], base[q_bias])  # scaled with the output
    down_bias = "model.layers.0.mlp.down_proj.bias"
    assert torch.equal(written[down_bias], base[down_bias])  # a feed-forward layer's input is scaled, not its bias


@torch.no_grad()
def test_float_target_from_a_quantized_base_is_the_float_merged_model(bases: dict[str, Path], tmp_path: Path):
    adapted = make_adapter(loader(bases, "nf4", "nf4"), "oft", tmp_path / "adapter")
    ids = token_ids(length=8)
    expected = adapted(ids).logits  # the adapted layers, computed on the dequantized weights
    export(bases["nf4"], tmp_path / "adapter", tmp_path / "out", to="float32", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not any("Linear4bit" in type(m).__name__ for m in exported.modules())
    torch.testing.assert_close(exported(ids).logits, expected, rtol=1e-4, atol=1e-4)

    export(bases["nf4"], tmp_path / "adapter", tmp_path / "bf16", to="bf16", progress=False)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16
    assert (half(ids).logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


@torch.no_grad()
def test_peft_adapter_with_shared_bases_and_small_shards(bases: dict[str, Path], tmp_path: Path):
    load = loader(bases, "float", "float32")
    model = qadapt.wrap(load(), method="randlora", method_options=METHODS["randlora"])
    perturb_adapters(model)
    qadapt.save_peft_adapter(model, tmp_path / "peft")
    reference = qadapt.unwrap(qadapt.load_peft_adapter(load(), tmp_path / "peft"), merge=True).eval()

    export(bases["float"], tmp_path / "peft", tmp_path / "out", to="float32", max_shard_size="40KB", progress=False)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = token_ids(length=8)
    assert torch.equal(exported(ids).logits, reference(ids).logits)


def test_existing_out_memory_cap_and_failures_leave_no_partial_output(bases: dict[str, Path], tmp_path: Path):
    make_adapter(loader(bases, "float", "float32"), "oft", tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = digest(out)
    with pytest.raises(ConfigError, match="exists; pass overwrite"):
        export(bases["float"], tmp_path / "adapter", out, to="float32", progress=False)
    with pytest.raises(ConfigError, match=r"max_memory=.* too small: layer model\.layers\..* at least"):
        export(bases["float"], tmp_path / "adapter", out, to="float32", max_memory="8KiB", overwrite=True)
    with pytest.raises(ConfigError, match=r"--to must be one of .*nf4"):
        export(bases["float"], tmp_path / "adapter", out, to="nf5", overwrite=True)

    # A base whose last tensor is cut short fails mid-write: the old OUT stays, no temporary is left.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((bases["float"] / "config.json").read_bytes())
    data = (bases["float"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"broken/model\.safetensors"):
        export(broken, tmp_path / "adapter", out, to="float32", overwrite=True, progress=False)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "broken", "out"]

    # A layer no installed backend reads is refused with the layout and the readers.
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_bytes((bases["float"] / "config.json").read_bytes())
    tensors = load_file(bases["float"] / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 64, dtype=torch.int16)
    save_file(tensors, odd / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj: no installed backend reads .*I16"):
        export(odd, tmp_path / "adapter", tmp_path / "odd-out", to="float32", progress=False)
    assert not (tmp_path / "odd-out").exists()

    export(bases["float"], tmp_path / "adapter", out, to="float32", overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_targets_come_from_the_backends():
    targets = export_targets()
    assert targets["nf4"].backend == "bnb4" and targets["nf4"].options == {"quant_type": "nf4"}
    assert targets["int8"].backend == "bnb8"
    assert targets["bf16"].dtype == torch.bfloat16 and targets["bf16"].backend is None


def test_cli_export(bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_adapter(loader(bases, "nf4", "nf4"), "oft", tmp_path / "adapter")
    args = ["export", str(bases["nf4"]), str(tmp_path / "adapter"), str(tmp_path / "out"), "--to", "nf4"]
    assert main([*args, "--no-progress", "-v"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "14 layer(s) merged" in printed
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err


def test_a_non_finite_merge_is_refused_and_nothing_is_written(bases: dict[str, Path], tmp_path: Path):
    model = qadapt.wrap(loader(bases, "float", "float32")(), method="randlora", method_options=METHODS["randlora"])
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    qadapt.save_adapter(model, tmp_path / "adapter")
    for target in ("float32", "nf4"):
        with pytest.raises(qadapt.UnsafeMergeError, match="non-finite"):
            export(bases["float"], tmp_path / "adapter", tmp_path / "out", to=target, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_peft_pair_from_two_saves_is_refused_as_load_refuses_it(bases: dict[str, Path], tmp_path: Path):
    load = loader(bases, "float", "float32")
    for name, r in (("peft", 8), ("other", 4)):
        qadapt.save_peft_adapter(qadapt.wrap(load(), method="randlora", method_options={"r": r}), tmp_path / name)
    (tmp_path / "peft" / "adapter_config.json").write_bytes((tmp_path / "other" / "adapter_config.json").read_bytes())
    with pytest.raises(qadapt.PairMismatchError, match="other method settings"):
        export(bases["float"], tmp_path / "peft", tmp_path / "out", to="float32", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_base_cut_short_is_named_and_nothing_is_written(bases: dict[str, Path], tmp_path: Path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(bases["float"], base)
    weights = base / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 1000)  # the last tensors lose their tail
    model = qadapt.wrap(loader(bases, "float", "float32")(), method="oft", method_options=METHODS["oft"])
    qadapt.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(qadapt.CheckpointError, match=r"model\.safetensors"):
        export(base, tmp_path / "adapter", tmp_path / "out", to="float32", progress=False)
    assert not (tmp_path / "out").exists()


def test_blocks_that_do_not_fill_the_shape_are_refused(tmp_path: Path):
    from qadapt.formats.hf_checkpoint import ShardWriter

    writer = ShardWriter(tmp_path, 10**9)
    with pytest.raises(qadapt.CheckpointError, match="its blocks hold 24 bytes, its shape \\[4, 3\\] needs 48"):
        writer.add_blocks("w", torch.float32, (4, 3), [torch.zeros(2, 3)])
    writer.abort()


def test_a_failed_block_write_is_taken_back_and_the_shard_stays_readable(tmp_path: Path):
    from safetensors.torch import load_file

    from qadapt.formats.hf_checkpoint import ShardWriter

    def blocks():
        yield torch.ones(2, 3)
        raise qadapt.UnsafeMergeError("non-finite")

    writer = ShardWriter(tmp_path, 10**9)
    writer.add("a", torch.arange(4.0))
    with pytest.raises(qadapt.UnsafeMergeError):
        writer.add_blocks("w", torch.float32, (4, 3), blocks())
    writer.add("b", torch.full((2,), 7.0))
    (path,) = writer.finish()
    loaded = load_file(str(path))
    assert sorted(loaded) == ["a", "b"] and torch.equal(loaded["b"], torch.full((2,), 7.0))


@torch.no_grad()
def test_a_float_model_wrapped_on_some_targets_exports_as_it_was_trained(bases: dict[str, Path], tmp_path: Path):
    # Wrapping a float model with bnb4 quantizes the targets only; the export keeps the other linears float.
    model = qadapt.wrap(
        LlamaForCausalLM.from_pretrained(bases["float"], dtype=torch.float32),
        method="oft",
        backend="bnb4",
        targets=["q_proj", "v_proj"],
        method_options=METHODS["oft"],
    )
    perturb_adapters(model)
    qadapt.save_adapter(model.eval(), tmp_path / "adapter")
    reference = qadapt.unwrap(model, merge=True).eval()
    ids = token_ids(length=8)

    report = export(bases["float"], tmp_path / "adapter", tmp_path / "out", to="nf4", progress=False)

    assert len(report.kept_float) == 10 and not report.quantized_float  # k, o, gate, up, down of 2 layers
    assert "10 float linear(s) kept in float, as they were when the adapter was trained" in str(report)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (
        set(report.kept_float) <= set(config["llm_int8_skip_modules"]) and "lm_head" in config["llm_int8_skip_modules"]
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(exported(ids).logits, reference(ids).logits)

    report = export(
        bases["float"], tmp_path / "adapter", tmp_path / "all", to="nf4", progress=False, quantize_float_linears=True
    )
    assert not report.kept_float and len(report.quantized_float) == 10
    assert all(0 < e < 0.2 for e in report.quantized_float.values())
    assert "10 float linear(s) not adapted were quantized" in str(report)
    written = json.loads((tmp_path / "all" / "config.json").read_text())["quantization_config"]
    assert written["llm_int8_skip_modules"] is None  # transformers' own default: every linear but the head
    everything = AutoModelForCausalLM.from_pretrained(tmp_path / "all")
    assert not torch.equal(everything(ids).logits, reference(ids).logits)
