"""A tiny Llama written as a GGUF file with the ``gguf`` package, with a byte-level BPE tokenizer trained in
memory: what transformers' ``from_pretrained(..., gguf_file=...)`` reads, in a few KB (no download).

For tests and docs (``from qadapt_gguf.tiny import write_tiny_gguf``); needs transformers and tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

#: llama.cpp's tensor names for the Llama blocks, against transformers' module names.
BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 64, 2


def _llama_cpp_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows ``[out, in]`` in llama.cpp's rotary order (transformers' reader undoes it)."""
    rows = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path | str, text: str, seed: int = 0, linear_type: str | None = None) -> LlamaForCausalLM:
    """Write a 2-layer Llama (hidden 64) and a tokenizer trained on ``text`` to ``path`` (F32 tensors; the
    block linears quantized by the ``gguf`` package to ``linear_type``, e.g. ``"Q4_1"``, when given);
    returns the float model the file was written from."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(2 * HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    state = model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for i in range(LAYERS):
        for ours, theirs in BLOCK_TENSORS.items():
            weight = state[f"model.layers.{i}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k"):
                weight = _llama_cpp_order(weight, HEADS if theirs == "attn_q" else KV_HEADS)
            data = weight.numpy().astype(np.float32)
            if linear_type is not None and weight.dim() == 2:
                qtype = gguf.GGMLQuantizationType[linear_type]
                writer.add_tensor(f"blk.{i}.{theirs}.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(f"blk.{i}.{theirs}.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
