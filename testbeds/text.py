"""Text domains for TRAM's cross-lingual setting (Sherborne et al., ICLR 2024, Section 4: fine-tune XLM-R on
English NLI, evaluate zero-shot on the other XNLI languages).

- "xnli" (`xnli_suite`): one domain per language of `facebook/xnli` (premise, hypothesis, label: entailment,
  neutral, contradiction), loaded from the hub, or from `data_dir/<language>` (a `save_to_disk` copy in the
  same format; this is how the tests run it offline). The pairs are tokenized once by `tokenizer` (a hub id or a
  local folder) to `max_length` tokens, padded, and packed as int64 (N, 2, max_length): token ids and the
  attention mask, so that every tensor-indexing step of `samsuite train` (batches, splits, USEFUL) works
  unchanged. `testbeds.models`' "hf-classifier" unpacks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from torch import Tensor

from testbeds.domains import DomainSuite

XNLI_LANGUAGES = ("en", "ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
XNLI_HUB = "facebook/xnli"
XNLI_COLUMNS = ("premise", "hypothesis", "label")


def xnli_suite(*, tokenizer: str, languages: Sequence[str] = XNLI_LANGUAGES, split: str = "train",
               max_length: int = 128, max_examples: int | None = None, data_dir: str | None = None) -> DomainSuite:
    """XNLI, one domain per language (`max_examples`: the first N pairs of each, None: all)."""
    from datasets import load_dataset, load_from_disk
    from transformers import AutoTokenizer

    if isinstance(languages, str) or not languages or len(set(languages)) != len(languages):
        raise ValueError(f"languages: expected distinct XNLI languages, got {languages!r}")
    unknown = [lang for lang in languages if lang not in XNLI_LANGUAGES]
    if unknown:
        raise ValueError(f"languages: unknown XNLI language {unknown[0]!r}. Allowed: {', '.join(XNLI_LANGUAGES)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an integer >= 2, got {max_length!r}")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"max_examples: expected an integer >= 1 or null, got {max_examples!r}")
    domains: dict[str, Dataset] = {}
    for lang in languages:
        if data_dir is not None:
            path = Path(data_dir) / lang
            if not path.is_dir():
                raise ValueError(f"data_dir: no {path} (a save_to_disk copy of {XNLI_HUB} '{lang}', split {split!r})")
            ds = load_from_disk(str(path))
            ds = ds[split] if hasattr(ds, "keys") else ds
        else:
            ds = load_dataset(XNLI_HUB, lang, split=split)
        missing = [c for c in XNLI_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"data_dir: {lang} lacks the {XNLI_HUB} column {missing[0]!r} (has {ds.column_names})")
        domains[lang] = ds.select(range(min(max_examples, len(ds)))) if max_examples else ds
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.pad_token is None:  # decoder tokenizers (GPT-2, Llama) have none: pad with end-of-sequence
        tok.pad_token = tok.eos_token

    def encode(ds: Dataset) -> Tensor:
        enc = tok(list(ds["premise"]), list(ds["hypothesis"]), truncation=True, max_length=max_length, padding="max_length",
                  return_tensors="pt")
        return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).to(torch.int64)

    num_classes = domains[languages[0]].features["label"].num_classes
    definitions = {lang: f"{XNLI_HUB} '{lang}' {split} ({len(ds)} pairs)" for lang, ds in domains.items()}
    return DomainSuite("xnli", domains, num_classes, 1.0, (0.0,), (1.0,), definitions, encode)
