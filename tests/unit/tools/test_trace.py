"""Routing traces: round trips, errors that name the byte offset, replay, analysis and the `trace` CLI."""

import json
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from expertray.config import GateConfig
from expertray.errors import InputError, TraceFormatError
from expertray.layer.gating import gate_from_logits
from expertray.policies.routing import ROUTING
from expertray.state.placement_table import PlacementTable
from expertray.tools.trace import TraceWriter, analyze, read_trace, replay, write_heatmap
from expertray.tools.trace.analysis import _TimeBins
from expertray.tools.trace.cli import trace_app
from expertray.tools.workload import Workload, WorkloadConfig


def _write(path: Path, batches: int = 3, T: int = 64, E: int = 16, k: int = 2, layers: int = 2,
           gate: bool = True, temperature: float = 2.0) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    cfg = GateConfig("mixtral", E, k)
    wl = Workload(WorkloadConfig(E, T, temperature=temperature, seed=5))
    written = []
    with TraceWriter(path, layers, E, k, {"normalize": True}) as w:
        for b in wl.batches(batches):
            g = gate_from_logits(b.logits, cfg)
            for layer in range(layers):
                w.write(layer, g.experts, g.weights, g.probs if gate else None, t=float(b.arrival_s[-1]))
                written.append((layer, g.experts, g.weights, g.probs))
    return written


def test_round_trip(tmp_path: Path) -> None:
    written = _write(tmp_path / "t", gate=True)
    tr = read_trace(tmp_path / "t")
    assert (tr.header.num_layers, tr.header.num_experts, tr.header.top_k) == (2, 16, 2)
    assert tr.header.meta == {"normalize": True}
    records = list(tr)
    assert len(records) == len(written)
    for rec, (layer, experts, weights, probs) in zip(records, written, strict=True):
        assert rec.layer == layer and torch.equal(rec.experts, experts)
        assert torch.equal(rec.weights, weights.half().float())
        assert torch.equal(rec.gate_probs, probs.half().float())
    assert records[0].offset > 0 and records[1].offset > records[0].offset
    assert [r.t for r in records] == sorted(r.t for r in records)
    assert len(list(tr)) == len(records)  # re-iterable


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), E=st.integers(1, 40), layers=st.integers(1, 3))
def test_round_trip_property(tmp_path: Path, data: st.DataObject, E: int, layers: int) -> None:
    k = data.draw(st.integers(1, E))
    path = tmp_path / "p"
    batches = []
    with TraceWriter(path, layers, E, k, {"x": [1, "two"]}) as w:
        for _ in range(data.draw(st.integers(0, 4))):
            T = data.draw(st.integers(0, 12))
            layer = data.draw(st.integers(0, layers - 1))
            experts = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, E - 1), min_size=k, max_size=k),
                                                      min_size=T, max_size=T)), dtype=torch.long).reshape(T, k)
            weights = torch.rand(T, k)
            probs = torch.rand(T, E) if data.draw(st.booleans()) else None
            t = data.draw(st.floats(0, 1e6))
            w.write(layer, experts, weights, probs, t)
            batches.append((layer, experts, weights, probs, t))
    got = list(read_trace(path))
    assert len(got) == len(batches)
    for rec, (layer, experts, weights, probs, t) in zip(got, batches, strict=True):
        assert (rec.layer, rec.t, rec.tokens) == (layer, t, experts.shape[0])
        assert torch.equal(rec.experts, experts) and torch.equal(rec.weights, weights.half().float())
        assert (rec.gate_probs is None) == (probs is None)
        if probs is not None:
            assert torch.equal(rec.gate_probs, probs.half().float())


