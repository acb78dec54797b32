"""Padding a batch of variable-length token sequences: to a fixed length, or to the batch's own longest.

Both paths copy with ``torch.nn.utils.rnn.pad_sequence`` (one C++ copy per sequence) and build the attention
mask with one broadcast compare, so no Python code runs per token.
"""

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

__all__ = ["DynamicPaddingCollator", "pad_fixed"]

TRUNCATIONS = ("right", "left")
MASK_DTYPE = torch.long  # what Hugging Face models expect for attention_mask


# --- argument checks shared by the whole package ---------------------------------------------------------


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int >= ``minimum``: TypeError if not an int (bools too), ValueError if too small."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_sequence(value, where: str) -> torch.Tensor:
    """One sequence (1-D integer tensor, or list/tuple of ints) as a 1-D tensor; lists become int64."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{where} must be a 1-D tensor, got shape {tuple(value.shape)}")
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not all(isinstance(v, numbers.Integral) for v in value):
            raise TypeError(f"{where} must be a list of ints, got a list holding "
                            f"{sorted({type(v).__name__ for v in value})}")
        return torch.tensor(value, dtype=torch.long)
    raise TypeError(f"{where} must be a 1-D tensor or a list of ints, got {type(value).__name__}")


def as_sequences(sequences, name: str = "sequences") -> List[torch.Tensor]:
    """A non-empty list of sequences as 1-D tensors of one dtype."""
    if isinstance(sequences, (torch.Tensor, str)) or not isinstance(sequences, Sequence):
        raise TypeError(f"{name} must be a list of 1-D tensors or of lists of ints, "
                        f"got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name} must not be empty, got 0 sequences")
    tensors = [_as_sequence(s, f"{name}[{i}]") for i, s in enumerate(sequences)]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        # pad_sequence would silently cast everything to the first one's dtype.
        raise TypeError(f"{name} must share one dtype, got {sorted(str(d) for d in dtypes)}")
    return tensors


def lengths_of(tensors: List[torch.Tensor]) -> torch.Tensor:
    """(N,) int64 lengths of 1-D tensors."""
    return torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)


def round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) lengths -> (N, width) int64 mask, 1 on the first ``lengths[i]`` positions of row i, 0 after."""
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).to(MASK_DTYPE)


def pad_right(tensors: List[torch.Tensor], width: int, padding_value) -> torch.Tensor:
    """Sequences no longer than ``width`` -> (N, width) tensor, rows left-aligned, padded on the right."""
    padded = pad_sequence(tensors, batch_first=True, padding_value=padding_value)
    extra = width - padded.shape[1]
    # F.pad widens by one more copy only when width exceeds the longest (fixed length, pad_to_multiple_of).
    return F.pad(padded, (0, extra), value=padding_value) if extra > 0 else padded


# --- fixed-length padding ------------------------------------------------------------------------------


