"""The cluster simulator: replay routing (synthetic, generated or traced; routing.py) over placements on a
topology (simulator.py), with per-link traffic (traffic.py) and the `expertray sim` command (cli.py)."""

from expertray.tools.sim.simulator import SimConfig, SimResult, simulate

__all__ = ["SimConfig", "SimResult", "simulate"]
