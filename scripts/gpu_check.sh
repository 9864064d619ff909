#!/usr/bin/env bash
# `make gpu-check`: the one-shot device check. Built for a bare one-GPU machine with Python,
# torch (CUDA), transformers, safetensors, numpy, msgpack, typer, rich, pyyaml, matplotlib, pytest and
# hypothesis, no network and no Ray. Steps:
#   1. install this checkout without touching dependencies (pip --no-deps --no-build-isolation -e .);
#   2. every Ray-free test on EXPERTRAY_DEVICE (default cuda), with Ray blocked from import;
#   3. `expertray bench gpu --json`;
# and writes one JSON with everything to $OUT/gpu_check.json (default build/gpu-check/). Exit status is
# nonzero when the install, a test or the benchmark failed; the JSON is written either way.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "${OUT:-build/gpu-check}"
DIR="$(cd "${OUT:-build/gpu-check}" && pwd)"
export EXPERTRAY_DEVICE="${EXPERTRAY_DEVICE:-cuda}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Where Ray is installed, prove the selection neither needs nor imports it (and the packages the GPU
# machine lacks): importing them fails as it would there.
export EXPERTRAY_BLOCK_IMPORTS="${EXPERTRAY_BLOCK_IMPORTS:-ray,prometheus_client,openai}"
export PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

echo "== install (no deps, no build isolation) with $PY"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$DIR/install.log" 2>&1
INSTALL_RC=$?
if [[ $INSTALL_RC -ne 0 ]] && grep -q externally-managed "$DIR/install.log"; then
  # A distribution's system Python (PEP 668): this throwaway machine is the point of the check.
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$DIR/install.log" 2>&1
  INSTALL_RC=$?
fi
tail -5 "$DIR/install.log"
if [[ $INSTALL_RC -ne 0 ]]; then
  echo "install failed (rc $INSTALL_RC): running from the checkout instead"
  # the installed layout (actors/ and policies/ as expertray.actors / expertray.policies) as symlinks
  rm -rf "$DIR/pkg" && mkdir -p "$DIR/pkg/expertray"
  ln -s "$PWD"/expertray/* "$DIR/pkg/expertray/"
  ln -s "$PWD/actors" "$DIR/pkg/expertray/actors" && ln -s "$PWD/policies" "$DIR/pkg/expertray/policies"
  export PYTHONPATH="$DIR/pkg:$PYTHONPATH"
fi

echo "== pytest -m 'not ray' on EXPERTRAY_DEVICE=$EXPERTRAY_DEVICE"
"$PY" -m pytest -m "not ray and not slow" -q -p block_imports -p no:cacheprovider \
  --junitxml="$DIR/pytest.xml" -o junit_family=xunit1 2>&1 | tee "$DIR/pytest.log" | tail -25
TEST_RC=${PIPESTATUS[0]}

echo "== expertray bench gpu"
"$PY" -c "import sys; from expertray.cli.main import main; sys.argv[0] = 'expertray'; main()" \
  bench gpu --json --out "$DIR/bench_gpu.json" >"$DIR/bench.log" 2>&1
BENCH_RC=$?
tail -5 "$DIR/bench.log"

"$PY" - "$DIR" "$INSTALL_RC" "$TEST_RC" "$BENCH_RC" "$START" <<'PYEOF'
"""Fold install/test/bench results into one JSON."""
import json, os, platform, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

import torch

d, install_rc, test_rc, bench_rc, start = Path(sys.argv[1]), *map(int, sys.argv[2:6])
tests = {}
if (d / "pytest.xml").exists():
    root = ET.parse(d / "pytest.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
    tests["skipped_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
bench = json.loads((d / "bench_gpu.json").read_text()) if (d / "bench_gpu.json").exists() else None
doc = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": os.environ.get("EXPERTRAY_DEVICE"),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "rc": {"install": install_rc, "pytest": test_rc, "bench": bench_rc}, "wall_s": round(time.time() - start, 1),
       "pytest": tests, "bench_gpu": bench}
(d / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
print(f"== wrote {d / 'gpu_check.json'}: rc {doc['rc']}, tests {({k: v for k, v in tests.items() if k != 'skipped_reasons'})}, {doc['wall_s']} s")
PYEOF
[[ $INSTALL_RC -eq 0 && $TEST_RC -eq 0 && $BENCH_RC -eq 0 ]]
