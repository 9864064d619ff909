"""A minimal HTTP client for the Serve app (stdlib only), used by examples and tests."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import NamedTuple

import numpy as np
import torch

from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack

MSGPACK = "application/msgpack"


class Reply(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]


def post(url: str, body: bytes, content_type: str, timeout_s: float = 60.0) -> Reply:
    """POST and return the reply, 4xx/5xx included (no exception for an HTTP error status)."""
    req = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return Reply(r.status, r.read(), dict(r.headers))
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), dict(e.headers))


def forward(base_url: str, layer: int, hidden: np.ndarray | torch.Tensor, timeout_s: float = 60.0
            ) -> np.ndarray | torch.Tensor:
    """One MoE layer over HTTP with msgpack tensors (a bf16 tensor in, a bf16 tensor out); raises RuntimeError
    with the server's message on 4xx/5xx."""
    reply = post(f"{base_url}/v1/layers/{layer}/forward", pack({"hidden": encode_tensor(hidden)}), MSGPACK,
                 timeout_s)
    if reply.status != 200:
        raise RuntimeError(f"HTTP {reply.status}: {reply.body.decode(errors='replace')}")
    return decode_tensor(unpack(reply.body)["output"], "output")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (for tests and examples that start servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
