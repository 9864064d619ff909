"""Every bad input on every interface gets a specific error naming the problem, and breaks nothing.

Interfaces: the Python API (`Cluster.forward`), HTTP (the Serve app), the CLI (typer), config files and
`expertray.config.from_dict`, and controller snapshots. After each bad input the cluster must still answer a
good request exactly and its placement table must be unchanged. Cases marked xfail(strict) are known bugs
(see docs/RELIABILITY.md, "Known limits"); they start failing loudly once fixed, so the mark can go.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

import msgpack
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig, from_dict
from expertray.errors import ConfigError, InputError, OversizeError, UnknownExpertError
from expertray.runtime.snapshot import SnapshotError, load_snapshot, save_snapshot
from expertray.state.placement_table import PlacementTable
from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack

pytestmark = pytest.mark.ray
D = 32
MAX_TOKENS = 64
GOOD = torch.randn(5, D, generator=torch.Generator().manual_seed(123))


def _cfg(**kw) -> ClusterConfig:
    return ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 6, 2)), num_layers=2,
                         num_expert_actors=3, actor_num_cpus=0.25, router_num_cpus=0.25,
                         max_request_tokens=MAX_TOKENS, metrics_port=-1, **kw)


# --- the module's live cluster behind Serve ----------------------------------------------------------
@pytest.fixture(scope="module")
def live(ray_session, serve_port):
    from ray import serve

    from expertray.serve.layers import run_app

    cfg = _cfg()
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    base = run_app(serve_port, name="expertray-bad-input", quiet=True)
    yield cluster, layers, base
    serve.delete("expertray-bad-input")
    cluster.shutdown()


def _still_exact(cluster, layers) -> None:
    for layer in (0, 1):
        torch.testing.assert_close(cluster.forward(layer, GOOD), layers[layer](GOOD), atol=1e-5, rtol=0)


# --- Python API --------------------------------------------------------------------------------------
API_CASES = [
    ("wrong-d_model", 0, lambda: torch.randn(4, D + 1), InputError, "last dim must be d_model=32"),
    ("1-d", 0, lambda: torch.randn(D), InputError, "must have shape [tokens, d_model=32]"),
    ("0-d", 0, lambda: torch.tensor(1.0), InputError, "must have shape [tokens, d_model=32]"),
    ("int64", 0, lambda: torch.ones(4, D, dtype=torch.int64), InputError, "dtype torch.int64 not supported"),
    ("complex", 0, lambda: torch.ones(4, D, dtype=torch.complex64), InputError, "torch.complex64 not supported"),
    ("numpy-int", 0, lambda: np.ones((4, D), np.int32), InputError, "must be floating point, got numpy dtype int32"),
    ("python-list", 0, lambda: [[0.0] * D], InputError, "torch.Tensor or numpy array, got list"),
    ("nan", 0, lambda: torch.randn(4, D).index_fill_(0, torch.tensor([2]), float("nan")), InputError,
     "NaN or inf (first at token 2)"),
    ("inf", 1, lambda: torch.randn(4, D).index_fill_(0, torch.tensor([3]), float("inf")), InputError,
     "NaN or inf (first at token 3)"),
    ("-inf-numpy", 1, lambda: np.full((2, D), -np.inf, np.float32), InputError, "NaN or inf (first at token 0)"),
    ("empty", 0, lambda: torch.zeros(0, D), InputError, "empty batch"),
    ("empty-3d", 0, lambda: torch.zeros(2, 0, D), InputError, "empty batch"),
    ("over-max_request_tokens", 0, lambda: torch.zeros(MAX_TOKENS + 1, D), OversizeError,
     "65 tokens, over the limit of 64"),
    ("over-max-as-3d", 0, lambda: torch.zeros(5, 13, D), OversizeError, "65 tokens, over the limit of 64"),
    ("unknown-layer", 2, lambda: GOOD, UnknownExpertError, "unknown layer 2 (cluster serves layers 0..1)"),
    ("negative-layer", -1, lambda: GOOD, UnknownExpertError, "unknown layer -1"),
    ("str-layer", "0", lambda: GOOD, UnknownExpertError, "unknown layer '0'"),
    ("bool-layer", True, lambda: GOOD, UnknownExpertError, "unknown layer True (a layer index must be an integer"),
    ("numpy-bool-layer", np.bool_(False), lambda: GOOD, UnknownExpertError, "not bool"),
    ("float-layer", 0.0, lambda: GOOD, UnknownExpertError, "unknown layer 0.0"),
    ("longdouble", 0, lambda: np.ones((4, D), np.longdouble), InputError, "numpy dtype float128 not supported"),
    ("big-endian", 0, lambda: np.ones((4, D), ">f4"), InputError, "non-native byte order (numpy dtype >f4)"),
    ("meta", 0, lambda: torch.empty(4, D, device="meta"), InputError, "meta tensor"),
    ("sparse", 0, lambda: torch.ones(4, D).to_sparse(), InputError, "layout torch.sparse_coo"),
    ("quantized", 0, lambda: torch.quantize_per_tensor(torch.ones(4, D), 0.1, 0, torch.qint8), InputError,
     "quantized tensor"),
]


def _params(cases: list) -> list:
    """Table rows (id, *values) or pytest.param(id, *values, marks=...) → pytest.param(*values, id=id)."""
    out = []
    for c in cases:
        values, marks = (c.values, c.marks) if hasattr(c, "values") else (c, ())
        out.append(pytest.param(*values[1:], id=values[0], marks=marks))
    return out


@pytest.mark.parametrize("layer,make,exc,needle", _params(API_CASES))
def test_python_api_rejects(live, layer, make, exc: type, needle: str) -> None:
    cluster, layers, _ = live
    version = cluster.table().version
    with pytest.raises(exc) as info:
        cluster.forward(layer, make())
    assert needle in str(info.value)
    _still_exact(cluster, layers)
    assert cluster.table().version == version


DTYPE_CASES = [
    pytest.param(lambda x: x.half(), id="float16"),
    pytest.param(lambda x: x.double(), id="float64"),
    pytest.param(lambda x: x.reshape(1, 5, D), id="3-d"),
    pytest.param(lambda x: x.bfloat16(), id="bfloat16"),
    pytest.param(lambda x: x.clone().requires_grad_(), id="requires-grad"),
    pytest.param(lambda x: x.reshape(5, 1, 1, D), id="4-d"),
]


@pytest.mark.parametrize("layer", [np.int64(1), np.uint8(1), torch.tensor(1), np.array(1)],
                         ids=["numpy-int64", "numpy-uint8", "0-d-tensor", "0-d-array"])
def test_python_api_accepts_integer_layer_types(live, layer) -> None:
    cluster, layers, _ = live
    torch.testing.assert_close(cluster.forward(layer, GOOD), layers[1](GOOD), atol=1e-5, rtol=0)


@pytest.mark.parametrize("convert", DTYPE_CASES)
def test_python_api_serves_every_accepted_input_form(live, convert) -> None:
    cluster, layers, _ = live
    x = convert(GOOD)
    out = cluster.forward(0, x)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, layers[0](x.detach()), atol=1e-2 if x.dtype == torch.float16 else 1e-5, rtol=0)


# --- HTTP ----------------------------------------------------------------------------------------------
MP, JS = "application/msgpack", "application/json"
FWD = "/v1/layers/0/forward"


def _wire(shape: list[int], data: bytes | None = None, dtype: str = "float32") -> bytes:
    n = int(np.prod(shape)) * 4 if data is None else 0
    return pack({"hidden": {"dtype": dtype, "shape": shape, "data": data if data is not None else b"\0" * n}})


HTTP_CASES = [
    # JSON bodies
    ("json-malformed", FWD, b"{not json", JS, 400, "malformed JSON"),
    ("json-empty-body", FWD, b"", JS, 400, "malformed JSON"),
    ("json-not-utf8", FWD, b"\xff\xfe\xfd", JS, 400, "malformed JSON"),
    ("json-top-level-list", FWD, b"[1, 2]", JS, 400, "object with key 'hidden'"),
    ("json-missing-hidden", FWD, b'{"x": 1}', JS, 400, "object with key 'hidden'"),
    ("json-hidden-dict", FWD, b'{"hidden": {"a": 1}}', JS, 400, "non-empty list of rows"),
    ("json-hidden-flat", FWD, json.dumps({"hidden": [0.0] * D}).encode(), JS, 400, "non-empty list of rows"),
    ("json-empty", FWD, b'{"hidden": []}', JS, 400, "non-empty list of rows"),
    ("json-ragged", FWD, json.dumps({"hidden": [[0.0] * D, [0.0]]}).encode(), JS, 400, "different lengths"),
    ("json-null", FWD, json.dumps({"hidden": [[None] * D]}).encode(), JS, 400, "NaN or inf"),  # numpy: None → nan
    ("json-words", FWD, json.dumps({"hidden": [["a"] * D]}).encode(), JS, 400, "only numbers"),
    ("json-wrong-d_model", FWD, json.dumps({"hidden": [[0.0] * (D + 1)]}).encode(), JS, 400, "d_model=32"),
    ("json-NaN-literal", FWD, b'{"hidden": [[NaN' + b", 0" * (D - 1) + b"]]}", JS, 400, "NaN or inf"),
    ("json-Infinity", FWD, b'{"hidden": [[0' + b", Infinity" * (D - 1) + b"]]}", JS, 400, "NaN or inf"),
    ("json-1e999", FWD, b'{"hidden": [[1e999' + b", 0" * (D - 1) + b"]]}", JS, 400, "NaN or inf"),
    ("json-over-json-limit", FWD, json.dumps({"hidden": [[0.0]] * 4097}).encode(), JS, 413, "send application/msgpack"),
    ("json-over-max_request_tokens", FWD, json.dumps({"hidden": [[0.0] * D] * (MAX_TOKENS + 1)}).encode(), JS, 413,
     "over the limit of 64"),
    # msgpack bodies
    ("mp-malformed", FWD, b"\xc1", MP, 400, "malformed msgpack"),
    ("mp-empty-body", FWD, b"", MP, 400, "malformed msgpack"),
    ("mp-truncated", FWD, _wire([2, D])[:-7], MP, 400, "malformed msgpack"),
    ("mp-extra-data", FWD, _wire([1, D]) + b"\x01", MP, 400, "malformed msgpack"),
    ("mp-int-map-key", FWD, msgpack.packb({1: 2}), MP, 400, "malformed msgpack"),
    ("mp-top-level-list", FWD, pack([1, 2]), MP, 400, "map with key 'hidden'"),
    ("mp-hidden-not-map", FWD, pack({"hidden": [1.0] * D}), MP, 400, "expected a map with dtype, shape, data"),
    ("mp-missing-keys", FWD, pack({"hidden": {"dtype": "float32"}}), MP, 400, "missing key(s) ['shape', 'data']"),
    ("mp-dtype-int8", FWD, _wire([1, D], b"x" * D, "int8"), MP, 400, "hidden.dtype: 'int8' not supported"),
    ("mp-dtype-float8", FWD, _wire([1, D], b"x" * D, "float8_e4m3fn"), MP, 400, "'float8_e4m3fn' not supported"),
    ("mp-bf16-short", FWD, _wire([2, D], b"\0" * 2 * D, "bfloat16"), MP, 400,
     f"{2 * D} bytes do not match shape [2, 32] of bfloat16"),
    ("mp-bf16-nan", FWD, _wire([1, D], b"\xc0\x7f" * D, "bfloat16"), MP, 400, "NaN or inf"),
    ("mp-shape-negative", FWD, _wire([-1, D], b""), MP, 400, "hidden.shape: must be a list of non-negative"),
    ("mp-shape-string", FWD, pack({"hidden": {"dtype": "float32", "shape": "4x32", "data": b""}}), MP, 400,
     "hidden.shape"),
    ("mp-data-str", FWD, pack({"hidden": {"dtype": "float32", "shape": [1, D], "data": "abc"}}), MP, 400,
     "hidden.data: must be raw bytes"),
    ("mp-data-short", FWD, _wire([2, D], b"\0" * 8), MP, 400, "8 bytes do not match shape [2, 32]"),
    ("mp-1-d", FWD, _wire([D]), MP, 400, "must have shape [tokens, d_model=32]"),
    ("mp-empty", FWD, _wire([0, D]), MP, 400, "empty batch"),
    ("mp-wrong-d_model", FWD, _wire([2, D + 1]), MP, 400, "d_model=32"),
    ("mp-nan", FWD, pack({"hidden": encode_tensor(np.full((3, D), np.nan, np.float32))}), MP, 400, "NaN or inf"),
    ("mp-over-max_request_tokens", FWD, _wire([MAX_TOKENS + 1, D]), MP, 413, "over the limit of 64"),
    ("mp-shape-overflows-int64", FWD, _wire([2**62, 4], b""), MP, 400, "0 bytes do not match shape"),
    ("mp-shape-max-uint64", FWD, _wire([2**64 - 1, D], b""), MP, 400, "0 bytes do not match shape"),
    # routes
    ("unknown-layer", "/v1/layers/2/forward", _wire([1, D]), MP, 404, "unknown layer 2"),
    ("negative-layer", "/v1/layers/-1/forward", _wire([1, D]), MP, 404, "unknown layer -1"),
    ("non-int-layer", "/v1/layers/abc/forward", _wire([1, D]), MP, 422, "layer"),
    ("unknown-route", "/v1/nothing", b"{}", JS, 404, "Not Found"),
    # limits and content types
    ("json-deeply-nested-3KB", FWD, b"[" * 3000, JS, 400, "nested 3000 levels deep, over the limit of 32"),
    ("json-nested-in-other-key", FWD, b'{"hidden": [[0]], "x": ' + b"[" * 100 + b"]" * 100 + b"}", JS, 400,
     "over the limit of 32"),
    ("text-plain", FWD, json.dumps({"hidden": [[0.0] * D]}).encode(), "text/plain", 415,
     "content type 'text/plain' is not supported"),
    ("no-content-type", FWD, json.dumps({"hidden": [[0.0] * D]}).encode(), "", 415, "content type none"),
    ("form-encoded", FWD, b"hidden=1", "application/x-www-form-urlencoded", 415, "x-www-form-urlencoded"),
]


def _request(url: str, body: bytes | None, content_type: str, method: str = "POST") -> tuple[int, bytes]:
    if not content_type:  # urllib would add a form content type to a body without one
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request(method, parts.path, body=body)
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("path,body,ctype,code,needle", _params(HTTP_CASES))
def test_http_rejects(live, path: str, body: bytes, ctype: str, code: int, needle: str) -> None:
    cluster, layers, base = live
    status, payload = _request(base + path, body, ctype)
    assert status == code, payload[:300]
    assert needle in payload.decode(errors="replace")
    assert list(json.loads(payload)) == ["error"], "every error reply has the one shape {'error': ...}"
    good = pack({"hidden": encode_tensor(GOOD.numpy())})
    status, payload = _request(base + FWD, good, MP)
    assert status == 200
    np.testing.assert_allclose(decode_tensor(unpack(payload)["output"]), layers[0](GOOD).numpy(), atol=1e-5, rtol=0)


def test_http_wrong_method_is_405(live) -> None:
    _, _, base = live
    assert _request(base + FWD, None, JS, method="GET")[0] == 405
    assert _request(base + "/healthz", b"{}", JS, method="POST")[0] == 405
    status, payload = _request(base + "/healthz", b"{}", JS, method="POST")
    assert status == 405 and json.loads(payload) == {"error": "Method Not Allowed"}


def test_http_n_d_inputs_keep_their_shape(live) -> None:
    _, layers, base = live
    x = GOOD.reshape(1, 5, D).numpy()
    ref = layers[0](GOOD).numpy().reshape(1, 5, D)
    status, payload = _request(base + FWD, json.dumps({"hidden": x.tolist()}).encode(), JS)
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(payload)["output"], np.float32), ref, atol=1e-5, rtol=0)
    status, payload = _request(base + FWD, pack({"hidden": encode_tensor(x.reshape(5, 1, 1, D))}), MP)
    assert status == 200
    out = decode_tensor(unpack(payload)["output"])
    assert out.shape == (5, 1, 1, D)
    np.testing.assert_allclose(out.reshape(1, 5, D), ref, atol=1e-5, rtol=0)


def test_http_bf16_answers_in_bf16(live) -> None:
    """bf16 hidden states on the msgpack wire (its 16-bit patterns) come back bf16, in the request's shape."""
    _, layers, base = live
    x = GOOD.bfloat16().reshape(5, 1, D)
    status, payload = _request(base + FWD, pack({"hidden": encode_tensor(x)}), MP)
    assert status == 200, payload[:300]
    wire = unpack(payload)["output"]
    assert wire["dtype"] == "bfloat16" and len(wire["data"]) == 5 * D * 2
    out = decode_tensor(wire)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 1, D)
    ref = layers[0](x.reshape(5, D).float())
    torch.testing.assert_close(out.reshape(5, D).float(), ref, atol=3e-2, rtol=3e-2)


