"""Print the figures of a `make gpu-check` result ($OUT/gpu_check.json) as a Markdown table for
docs/BENCHMARKS.md: python scripts/gpu_check_table.py path/to/gpu_check.json"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def table(doc: dict) -> str:
    bench = doc["bench_gpu"]
    lines = [f"{bench['device']}, torch {bench['torch']}, {bench['dtype']}, median of {bench['repeats']}; "
             f"tests: {doc['pytest'].get('tests')} run, {doc['pytest'].get('failures')} failed, "
             f"{doc['pytest'].get('skipped')} skipped",
             "",
             "| layer | phase | rows | experts | grouped TFLOP/s | loop TFLOP/s | matmul TFLOP/s | grouped/matmul "
             "| loop/matmul | decode weights GB/s (grouped) | copy GB/s | weights/copy | router/compute |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in bench["cases"]:
        tf, frac = c["tflops"], c["matmul_fraction"]
        best = "experts_grouped" if "experts_grouped" in tf else "experts_loop"
        lines.append("| " + " | ".join([
            c["shape"]["name"], c["phase"], str(c["routed_rows"]), str(c["experts_resident"]),
            _f(tf.get("experts_grouped")), _f(tf["experts_loop"]), _f(tf["plain_matmul"]),
            _f(frac.get("experts_grouped")), _f(frac["experts_loop"]),
            _f(c.get("weights_gbs", {}).get(best)), _f(c.get("copy_gbs")),
            _f(c.get("copy_fraction", {}).get(best)), _f(c["router_over_compute"])]) + " |")
    return "\n".join(lines + ["", *stages_table(bench["cases"])])


# router stages as `expertray bench gpu` names them (median_ms of router_stages), in pipeline order
STAGES = ["gate_upcast", "gate_gemm", "gate_gemm_out_fp32", "gate_gemm_in_dtype", "gate_select", "routing_topk",
          "routing_capacity_drop", "replica", "plan", "permute", "expert_counts", "pipeline_prepare", "combine",
          "combine_place", "combine_place_gather", "combine_reduce_bmm", "combine_reduce_sum", "shared_expert"]


def stages_table(cases: list[dict]) -> list[str]:
    """Where the router's time goes: each stage's device ms, host syncs per prepare, the padded expert
    path beside the grouped GEMM (absent in results from before the breakdown)."""
    failed = [f"{c['shape']['name']} {c['phase']}: {c['errors']}" for c in cases if c.get("errors")]
    cases = [c for c in cases if c.get("router_stages")]
    if not cases:
        return [f"failed: {f}" for f in failed]
    lines = ["| layer | phase | " + " | ".join(STAGES) + " | syncs/prepare | padded TFLOP/s | padded/matmul "
             "| padding |", "|" + "---|" * (len(STAGES) + 6)]
    for c in cases:
        st = c["router_stages"]
        syncs = st.get("pipeline_prepare_host_syncs")
        lines.append("| " + " | ".join([c["shape"]["name"], c["phase"], *(_f(st["median_ms"].get(s)) for s in STAGES),
                                        "–" if syncs is None else str(syncs),
                                        _f(c["tflops"].get("experts_padded")),
                                        _f(c["matmul_fraction"].get("experts_padded")),
                                        _f(c.get("padded_overhead"))]) + " |")
    return lines + [f"failed: {f}" for f in failed]


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
