"""bench/embed_speed.py --dry-run in a subprocess: every framework (JAX, onnxruntime, PyTorch) prints a
batch-1 and a batch line with a positive speed."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embed_speed_dry_run_prints_every_framework():
    proc = subprocess.run([sys.executable, "-m", "bench.embed_speed", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    seen = {(l["framework"], l["mode"]) for l in lines}
    for fw in ("jax", "onnxruntime", "torch"):
        assert {(fw, "batch1"), (fw, "batch2")} <= seen, seen
    for l in lines:
        assert l["model"] == "part_fvit_tiny" and l["depth"] == 2 and l["dry_run"] is True
        assert l["img_per_s"] > 0 and l["over_torch"] > 0
        if l["mode"] == "batch1":
            assert l["median_ms"] > 0
