"""bench/aot.py: the tiny fine-tuning step (Partial FC included) compiled ahead of time by XLA's TPU
compiler for a v5e:2x2 pod slice, in a subprocess whose environment has libtpu (requirements-tpu-aot.txt
installed into .tpu-aot/, as .ci/run does); this process keeps its CPU backend."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_NO_LIBTPU = 3
GIB = 2 ** 30
PRETRAINED = ["--config.init.backbone=/not/read/teacher_backbone", "--config.optim.layer_decay=0.58"]
# one ViT block and the landmark CNN frozen (its backward not compiled): the TPU compile of the batch that
# fits takes 10 s instead of 32 s on 2 cores; the sharding and memory accounting under test are the same
SMALLER = ["--config.model.depth=1", "--config.freeze_landmark_cnn=True"]


@pytest.fixture(scope="module")
def tiny_v5e():
    """One run: per-chip batch 8 (the recipe's 32 over 4 chips) and an impossible 100,000, set up as the
    large recipes are, fine-tuning a pretrained backbone with layer decay 0.58 (the directory is not read),
    on a smaller tiny model (SMALLER)."""
    cmd = [sys.executable, "-m", "bench.aot", "--config", "configs/finetune.py:tiny", "--topology", "v5e:2x2",
           "--num-classes", "30", "--per-chip-batch", "8,100000", *PRETRAINED, *SMALLER]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode == EXIT_NO_LIBTPU:
        pytest.skip(f"libtpu cannot be loaded in the compile subprocess: {proc.stderr.strip()[-500:]}")
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    return proc, lines


def test_tiny_finetune_step_compiles_for_v5e_2x2_with_w_split_over_the_chips(tiny_v5e):
    proc, lines = tiny_v5e
    assert len(lines) == 3, proc.stdout + proc.stderr[-3000:]
    ok = lines[0]
    for key in ("recipe", "topology", "chips", "global_batch", "per_chip_batch", "per_chip_bytes", "hbm_bytes", "fits",
                "flops_per_chip_step", "param_bytes_per_chip", "compile_s", "largest_unsplit"):
        assert key in ok, key
    assert (ok["recipe"], ok["topology"], ok["chips"], ok["device_kind"]) == (
        "configs/finetune.py:tiny", "v5e:2x2", 4, "TPU v5 lite")
    assert ok["overrides"] == PRETRAINED + SMALLER
    assert (ok["global_batch"], ok["per_chip_batch"], ok["num_classes"]) == (32, 8, 30)
    assert ok["precision"] == "bfloat16" and ok["fits"] is True and ok["hbm_bytes"] == 16 * GIB
    assert ok["per_chip_bytes"] == ok["argument_bytes"] + ok["output_bytes"] + ok["temp_bytes"] - ok["alias_bytes"]
    assert 0 < ok["per_chip_bytes"] < GIB
    assert ok["alias_bytes"] > 0  # the donated state is reused for the new one
    assert ok["argument_bytes"] >= ok["state_bytes_per_chip"] > ok["param_bytes_per_chip"] > 0
    assert ok["flops_per_chip_step"] > 1e8  # a forward + backward of 8 images, not an empty program
    # W [32 rows = 30 classes padded to 4 chips, D 96] and its two AdamW moments: a quarter on each chip
    c = ok["centers"]
    assert c["shape"] == [32, 96] and c["arrays"] == 3 and c["split_over_every_chip"] is True
    assert c["bytes"] == 32 * 96 * 4 and c["bytes_per_chip"] * 4 == c["bytes"]
    assert c["arrays_bytes_per_chip"] == 3 * c["bytes_per_chip"]
    # what is held whole on every chip is named, largest first (the tiny backbone is replicated by default)
    sizes = [u["bytes"] for u in ok["largest_unsplit"]]
    assert sizes and sizes == sorted(sizes, reverse=True) and all("path" in u for u in ok["largest_unsplit"])
    assert not any(u["path"].endswith("centers") for u in ok["largest_unsplit"])


def test_impossible_batch_reports_fits_false_and_a_nonzero_status(tiny_v5e):
    proc, lines = tiny_v5e
    assert len(lines) == 3, proc.stdout + proc.stderr[-3000:]
    bad, search = lines[1], lines[2]
    assert (bad["per_chip_batch"], bad["global_batch"], bad["fits"]) == (100000, 400000, False)
    exhausted = bad.get("resource_exhausted")
    if exhausted:  # the TPU compiler refused it: the sizes come from its message
        assert exhausted["used_bytes"] > exhausted["capacity_bytes"] > 0
    else:
        assert bad["per_chip_bytes"] > bad["hbm_bytes"]
    assert proc.returncode == 1
    assert "does not fit v5e:2x2" in proc.stderr and "per-chip batch 100000" in proc.stderr
    assert f"{16 * GIB:,} bytes" in proc.stderr
    assert search["kind"] == "aot_search" and search["largest_fitting_per_chip_batch"] == 8


def test_results_section_keeps_its_prose_and_shows_flops_per_image(tmp_path):
    """--write-results merges a line into bench/RESULTS.md's section: the prose under the table stays
    when the new run brings no --note, and GFLOP/image (FLOPs per chip and step over the per-chip batch)
    shows where XLA rematerialises. (bench.aot's writer, run in a subprocess as the benchmarks run.)"""
    path = str(tmp_path / "RESULTS.md")
    open(path, "w").write("# Benchmark results\n\n## Other\n\nkept\n")
    line = {"kind": "aot", "recipe": "configs/x.py", "overrides": [], "task": "finetune", "topology": "v5e:2x2",
            "chips": 4, "precision": "bfloat16", "global_batch": 32, "per_chip_batch": 8, "num_classes": 30,
            "hbm_bytes": 16 * GIB, "fits": True, "param_bytes_per_chip": 2 ** 20, "largest_unsplit": [],
            "per_chip_bytes": GIB, "flops_per_chip_step": 8e12, "compile_s": 1.0}
    bigger = dict(line, global_batch=64, per_chip_batch=16, flops_per_chip_step=2e13)
    script = (f"import json; from bench import aot; p = {path!r}; "
              f"aot.write_results([json.loads({json.dumps(line)!r})], note='Read this first.', path=p); "
              f"aot.write_results([json.loads({json.dumps(bigger)!r})], path=p); print(json.dumps(aot.existing_note(p)))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == "Read this first."
    text = open(path).read()
    assert text.count("Read this first.") == 1 and "## Other\n\nkept" in text
    rows = [l for l in text.split("Every compile:")[1].splitlines() if l.startswith("| configs/x.py")]
    assert [r.split(" | ")[11] for r in rows] == ["1000.0", "1250.0"]  # 8e12 / 8, 2e13 / 16 (GFLOP)


def test_results_section_brackets_the_largest_per_chip_batch(tmp_path):
    """The section's first table gives, per recipe / overrides / topology / C, the batches compiled and
    the largest per-chip batch that fits: a bracket when a larger one did not, '>=' when none larger was
    compiled, '<' when none fits; the largest that fits without rematerialising (GFLOP/image within 2 % of
    the lowest); GFLOP/image at the smallest and the largest fitting batch."""
    path = str(tmp_path / "RESULTS.md")
    base = {"kind": "aot", "recipe": "configs/x.py", "overrides": [], "task": "pretrain", "topology": "v5e:2x4",
            "chips": 8, "precision": "bfloat16", "hbm_bytes": 16 * GIB, "param_bytes_per_chip": 2 ** 20,
            "largest_unsplit": [], "per_chip_bytes": GIB, "compile_s": 1.0}
    lines = [dict(base, global_batch=8 * b, per_chip_batch=b, fits=fits, flops_per_chip_step=f * b * 1e9)
             for b, fits, f in [(48, True, 350.0), (32, True, 350.0), (56, False, 364.0), (52, True, 353.5)]]
    lines.append(dict(base, topology="v5e:4x4", chips=16, global_batch=16 * 64, per_chip_batch=64, fits=True,
                      flops_per_chip_step=64 * 88.8e9))
    lines.append(dict(base, overrides=["--config.x=1"], global_batch=8 * 32, per_chip_batch=32, fits=False,
                      flops_per_chip_step=None))
    lines += [dict(base, recipe="configs/y.py", global_batch=8 * b, per_chip_batch=b, fits=True,
                   flops_per_chip_step=f * b * 1e9) for b, f in [(64, 88.8), (80, 94.8), (128, 102.0)]]
    script = (f"import json; from bench import aot; "
              f"aot.write_results(json.loads({json.dumps(json.dumps(lines))}), path={path!r})")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = open(path).read().split("Every compile:")[0]
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in search.splitlines() if l.startswith("| configs/")]
    assert rows == [
        ["configs/x.py", "-", "v5e:2x4", "-", "32, 48, 52, 56 (no)", "52-55", "52", "350.0 -> 353.5"],
        ["configs/x.py", "-", "v5e:4x4", "-", "64", ">= 64", "-", "88.8 -> 88.8"],  # one batch: unknown
        ["configs/x.py", "x=1", "v5e:2x4", "-", "32 (no)", "< 32", "-", "- -> -"],
        # rematerialising: 80 and 128 fit at +6.8 / +14.9 % GFLOP per image
        ["configs/y.py", "-", "v5e:2x4", "-", "64, 80, 128", ">= 128", "64", "88.8 -> 102.0"],
    ]
