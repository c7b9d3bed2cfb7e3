"""bench/gpu.sh --dry-run: the unattended GPU benchmark script end to end on the CPU with tiny settings
(fine-tuning step with its profiler summary, JAX and PyTorch model steps in separate processes, the
`## GPU` report), writing only into a temporary folder."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_dry_run_writes_the_gpu_section(tmp_path):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    repo_results = os.path.join(ROOT, "bench", "RESULTS.md")
    before = open(repo_results).read()
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--only", "finetune,model", "--out", str(out),
                           "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text()
    for name in ("finetune", "model_jax", "model_torch"):
        assert f"{name} rc=0" in status, status
    lines = [json.loads(l) for l in (out / "lines.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == ["finetune", "model_jax", "model_torch"]
    ft = lines[0]
    assert ft["name"] == "finetune_part_fvit_tiny" and ft["num_classes"] == 64 and ft["per_device_batch"] == 2
    assert ft["step_ms"] > 0 and 0 < ft["mfu"] < 1 and ft["flops_per_step_per_device"] > 0
    assert ft["profile"]["kernels"] and ft["profile"]["source"] == "host"
    assert {l["framework"] for l in lines[1:]} == {"jax", "torch"}
    text = results.read_text()
    assert text.startswith("# Benchmark results") and "## GPU" in text and "DRY RUN" in text
    assert "| finetune_part_fvit_tiny (C=64, r=0.5) | float32 |" in text
    assert "| part_fvit_tiny | forward | 2 |" in text  # the JAX / PyTorch table
    assert "Dominant kernels" in text and "fine-tuning step MFU >= 45.0%" in text
    assert open(repo_results).read() == before  # a dry run never writes the repository's results