def test_truncation_names_the_record_offset(tmp_path: Path) -> None:
    _write(tmp_path / "t", batches=2, T=8)
    full = (tmp_path / "t").read_bytes()
    offsets = [r.offset for r in read_trace(tmp_path / "t")]
    cut_in = [offsets[1] + 1, (offsets[1] + offsets[2]) // 2, offsets[2] - 1]
    for cut in cut_in:
        (tmp_path / "cut").write_bytes(full[:cut])
        tr = read_trace(tmp_path / "cut")
        with pytest.raises(TraceFormatError, match=f"truncated record at byte {offsets[1]} "):
            list(tr)
    (tmp_path / "cut").write_bytes(full[:offsets[2]])  # a cut at a record boundary is a shorter, valid trace
    assert len(list(read_trace(tmp_path / "cut"))) == 2
    (tmp_path / "cut").write_bytes(full[:5])
    with pytest.raises(TraceFormatError, match="truncated record at byte 0"):
        read_trace(tmp_path / "cut")


@pytest.mark.parametrize("payload,needle", [
    (b"", "empty file"),
    (msgpack.packb([1, 2]), "holds a msgpack list, not the header map"),
    (msgpack.packb({"format": "other"}), "header format is 'other'"),
    (msgpack.packb({"format": "expertray-trace", "version": 2}), "version 2 is not supported"),
    (msgpack.packb({"format": "expertray-trace", "version": 1, "num_layers": 1}), "bad header"),
    (msgpack.packb({"format": "expertray-trace", "version": 1, "num_layers": 1, "num_experts": 4,
                    "top_k": 9, "meta": {}}), "top_k"),
    (b"\xc1", "malformed msgpack at byte 0"),
])
def test_bad_headers(tmp_path: Path, payload: bytes, needle: str) -> None:
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(TraceFormatError, match=needle):
        read_trace(tmp_path / "bad")


def test_inconsistent_records_name_their_offset(tmp_path: Path) -> None:
    header = msgpack.packb({"format": "expertray-trace", "version": 1, "num_layers": 1, "num_experts": 4,
                            "top_k": 2, "meta": {}})
    good = {"layer": 0, "t": 0.0, "tokens": 1, "experts": b"\x00\x00\x01\x00", "scores": b"\x00" * 4, "gate": None}
    cases = [({"experts": b"\x00\x00"}, "'experts' has 2 bytes, expected 4"),
             ({"layer": 3}, "layer 3 outside 0..0"),
             ({"experts": b"\x09\x00\x01\x00"}, "expert ids outside"),
             ({"gate": b"\x00" * 6}, "'gate' has 6 bytes, expected 8"),
             ({"t": "soon"}, "t must be a finite number")]
    for change, needle in cases:
        (tmp_path / "r").write_bytes(header + msgpack.packb(good) + msgpack.packb({**good, **change}))
        with pytest.raises(TraceFormatError, match=f"record at byte {len(header) + len(msgpack.packb(good))}: "
                                                   f"{needle}"):
            list(read_trace(tmp_path / "r"))
    (tmp_path / "r").write_bytes(header + msgpack.packb({"layer": 0}))
    with pytest.raises(TraceFormatError, match=f"record at byte {len(header)}: missing fields"):
        list(read_trace(tmp_path / "r"))
    wide = msgpack.packb({"format": "expertray-trace", "version": 1, "num_layers": 1, "num_experts": 64,
                          "top_k": 2, "meta": {}})
    (tmp_path / "r").write_bytes(wide + msgpack.packb({**good, "gate": b"\x00" * 128}))
    assert len(list(read_trace(tmp_path / "r", max_record_bytes=128))) == 1
    with pytest.raises(TraceFormatError, match=f"record at byte {len(wide)} holds a field larger than "
                                               "max_record_bytes=127"):
        list(read_trace(tmp_path / "r", max_record_bytes=127))


def test_writer_validates_its_input(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "w", 1, 4, 2) as w:
        with pytest.raises(InputError, match=r"must both be \[T, 2\]"):
            w.write(0, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1))
        with pytest.raises(InputError, match="expert ids must be in"):
            w.write(0, torch.tensor([[0, 4]]), torch.zeros(1, 2))
        with pytest.raises(InputError, match="layer 1 outside"):
            w.write(1, torch.tensor([[0, 1]]), torch.zeros(1, 2))
        with pytest.raises(InputError, match=r"gate_probs must be \[1, 4\]"):
            w.write(0, torch.tensor([[0, 1]]), torch.zeros(1, 2), torch.zeros(1, 3))


