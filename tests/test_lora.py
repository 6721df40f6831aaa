"""The ``lora`` and ``dora`` methods against PEFT 0.21.2's LoRA / DoRA on every backend (real bitsandbytes, CPU)."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import model_checksum
from peft_reference import TARGET, Holder, float_twin, inputs, peft_layer, peft_model, relative, trainable_count
from tiny_models import model_output, tiny_llama, token_ids
from torch import nn

import qadapt
from qadapt import QuantAdapterLinear
from qadapt.errors import AdapterStateError, CheckpointError
from qadapt_lora import DoraMethod, LoraMethod, LoraOptions

BACKENDS = [
    ("none", {}),
    ("bnb8", {}),
    ("bnb4", {"quant_type": "nf4"}),
    ("bnb4", {"quant_type": "fp4"}),
    ("int8sym", {}),
]
BACKEND_IDS = ["none", "bnb8", "bnb4-nf4", "bnb4-fp4", "int8sym"]
METHODS = [LoraMethod, DoraMethod]

# (in, out, options): non-square both ways, rslora, a rank above one side, gaussian init.
CASES = [
    (64, 48, {"r": 4, "alpha": 16}),
    (48, 96, {"r": 8, "alpha": 8, "use_rslora": True}),
    (40, 24, {"r": 32, "alpha": 4}),
    (64, 32, {"r": 2, "alpha": 3, "init_weights": "gaussian"}),
]
CASE_IDS = ["64x48", "48x96-rslora", "r-above-out", "gaussian"]


def peft_config(options: dict, dora: bool) -> peft.LoraConfig:
    opts = LoraOptions(**options)
    return peft.LoraConfig(
        target_modules=[TARGET],
        r=opts.r,
        lora_alpha=opts.alpha,
        use_rslora=opts.use_rslora,
        lora_dropout=opts.dropout,
        init_lora_weights=opts.init_weights,
        use_dora=dora,
    )


def make_layer(method: type, in_f: int, out_f: int, options: dict, backend: tuple[str, dict]) -> QuantAdapterLinear:
    torch.manual_seed(0)
    name, backend_options = backend
    return QuantAdapterLinear(nn.Linear(in_f, out_f), method(options), name, backend_options=backend_options)


def perturb(layer: QuantAdapterLinear, seed: int = 3) -> None:
    """Move every adapter tensor off its start (B = 0 and m = ||W|| make a fresh adapter a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1 * param.abs().mean().clamp_min(0.1))


