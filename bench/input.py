"""Input pipeline throughput: images/s of each Grain pipeline for several worker counts.

    python -m bench.input [--workers 0,1,2,4] [--pipelines decode_flip,finetune,dino,lafs,eval]
                          [--augment-on host,device] [--num-images 2048] [--batch-size 64] [--seconds 6]
                          [--write-results]

Generates an InsightFace-layout .rec of 112x112 face-like JPEGs (lafs_jax.input.synthetic) in a
temporary folder, then, per (pipeline, workers), builds the pipeline, waits for its first batch
(worker start-up) and `--warmup-batches` more, and counts the batches it delivers in the following
`--seconds` (the evaluation pipeline runs over 50 back-to-back copies of the data so that one pass
outlasts the measurement). Prints one JSON
line per result. `images_per_s` counts source images (one sample of DINO/LAFS is many views:
`views_per_s`). `workers 0` runs in the main process with `--read-threads` reader threads (0 = a
single thread: one core), which is the per-core number. With --write-results the numbers and the
command go into the `## Input pipeline` section of bench/RESULTS.md.

Pipelines: decode_flip = decode + random flip + normalise (every other augmentation off);
finetune = the fine-tuning defaults (flip, RandAugment m=1, crop 0.9-1, jitter 0.1, erasing 0.5,
mixup 0.1); dino = 2x112 + 8x48 multi-crop; lafs = 2 + 8 (clean, augmented) 112-px view pairs;
eval = decode + normalise, padded batches.

`--augment-on host,device` (a comma list, like --workers) measures the training pipelines (finetune,
dino, lafs) both ways: 'host' makes the views in the pipeline (Pillow, float32 out); 'device' only
decodes (fine-tuning also flips and runs RandAugment) and hands uint8 images + stream indices to the
step, which makes the views (lafs_jax.input.device_augment; its cost is in bench/pretrain.py).
decode_flip and eval have no device variant and run once ('host'). `views_per_s` counts the views
the delivered samples make (on the host or on the device); `bytes_per_sample` is what one sample
puts in the batch that crosses to the device (all arrays of a batch / batch size).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from lafs_jax.input import pipelines as P
from lafs_jax.input import sources, synthetic

VIEWS = {"decode_flip": 1, "finetune": 1, "dino": 10, "lafs": 20, "eval": 1}
DEVICE_PIPELINES = ("finetune", "dino", "lafs")  # the ones with an augment_on='device' variant
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, however it is run
import results_md  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Input pipeline"


class Repeated:
    """`times` copies of a source back to back (a long evaluation pass without restarts). Picklable."""

    def __init__(self, source, times: int):
        self.source, self.times = source, times

    def __len__(self) -> int:
        return len(self.source) * self.times

    def __getitem__(self, i: int):
        return self.source[i % len(self.source)]


def build(name: str, source, dc, batch_size: int, seed: int = 0):
    kw = dict(batch_size=batch_size, process_index=0, process_count=1)
    if name == "decode_flip":
        f = dc.finetune
        f.random_resized_crop = f.randaugment = False
        f.color_jitter = f.random_erasing_prob = f.mixup_prob = 0.0
        return P.finetune_batches(source, dc, seed=seed, **kw)
    if name == "finetune":
        return P.finetune_batches(source, dc, seed=seed, **kw)
    if name == "dino":
        return P.dino_batches(source, dc, seed=seed, **kw)
    if name == "lafs":
        return P.lafs_batches(source, dc, seed=seed, **kw)
    if name == "eval":
        return P.eval_batches(Repeated(source, 50), dc, **kw)
    raise ValueError(f"unknown pipeline {name!r}; choose from {sorted(VIEWS)}")


def measure(name: str, source, workers: int, batch_size: int, seconds: float, read_threads: int,
            warmup_batches: int = 3, augment_on: str = "host") -> dict:
    dc = P.data_config()
    dc.workers = workers
    dc.read_threads = read_threads
    dc.worker_buffer_size = 2
    dc.augment_on = augment_on
    t0 = time.perf_counter()
    it = build(name, source, dc, batch_size)
    first = next(it)
    bytes_per_sample = sum(np.asarray(a).nbytes for a in first.values()) / batch_size
    startup = time.perf_counter() - t0
    for _ in range(warmup_batches):  # workers reach their steady state
        next(it)
    batches, elapsed, start = 0, 0.0, time.perf_counter()
    while True:
        try:
            next(it)
        except StopIteration:  # eval is one pass: start a new one, its start-up not timed
            elapsed += time.perf_counter() - start
            it.close()
            it = build(name, source, dc, batch_size)
            next(it)
            start = time.perf_counter()
            continue
        batches += 1
        if batches >= 2 and elapsed + time.perf_counter() - start >= seconds:
            break
    elapsed += time.perf_counter() - start
    it.close()
    images = batches * batch_size / elapsed
    return {"name": f"input/{name}", "pipeline": name, "augment_on": augment_on, "workers": workers,
            "read_threads": read_threads, "bytes_per_sample": int(bytes_per_sample),
            "batch_size": batch_size, "images_per_s": round(images, 1), "views_per_s": round(images * VIEWS[name], 1),
            "batch_ms": round(1000 * elapsed / batches, 1), "startup_s": round(startup, 2), "batches": batches,
            "warmup_batches": warmup_batches,
            "device": "cpu", "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def side_by_side(results: list[dict]) -> dict:
    """{(pipeline, workers): (host result, device result)} for the pairs measured in this run."""
    by = {(r["pipeline"], r["workers"], r["augment_on"]): r for r in results}
    return {(p, w): (by[(p, w, "host")], r) for (p, w, a), r in by.items()
            if a == "device" and (p, w, "host") in by}


def write_results(results: list[dict], command: str, note: str) -> None:
    """Replace (or add) the `## Input pipeline` section of bench/RESULTS.md; other sections stay."""
    rows = ["| pipeline | augment_on | workers | images/s | views/s | bytes/sample | batch ms | load avg |",
            "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['pipeline']} | {r['augment_on']} | {r['workers']} | {r['images_per_s']} | {r['views_per_s']} | "
             f"{r['bytes_per_sample']} | {r['batch_ms']} | {r['load_avg_1m']} |" for r in results]
    side = side_by_side(results)
    if side:
        rows += ["", "Host vs device, same run (ratio = device images/s / host images/s; bytes per sample crossing "
                 "to the device):", "",
                 "| pipeline | workers | host images/s | device images/s | ratio | host bytes/sample | "
                 "device bytes/sample | bytes ratio |", "|---|---|---|---|---|---|---|---|"]
        rows += [f"| {p} | {w} | {h['images_per_s']} | {d['images_per_s']} | {d['images_per_s'] / h['images_per_s']:.1f}x | "
                 f"{h['bytes_per_sample']} | {d['bytes_per_sample']} | "
                 f"{h['bytes_per_sample'] / d['bytes_per_sample']:.1f}x |" for (p, w), (h, d) in side.items()]
    section = "\n".join([
        SECTION, "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}; generated 112x112 JPEGs (about 4.4 KB each), batch "
        f"{results[0]['batch_size']}.", "",
        "Command:", "", "```", command, "```", "",
        *rows, "",
        note, ""])
    results_md.write_section(section, RESULTS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="0,1,2,4", help="comma-separated worker counts")
    parser.add_argument("--pipelines", default="decode_flip,finetune,dino,lafs,eval")
    parser.add_argument("--augment-on", default="host",
                        help="comma list of host, device (training pipelines; decode_flip and eval run on host)")
    parser.add_argument("--num-images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per result")
    parser.add_argument("--read-threads", type=int, default=0, help="reader threads per process (0 = one thread)")
    parser.add_argument("--warmup-batches", type=int, default=3, help="untimed batches after the first one")
    parser.add_argument("--data", default=None, help="an existing .rec prefix instead of generated images")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--note", default="", help="text appended to the RESULTS.md section")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.data
        if prefix is None:
            prefix = os.path.join(tmp, "train")
            per_class = 16
            synthetic.write_synthetic_rec(prefix, max(1, args.num_images // per_class), per_class, size=112)
        source = sources.FaceRecordSource(prefix)
        results = []
        for name in args.pipelines.split(","):
            modes = [m for m in args.augment_on.split(",") if m == "host" or name in DEVICE_PIPELINES] or ["host"]
            for workers in (int(w) for w in args.workers.split(",")):
                for augment_on in modes:
                    r = measure(name, source, workers, args.batch_size, args.seconds, args.read_threads,
                                args.warmup_batches, augment_on)
                    print(json.dumps(r), flush=True)
                    results.append(r)
    if args.write_results:
        write_results(results, "python -m bench.input " + " ".join(argv if argv is not None else sys.argv[1:]),
                      args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