def test_http_rejections_are_counted_by_the_ingress(live) -> None:
    _, _, base = live

    def rejected() -> dict[str, int]:
        with urllib.request.urlopen(base + "/healthz", timeout=60) as r:
            return json.load(r)["ingress"]["rejected"]

    before = rejected()
    assert _request(base + FWD, b"x", "text/plain")[0] == 415
    assert _request(base + FWD, b"[" * 100, JS)[0] == 400
    after = rejected()
    # one ingress replica here; each replica counts what it answered itself
    assert after.get("415", 0) == before.get("415", 0) + 1 and after.get("400", 0) == before.get("400", 0) + 1


# --- CLI -------------------------------------------------------------------------------------------------
runner = CliRunner()
CLI_CASES = [
    (["replicate", "9:0"], "unknown expert 9:0"),
    (["replicate", "0:99"], "unknown expert 0:99"),
    (["replicate", "0:-1"], "unknown expert 0:-1"),
    (["replicate", "abc"], "LAYER:EXPERT (e.g. 0:3), got 'abc'"),
    (["replicate", "0:1:2"], "LAYER:EXPERT (e.g. 0:3), got '0:1:2'"),
    (["replicate", "0:1", "--to", "nobody"], "unknown actor 'nobody'"),
    (["replicate", "0:0", "--to", "expert-0"], "actor 'expert-0' already holds expert 0:0"),
    (["migrate", "0:1", "--to", "nobody"], "unknown actor 'nobody'"),
    (["migrate", "0:1", "--to", "expert-2", "--from", "nobody"], "'nobody' holds no replica of expert 0:1"),
    (["migrate", "x:1", "--to", "expert-2"], "LAYER:EXPERT"),
    (["drain", "nobody"], "unknown actor 'nobody'"),
    (["experts", "--layer", "7"], "unknown layer 7"),
]


