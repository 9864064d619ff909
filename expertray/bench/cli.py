"""`expertray bench …`: one sub-command per benchmark module (each module exposes `cli`)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks: results as JSON (--json) or a table.", no_args_is_help=True)

from expertray.bench import core, elastic, faults, layer, routing  # noqa: E402  # noqa: E402

bench_app.command("core")(core.cli)
bench_app.command("layer")(layer.cli)
bench_app.command("routing")(routing.cli)
bench_app.command("elastic")(elastic.cli)
bench_app.command("faults")(faults.cli)
