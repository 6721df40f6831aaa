"""bitsandbytes backend specifics: odd shapes, adopted layers, storage layout."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from conftest import float_linear
from torch import nn

import qadapt
from qadapt import registry


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_bnb4_quantization_error_does_not_depend_on_row_alignment(quant_type, blocksize):
    """in_features = 352 is not a multiple of the block size; the error must match an aligned layer's.

    bitsandbytes 0.50.2's 2-D CPU dequantize kernel gives ~2.7x the error there; the backend
    dequantizes flat to avoid it.
    """
    backend = registry.backend_class("bnb4")({"quant_type": quant_type, "blocksize": blocksize})
    errors = {}
    for in_features in (352, 384):
        linear = float_linear(in_features, 96, seed=3)
        module = backend.quantize(float_linear(in_features, 96, seed=3))
        errors[in_features] = relative(backend.dequantize_module(module), linear.weight.detach())
    assert errors[352] < 1.2 * errors[384], errors


@pytest.mark.parametrize("shape", [(96, 352), (33, 96), (7, 130)])
def test_bnb4_forward_matches_dequantized_weight_for_unaligned_rows(shape):
    out_features, in_features = shape
    backend = registry.backend_class("bnb4")()
    module = backend.quantize(float_linear(in_features, out_features))
    x = torch.randn(4, in_features)
    with torch.no_grad():
        expected = F.linear(x, backend.dequantize_module(module), module.bias)
        assert relative(backend.forward(module, x), expected) < 1e-5


def test_bnb4_adopts_a_layer_quantized_by_bitsandbytes_itself():
    linear = float_linear(64, 32)
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="fp4")
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes on .to()
    backend = registry.backend_class("bnb4")()
    assert backend.owns(layer)
    storage = backend.get_storage(layer)
    assert storage.meta["quant_type"] == "fp4"
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert relative(backend.forward(layer, x), layer(x)) < 1e-5
    requantized = backend.requantize(backend.dequantize(storage), like=storage)
    assert requantized.meta == storage.meta


def test_bnb4_backend_forward_never_repacks_storage():
    """bitsandbytes' own eval forward repacks weights on AVX512-BF16 CPUs, re-quantizing the nested
    absmax (lossy); the backend's forward calls matmul_4bit itself, so storage stays bit-identical."""
    backend = registry.backend_class("bnb4")()
    layer = backend.quantize(float_linear(64, 64)).eval()
    before = backend.snapshot(layer)
    with torch.no_grad():
        backend.forward(layer, torch.randn(2, 64))
    assert backend.get_storage(layer).equal(before)


def test_bnb4_reads_portable_layout_after_bitsandbytes_own_forward():
    backend = registry.backend_class("bnb4")()
    layer = backend.quantize(float_linear(64, 64)).eval()
    weight = backend.dequantize_module(layer)
    with torch.no_grad():
        layer(torch.randn(2, 64))  # bitsandbytes' forward, not the backend's
    storage = backend.get_storage(layer)
    assert storage.tensors["data"].shape == (64 * 64 // 2, 1)
    assert relative(backend.dequantize(storage), weight) < 1e-2


def test_bnb8_adopts_a_layer_quantized_by_bitsandbytes_itself():
    linear = float_linear(64, 32)
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    backend = registry.backend_class("bnb8")()
    assert backend.owns(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = layer(x)  # moves CB/SCB into the matmul state
        assert relative(backend.forward(layer, x), first) < 1e-6
    weight = backend.dequantize_module(layer)
    assert relative(weight, linear.weight.detach()) < 0.02


def test_float_layer_is_not_owned_by_quantizing_backends():
    linear = float_linear(8, 8)
    assert not registry.backend_class("bnb4")().owns(linear)
    assert not registry.backend_class("bnb8")().owns(linear)
    assert registry.backend_class("none")().owns(linear)


def test_bnb4_fast_requantize_gives_the_bits_bitsandbytes_gives():
    from qadapt_bnb import fast_quant

    fast = registry.backend_class("bnb4")({"fast_requantize": True})
    plain = registry.backend_class("bnb4")({"fast_requantize": False})
    like = plain.get_storage(plain.quantize(float_linear(1024, 1024)))
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(5)) * 0.03
    assert weight.numel() >= fast_quant.FAST_MIN_ELEMENTS
    assert fast.requantize(weight, like=like).equal(plain.requantize(weight, like=like))
    assert fast_quant.verified(), "the compiled quantizer should pass its self-check on this machine"


def test_the_hub_kernel_noise_is_dropped_and_other_bitsandbytes_warnings_pass(caplog):
    """bitsandbytes logs the optional kernels-community lookup failing (offline, or `kernels` absent) at import
    on AVX512-BF16 CPUs; qadapt_bnb drops that one record and nothing else."""
    import logging

    import qadapt_bnb
    from qadapt_bnb import _quiet

    assert qadapt_bnb.Bnb4Backend is not None
    logger = logging.getLogger(_quiet.SOURCE_LOGGER)
    with caplog.at_level(logging.DEBUG):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        logger.warning("a real bitsandbytes warning: %s", "kept")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["a real bitsandbytes warning: kept"]
    dropped = [r for r in caplog.records if r.name == "qadapt_bnb"]
    assert len(dropped) == 1 and dropped[0].levelno == logging.DEBUG and "kernels-community" in dropped[0].getMessage()


_AS_IF_AVX512_BF16 = """
import importlib.abc, importlib.util, sys

class AsIfAvx512Bf16(importlib.abc.MetaPathFinder):
    # bitsandbytes only tries the hub kernel on AVX512-BF16 CPUs: claim one while its CPU ops load.
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.backends.cpu.ops":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            import bitsandbytes.functional as functional
            functional.has_avx512bf16 = lambda: True
            run(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AsIfAvx512Bf16())
import logging
logging.getLogger("bitsandbytes").warning("a real bitsandbytes warning")
"""


def test_importing_qadapt_bnb_on_an_avx512_bf16_cpu_prints_no_hub_kernel_line():
    """One subprocess (importing bitsandbytes costs seconds): bitsandbytes does emit the line there (qadapt_bnb's
    debug logger, printed to stdout, receives it), stderr does not show it, and other warnings still show."""
    import subprocess
    import sys

    code = _AS_IF_AVX512_BF16 + (
        "debug = logging.getLogger('qadapt_bnb')\n"
        "debug.addHandler(logging.StreamHandler(sys.stdout))\n"
        "debug.setLevel(logging.DEBUG)\n"
        "debug.propagate = False\n"
        "import qadapt_bnb\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = "Failed to load CPU gemm_4bit_forward from kernels-community"
    assert line in proc.stdout, proc.stdout
    assert line not in proc.stderr and "a real bitsandbytes warning" in proc.stderr, proc.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_bnb8_forward_in_another_dtype_leaves_the_bias_as_it_was(dtype):
    # bitsandbytes' Linear8bitLt.forward casts its bias to the input dtype in place; through qadapt it must not.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    qadapt.wrap(model, method="oft", backend="bnb8", method_options={"block_size": 16})
    layer = model[0]
    bias = layer.base.bias.detach().clone()
    x = torch.randn(8, 64)
    before = model(x)
    model(x.to(dtype))
    assert layer.base.bias.dtype == torch.float32 and torch.equal(layer.base.bias, bias)
    assert torch.equal(model(x), before)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qadapt.merge(model, calibration=[torch.randn(32, 64).to(dtype) for _ in range(4)])
    qadapt.unmerge(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
