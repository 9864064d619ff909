"""The `expertray` command line."""

from __future__ import annotations

import typer

from expertray.bench.cli import bench_app

app = typer.Typer(help="expertray: elastic expert-parallel MoE inference on Ray.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