def peft_twin(layer: QuantAdapterLinear, options: dict) -> tuple[nn.Module, nn.Module]:
    """PEFT's LoRA / DoRA on a float linear holding ``layer``'s dequantized weight, with our adapter values."""
    dora = isinstance(layer.methods["default"], DoraMethod)
    model = peft_model(peft_config(options, dora), **{TARGET: float_twin(layer)})
    twin = peft_layer(model)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(adapter.lora_A.weight)
        twin.lora_B["default"].weight.copy_(adapter.lora_B.weight)
        if dora:
            twin.lora_magnitude_vector["default"].weight.copy_(adapter.magnitude)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(("in_f", "out_f", "options"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", METHODS, ids=["lora", "dora"])
def test_forward_merged_weight_and_gradients_equal_peft(method, backend, in_f, out_f, options):
    layer = make_layer(method, in_f, out_f, options, backend)
    perturb(layer)
    model, twin = peft_twin(layer, options)
    x = inputs(in_f)
    ours, theirs = layer(x), model(x)
    assert relative(ours, theirs) <= 1e-6
    ours.square().mean().backward()
    theirs.square().mean().backward()
    adapter = layer.adapters["default"]
    pairs = [
        (adapter.lora_A.weight, twin.lora_A["default"].weight),
        (adapter.lora_B.weight, twin.lora_B["default"].weight),
    ]
    if method is DoraMethod:
        pairs.append((adapter.magnitude, twin.lora_magnitude_vector["default"].weight))
    for mine, peft_param in pairs:
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        assert relative(mine.grad, peft_param.grad) <= 1e-5
    assert trainable_count(layer) == trainable_count(model)
    with torch.no_grad():
        merged = layer.methods["default"].merge_weight(adapter, twin.base_layer.weight.clone())
        twin.merge()
    assert relative(merged, twin.base_layer.weight) <= 1e-6


@pytest.mark.parametrize("init", [True, "gaussian", False], ids=["default", "gaussian", "nn-linear"])
@pytest.mark.parametrize("method", METHODS, ids=["lora", "dora"])
def test_seeded_initialisation_is_peft_bit_for_bit(method, init):
    base = QuantAdapterLinear(nn.Linear(64, 48), LoraMethod(), "none")
    twin_linear = float_twin(base)
    torch.manual_seed(5)
    adapter = base.add_adapter("fresh", method({"r": 4, "init_weights": init}))
    torch.manual_seed(5)
    twin = peft_layer(peft_model(peft_config({"r": 4, "init_weights": init}, method is DoraMethod), proj=twin_linear))
    assert torch.equal(adapter.lora_A.weight, twin.lora_A["default"].weight)
    assert torch.equal(adapter.lora_B.weight, twin.lora_B["default"].weight)
    assert bool(adapter.lora_B.weight.any()) == (init is False)
    if method is DoraMethod:
        assert relative(adapter.magnitude, twin.lora_magnitude_vector["default"].weight) <= 1e-6


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dora_magnitude_is_peft_s_from_the_real_bitsandbytes_layer(quant_type):
    """PEFT's DoRA on the very Linear4bit qadapt holds computes the same magnitude (it dequantizes it)."""
    layer = make_layer(LoraMethod, 64, 48, {"r": 4}, ("bnb4", {"quant_type": quant_type}))
    torch.manual_seed(7)
    adapter = layer.add_adapter("d", DoraMethod({"r": 4, "init_weights": False}))
    holder = Holder(proj=copy.deepcopy(layer.base))
    holder.is_loaded_in_4bit = True  # what transformers sets; PEFT then picks its bitsandbytes layer
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft_layer(peft.get_peft_model(holder, peft_config({"r": 4, "init_weights": False}, True)))
    assert type(twin).__module__ == "peft.tuners.lora.bnb"
    theirs = twin.lora_magnitude_vector["default"].weight
    assert relative(adapter.magnitude, theirs) <= 1e-6
    float_norms = torch.linalg.vector_norm(float_twin(layer).weight + adapter.delta_weight(), dim=1)
    assert torch.equal(adapter.magnitude.detach(), float_norms)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("method", METHODS, ids=["lora", "dora"])
def test_fresh_adapter_is_a_no_op(method, backend):
    layer = make_layer(method, 64, 48, {"r": 4}, backend)
    x = inputs(64)
    with torch.no_grad():
        assert relative(layer(x), layer.base_forward(x)) <= 1e-6


@pytest.mark.parametrize("method", METHODS, ids=["lora", "dora"])
def test_dropout_draws_the_same_mask_as_peft(method):
    options = {"r": 4, "dropout": 0.3}
    layer = make_layer(method, 64, 48, options, ("none", {}))
    perturb(layer)
    model, _ = peft_twin(layer, options)
    layer.train(), model.train()
    x = inputs(64)
    torch.manual_seed(11)
    ours = layer(x)
    torch.manual_seed(11)
    theirs = model(x)
    assert relative(ours, theirs) <= 1e-6
    with torch.no_grad():
        assert not torch.equal(ours, layer.eval()(x))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_dora_inverse_unmerge(backend):
    layer = make_layer(DoraMethod, 64, 48, {"r": 4}, backend)
    perturb(layer)
    original = layer.backend.dequantize_module(layer.base)
    result = layer.merge(keep_snapshot=False)
    layer.unmerge("inverse")
    assert relative(layer.backend.dequantize_module(layer.base), original) <= 3 * result.error + 1e-6


def test_dora_inverse_unmerge_without_its_merge_says_use_exact():
    layer = make_layer(DoraMethod, 16, 8, {"r": 2}, ("none", {}))
    weight = layer.backend.dequantize_module(layer.base)
    with pytest.raises(AdapterStateError, match="mode='exact'"):
        layer.methods["default"].unmerge_weight(layer.adapters["default"], weight)


def test_dora_forward_outside_a_layer_needs_a_base_layer():
    layer = make_layer(DoraMethod, 16, 8, {"r": 2}, ("none", {}))
    with pytest.raises(TypeError, match="BaseLayer"):
        layer.methods["default"].forward(layer.adapters["default"], inputs(16), lambda z: z)


def test_options_reject_bad_values_with_locations():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="init_weights"):
        LoraOptions(init_weights="pissa")
    with pytest.raises(pydantic.ValidationError, match="r\n"):
        LoraOptions(r=0)
    assert LoraOptions(r=4, alpha=8, use_rslora=True).scaling == 4.0


# ------------------------------------------------------------------------------ PEFT checkpoints


def _peft_saved(directory, **config) -> torch.Tensor:
    """Save a perturbed PEFT LoRA / DoRA adapter of the tiny Llama; return its eval output."""
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "down_proj"], **config))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        output = model_output(model.eval(), token_ids())
    model.save_pretrained(directory)
    return output


