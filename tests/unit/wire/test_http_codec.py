"""The msgpack wire tensor: every supported dtype round-trips bit for bit; others are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertray.errors import InputError
from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dtypes_round_trip(dtype: type) -> None:
    x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(dtype)
    out = decode_tensor(unpack(pack({"hidden": encode_tensor(x)}))["hidden"])
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == x.shape
    assert np.array_equal(out, x)


def test_bf16_round_trips_as_its_bits() -> None:
    x = torch.randn(4, 7).bfloat16()
    wire = encode_tensor(x)
    assert wire["dtype"] == "bfloat16" and wire["shape"] == [4, 7] and len(wire["data"]) == 4 * 7 * 2
    out = decode_tensor(unpack(pack({"hidden": wire}))["hidden"])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))
    out.add_(1)  # owns writable memory


def test_float_tensors_travel_as_numpy() -> None:
    x = torch.randn(2, 3)
    out = decode_tensor(encode_tensor(x))
    assert isinstance(out, np.ndarray) and np.array_equal(out, x.numpy())


@pytest.mark.parametrize("bad", [np.zeros(3, np.uint16), np.zeros(3, np.int8), torch.zeros(3, dtype=torch.int16)],
                         ids=["uint16", "int8", "torch-int16"])
def test_other_dtypes_are_refused(bad: object) -> None:
    with pytest.raises(InputError, match="cannot go on the wire"):
        encode_tensor(bad)


def test_bf16_byte_count_is_checked() -> None:
    with pytest.raises(InputError, match="6 bytes do not match shape \\[2, 2\\] of bfloat16 \\(8 bytes\\)"):
        decode_tensor({"dtype": "bfloat16", "shape": [2, 2], "data": b"\0" * 6})
