"""The Hugging Face stack on models transformers loaded quantized: Trainer and TRL accept a wrapped model,
saves are the adapter, resume is exact, and the saved directory loads in qadapt, PEFT and the export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import VOCAB, model_output, perturb_adapters, tiny_llama, tiny_tokenizer, token_ids
from torch.utils.data import Dataset
from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, TrainingArguments

import qadapt
from qadapt.persist.adapter import adapter_tensors

OFT = {"block_size": 16}


class Batches(Dataset):
    """``n`` seeded rows of ``length`` token ids, as ``{"input_ids", "labels"}``."""

    def __init__(self, n: int = 16, length: int = 12) -> None:
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "base"
    tiny_llama().save_pretrained(path)
    return path


def load_quantized(base: Path, bits: str) -> LlamaForCausalLM:
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == "4bit"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    return LlamaForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=torch.float32)


def wrapped(base: Path, bits: str, method: str) -> LlamaForCausalLM:
    model = load_quantized(base, bits)
    qadapt.wrap(model, method=method, method_options=OFT if method == "oft" else None)
    return model


def arguments(out: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def trained(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}


@pytest.mark.parametrize("method", ["lora", "oft"])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_trainer_trains_saves_the_adapter_and_resumes_exactly(base_dir, tmp_path, bits, method):
    model = wrapped(base_dir, bits, method)
    before = trained(model)
    args = arguments(tmp_path / "run", gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=Batches())
    trainer.train()
    after = trained(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the adapters did not move"

    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"qadapt_adapter.safetensors", "adapter_config.json", "model.safetensors", "optimizer.pt"} <= files
    assert "config.json" not in files  # like PEFT's: a checkpoint is not a whole model
    for weights in ("model.safetensors", "qadapt_adapter.safetensors", "adapter_model.safetensors"):
        with safe_open(str(checkpoint / weights), framework="pt") as handle:
            keys = list(handle.keys())
        assert keys and not [k for k in keys if ".base." in k or "embed_tokens" in k or "norm" in k], weights

    resumed = wrapped(base_dir, bits, method)
    Trainer(model=resumed, args=arguments(tmp_path / "run"), train_dataset=Batches()).train(
        resume_from_checkpoint=str(checkpoint)
    )
    again = trained(resumed)
    assert all(torch.equal(after[k], again[k]) for k in after), "resume did not replay the uninterrupted run"


def test_the_saved_directory_loads_in_qadapt_peft_and_the_export(base_dir, tmp_path):
    model = wrapped(base_dir, "4bit", "lora")
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = token_ids(length=8)
    with torch.no_grad():
        expected = model_output(model, ids)

    fresh = load_quantized(base_dir, "4bit")
    qadapt.load_adapter(fresh, tmp_path / "adapter")  # one call, as PeftModel.from_pretrained
    with torch.no_grad():
        assert torch.equal(model_output(fresh, ids), expected)

    import peft

    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    ours = adapter_tensors(model, "default")
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(theirs) == len(ours) > 0
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(theirs[f"base_model.model.{name}.lora_A.default.weight"], ours[f"{name}.lora_A.weight"])

    report = qadapt.export(base_dir, tmp_path / "adapter", tmp_path / "merged", to="bf16", progress=False)
    assert len(report.layers) == 14


def test_sft_trainer_accepts_a_wrapped_8bit_model_and_saves_the_adapter(base_dir, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = wrapped(base_dir, "8bit", "oft")
    before = trained(model)
    rows = torch.randint(2, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    after = trained(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = qadapt.load_adapter(wrapped(base_dir, "8bit", "oft"), tmp_path / "final")
    assert all(torch.equal(after[k], v) for k, v in adapter_tensors(saved, "default").items())


def test_float_unwrap_of_a_quantized_load_is_a_plain_float_model_that_round_trips(base_dir, tmp_path):
    model = wrapped(base_dir, "4bit", "lora")
    perturb_adapters(model)
    ids = token_ids(length=8)
    with torch.no_grad():
        adapted = model_output(model, ids)
    qadapt.unwrap(model, merge="float", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "_hf_peft_config_loaded", False)
    with torch.no_grad():
        out = model_output(model, ids)
    assert (out.float() - adapted).abs().max() / adapted.abs().max() < 0.05
    model.save_pretrained(tmp_path / "float")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "float")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model_output(reloaded, ids), out)


def test_transformers_adapter_methods_act_on_qadapt_or_name_the_qadapt_function(base_dir):
    model = wrapped(base_dir, "8bit", "lora")
    qadapt.add_adapter(model, "second", "lora")
    assert model.active_adapters() == ["second"]
    model.set_adapter("default")
    assert model.active_adapters() == ["default"]
    with pytest.raises(qadapt.ConfigError, match=r"qadapt\.add_adapter"):
        model.add_adapter(object(), adapter_name="third")
    with pytest.raises(qadapt.CheckpointError, match="not a local directory"):
        model.load_adapter("some-user/some-adapter")
    with pytest.raises(qadapt.TargetError, match="already wrapped"):
        qadapt.wrap(model, method="lora")


def test_disable_adapters_as_a_context_manager_restores_the_previous_state(base_dir):
    model = wrapped(base_dir, "8bit", "lora")
    perturb_adapters(model)
    ids = token_ids(length=8)
    with torch.no_grad():
        adapted = model_output(model, ids)
        with pytest.raises(KeyError):
            with qadapt.disable_adapters(model):
                plain = model_output(model, ids)
                raise KeyError("inside the block")
        assert not torch.equal(plain, adapted)
        assert torch.equal(model_output(model, ids), adapted)
        qadapt.disable_adapters(model)  # a plain call still just turns them off
        assert torch.equal(model_output(model, ids), plain)


def test_print_trainable_parameters_prints_peft_s_line(base_dir, capsys):
    model = wrapped(base_dir, "4bit", "lora")
    qadapt.print_trainable_parameters(model)
    info = qadapt.summary(model)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {info.trainable_params:,} || all params: {info.total_params:,}")


DDP_WORKER = """
import os, sys
import torch
sys.path.insert(0, {tests_dir!r})
from test_hf_stack import Batches, arguments, wrapped
from transformers import Trainer

