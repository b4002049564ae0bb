"""Records -> token ids and labels, with the seed's masking rule.

A record is ``{instruction, context, response}``. The full text is ``prompter.full(...)``,
tokenized, with EOS appended when it does not already end with it. Labels equal the ids, except
that without ``train_on_inputs`` the prompt tokens get -100.

Cutoff. A text longer than ``cutoff_len`` tokens loses prompt tokens from the left (after the
tokenizer's leading special tokens, e.g. BOS), so the response and its EOS are kept whole: the
seed cut from the right, and a long prompt (a BoolQ passage) then lost its whole response, so the
record trained on nothing while it still counted in its client's weight. A response longer than
``cutoff_len`` on its own keeps its start. The held-out loss cuts the same way
(``rblora.evaluation.loss``, the same ``keep_response``), so it sees the tokens training sees; the
multiple-choice scorer also cuts prompts from the left, at the model's context length.

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

from rblora.utils.sequences import common_prefix, keep_response, leading_special_ids

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
    prompts = [prompter.prompt(r["instruction"], r.get("context") or "") for r in records]
    enc = tokenizer(full + prompts, padding=False, verbose=False)["input_ids"]
    n_lead = len(leading_special_ids(tokenizer))
    out = []
    for ids, prompt_ids in zip(enc[: len(full)], enc[len(full) :], strict=True):
        ids = list(ids)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        n_prompt = common_prefix(prompt_ids, ids)
        ids, n_prompt = keep_response(ids, n_prompt, n_lead, cutoff_len)
        labels = list(ids)
        if not train_on_inputs:
            labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
        out.append({"input_ids": ids, "labels": labels})
    return out
