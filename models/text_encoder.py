"""T5 text encoder: local-folder loading, caption cleaning, fixed-length padding.

The reference conditions STDiT2 on the last hidden state of ``DeepFloyd/t5-v1_1-xxl`` (d_model 4096), with every
prompt padded to ``model_max_length=200`` tokens and the attention mask returned beside it; the model's
cross-attention later drops the padded tokens. The encoder runs in fp32 (T5 overflows in fp16).

Loading is offline only. Two traps of the pinned stack (transformers 5 + protobuf 6) are handled here:

* a folder that only ships ``spiece.model`` (DeepFloyd's layout) cannot be loaded by ``AutoTokenizer``: the
  sentencepiece protobuf module was generated for a newer protobuf runtime and transformers then falls back to a
  tiktoken reader. We read the pieces and scores with the sentencepiece processor itself and the normaliser's
  precompiled charsmap with a small protobuf wire reader, then build the fast ``T5Tokenizer`` from them, which
  tokenises exactly as the sentencepiece model does;
* ``T5Tokenizer(vocab_file=...)`` is silently ignored in transformers 5, so we always pass ``vocab=[...]``.

A folder that has a ``tokenizer.json`` (what ``save_pretrained`` writes) is loaded with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.caption_clean import text_preprocessing
from models.memo import EncoderMemo, content_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

__all__ = ["T5TextEncoder", "load_t5_tokenizer", "spiece_precompiled_charsmap", "t5_tokenizer_from_spiece"]

# T5's sentencepiece layout: the tokenizer hard-codes these ids.
_T5_SPECIAL_PIECES = ("<pad>", "</s>", "<unk>")

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected a torch.dtype or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer loading
# ---------------------------------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield ``(field_number, value)`` of a serialized protobuf message (wire types 0, 1, 2, 5)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 0x7
        value: int | bytes
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in a sentencepiece model")
        yield number, value


def spiece_precompiled_charsmap(model_bytes: bytes) -> bytes | None:
    """The normaliser table (``ModelProto.normalizer_spec.precompiled_charsmap``, fields 3 -> 2) of a
    sentencepiece model, read without the protobuf runtime. None when the model normalises nothing."""
    for number, value in _proto_fields(model_bytes):
        if number == 3 and isinstance(value, bytes):
            for inner_number, inner_value in _proto_fields(value):
                if inner_number == 2 and isinstance(inner_value, bytes) and inner_value:
                    return inner_value
    return None


def t5_tokenizer_from_spiece(model_file: str | Path, extra_ids: int = 100) -> PreTrainedTokenizerBase:
    """Build the fast T5 tokenizer from a sentencepiece ``spiece.model`` without protobuf.

    Sentinels ``<extra_id_N>`` are appended in T5's order (``<extra_id_0>`` gets the last id), so ids match the
    tokenizer the checkpoint was trained with.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model_file = Path(model_file)
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    head = tuple(piece for piece, _ in vocab[:3])
    if head != _T5_SPECIAL_PIECES:
        raise ValueError(f"{model_file} is not a T5 sentencepiece model: ids 0-2 are {head}, expected {_T5_SPECIAL_PIECES}")
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    charsmap = spiece_precompiled_charsmap(model_file.read_bytes())
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids, _spm_precompiled_charsmap=charsmap)


def _extra_ids_from_config(folder: Path) -> int:
    """Sentinel count as the folder's tokenizer_config.json declares it (transformers' default is 100)."""
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return 100
    config: dict[str, Any] = json.loads(config_file.read_text())
    if "extra_ids" in config:
        return int(config["extra_ids"])
    specials = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    sentinels = [t for t in specials if isinstance(t, str) and t.startswith("<extra_id_")]
    return len(sentinels) if sentinels else 100


def load_t5_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a T5 tokenizer from a local folder: ``tokenizer.json`` if present, else ``spiece.model``."""
    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if (folder / "spiece.model").is_file():
        return t5_tokenizer_from_spiece(folder / "spiece.model", extra_ids=_extra_ids_from_config(folder))
    raise FileNotFoundError(f"no tokenizer.json or spiece.model in {folder}")


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


class T5TextEncoder:
    """Prompts -> ``{"y": [B, 1, L, C], "mask": [B, L]}`` with a T5 encoder loaded from a local folder.

    Args:
        path: folder with ``config.json``, the weights, and ``tokenizer.json`` or ``spiece.model``
            (e.g. a local copy of ``DeepFloyd/t5-v1_1-xxl``).
        model_max_length: every prompt is padded or truncated to this many tokens, EOS included (reference: 200).
        device: where the encoder runs.
        dtype: encoder weights dtype; the reference uses fp32.
        clean_caption: apply the DeepFloyd/PixArt ``clean_caption`` (twice, as the reference) before tokenising;
            when False the prompts are tokenised as given.

    The null (unconditional) caption is a learned embedding of the diffusion model, not produced here.
    """

    def __init__(
        self,
        path: str | Path,
        model_max_length: int = 200,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        clean_caption: bool = True,
    ) -> None:
        from transformers import T5EncoderModel

        if model_max_length < 1:
            raise ValueError(f"model_max_length must be positive, got {model_max_length}")
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} has no config.json; expected a local T5 checkpoint folder")
        self.model_max_length = model_max_length
        self.clean_caption = clean_caption
        self.tokenizer = load_t5_tokenizer(self.path)
        model: T5EncoderModel = T5EncoderModel.from_pretrained(
            self.path, dtype=_resolve_dtype(dtype), local_files_only=True
        )
        self.model = model.to(device).eval().requires_grad_(False)
        self.memo: EncoderMemo | None = None  # see models.memo: set by a training run on a small dataset

    @property
    def output_dim(self) -> int:
        """Width C of the embeddings (T5-XXL: 4096); the diffusion model's ``caption_channels``."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: torch.device | str) -> T5TextEncoder:
        self.model.to(device)
        return self

    def preprocess(self, texts: Sequence[str]) -> list[str]:
        """Caption cleaning as configured (identity when ``clean_caption`` is False)."""
        if not self.clean_caption:
            return list(texts)
        return [text_preprocessing(t, use_text_preprocessing=True) for t in texts]

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both [B, L] int64, padded/truncated to ``model_max_length``.

        The EOS token is kept at the end of truncated prompts (the tokenizer truncates first, then appends it).
        """
        batch = self.tokenizer(
            self.preprocess(texts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``y`` [B, 1, L, C] (last hidden state, in the encoder dtype) and ``mask`` [B, L] int64 (1 = real token)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if self.memo is None:
            hidden, mask = self._encode(texts)
            return {"y": hidden[:, None], "mask": mask}  # y: [B, 1, L, C]
        # Each caption is padded to model_max_length and attends only to itself, so a memoized row is the row a
        # fresh batch would give (up to float rounding); new captions are encoded one at a time so that their bits
        # never depend on the batch they came in (see VideoAutoencoderKL._posterior).
        def encode_one(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, mask = self._encode([text])
            return hidden[0], mask[0]

        rows = [self.memo.get_or_compute(content_key(t, self.model_max_length, self.clean_caption),
                                         lambda t=t: encode_one(t)) for t in texts]
        return {"y": torch.stack([h for h, _ in rows])[:, None], "mask": torch.stack([m for _, m in rows])}

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = self.tokenize(texts)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask  # [B, L, C], [B, L]
