"""Interoperability with other formats: transformers weights, PEFT adapter files."""
