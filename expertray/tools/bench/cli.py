"""`expertray bench …`: one sub-command per benchmark module (each module exposes `cli`)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks: results as JSON (--json) or a table.", no_args_is_help=True)

from expertray.tools.bench import core, gpu, routing  # noqa: E402

bench_app.command("core")(core.cli)
try:  # the live-cluster benchmarks need Ray; `bench gpu` runs where Ray is not installed
    from expertray.tools.bench import chaos, elastic, faults, latency, layer, load, recovery, serve, stall  # noqa: E402
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] != "ray":
        raise
else:
    bench_app.command("layer")(layer.cli)
    bench_app.command("latency")(latency.cli)
    bench_app.command("elastic")(elastic.cli)
    bench_app.command("faults")(faults.cli)
    bench_app.command("chaos")(chaos.cli)
    bench_app.command("load")(load.cli)
    bench_app.command("recovery")(recovery.cli)
    bench_app.command("stall")(stall.cli)
    bench_app.command("serve")(serve.cli)
bench_app.command("routing")(routing.cli)
bench_app.command("gpu")(gpu.cli)
