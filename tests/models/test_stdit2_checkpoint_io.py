"""Loading STDiT2 weights from every supported layout, text-length adaptation, errors, atomic HF-format saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint_io import (
    CheckpointMismatchError,
    adapt_y_embedding,
    config_from_hf_dir,
    load_stdit2_weights,
    read_state_dict,
    save_stdit2_hf_dir,
)
from models.stdit2 import build_stdit2


@pytest.fixture()
def source():
    torch.manual_seed(3)
    model = build_stdit2("STDiT2-Tiny/2")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def fresh(**overrides):
    torch.manual_seed(99)
    return build_stdit2("STDiT2-Tiny/2", **overrides)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def shard(sd, n):
    keys = list(sd)
    return [{k: sd[k].clone() for k in keys[i::n]} for i in range(n)]


def test_every_layout_gives_the_same_model(source, tmp_path):
    sd = source.state_dict()
    # single safetensors file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    # torch pickle wrapped the way training scripts save it, with DDP prefixes
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "step": 7}, tmp_path / "w.pt")
    torch.save(sd, tmp_path / "w.pth")
    # sharded safetensors with an index
    sharded = tmp_path / "epoch0-global_step10" / "model"
    sharded.mkdir(parents=True)
    weight_map = {}
    for i, part in enumerate(shard(sd, 3)):
        name = f"model-0000{i + 1}-of-00003.safetensors"
        save_file(part, str(sharded / name))
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # pytorch_model-0000x-of-0000y.bin shards without an index
    bins = tmp_path / "bins"
    bins.mkdir()
    for i, part in enumerate(shard(sd, 2)):
        torch.save(part, bins / f"pytorch_model-0000{i + 1}-of-00002.bin")
    # Hugging Face-format directory
    hf = save_stdit2_hf_dir(source, source.config, tmp_path / "hf")

    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt", tmp_path / "w.pth", sharded,
                 sharded.parent, bins, hf):  # sharded.parent: a reference checkpoint folder with model/
        model = fresh()
        result = load_stdit2_weights(model, path)
        assert_same(model, source)
        assert result.num_tensors == len(sd)
    assert len(load_stdit2_weights(fresh(), sharded).files) == 3


def test_hf_dir_round_trip_and_config(source, tmp_path):
    path = save_stdit2_hf_dir(source, source.config, tmp_path / "out" / "stdit2")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "STDiT2" and cfg["hidden_size"] == 48 and cfg["patch_size"] == [1, 2, 2]
    assert config_from_hf_dir(path) == source.config
    # saving again replaces the directory atomically and leaves no temporary folders behind
    save_stdit2_hf_dir(source, source.config, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stdit2"]


def test_config_from_hf_dir_reads_nested_and_reference_style_configs(tmp_path):
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({
        "architectures": ["STDiT2"], "model_type": "STDiT2", "torch_dtype": "float32",
        "model": {"input_size": [None, None, None], "input_sq_size": 512, "in_channels": 4, "patch_size": [1, 2, 2],
                  "hidden_size": 1152, "depth": 28, "num_heads": 16, "caption_channels": 4096,
                  "model_max_length": 200, "qk_norm": True, "enable_flashattn": False},
    }))
    cfg = config_from_hf_dir(nested)
    assert (cfg.hidden_size, cfg.depth, cfg.model_max_length, cfg.qk_norm, cfg.input_sq_size) == (1152, 28, 200, True,
                                                                                                  512)
    assert cfg.qk_norm_legacy  # v1.1 weights need the legacy order
    (tmp_path / "bad.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="no STDiT2 kwargs"):
        config_from_hf_dir(tmp_path / "bad.json")


def test_text_length_change(source, tmp_path):
    y = source.y_embedder.y_embedding  # [12, 32]
    longer = adapt_y_embedding(y, 20)
    assert longer.shape == (20, 32) and torch.equal(longer[:12], y) and torch.equal(longer[12:], y[-1:].expand(8, -1))
    assert torch.equal(adapt_y_embedding(y, 5), y[:5])

    save_stdit2_hf_dir(source, source.config, tmp_path / "hf12")
    for length in (20, 5):
        model = fresh(model_max_length=length)
        result = load_stdit2_weights(model, tmp_path / "hf12")
        assert result.y_embedding_resized == (12, length)
        assert torch.equal(model.y_embedder.y_embedding, adapt_y_embedding(y, length))
        assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_mismatch_error_lists_every_key(source, tmp_path):
    sd = dict(source.state_dict())
    del sd["blocks.0.attn.qkv.bias"]
    sd["blocks.9.extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(5, 48)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_stdit2_weights(fresh(), tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1)" in msg and "blocks.0.attn.qkv.bias" in msg
    assert "unexpected keys (1)" in msg and "blocks.9.extra.weight" in msg
    assert "final_layer.linear.weight: checkpoint [5, 48] vs model [32, 48]" in msg
    # rope.freqs is a deterministic constant: tolerated when absent
    sd = dict(source.state_dict())
    del sd["rope.freqs"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "norope.safetensors"))
    load_stdit2_weights(fresh(), tmp_path / "norope.safetensors")


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no STDiT2 weights"):
        read_state_dict(tmp_path / "empty")
    torch.save({"step": 3}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(tmp_path / "nostate.pt")
