"""Instruction data: read JSONL in three formats, tokenise with the chat template, pack.

Loss is computed on the assistant's tokens only. Examples are packed back to back into
fixed-length sequences (separated by the template's end-of-turn token), so no compute is spent
on padding; only the last sequence is padded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.sources import is_uri

IGNORE = -100
Messages = list[dict[str, str]]


def _to_messages(rec: Any, where: str) -> Messages:
    if not isinstance(rec, dict):
        raise SpecError(fix(f"{where}: expected a JSON object", "write one object per line"))
    if "messages" in rec:
        msgs = rec["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                        for m in msgs)):
            raise SpecError(fix(f"{where}: 'messages' must be a list of {{role, content}} objects",
                                'e.g. {"messages": [{"role": "user", "content": "..."}, ...]}'))
        if not any(m["role"] == "assistant" for m in msgs):
            raise SpecError(fix(f"{where}: no assistant message to learn from", "add an assistant turn"))
        return [{"role": m["role"], "content": str(m["content"])} for m in msgs]
    if "prompt" in rec and "completion" in rec:
        return [{"role": "user", "content": str(rec["prompt"])},
                {"role": "assistant", "content": str(rec["completion"])}]
    if "instruction" in rec and "output" in rec:
        user = str(rec["instruction"]) + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(rec["output"])}]
    raise SpecError(fix(f"{where}: unknown record format with keys {sorted(rec)}",
                        "use 'messages', 'prompt'+'completion', or 'instruction'+'input'+'output'"))


def _read_lines(path: str | Path) -> list[str]:
    """A dataset's lines, from a local file or through pyarrow's filesystems for a URI."""
    if is_uri(path):
        import pyarrow.fs as pafs

        try:
            fs, where = pafs.FileSystem.from_uri(str(path))
            with fs.open_input_stream(where) as f:
                return f.read().decode().splitlines()
        except (OSError, ValueError) as e:  # pyarrow: missing object, no credentials, unknown scheme
            raise SpecError(fix(f"dataset {path} cannot be read here: {str(e).splitlines()[0]}",
                                "check the URI and the cluster's credentials for it")) from None
    p = Path(path)
    if not p.is_file():
        raise SpecError(fix(f"dataset {p} not found", "point dataset at a JSONL file"))
    return p.read_text().splitlines()


def load_conversations(path: str | Path) -> list[Messages]:
    """All records of a JSONL file (local, or a URI) as chat messages; errors name the file and line."""
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(fix(f"{path}:{n}: malformed JSON ({e.msg})", "fix that line")) from None
        out.append(_to_messages(rec, f"{path}:{n}"))
    if not out:
        raise SpecError(fix(f"dataset {path} is empty", "add at least one record"))
    return out


def tokenize(messages: Messages, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns."""
    def render(msgs: Messages, gen: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                  return_dict=True)["input_ids"])

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into sequences of exactly ``seq_len`` tokens (examples longer than
    ``seq_len`` are truncated; the last sequence is padded with ignored labels)."""
    blocks, ids, labels = [], [], []
    for e_ids, e_labels in examples:
        e_ids, e_labels = e_ids[:seq_len], e_labels[:seq_len]
        if len(ids) + len(e_ids) > seq_len:
            blocks.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + e_ids, labels + e_labels
    if ids:
        blocks.append((ids, labels))
    out = []
    for b_ids, b_labels in blocks:
        pad = seq_len - len(b_ids)
        out.append({"input_ids": b_ids + [pad_id] * pad, "labels": b_labels + [IGNORE] * pad,
                    "attention_mask": [1] * len(b_ids) + [0] * pad})
    return out


def build_dataset(source: str | Path | list[Messages], tokenizer: Any, seq_len: int) -> list[dict[str, list[int]]]:
    """Read (a dataset file or URI, unless given its records), tokenise and pack (deterministic: every worker
    builds the same)."""
    path = "the dataset" if isinstance(source, list) else source
    examples = [tokenize(m, tokenizer) for m in (source if isinstance(source, list) else load_conversations(source))]
    if not any(label != IGNORE for _, labels in examples for label in labels):
        raise SpecError(fix(f"dataset {path}: no assistant tokens survive tokenisation", "check the records"))
    return pack(examples, seq_len, tokenizer.pad_token_id or 0)
