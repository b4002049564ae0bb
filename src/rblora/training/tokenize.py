"""Records -> token ids and labels, with the seed's masking rule.

A record is ``{instruction, context, response}``. The full text is ``prompter.full(...)``,
tokenized with truncation at ``cutoff_len``; EOS is appended when the text did not already end with
it and there is room (the seed's rule: a truncated example gets no EOS). Labels equal the ids,
except that without ``train_on_inputs`` the prompt tokens get -100.

Prompt/response boundary: as in the seed, the prompt length comes from tokenizing the prompt
alone. A tokenizer may merge characters across the boundary (e.g. a BPE that joins the prompt's
trailing whitespace with the response's first characters), so the prompt's tokens are then not a
prefix of the full tokenization. We mask the longest common prefix of the two token lists: every
token that is wholly prompt text is masked, a token straddling the boundary is trained on, and no
response-only token is ever masked. With the shipped templates (ending in a newline) the two
coincide for the usual tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rblora.utils.sequences import common_prefix

IGNORE_INDEX = -100


def tokenize_records(
    records: Iterable[Mapping[str, str]],
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool,
) -> list[dict[str, list[int]]]:
    """Tokenize records into ``[{"input_ids": [...], "labels": [...]}]`` (same lengths)."""
    records = list(records)
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len!r}")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "instruction" not in rec or "response" not in rec:
            raise ValueError(
                f"record {i} must be a mapping with 'instruction', 'response' (and optional "
                f"'context'), got {rec!r:.200}"
            )
    if not records:
        return []  # fast tokenizers reject an empty batch
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set one before tokenizing")
    full = [prompter.full(r["instruction"], r.get("context") or "", r["response"]) for r in records]
    enc = tokenizer(full, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    prompt_ids = None
    if not train_on_inputs:
        prompts = [prompter.prompt(r["instruction"], r.get("context") or "") for r in records]
        prompt_ids = tokenizer(prompts, truncation=True, max_length=cutoff_len, padding=False)[
            "input_ids"
        ]
    out = []
    for i, ids in enumerate(enc):
        ids = list(ids)
        if not ids or (ids[-1] != eos and len(ids) < cutoff_len):
            ids.append(eos)
        labels = list(ids)
        if prompt_ids is not None:
            n = common_prefix(prompt_ids[i], ids)
            labels[:n] = [IGNORE_INDEX] * n
        out.append({"input_ids": ids, "labels": labels})
    return out
