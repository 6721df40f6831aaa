"""Saving and loading adapters onto live models: qadapt checkpoints (``adapter``) and PEFT directories
both ways (``peft``). Imports formats for the file layout and model for the surgery."""
