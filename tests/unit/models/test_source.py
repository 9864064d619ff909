"""Checkpoint reader: descriptor, tensor index and WeightSource on real `save_pretrained` layouts, reading only
the tensors asked for, and one-line errors naming the file and tensor for every kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from expertray.errors import CheckpointError
from expertray.models import CheckpointDescriptor, WeightSource, describe, resolve_dtype
from expertray.models import source as source_module
from expertray.models.files import INDEX_FILE, tensor_index
from expertray.models.synthetic import TINY_CONFIGS, tiny_model, write_tiny_checkpoint

tf = pytest.importorskip("transformers")

from expertray.models.blocks import from_hf_block  # noqa: E402
from expertray.models.proxy import find_moe_blocks  # noqa: E402


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "mixtral")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_layer_matches_the_transformers_block(family: str, tmp_path: Path) -> None:
    """Layer config, MoE-layer mapping (dense layers skipped) and weights equal the reference blocks'."""
    path = write_tiny_checkpoint(family, tmp_path / family)
    assert len(describe(path).shards) > 1, "the fixture must be sharded"
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    blocks = find_moe_blocks(ref)
    source = WeightSource.open(str(path))
    assert source.num_layers == len(blocks) and source.dtype == torch.float32
    assert source.moe_layers == [int(name.split(".")[2]) for name, _ in blocks]
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2))
    for layer, (_, block) in enumerate(blocks):
        expected = from_hf_block(block)
        got = source.layer(layer)
        assert got.cfg == expected.cfg
        torch.testing.assert_close(got.experts.gate_up, expected.experts.gate_up, atol=0, rtol=0)
        with torch.no_grad():
            out = block(x[None])
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(got(x), out[0], atol=1e-5, rtol=0)


