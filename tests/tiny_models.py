"""Tiny models and a tokenizer built from configs (no downloads), shared by the tests.

Import as ``from tiny_models import build_tiny_llama`` (``tests/`` is on pytest's pythonpath);
the fixtures in ``tests/conftest.py`` wrap the same builders.
"""

from __future__ import annotations

import string


def build_tiny_tokenizer(bos_token: str | None = "<s>", eos_token: str | None = "</s>"):
    """A character-level fast tokenizer (printable ASCII + specials), built in memory.

    It adds no special token to a text. ``bos_token=None`` / ``eos_token=None`` build one that
    declares no BOS / EOS (the ids of ``<s>`` and ``</s>`` stay in the vocabulary).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token="<unk>",
    )


def build_tiny_llama(vocab_size: int = 104, seed: int = 0, **config_overrides):
    """A 2-layer LlamaForCausalLM (hidden 32) with q/k/v/o projections, random weights.

    ``config_overrides`` go to ``LlamaConfig`` and win over these defaults (e.g.
    ``attn_implementation="eager"``, ``num_hidden_layers=12``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config = LlamaConfig(vocab_size=vocab_size, **{**defaults, **config_overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_fixed_logprob_lm(logprobs):
    """A causal LM whose log-prob of each token id is ``logprobs[id]`` whatever the context.

    ``logprobs``: a 1-D float tensor (or list) over the vocabulary whose ``exp`` sums to 1, so the
    logits it returns are already log-probabilities. It accepts the keyword arguments the scorer
    passes (``position_ids``, ``attention_mask``, ``logits_to_keep``, ...) and ignores them except
    ``logits_to_keep``; hand-computed scores are sums of table entries.
    """
    from types import SimpleNamespace

    import torch

    class FixedLogProbLM(torch.nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

        def forward(self, input_ids, logits_to_keep=0, **_):
            batch, length = input_ids.shape
            keep = logits_to_keep or length
            return SimpleNamespace(logits=self.table.expand(batch, keep, -1))

    return FixedLogProbLM(logprobs).eval()


def build_tiny_vit(folder, num_labels: int = 10, seed: int = 0):
    """A 2-layer ViT image classifier (hidden 32, 16 px, patch 4) saved with its image processor
    to ``folder``; returns the folder."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
