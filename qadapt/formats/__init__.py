"""File formats, read and checked before any tensor is used: the checkpoint file helpers (one read per
file, pairs, atomic writes), the qadapt adapter layout, the PEFT layout and transformers' safetensors
checkpoints (streamed reader, shard writer). No ``nn.Module`` here: imports errors, protocols,
plugins and config only."""