@pytest.mark.parametrize(
    ("config", "method"),
    [({"r": 4, "lora_alpha": 16}, "lora"), ({"r": 4, "use_rslora": True, "use_dora": True}, "dora")],
    ids=["lora", "dora"],
)
def test_a_checkpoint_saved_by_peft_gives_peft_s_outputs(tmp_path, config, method):
    expected = _peft_saved(tmp_path, **config)
    model = qadapt.load_peft_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert relative(model_output(model, token_ids()), expected) <= 1e-6
    layers = [layer for layer in model.modules() if isinstance(layer, QuantAdapterLinear)]
    assert len(layers) == 4 and {layer.methods["default"].name for layer in layers} == {method}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' \(only True, False or 'gaussian'"),
        ({"lora_bias": True}, r"lora_bias=True"),
    ],
    ids=["pissa", "lora-bias"],
)
def test_unsupported_peft_lora_settings_are_named_and_change_nothing(tmp_path, change, message):
    _peft_saved(tmp_path, r=4)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    model = tiny_llama()
    before = model_checksum(model)
    with pytest.raises(CheckpointError, match=message):
        qadapt.load_peft_adapter(model, tmp_path, backend="bnb4")
    assert model_checksum(model) == before


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_rank_and_alpha_patterns_are_peft_s_per_layer_choice(tmp_path, dora):
    patterns = {
        "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 8},
        "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 3.0},
    }
    config = {"r": 4, "lora_alpha": 16, "init_lora_weights": False, "use_dora": dora, **patterns}
    expected = _peft_saved(tmp_path, **config)
    model = qadapt.load_peft_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert relative(model_output(model, token_ids()), expected) <= 1e-6
    wrapped = [(n, layer) for n, layer in model.named_modules() if isinstance(layer, QuantAdapterLinear)]
    layers = {n: layer.adapters["default"] for n, layer in wrapped}
    assert [layers[f"model.layers.{i}.self_attn.q_proj"].r for i in (0, 1)] == [2, 2]
    assert [layers[f"model.layers.{i}.mlp.down_proj"].r for i in (0, 1)] == [4, 8]
    assert [layers[f"model.layers.{i}.self_attn.q_proj"].scaling for i in (0, 1)] == [3.0 / 2, 16 / 2]
    # Written back by qadapt, PEFT reads the same per-layer shapes and computes the same outputs.
    qadapt.save_peft_adapter(model, tmp_path / "back")
    saved = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == patterns["rank_pattern"] and saved["alpha_pattern"] == patterns["alpha_pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "back").eval()
    with torch.no_grad():
        assert relative(model_output(reloaded, token_ids()), expected) <= 1e-6
