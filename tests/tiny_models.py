"""Small seeded transformers models built from configs (nothing is downloaded), and a checksum helper."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(
    seed: int = 0, hidden_size: int = 64, num_layers: int = 2, intermediate_size: int | None = None, bias: bool = False
) -> LlamaForCausalLM:
    """A ``num_layers``-layer Llama (default 2), hidden ``hidden_size``, MLP ``intermediate_size``
    (default twice the hidden size), float32, eval mode, seeded init; ``bias``: every attention and
    MLP projection has a bias."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    """A 2-layer BERT encoder, hidden 64, float32, eval mode, seeded init."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, or the last hidden state of an encoder."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def perturb_adapters(model: nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    """Move every trainable parameter off its (identity) initialisation, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def tiny_tokenizer():
    """A word-level tokenizer over :data:`VOCAB` words ``w2 .. w127`` (``<pad>`` 0, ``<eos>`` 1), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