def test_replay_reproduces_topk_loads_and_laser_balances(tmp_path: Path) -> None:
    written = _write(tmp_path / "t", batches=4, T=256, E=16, k=2, layers=1)
    placement = PlacementTable.balanced(1, 16, ["a", "b", "c", "d"])
    tr = read_trace(tmp_path / "t")
    top = replay(tr, ROUTING.create("topk"), placement)["layers"]["0"]
    # the recorded probs are float16, so the replayed top-k can differ from the live one only on ties
    want = sum(torch.bincount(e.reshape(-1), minlength=16) for _, e, _, _ in written).double()
    got = torch.tensor(top["expert_tokens"])
    assert float((got - want).abs().sum()) <= 4
    assert sum(top["actor_tokens"].values()) == 4 * 256 * 2
    assert top["batches"] == 4 and top["gate_mass_retained"] == 1.0 and top["topk_agreement"] == 1.0
    laser = replay(tr, ROUTING.create("laser"), placement)["layers"]["0"]
    assert laser["imbalance_expert"] < top["imbalance_expert"]
    assert laser["gate_mass_retained"] > 0.95 and laser["drop_rate"] == 0.0
    _write(tmp_path / "nogate", batches=1, layers=1, gate=False)
    with pytest.raises(TraceFormatError, match="has no gate probs"):
        replay(read_trace(tmp_path / "nogate"), ROUTING.create("topk"), placement)


def test_analysis_totals_bins_and_heatmap(tmp_path: Path) -> None:
    written = _write(tmp_path / "t", batches=5, T=32)
    a = analyze(read_trace(tmp_path / "t"), max_time_bins=2)
    for layer in (0, 1):
        want = sum(torch.bincount(e.reshape(-1), minlength=16) for lyr, e, _, _ in written if lyr == layer)
        assert a.expert_tokens[layer].tolist() == want.double().tolist()
        assert sum(a.bins[layer].counts) == 5 and len(a.bins[layer].rows) <= 2
        assert torch.equal(sum(a.bins[layer].rows), a.expert_tokens[layer])
    s = a.summary()
    assert s["layers"]["1"]["batches"] == 5 and s["layers"]["1"]["tokens"] == 160
    write_heatmap(a, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 200), max_bins=st.integers(1, 9))
def test_time_bins_stay_bounded_and_lose_nothing(n: int, max_bins: int) -> None:
    bins = _TimeBins(max_bins)
    for i in range(n):
        bins.add(torch.tensor([float(i), 1.0]), t=float(i))
    assert len(bins.rows) <= max_bins and sum(bins.counts) == n
    if n:
        assert float(sum(bins.rows)[0]) == n * (n - 1) / 2
        assert bins.starts[0] == 0.0 and all(c <= bins.per_bin for c in bins.counts)


def test_cli_record_analyze_replay_and_clean_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    trace = tmp_path / "cli.ert"
    r = runner.invoke(trace_app, ["record", str(trace), "--batches", "3", "--tokens", "64", "--experts", "8",
                            "--top-k", "2", "--family", "mixtral", "--normalize", "--temperature", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(trace_app, ["analyze", str(trace), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["layers"]["0"]["batches"] == 3 and sum(doc["layers"]["0"]["expert_tokens"]) == 3 * 64 * 2
    assert (tmp_path / "cli.ert.heatmap.png").exists() and (tmp_path / "cli.ert.summary.json").exists()
    r = runner.invoke(trace_app, ["replay", str(trace), "--policy", "laser", "--placement-actors", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["layers"]["0"]["actor_tokens"]) == {"actor0", "actor1", "actor2", "actor3"}
    (tmp_path / "bad.ert").write_bytes(trace.read_bytes()[:100])
    r = runner.invoke(trace_app, ["replay", str(tmp_path / "bad.ert")])
    assert r.exit_code == 2 and "truncated record at byte" in r.output and "Traceback" not in r.output
    r = runner.invoke(trace_app, ["replay", str(trace), "--policy", "laser", "--policy-params", '{"widen": -1}'])
    assert r.exit_code == 2 and "routing.laser.widen" in r.output