import qadapt
from qadapt.persist.adapter import adapter_tensors

base, out = sys.argv[1], sys.argv[2]
model = wrapped(__import__("pathlib").Path(base), "4bit", "lora")
trainer = Trainer(model=model, args=arguments(out + "/run", max_steps=2, save_strategy="no"), train_dataset=Batches())
trainer.train()
trainer.save_model(out + "/final")
rank = int(os.environ["RANK"])
torch.save({{k: v.clone() for k, v in adapter_tensors(model, "default").items()}}, out + f"/rank{{rank}}.pt")
"""


def test_torchrun_ddp_with_trainer_keeps_the_ranks_equal_and_saves_once(base_dir, tmp_path):
    import launch

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests_dir=str(Path(__file__).resolve().parent)))
    port = launch.free_port()
    command = [*launch.torchrun(2, port), str(script), str(base_dir), str(tmp_path)]
    (log,) = launch.run_processes([command], launch.env(), timeout=300)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(bool(first[k].abs().sum() > 0) for k in first if "lora_B" in k), "LoRA's B (zero at start) did not train"
    fresh = qadapt.load_adapter(load_quantized(base_dir, "4bit"), tmp_path / "final")
    assert all(torch.equal(first[k], v) for k, v in adapter_tensors(fresh, "default").items())
    assert log.count("qadapt wrap") <= 1, "a wrap progress bar printed on more than one rank"


def test_load_adapter_is_trainable_false_freezes_the_loaded_adapter(base_dir, tmp_path):
    model = wrapped(base_dir, "4bit", "lora")
    model.save_pretrained(tmp_path / "adapter")
    frozen = qadapt.load_adapter(load_quantized(base_dir, "4bit"), tmp_path / "adapter", is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = qadapt.load_adapter(load_quantized(base_dir, "4bit"), tmp_path / "adapter")
    trained_names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert trained_names and all(".adapters." in n for n in trained_names)