def pad_fixed(sequences, max_length: int, padding_value=0, truncation: str = "right"
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pads (and truncates) every sequence to exactly ``max_length`` tokens.

    Args:
        sequences: N sequences, each a 1-D tensor (all one dtype) or a list of ints (becomes int64).
        max_length: the output width, >= 1.
        padding_value: written after each sequence's last token.
        truncation: which end of a too-long sequence is cut: ``"right"`` keeps its first ``max_length``
            tokens, ``"left"`` keeps its last ``max_length`` (e.g. the most recent context).

    Returns:
        ``(input_ids, attention_mask)``, both (N, max_length); ``input_ids`` has the sequences' dtype,
        ``attention_mask`` is int64, 1 on real tokens and 0 on padding. Padding always goes on the right.
    """
    max_length = check_int("max_length", max_length, 1)
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    tensors = as_sequences(sequences)
    # Slicing makes views, so truncation copies nothing; pad_sequence does the one copy.
    cut = slice(None, max_length) if truncation == "right" else slice(-max_length, None)
    tensors = [t[cut] for t in tensors]
    input_ids = pad_right(tensors, max_length, padding_value)
    return input_ids, mask_from_lengths(lengths_of(tensors), max_length)


# --- dynamic padding -----------------------------------------------------------------------------------


def _is_scalar(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (numbers.Number, bool))


def _stack_field(key: str, values: List[Any]):
    """A field that is not padded: scalars -> (B,) tensor, equal-shape tensors -> (B, ...), else the list."""
    if all(_is_scalar(v) for v in values):
        if all(isinstance(v, torch.Tensor) for v in values):
            return torch.stack(values)
        if any(isinstance(v, torch.Tensor) for v in values):
            values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        return torch.tensor(values)  # ints -> int64, floats -> float32, bools -> bool
    if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return list(values)  # strings, ids, ragged extras: passed through untouched


class DynamicPaddingCollator:
    """``collate_fn`` that pads each batch only to its own longest sequence (optionally rounded up).

    Input (what a DataLoader hands over), B examples:

    - a list of sequences (1-D tensors or lists of ints): returns ``{"input_ids", "attention_mask"}``;
    - a list of dicts (all with the same keys). Fields are treated by name:

      * each of ``keys`` (default ``("input_ids",)``): padded with ``padding_value`` to (B, L_key);
      * ``"attention_mask"``: if the examples carry one it is padded with 0 (so zeros a user put inside are
        kept), otherwise it is built from the lengths of ``keys[0]``; always int64 (B, L_keys[0]);
      * ``label_key`` (default ``"labels"``): a sequence per example is padded with ``label_padding_value``
        (-100 by default: ignored by ``torch.nn.CrossEntropyLoss``) to (B, L_labels); a scalar per example
        (a class id) is stacked into a (B,) tensor;
      * anything else: scalars (Python numbers, 0-d tensors) are stacked into a (B,) tensor, tensors of one
        shape are stacked into (B, ...), other values (strings, ragged lists) are passed through as a list.

    Each padded field is padded to its own longest (rounded up to ``pad_to_multiple_of``): labels of a
    language model or a tagger have the input's lengths, so they come out the same width; a seq2seq target
    keeps its own width.

    Args:
        padding_value: for ``keys`` (the tokenizer's pad id).
        pad_to_multiple_of: round every padded width up to a multiple of this (8 lets fp16/bf16 matmuls use
            tensor cores fully); ``None`` pads to the longest exactly.
        keys: dict fields that hold token sequences; the first one gives the attention mask.
        label_padding_value: for ``label_key`` sequences.
        label_key: the name of the labels field.
    """

    def __init__(self, padding_value=0, pad_to_multiple_of: Optional[int] = None, keys=("input_ids",),
                 label_padding_value=-100, label_key: str = "labels"):
        self.padding_value = padding_value
        self.pad_to_multiple_of = check_int("pad_to_multiple_of", pad_to_multiple_of, 1, allow_none=True)
        if isinstance(keys, str) or not isinstance(keys, Sequence) or len(keys) == 0:
            raise ValueError(f"keys must be a non-empty list of field names, got {keys!r}")
        if label_key in keys or "attention_mask" in keys:
            raise ValueError(f"keys must not contain label_key {label_key!r} or 'attention_mask' (they have "
                             f"their own padding values), got {tuple(keys)}")
        self.keys = tuple(keys)
        self.label_padding_value = label_padding_value
        self.label_key = label_key

    def _pad(self, name: str, values: List[Any], padding_value) -> Tuple[torch.Tensor, torch.Tensor]:
        """B sequences -> ((B, L) padded, (B,) lengths), L = longest rounded up to pad_to_multiple_of."""
        tensors = as_sequences(values, name)
        lengths = lengths_of(tensors)
        width = round_up(int(lengths.max()), self.pad_to_multiple_of)
        return pad_right(tensors, width, padding_value), lengths

    def __call__(self, batch) -> Dict[str, Any]:
        if isinstance(batch, (str, Mapping)) or not isinstance(batch, Sequence):
            raise TypeError(f"batch must be a list of sequences or a list of dicts, "
                            f"got {type(batch).__name__}")
        if len(batch) == 0:
            raise ValueError("batch must not be empty, got 0 examples")
        is_dict = [isinstance(example, Mapping) for example in batch]
        if not any(is_dict):
            return self._collate_sequences(batch)
        if not all(is_dict):
            raise TypeError("batch must be all dicts or all sequences, got a mix")
        return self._collate_dicts(batch)

    def _collate_sequences(self, batch: List[Any]) -> Dict[str, torch.Tensor]:
        key = self.keys[0]
        ids, lengths = self._pad("batch", batch, self.padding_value)
        return {key: ids, "attention_mask": mask_from_lengths(lengths, ids.shape[1])}

    def _collate_dicts(self, batch: List[Mapping]) -> Dict[str, Any]:
        fields = list(batch[0].keys())
        for i, example in enumerate(batch):
            if example.keys() != batch[0].keys():  # set-like comparison: key order does not matter
                raise ValueError(f"batch[{i}] has keys {sorted(example.keys())}, expected {sorted(fields)} "
                                 "(as batch[0])")
        missing = [k for k in self.keys if k not in fields]
        if missing:
            raise ValueError(f"examples lack the keys {missing} to pad (keys={self.keys}), "
                             f"got {sorted(fields)}")
        out: Dict[str, Any] = {}
        for key in self.keys:
            out[key], lengths = self._pad(key, [ex[key] for ex in batch], self.padding_value)
            if key == self.keys[0] and "attention_mask" not in fields:
                out["attention_mask"] = mask_from_lengths(lengths, out[key].shape[1])
        for key in fields:
            if key in out:
                continue
            values = [ex[key] for ex in batch]
            if key == "attention_mask":
                out[key] = self._pad(key, values, 0)[0].to(MASK_DTYPE)
            elif key == self.label_key and not all(_is_scalar(v) for v in values):
                out[key] = self._pad(key, values, self.label_padding_value)[0]
            else:
                out[key] = _stack_field(key, values)
        return out

    def __repr__(self):
        return (f"DynamicPaddingCollator(padding_value={self.padding_value!r}, "
                f"pad_to_multiple_of={self.pad_to_multiple_of}, keys={self.keys}, "
                f"label_padding_value={self.label_padding_value!r}, label_key={self.label_key!r})")