def test_reads_only_the_requested_tensors(mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real = source_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(source_module, "safe_open", Spy)
    source = WeightSource.open(str(mixtral_dir), dtype="bfloat16")
    weights, biases = source.experts([(2, 5), (0, 1)])
    assert biases is None and weights.gate_up.dtype == torch.bfloat16 and weights.num_slots == 2
    assert sorted(read) == sorted(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                                  for layer, e in [(2, 5), (0, 1)] for w in ("w1", "w2", "w3"))
    full = source.layer(0)
    torch.testing.assert_close(weights.gate_up[1], full.experts.gate_up[1], atol=0, rtol=0)
    torch.testing.assert_close(weights.down[1], full.experts.down[1], atol=0, rtol=0)
    read.clear()
    router = source.router(1)
    assert router.gate.weight.dtype == torch.float32 and router.shared is None
    assert read == ["model.layers.1.block_sparse_moe.gate.weight"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_stacked_transformers5_layout(family: str, tmp_path: Path) -> None:
    """A checkpoint saved in transformers-5's in-memory layout (experts stacked per layer; for GPT-OSS its
    interleaved gate/up with biases) reads like the per-expert one, row by row."""
    from safetensors.torch import save_file

    model = tiny_model(family, seed=4)
    path = tmp_path / family
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    source = WeightSource.open(str(path))
    assert source._tensors[0].layout == ("gpt_oss" if family == "gpt_oss" else "stacked")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    for layer, (_, block) in enumerate(find_moe_blocks(model)):
        with torch.no_grad():
            torch.testing.assert_close(source.layer(layer)(x), from_hf_block(block)(x), atol=1e-6, rtol=0)
    one, _ = source.experts([(0, 3)])
    torch.testing.assert_close(one.down[0], source.layer(0).experts.down[3], atol=0, rtol=0)


def test_descriptor_round_trips_as_plain_data_and_detects_changes(mixtral_dir: Path, tmp_path: Path) -> None:
    path = _copy(mixtral_dir, tmp_path)
    desc = describe(path)
    data = json.loads(json.dumps(desc.to_dict()))
    assert CheckpointDescriptor.from_dict(data) == desc and desc.architecture == "MixtralForCausalLM"
    assert all(s.size_bytes == (path / s.file).stat().st_size for s in desc.shards)
    full = describe(path, full_digest=True)
    assert {s.digest_of for s in full.shards} == {"file"}
    WeightSource(desc)  # verifies: unchanged
    victim = desc.shards[0].file
    with open(path / victim, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"shard {victim} changed since the cluster recorded it"):
        WeightSource(desc)
    with pytest.raises(CheckpointError, match="'path' must be a non-empty string"):
        CheckpointDescriptor.from_dict({"shards": []})


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", None) == torch.float32
    assert resolve_dtype("float16", "bfloat16") == torch.float16
    with pytest.raises(CheckpointError, match="dtype 'int8' is not one of auto, float32, float16, bfloat16"):
        resolve_dtype("int8", None)


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def _rewrite_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Replace tensor `name` in its shard by `tensor` (other tensors kept)."""
    from safetensors.torch import load_file, save_file

    file = _index(path)["weight_map"][name]
    state = load_file(str(path / file))
    state[name] = tensor
    save_file(state, str(path / file), metadata={"format": "pt"})


EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def _missing_shard(path: Path) -> str:
    file = _index(path)["weight_map"][EXPERT]
    (path / file).unlink()
    return rf"^checkpoint {path}: shard {file} is missing$"


def _missing_tensor(path: Path) -> str:
    index = _index(path)
    file = index["weight_map"].pop(EXPERT)
    (path / INDEX_FILE).write_text(json.dumps(index))
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / file))
    del state[EXPERT]
    save_file(state, str(path / file))
    return rf"^checkpoint {path}: tensor {EXPERT} is in no shard$"


def _index_lies(path: Path) -> str:
    index = _index(path)
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][EXPERT])
    index["weight_map"][EXPERT] = other
    (path / INDEX_FILE).write_text(json.dumps(index))
    return rf"^checkpoint {path}: tensor {EXPERT} is missing from shard {other} \({INDEX_FILE} says it is there\)$"


def _wrong_shape(path: Path) -> str:
    _rewrite_tensor(path, EXPERT, torch.zeros(48, 31))
    file = _index(path)["weight_map"][EXPERT]
    return rf"^checkpoint {path}: tensor {EXPERT} in {file} has shape \[48, 31\], expected \[48, 32\]$"


def _wrong_dtype(path: Path) -> str:
    _rewrite_tensor(path, EXPERT, torch.zeros(48, 32, dtype=torch.int8))
    file = _index(path)["weight_map"][EXPERT]
    return (rf"^checkpoint {path}: tensor {EXPERT} in {file} has dtype I8, expected one of F32, F16, BF16 "
            r"\(quantized weights need a supported quantization_config\)$")


def _unsupported_architecture(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Llama4ForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    return (rf"^checkpoint {path}: architecture Llama4ForCausalLM is not supported \(supported: "
            r"MixtralForCausalLM, Qwen2MoeForCausalLM, .*GptOssForCausalLM\)$")


def _unreadable_config(path: Path) -> str:
    (path / "config.json").unlink()
    return rf"^checkpoint {path}: cannot read config.json on node .+ \(No such file or directory\)$"


def _not_a_directory(path: Path) -> str:
    shutil.rmtree(path)
    return rf"^checkpoint {path}: not a directory readable on node .+$"


def _corrupt_header(path: Path) -> str:
    file = _index(path)["weight_map"][EXPERT]
    (path / file).write_bytes((10**12).to_bytes(8, "little") + b"{}")
    return rf"^checkpoint {path}: shard {file} has a corrupt header length 1000000000000 \(file is 10 bytes\)$"


def _shard_outside(path: Path) -> str:
    index = _index(path)
    index["weight_map"][EXPERT] = "../elsewhere.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    return rf"^checkpoint {path}: {INDEX_FILE} names shard '../elsewhere.safetensors' outside the directory$"


BAD = [_missing_shard, _missing_tensor, _index_lies, _wrong_shape, _wrong_dtype, _unsupported_architecture,
       _unreadable_config, _not_a_directory, _corrupt_header, _shard_outside]


@pytest.mark.parametrize("damage", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_checkpoint_gets_one_line_error(damage, mixtral_dir: Path, tmp_path: Path) -> None:
    path = _copy(mixtral_dir, tmp_path).resolve()
    pattern = damage(path)
    with pytest.raises(CheckpointError) as info:
        source = WeightSource.open(str(path))
        source.layer(1)
    assert "\n" not in str(info.value)
    assert info.match(pattern)


def test_tensor_index_covers_every_tensor(mixtral_dir: Path) -> None:
    index = tensor_index(mixtral_dir)
    assert set(index) == set(_index(mixtral_dir)["weight_map"])
    assert index[EXPERT].shape == (48, 32) and index[EXPERT].dtype == "F32"


def test_cached_source_opens_once_per_descriptor_and_dtype(mixtral_dir: Path) -> None:
    from expertray.models import cached_source

    data = describe(mixtral_dir).to_dict()
    first = cached_source(data, "bfloat16")
    assert cached_source(CheckpointDescriptor.from_dict(data), "bfloat16") is first
    assert cached_source(data, "float32") is not first and first.dtype == torch.bfloat16
    assert first.slot_bytes(3) == 3 * 3 * 32 * 48 * 2


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_no_keys_reads_nothing(family: str, tmp_path: Path) -> None:
    """An actor holding no slot of a layer gets empty stacks of the right shape (and biases for GPT-OSS)."""
    source = WeightSource.open(str(write_tiny_checkpoint(family, tmp_path / family)))
    weights, biases = source.experts([])
    F = source.layer_config.d_ff
    assert tuple(weights.gate_up.shape) == (0, 2 * F, 32) and tuple(weights.down.shape) == (0, 32, F)
    assert (biases is not None) == (family == "gpt_oss")
