"""The FSDP2 recipes in docs/training.md, run as written (CPU): torchrun, the accelerate config, the Trainer script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import launch
import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

import qadapt

PAGE = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def block(first_line: str) -> str:
    """The fenced block of docs/training.md whose first line is ``first_line`` (up to a colon)."""
    for _lang, body in re.findall(r"```(\w+)\n(.*?)```", PAGE.read_text(), flags=re.DOTALL):
        if body.split("\n", 1)[0].split(":")[0] == first_line:
            return body
    raise AssertionError(f"docs/training.md has no block starting {first_line!r}")


def test_the_fsdp2_recipe_trains_sharded_under_torchrun(tmp_path):
    script = tmp_path / "fsdp2_train.py"
    script.write_text(block("# fsdp2_train.py"))
    port = launch.free_port()
    command = [*launch.torchrun(2, port), str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=launch.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "saved adapter after 4 steps" in result.stdout
    optimizer_state = torch.load(tmp_path / "adapter" / "optimizer.pt")
    assert optimizer_state["state"]  # AdamW moments for every adapter parameter
    # The checkpoint is whole: it loads into one unsharded process, and it trained.
    model = qadapt.load_adapter(_recipe_model(), tmp_path / "adapter")
    fresh = dict(_recipe_model().named_parameters())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(not torch.equal(p, fresh[n]) for n, p in trained.items())


def _recipe_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return qadapt.wrap(
        LlamaForCausalLM(config),
        method="oft",
        backend="bnb4",
        method_options={"block_size": 16},
        backend_options={"quant_storage": "float32"},
    )


def test_accelerate_reads_the_documented_config_as_fsdp2(tmp_path, monkeypatch):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(block("# fsdp2.yaml"))
    args = launch_command_parser().parse_args(["--config_file", str(config), "train_trainer.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == 2
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


def test_the_trainer_script_trains_and_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = block("# train_trainer.py")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "'loss'" in result.stdout + result.stderr
    loaded = qadapt.load_adapter(_recipe_model(), tmp_path / "adapter")
    assert any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("name", ["# fsdp2_train.py", "# fsdp2.yaml", "# train_trainer.py"])
def test_each_recipe_is_on_the_page(name):
    assert block(name).strip()
