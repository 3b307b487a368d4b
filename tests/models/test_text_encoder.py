"""T5TextEncoder on tiny random checkpoints written by models.tiny: shapes, masks, truncation, folder layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.text_encoder import (
    T5TextEncoder,
    load_t5_tokenizer,
    spiece_precompiled_charsmap,
    t5_tokenizer_from_spiece,
)
from models.tiny import build_tiny_t5, train_tiny_sentencepiece

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
CAPTIONS = ["A cat on the BEACH!", "a drone shot of snowy mountains at sunset"]


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5_fast"), tokenizer_format="fast")


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5_spiece"), tokenizer_format="spiece")


@pytest.fixture(scope="module")
def encoder(fast_dir: Path) -> T5TextEncoder:
    return T5TextEncoder(fast_dir, model_max_length=24)


def test_encode_shapes_and_masks(encoder: T5TextEncoder) -> None:
    out = encoder.encode(CAPTIONS)
    assert out["y"].shape == (2, 1, 24, encoder.output_dim) == (2, 1, 24, 32)
    assert out["y"].dtype == torch.float32
    assert out["mask"].shape == (2, 24) and out["mask"].dtype == torch.int64

    ids, _ = encoder.tokenize(CAPTIONS)
    for row, caption in enumerate(encoder.preprocess(CAPTIONS)):
        n_tokens = len(encoder.tokenizer(caption).input_ids)  # includes the EOS
        assert int(out["mask"][row].sum()) == n_tokens
        assert out["mask"][row, :n_tokens].eq(1).all() and out["mask"][row, n_tokens:].eq(0).all()
        assert ids[row, n_tokens - 1] == EOS_ID
        assert ids[row, n_tokens:].eq(PAD_ID).all()
        assert not ids[row].eq(UNK_ID).any()
    assert out["mask"][0].sum() < out["mask"][1].sum()


def test_single_string_is_a_batch_of_one(encoder: T5TextEncoder) -> None:
    assert encoder.encode("a cat")["y"].shape == (1, 1, 24, 32)


def test_long_prompt_is_truncated_with_eos_kept(encoder: T5TextEncoder) -> None:
    long = " ".join(["a horse galloping across an open meadow"] * 10)
    out = encoder.encode([long, "a cat"])
    ids, _ = encoder.tokenize([long])
    assert out["y"].shape[2] == 24
    assert out["mask"][0].eq(1).all()
    assert ids[0, -1] == EOS_ID


def test_valid_tokens_do_not_depend_on_padding_or_batch(fast_dir: Path, encoder: T5TextEncoder) -> None:
    longer = T5TextEncoder(fast_dir, model_max_length=40)
    short, wide = encoder.encode(CAPTIONS), longer.encode(CAPTIONS)
    for row in range(2):
        n = int(short["mask"][row].sum())
        assert int(wide["mask"][row].sum()) == n
        torch.testing.assert_close(short["y"][row, 0, :n], wide["y"][row, 0, :n], atol=1e-5, rtol=1e-5)
    alone = encoder.encode(CAPTIONS[:1])
    torch.testing.assert_close(alone["y"][0], short["y"][0], atol=1e-5, rtol=1e-5)


def test_caption_cleaning_flag(fast_dir: Path, encoder: T5TextEncoder) -> None:
    messy = "Check https://example.com/x <b>A Cat</b> on a Mat"
    assert encoder.preprocess([messy]) == ["check a cat on a mat"]
    torch.testing.assert_close(encoder.encode([messy])["y"], encoder.encode(["check a cat on a mat"])["y"])
    raw = T5TextEncoder(fast_dir, model_max_length=24, clean_caption=False)
    assert raw.preprocess([messy]) == [messy]
    assert not torch.equal(raw.tokenize([messy])[0], encoder.tokenize([messy])[0])


def test_spiece_folder_loads_like_the_fast_folder(fast_dir: Path, spiece_dir: Path) -> None:
    """The DeepFloyd layout (spiece.model, no tokenizer.json) loads despite protobuf 6 and matches save_pretrained's."""
    assert not (spiece_dir / "tokenizer.json").exists() and (spiece_dir / "spiece.model").exists()
    a, b = T5TextEncoder(spiece_dir, model_max_length=24), T5TextEncoder(fast_dir, model_max_length=24)
    ea, eb = a.encode(CAPTIONS), b.encode(CAPTIONS)
    assert torch.equal(ea["mask"], eb["mask"])
    torch.testing.assert_close(ea["y"], eb["y"])


def test_spiece_conversion_tokenizes_like_sentencepiece(spiece_dir: Path, fast_dir: Path) -> None:
    """Both folder layouts tokenise exactly as the sentencepiece model (plus EOS), normaliser included."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    tokenizer, saved = load_t5_tokenizer(spiece_dir), load_t5_tokenizer(fast_dir)
    texts = [
        "a cat on the beach",
        "A  CAT   sitting\ton the sofa ",
        "ｆｕｌｌwidth letters ①",  # NFKC folding comes from the precompiled charsmap
        "zzqx ☃ unknown words",
        "",
    ]
    for text in texts:
        assert tokenizer(text).input_ids == processor.encode(text) + [EOS_ID], text
        assert saved(text).input_ids == tokenizer(text).input_ids, text
    assert tokenizer("ｆｕｌｌ").input_ids == tokenizer("full").input_ids


def test_sentinels_keep_t5_ids(tmp_path: Path) -> None:
    model_file = tmp_path / "spiece.model"
    model_bytes = train_tiny_sentencepiece()
    model_file.write_bytes(model_bytes)
    assert spiece_precompiled_charsmap(model_bytes)  # nmt_nfkc ships a table
    base = t5_tokenizer_from_spiece(model_file, extra_ids=0)
    tokenizer = t5_tokenizer_from_spiece(model_file, extra_ids=3)
    n = len(base)
    assert len(tokenizer) == n + 3
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_2>"]) == [n + 2, n]
    assert tokenizer("a cat").input_ids == base("a cat").input_ids


def test_loads_full_seq2seq_checkpoint(spiece_dir: Path, tmp_path: Path) -> None:
    """A T5ForConditionalGeneration folder (encoder + decoder weights) loads; only the encoder is used."""
    import shutil

    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config.from_pretrained(spiece_dir)
    config.num_decoder_layers = 1
    torch.manual_seed(0)
    full = T5ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path)
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(spiece_dir / name, tmp_path / name)
    encoder = T5TextEncoder(tmp_path, model_max_length=12, clean_caption=False)
    out = encoder.encode(["a cat"])
    ids, mask = encoder.tokenize(["a cat"])
    with torch.no_grad():
        expected = full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out["y"][:, 0], expected)


def test_dtype_option(fast_dir: Path) -> None:
    encoder = T5TextEncoder(fast_dir, model_max_length=8, dtype="bf16")
    assert encoder.dtype == torch.bfloat16
    assert encoder.encode(["a cat"])["y"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        T5TextEncoder(fast_dir, dtype="float8")


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5TextEncoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_t5_tokenizer(tmp_path)
