"""Routing traces: the msgpack format (format.py), offline replay through any policy and placement
(replay.py), analysis and heatmaps (analysis.py), and the `expertray trace` commands (cli.py)."""

from expertray.trace.analysis import TraceAnalysis, analyze, write_heatmap
from expertray.trace.format import Trace, TraceHeader, TraceRecord, TraceWriter, read_trace
from expertray.trace.replay import gate_from_probs, replay

__all__ = ["Trace", "TraceAnalysis", "TraceHeader", "TraceRecord", "TraceWriter", "analyze", "gate_from_probs",
           "read_trace", "replay", "write_heatmap"]
