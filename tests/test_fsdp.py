"""FSDP2 (``fully_shard``) over 4-bit bases: 2 ranks under ``torchrun`` (gloo, CPU) against one process.

One launch trains a wrapped Llama (8 decoder blocks, hidden 1024, MLP 4096: 60 MiB of packed
4-bit codes, enough for sharding to show in resident memory) on bnb4 with ``quant_storage``
bfloat16 and float32, and on torchao's NF4 tensor, sharded per decoder block and at the root; a
single process trains the same model on the concatenated batch at the same time. See
``fsdp_worker.py`` for what each run does.

Both runs use ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB: glibc otherwise raises the threshold
as large buffers are freed and keeps later ones on its heap, so resident memory would measure
the allocator's caching (several hundred MiB on the gloo ranks) rather than the tensors alive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import launch
import pytest
import torch
from tiny_models import tiny_llama

import qadapt

TESTS_DIR = Path(__file__).resolve().parent
#: One model per run: bnb4 with each float ``quant_storage``, and torchao's NF4 tensor subclass
#: (the format torchtune shards with FSDP2).
STORAGES = ["bfloat16", "float32", "torchao-nf4"]
#: Loss agreement between the 2-rank run (mean of the ranks' losses) and the single process.
#: The sums run in another order (two half batches, then the gradient reduce-scatter, against one
#: batch), so float32 rounding differs by a few ulps (~5e-7 at a loss of 5) and AdamW carries
#: that on; 1e-5 leaves 10x room while a wrong gradient (not averaged, one rank's data) is off by >1e-2.
LOSS_ATOL = 1e-5


def build(storage: str, path: Path) -> None:
    if storage == "torchao-nf4":
        backend, options = "torchao", {"config": "nf4"}
    else:
        backend, options = "bnb4", {"quant_storage": storage, "fast_requantize": False}
    model = qadapt.wrap(
        tiny_llama(seed=0, hidden_size=1024, num_layers=8, intermediate_size=4096),
        method="oft",
        backend=backend,
        method_options={"block_size": 16},
        backend_options=options,
    )
    torch.save(model, path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("fsdp")
    models = [root / f"{storage}.pt" for storage in STORAGES]
    for storage, path in zip(STORAGES, models, strict=True):
        build(storage, path)
    worker = str(TESTS_DIR / "fsdp_worker.py")
    env = launch.env(MALLOC_MMAP_THRESHOLD_="131072")
    commands = [
        [*launch.torchrun(2, launch.free_port()), worker, str(root / "fsdp"), *map(str, models)],
        [sys.executable, worker, str(root / "single"), *map(str, models)],
    ]
    launch.run_processes(commands, env, timeout=900)  # ~4 min here; room for a slower CI machine
    return {
        storage: {
            "model": root / f"{storage}.pt",
            "single": torch.load(root / "single" / storage / "rank0.pt", weights_only=False),
            "ranks": [torch.load(root / "fsdp" / storage / f"rank{r}.pt", weights_only=False) for r in (0, 1)],
        }
        for storage in STORAGES
    }


@pytest.mark.parametrize("storage", STORAGES)
def test_losses_equal_a_single_process_on_the_concatenated_batch(runs, storage):
    single, ranks = runs[storage]["single"], runs[storage]["ranks"]
    averaged = torch.tensor([ranks[0]["losses"], ranks[1]["losses"]], dtype=torch.float64).mean(0)
    reference = torch.tensor(single["losses"], dtype=torch.float64)
    assert torch.allclose(averaged, reference, rtol=0, atol=LOSS_ATOL), (averaged - reference).abs().max()
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own rows
    # AdamW's step is at most lr (1e-2) per element whatever the gradient's size, so last-ulp
    # differences in near-zero gradients can move an element by up to ~lr; measured: 4e-5.
    for name, value in single["adapters"].items():
        assert torch.allclose(ranks[0]["adapters"][name], value, rtol=0, atol=1e-3), name


@pytest.mark.parametrize("storage", STORAGES)
def test_adapters_agree_across_ranks_and_trained_while_the_base_kept_its_bits(runs, storage):
    ranks = runs[storage]["ranks"]
    initial = torch.load(runs[storage]["model"], weights_only=False)
    initial = {n: p for n, p in initial.named_parameters() if p.requires_grad}
    assert ranks[0]["adapters"].keys() == initial.keys() and initial
    for name, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][name]), name
    assert sum(not torch.equal(v, initial[n]) for n, v in ranks[0]["adapters"].items()) == len(initial)
    for run in [*ranks, runs[storage]["single"]]:
        assert run["base_after"] == run["base_before"]
    assert ranks[0]["base_before"] != ranks[1]["base_before"]  # each rank holds its own shard


@pytest.mark.parametrize("storage", STORAGES)
def test_each_rank_holds_half_the_model_and_peaks_below_one_process(runs, storage):
    single, ranks = runs[storage]["single"], runs[storage]["ranks"]
    # Peaks are compared above each process's resident memory before the model was loaded: a gloo
    # rank starts ~6 MiB higher (the process group), which is not the model's. Measured: ranks
    # grow 171 MiB, the single process 201 MiB (bf16; the whole model is 63 MiB of parameters).
    grown = single["peak_mib"] - single["rss_start_mib"]
    for rank in ranks:
        assert rank["param_mib"] < 0.51 * single["param_mib"]
        assert rank["peak_mib"] - rank["rss_start_mib"] < grown, (rank["peak_mib"], rank["rss_start_mib"], grown)


@pytest.mark.parametrize("storage", STORAGES)
def test_resume_from_a_sharded_checkpoint_replays_the_same_steps(runs, storage):
    for run in runs[storage]["ranks"]:
        steps = len(run["resumed_losses"])
        assert run["resumed_losses"] == run["losses"][-steps:]
        for name, value in run["adapters"].items():
            assert torch.equal(run["resumed_adapters"][name], value), name


@pytest.mark.parametrize("storage", STORAGES)
def test_a_merge_after_sharded_training_equals_a_single_process_merge(runs, storage):
    rank0 = runs[storage]["ranks"][0]
    assert rank0["merged_from_checkpoint"] == rank0["merged_in_memory"]
    assert "cannot merge a sharded layer" in rank0["merge_on_shards"]


def test_a_bnb8_layer_that_lost_its_int8_params_refuses_to_run():
    # What sharding does to a bnb8 layer: the Int8Params object, which carries the row scales,
    # is replaced by a plain parameter holding the int8 codes.
    from tiny_models import token_ids

    model = qadapt.wrap(
        tiny_llama(), method="oft", backend="bnb8", targets=["q_proj"], method_options={"block_size": 16}
    )
    base = model.model.layers[0].self_attn.q_proj.base
    base.weight = torch.nn.Parameter(base.weight.data.clone(), requires_grad=False)
    with pytest.raises(qadapt.CapabilityError, match="bnb8 layers cannot be sharded"):
        model(token_ids())
