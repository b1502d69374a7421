"""Hugging Face transformers models (optional extra ``hf``)."""
