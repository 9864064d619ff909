"""Tools around the runtime: benchmarks, the simulator, trace analysis and replay, the synthetic workload and the
demo. Nothing in the serving path (core, actors, policies, serve) imports this package."""
