"""CPU seconds (min of 3) of the `balanced` planner on one layer of 256 experts, an older version of
policies/placement/balanced.py (its path in argv[1], e.g. `git show 412cfe2:policies/placement/balanced.py >
/tmp/old_balanced.py`) beside this checkout's, at 64, 256 and 1,024 devices with the simulator's defaults."""

from __future__ import annotations

import importlib.util
import sys
import time
from types import ModuleType

import numpy as np

import expertray.policies.placement as placement
from expertray.tools.sim.coactivation import Coactivation
from expertray.policies.placement.balanced import BalancedPlacement
from expertray.tools.sim.routing import SyntheticRouting
from expertray.tools.sim.simulator import default_slots_per_device
from expertray.state.topology import Topology

EXPERTS = 256


def load_old(path: str) -> ModuleType:
    """The older module, loaded without registering its policy a second time."""
    register = placement.PLACEMENT.register
    placement.PLACEMENT.register = lambda name: (lambda cls: cls)  # type: ignore[method-assign]
    try:
        spec = importlib.util.spec_from_file_location("old_balanced", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_balanced"] = module
        spec.loader.exec_module(module)
        return module
    finally:
        placement.PLACEMENT.register = register  # type: ignore[method-assign]


def main(old_path: str) -> None:
    old = load_old(old_path)
    source = SyntheticRouting(1, EXPERTS, 8, 128 * 1024, 0.25, 16, 0.5, 0)
    load = Coactivation.from_steps(source.calibration(), 1, EXPERTS).load.astype(np.float64)
    for devices in (64, 256, 1024):
        topology = Topology.uniform(devices // 8, 8, default_slots_per_device(EXPERTS, devices))
        line = [f"devices {devices}:"]
        for name, policy in (("before", old.BalancedPlacement()), ("after", BalancedPlacement())):
            seconds = []
            for _ in range(3):
                start = time.process_time()
                plan = policy.plan(load, topology)
                seconds.append(time.process_time() - start)
            line.append(f"{name} {min(seconds):.3f} s (balancedness {plan.balancedness_after.mean:.6f})")
        print(" ".join(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
