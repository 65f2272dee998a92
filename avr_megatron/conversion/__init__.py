"""Checkpoint conversion between Hugging Face Llama models and avr-megatron (Megatron-Core
torch_dist) checkpoints, both directions streaming and atomic.

    convert_hf_to_mcore(hf_dir, out, tp=, pp=, dtype=)     # avr convert hf-to-mcore
    convert_mcore_to_hf(ckpt, out, dtype=, tokenizer=)     # avr convert mcore-to-hf

mapping.py is the single name/layout table; hf_config.py maps config.json to `cfg.model`;
dist_io.py writes and reads torch_dist data chunk by chunk; safetensors_io.py / hf_weights.py do
the same on the HF side.
"""

from avr_megatron.conversion.errors import ConversionError
from avr_megatron.conversion.hf_to_mcore import convert_hf_to_mcore
from avr_megatron.conversion.mcore_to_hf import convert_mcore_to_hf

__all__ = ["ConversionError", "convert_hf_to_mcore", "convert_mcore_to_hf"]
