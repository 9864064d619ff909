"""The `expertray` command line: the root app and cluster commands (main.py) and the error handling and
progress output every command shares (common.py). Trace and sim commands live with their concern
(expertray/tools/trace/cli.py, expertray/tools/sim/cli.py), benchmarks in expertray/tools/bench/cli.py."""