@pytest.mark.parametrize("args,needle", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_rejects_with_exit_2(live, args: list[str], needle: str) -> None:
    from expertray.cli.main import app

    cluster, layers, _ = live
    version = cluster.table().version
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert cluster.table().version == version, "a refused command changed the placement"
    _still_exact(cluster, layers)


def test_cli_migrate_from_an_actor_without_the_expert_changes_nothing(live) -> None:
    from expertray.cli.main import app

    cluster, layers, _ = live
    table = cluster.table()
    holders = {s.actor for s in table.replicas(0, 1)}
    src = next(a for a in table.actors if a not in holders)
    dst = next(a for a in table.actors if a != src)  # holder or not: the source is checked first
    result = runner.invoke(app, ["migrate", "0:1", "--to", dst, "--from", src])
    assert result.exit_code == 2, result.output
    assert f"{src!r} holds no replica of expert 0:1" in result.output and "Traceback" not in result.output
    assert cluster.table().version == table.version, "a refused migrate changed the placement"
    _still_exact(cluster, layers)


UP_CASES = [
    ("unknown-field", "num_expert_actor: 3\n", "cluster.num_expert_actor: unknown field"),
    ("nested-unknown-field", "layer:\n  gate:\n    famly: mixtral\n", "cluster.layer.gate.famly: unknown field"),
    ("bad-value", "num_expert_actors: 0\n", "cluster.num_expert_actors: must be >= 1, got 0"),
    ("bad-enum", "transport: pigeon\n", "cluster.transport: 'pigeon' is not one of"),
    ("nested-bad-value", "layer:\n  capacity:\n    factor: -1\n", "capacity.factor: must be a positive"),
    ("queue-below-request", "max_request_tokens: 10\nmax_queue_tokens: 5\n", "cluster.max_queue_tokens"),
    ("not-a-mapping", "- 1\n- 2\n", "cluster: expected a mapping, got list"),
    ("nested-not-a-mapping", "layer: 3\n", "cluster.layer: expected a mapping, got int"),
    ("malformed-yaml", "layer: [unclosed\n", "cannot read"),
    ("wrong-type", "num_layers: two\n", "cluster.num_layers: expected int"),
    ("unknown-routing-policy", "routing_policy: nope\n", "cluster.routing_policy: 'nope' is unknown"),
    ("unknown-autoscale-policy", "autoscale_policy: magic\n", "cluster.autoscale_policy: 'magic' is unknown"),
]


@pytest.mark.parametrize("yaml_text,needle", _params(UP_CASES))
def test_cli_up_rejects_bad_config_before_starting_anything(monkeypatch, tmp_path, yaml_text: str,
                                                            needle: str) -> None:
    import expertray.api
    import expertray.cli.localhead
    from expertray.cli.main import app

    started: list[str] = []
    monkeypatch.setattr(expertray.cli.localhead, "start_head", lambda *a, **kw: started.append("ray head"))
    monkeypatch.setattr(expertray.api, "launch", lambda *a, **kw: started.append("launch"))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml_text)
    result = runner.invoke(app, ["up", "--config", str(path)])
    assert started == [], f"`up` started {started} before rejecting the config"
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_cli_up_missing_config_file(monkeypatch, tmp_path) -> None:
    import expertray.cli.localhead
    from expertray.cli.main import app

    monkeypatch.setattr(expertray.cli.localhead, "start_head", lambda *a, **kw: pytest.fail("started Ray"))
    result = runner.invoke(app, ["up", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml: cannot read" in result.output


# --- config.from_dict (no Ray) ---------------------------------------------------------------------------
FROM_DICT_CASES = [
    ({"num_layers": 0}, "cluster.num_layers: must be >= 1"),
    ({"max_wait_ms": float("nan")}, "cluster.max_wait_ms: must be a finite number"),
    ({"max_wait_ms": -1}, "cluster.max_wait_ms"),
    ({"metrics_port": 70000}, "cluster.metrics_port"),
    ({"actor_num_cpus": 0}, "cluster.actor_num_cpus"),
    ({"routing_params": [1]}, "cluster.routing_params"),
    ({"layer": None}, "cluster.layer: expected a mapping, got NoneType"),
    ({"layer": {"d_ff": 0}}, "layer.d_ff: must be >= 1"),
    ({"layer": {"gate": {"top_k": 9}}}, "gate.top_k: must be in [1, num_experts=8], got 9"),
    ({"layer": {"gate": {"num_groups": 3}}}, "gate.num_groups: must divide num_experts=8"),
    ({"layer": {"gate": {"family": "switch"}}}, "gate.family: 'switch' is not one of"),
    ({"layer": {"capacity": {"overflow": "spill"}}}, "capacity.overflow: 'spill' is not one of"),
    ({"layer": {"capacity": {"factor": float("inf")}}}, "capacity.factor"),
    ({"layer": {"gate": {"routed_scaling_factor": 0}}}, "gate.routed_scaling_factor"),
    ({"num_layers": 2.5}, "cluster.num_layers: expected int"),
    ({"num_expert_actors": True}, "cluster.num_expert_actors: expected int"),
    ({"layer": {"d_model": "64"}}, "cluster.layer.d_model: expected int"),
    ({"snapshot_path": 5}, "cluster.snapshot_path: expected str"),
]


@pytest.mark.parametrize("data,needle", FROM_DICT_CASES)
def test_from_dict_names_the_bad_field(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(ClusterConfig, data, "cluster")
    assert needle in str(info.value)


# --- snapshots (no Ray): corruptions past the unit tests' cases --------------------------------------------
def _mutated(mutate) -> dict:
    doc = {"format": "expertray-snapshot", "version": 1, "state": {"next_actor": 2},
           "table": PlacementTable.balanced(2, 4, ["a", "b"]).to_dict()}
    mutate(doc)
    return doc


SNAPSHOT_CASES = [
    ("empty-file", b"", "corrupted msgpack"),
    ("top-level-list", msgpack.packb([1, 2]), "not an expertray snapshot"),
    ("table-bad-int", msgpack.packb(_mutated(lambda d: d["table"].update(num_layers="x"))), "bad placement table"),
    ("table-unknown-actor", msgpack.packb(_mutated(lambda d: d["table"]["slots"].append(["zz", 0, 0]))),
     "unknown actor 'zz'"),
    ("table-expert-without-replica", msgpack.packb(_mutated(lambda d: d["table"]["slots"].pop())),
     "logical experts without any replica"),
    ("table-slot-outside", msgpack.packb(_mutated(lambda d: d["table"]["slots"].append(["a", 5, 0]))),
     "outside 2 layers x 4 experts"),
    ("table-missing", msgpack.packb(_mutated(lambda d: d.pop("table"))), "bad placement table"),
    ("state-not-map", msgpack.packb(_mutated(lambda d: d.update(state=[1]))), "state must be a map"),
]


@pytest.mark.parametrize("payload,needle", _params(SNAPSHOT_CASES))
def test_corrupted_snapshot_is_named(tmp_path, payload: bytes, needle: str) -> None:
    path = tmp_path / "snap.msgpack"
    path.write_bytes(payload)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_snapshot_single_byte_corruptions_raise_only_snapshot_error(tmp_path) -> None:
    """Flip each byte of a real snapshot: loading either fails with SnapshotError or yields a table that
    passed PlacementTable's own validation (a flipped digit can be another valid value); no other
    exception type may escape."""
    table = PlacementTable.balanced(2, 4, ["a", "b"]).replicate(0, 1, "b")
    path = tmp_path / "snap.msgpack"
    save_snapshot(path, table, {"next_actor": 2})
    raw = path.read_bytes()
    detected, escaped = 0, {}
    for i in range(len(raw)):
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
        try:
            load_snapshot(path)
        except SnapshotError:
            detected += 1
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            escaped[f"{type(exc).__name__}: {exc}"] = i
    assert not escaped, f"exceptions other than SnapshotError (message: first byte offset): {escaped}"
    assert detected >= len(raw) // 2, f"only {detected} of {len(raw)} corruptions were detected"


# --- last: the cluster is intact after everything above --------------------------------------------------
def test_cluster_still_serves_exactly_after_all_bad_inputs(live) -> None:
    cluster, layers, base = live
    _still_exact(cluster, layers)
    status = cluster.status()
    assert all(r["errors"] == 0 for r in status["routers"]), "a bad input reached a batch"
    x = np.random.default_rng(5).standard_normal((MAX_TOKENS, D)).astype(np.float32)
    code, payload = _request(base + "/v1/layers/1/forward", pack({"hidden": encode_tensor(x)}), MP)
    assert code == 200
    np.testing.assert_allclose(decode_tensor(unpack(payload)["output"]), layers[1](torch.from_numpy(x)).numpy(),
                               atol=1e-5, rtol=0)
