"""The HF Llama -> pikv Transformer port used by the SmolLM2 benches; it lives in pikv/models/hf.py,
shared with training (`model.init_from_hf`). Kept as this name for the bench scripts' imports."""

from pikv.models.hf import max_logit_difference, transformer_from_hf_llama

__all__ = ["transformer_from_hf_llama", "max_logit_difference"]
