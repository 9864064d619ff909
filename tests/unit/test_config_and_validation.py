"""Config and input validation name the offending field or problem."""

import json
import warnings

import numpy as np
import pytest
import torch

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig, from_dict, to_dict
from expertray.errors import ConfigError, InputError, OversizeError, UnknownExpertError
from expertray.validation import check_hidden, check_layer
from expertray.wire.http_codec import (
    MAX_JSON_TOKENS,
    MediaTypeError,
    decode_json_hidden,
    json_depth,
    media_type,
)


@pytest.mark.parametrize("kwargs,field", [
    ({"family": "switch"}, "gate.family"), ({"top_k": 0}, "gate.top_k"), ({"top_k": 9}, "gate.top_k"),
    ({"num_groups": 3}, "gate.num_groups"), ({"num_experts": 0}, "gate.num_experts"),
    ({"routed_scaling_factor": float("nan")}, "gate.routed_scaling_factor"),
])
def test_gate_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GateConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"factor": 0}, "capacity.factor"), ({"factor": float("inf")}, "capacity.factor"),
    ({"min_capacity": -1}, "capacity.min_capacity"), ({"overflow": "spill"}, "capacity.overflow"),
    ({"drop_priority": "random"}, "capacity.drop_priority"),
])
def test_capacity_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CapacityConfig(**kwargs)


def test_from_dict_round_trip_and_unknown_keys() -> None:
    cfg = MoELayerConfig(d_model=8, d_ff=16, gate=GateConfig("qwen_moe", 4, 2, normalize=False))
    assert from_dict(MoELayerConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="gate.topk"):
        from_dict(MoELayerConfig, {"gate": {"topk": 2}})
    with pytest.raises(ConfigError, match="layer.d_model"):
        from_dict(MoELayerConfig, {"d_model": 0})


@pytest.mark.parametrize("x,msg", [
    (torch.zeros(0, 8), "empty batch"), (torch.zeros(3, 7), "d_model=8"), (torch.zeros(8), "shape"),
    (torch.zeros(3, 8, dtype=torch.int32), "dtype"), ([[0.0] * 8], "torch.Tensor"),
    (torch.tensor([[0.0] * 7 + [float("nan")]]), "NaN or inf"), (np.zeros((2, 8), dtype=np.int64), "floating"),
    (torch.zeros(11, 8), "over the limit of 10"),
])
def test_check_hidden_rejects(x: object, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        check_hidden(x, 8, max_tokens=10)


def test_check_hidden_flattens_and_accepts_numpy() -> None:
    assert check_hidden(torch.zeros(2, 3, 8), 8).shape == (6, 8)
    assert check_hidden(np.ones((4, 8), dtype=np.float32), 8).dtype == torch.float32


# --- layer indices: one rule for every interface ------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, np.int64(1), np.uint8(1), np.int32(1), torch.tensor(1), np.array(1)])
def test_check_layer_accepts_integer_types(layer: object) -> None:
    index = check_layer(layer, 2)
    assert index == 1 and type(index) is int


@pytest.mark.parametrize("layer,needle", [
    (True, "not bool"), (np.bool_(False), "not bool"), (torch.tensor(True), "not bool"), (1.0, "unknown layer 1.0"),
    ("0", "unknown layer '0'"), (torch.tensor([1]), "unknown layer"), (torch.tensor(1.0), "unknown layer"),
    (np.float64(1), "unknown layer"), (None, "unknown layer None"), (2, "unknown layer 2 (cluster serves layers 0..1)"),
    (-1, "unknown layer -1"),
])
def test_check_layer_refuses_bools_and_non_integers(layer: object, needle: str) -> None:
    with pytest.raises(UnknownExpertError) as info:
        check_layer(layer, 2)
    assert needle in str(info.value)


# --- tensors whose values cannot be read as dense floats: InputError naming the problem ---------------------
@pytest.mark.parametrize("make,needle", [
    (lambda: np.ones((2, 8), np.longdouble), "numpy dtype float128 not supported"),
    (lambda: np.ones((2, 8), ">f4"), "non-native byte order (numpy dtype >f4)"),
    (lambda: torch.empty(2, 8, device="meta"), "meta tensor"),
    (lambda: torch.ones(2, 8).to_sparse(), "dense tensor, got layout torch.sparse_coo"),
    (lambda: torch.ones(2, 8, dtype=torch.complex64), "torch.complex64 not supported"),
    (lambda: np.ones((2, 8), np.complex64), "numpy dtype complex64"),
    (lambda: torch.quantize_per_tensor(torch.ones(2, 8), 0.1, 0, torch.qint8), "quantized tensor"),
])
def test_check_hidden_names_unreadable_tensors(make, needle: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta/deprecation notes on sparse and quantized tensors
        x = make()
    with pytest.raises(InputError) as info:
        check_hidden(x, 8)
    assert needle in str(info.value)


# --- HTTP wire formats -------------------------------------------------------------------------------------
def test_json_depth_ignores_brackets_in_strings_and_escapes() -> None:
    assert json_depth(b'{"a": "[[[[", "hidden": [[1, 2]]}') == 3
    assert json_depth(b'["\\"[[", "\\\\", [[1]]]') == 3
    assert json_depth(b"") == 0


@pytest.mark.parametrize("body,exc,needle", [
    (b"[" * 3000, InputError, "nested 3000 levels deep, over the limit of 32"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, InputError, "nested 40 levels deep"),
    (b'{"hidden": [[1, 2], [3]]}', InputError, "different lengths"),
    (b'{"hidden": [[[1, 2]], [3, 4]]}', InputError, "different lengths"),
    (b'{"hidden": [[{"a": 1}]]}', InputError, "only numbers"),
    (b'{"hidden": [1, 2]}', InputError, "non-empty list of rows"),
    (json.dumps({"hidden": [[0.0]] * (MAX_JSON_TOKENS + 1)}).encode(), OversizeError, "send application/msgpack"),
    (json.dumps({"hidden": [[[0.0]] * 64] * 65}).encode(), OversizeError, "4160 tokens"),
])
def test_decode_json_hidden_rejects(body: bytes, exc: type, needle: str) -> None:
    with pytest.raises(exc) as info:
        decode_json_hidden(body)
    assert needle in str(info.value)


def test_decode_json_hidden_keeps_n_d_shapes_and_bounds_size(monkeypatch) -> None:
    assert decode_json_hidden(b'{"hidden": [[[1, 2], [3, 4], [5, 6]]]}').shape == (1, 3, 2)
    assert decode_json_hidden(b'{"hidden": [[1, 2]], "extra": "[[["}').shape == (1, 2)
    import expertray.wire.http_codec

    monkeypatch.setattr(expertray.wire.http_codec, "MAX_JSON_BYTES", 10)
    with pytest.raises(OversizeError, match="12 bytes is over the 10-byte limit"):
        decode_json_hidden(b'{"hidden":1}')


@pytest.mark.parametrize("header,kind", [
    ("application/json", "application/json"), ("application/json; charset=utf-8", "application/json"),
    ("Application/MsgPack", "application/msgpack"),
])
def test_media_type_accepts_the_documented_types(header: str, kind: str) -> None:
    assert media_type(header) == kind


@pytest.mark.parametrize("header,needle", [("text/plain", "'text/plain' is not supported"),
                                           (None, "content type none"), ("", "content type none"),
                                           ("application/x-www-form-urlencoded", "x-www-form-urlencoded")])
def test_media_type_refuses_others(header: str | None, needle: str) -> None:
    with pytest.raises(MediaTypeError) as info:
        media_type(header)
    assert needle in str(info.value) and "application/msgpack" in str(info.value)
