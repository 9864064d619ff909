"""Routing traces: the msgpack format (expertray/wire/trace.py), offline replay through any policy and placement
(replay.py), analysis and heatmaps (analysis.py), and the `expertray trace` commands (cli.py)."""

from expertray.tools.trace.analysis import TraceAnalysis, analyze, write_heatmap
from expertray.tools.trace.replay import gate_from_probs, replay
from expertray.wire.trace import Trace, TraceHeader, TraceRecord, TraceWriter, read_trace

__all__ = ["Trace", "TraceAnalysis", "TraceHeader", "TraceRecord", "TraceWriter", "analyze", "gate_from_probs",
           "read_trace", "replay", "write_heatmap"]
