"""Same-process side by side: top-k gate, laser before the numpy chunk steps (tests/unit/laser_reference.py)
and laser now; device-aware defaults, T=4096, 1 thread, timed in turn each repeat; medians of wall and thread
CPU time. Run from the repository root: `.venv/bin/python docs/bench/routing_side_by_side.py 21`."""
import sys, time, statistics
import torch
torch.set_num_threads(1)
sys.path.insert(0, "tests/unit")
from laser_reference import LaserRouting as Old
from expertray.bench.routing import MODELS, families, _device_of, DROPLESS
from expertray.gating import gate_from_logits
from expertray.policies.routing_laser import LaserRouting as New
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
for model, (cfg, _, devices) in MODELS.items():
    groups = tuple(_device_of(cfg, devices).tolist())
    logits = families(model, None)["zipf"](0, 4096, 2.0)
    g = gate_from_logits(logits, cfg)
    runs = {"topk gate": lambda: gate_from_logits(logits, cfg),
            "laser before": lambda: Old(expert_groups=groups).route(g, DROPLESS),
            "laser now": lambda: New(expert_groups=groups).route(g, DROPLESS)}
    ro, rn = runs["laser before"](), runs["laser now"]()
    same = torch.equal(ro.experts, rn.experts) and torch.equal(ro.weights, rn.weights)
    wall = {k: [] for k in runs}; cpu = {k: [] for k in runs}
    for f in runs.values(): f()
    for _ in range(reps):
        for k, f in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time(); f()
            wall[k].append(time.perf_counter() - t0); cpu[k].append(time.thread_time() - c0)
    med = lambda v: statistics.median(v) * 1e6 / 4096
    print(f"{model}: identical={same} reps={reps} | " + " | ".join(
        f"{k}: wall {med(wall[k]):.3f} cpu {med(cpu[k]):.3f} us/token" for k in runs)
        + f" | now/before wall {med(wall['laser now'])/med(wall['laser before']):.2f} cpu {med(cpu['laser now'])/med(cpu['laser before']):.2f}")
