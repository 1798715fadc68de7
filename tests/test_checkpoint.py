"""Loading hub checkpoints: shards, single files, FP8 blocks, and one-line errors for bad files."""

import json
import shutil

import pytest
import torch

from mimo_local.checkpoint import Checkpoint, dequantize_fp8_blocks, quantize_fp8_blocks
from mimo_local.errors import MimoError
from mimo_local.loader import load_model


def copy_of(directory, tmp_path):
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def test_sharded_and_single_file_checkpoints_load_the_same(checkpoints):
    sharded = load_model(checkpoints("mimo_v2_flash", shards=3))
    single = load_model(checkpoints("mimo_v2_flash", shards=1))
    assert len(list(checkpoints("mimo_v2_flash", shards=3).glob("*.safetensors"))) == 3
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name
    assert sharded.config.num_mtp_layers == 3 and len(sharded.mtp_layers) == 3


def test_mtp_weights_are_loaded(checkpoints):
    directory = checkpoints("mimo")
    model = load_model(directory)
    expected = torch.empty(model.config.hidden_size, 2 * model.config.hidden_size)
    Checkpoint(directory).read_into("model.mtp_layers.0.input_proj.weight", expected)
    assert torch.equal(model.mtp_layers[0].input_proj.weight, expected)


def test_fp8_block_round_trip_with_partial_edge_blocks():
    weight = torch.randn(300, 200)
    quantized, scale_inv = quantize_fp8_blocks(weight)
    assert quantized.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    restored = dequantize_fp8_blocks(quantized, scale_inv)
    # e4m3 keeps 3 mantissa bits: relative error <= 1/16, plus subnormals near zero.
    assert ((restored - weight).abs() <= weight.abs() / 16 + 0.01).all()
    # Each 128x128 tile (edge tiles partial) has its own scale.
    assert torch.allclose(scale_inv[2, 1], weight[256:, 128:].abs().max() / 448)


def test_truncated_shard_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints("mimo"), tmp_path)
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MimoError, match=f"{shard.name}: truncated"):
        load_model(directory)


def test_corrupt_header_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints("mimo"), tmp_path)
    shard = sorted(directory.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(MimoError, match=f"{shard.name}: corrupt"):
        load_model(directory)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints("mimo", shards=1), tmp_path)
    checkpoint = Checkpoint(directory)
    tensors = {n: checkpoint.read(n) for n in checkpoint.names() if n != "model.layers.1.mlp.up_proj.weight"}
    from mimo_local.checkpoint import write_safetensors

    write_safetensors(directory / "model.safetensors", tensors)
    with pytest.raises(MimoError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(directory)


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    directory = copy_of(checkpoints("mimo"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(MimoError, match="tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        load_model(directory)


def test_index_naming_a_tensor_absent_from_its_shard(checkpoints, tmp_path):
    directory = copy_of(checkpoints("mimo"), tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MimoError, match="'model.layers.0.extra.weight' listed in the index is missing"):
        load_model(directory)
