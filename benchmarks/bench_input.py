"""Input pipeline throughput: Grain over ArrayRecord vs the reference's per-subject .npz.

    python benchmarks/bench_input.py --num-exams 64 --out bench_input.json

Both loaders read the same phantom exams at paper resolution (9 x 50 x 128 x 128):
  grain  whmae.data.dataset.pipeline.make_pipeline: uint8 images + plane_mask, batched, once with
         no reader threads (single-threaded) and once with reader threads.
  naive  what the authors' Dataset does per item: np.load of one compressed .npz per
         subject (float32 images, int labels, [H, W, S, T] as the reference stores them),
         astype float32 / int32, concatenate long- and short-axis planes, transpose to
         [S, T, H, W], min-max normalise; then batches are stacked (default collate).
Every file is read once before timing, so both loaders run from the page cache.
exams/s per core = exams / CPU seconds of the process (all its threads).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from whmae.data import quantize
from whmae.data.dataset import shards
from whmae.data.dataset.pipeline import make_pipeline, num_examples
from whmae.data.synthetic import phantom
from whmae.data.synthetic.generate import generate_dataset

VIEWS = ("la_2ch", "la_3ch", "la_4ch") + ("short_axis",) * 6


def write_reference_npz(config: phantom.PhantomConfig, num_exams: int, out_dir: Path) -> dict:
    """One np.savez_compressed per subject in the reference's layout; returns the
    quantisation error of our uint8 storage measured on the same float renders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    worst, squares, count = 0.0, 0.0, 0
    for index in range(num_exams):
        subject = phantom.sample_subject(config, index)
        planes = phantom.exam_planes(config, subject)
        rng = np.random.default_rng([config.seed, index, 1])  # make_exam's noise stream
        images, labels = phantom.render_planes(subject, planes, VIEWS, rng)  # [9, T, H, W]
        error = quantize.quantize_images(images).astype(np.float64) / 255
        error -= (images - images.min()) / (images.max() - images.min())
        worst, squares, count = (
            max(worst, np.abs(error).max()),
            squares + (error**2).sum(),
            count + error.size,
        )
        path = out_dir / f"{subject.eid}.npz"
        if not path.exists():
            hwst = lambda a: np.ascontiguousarray(a.transpose(2, 3, 0, 1))  # noqa: E731
            np.savez_compressed(
                path,
                sax=hwst(images[3:]),
                lax=hwst(images[:3]),
                seg_sax=hwst(labels[3:]),
                seg_lax=hwst(labels[:3]),
            )
    return {"max_abs_over_range": worst, "rms_over_range": float(np.sqrt(squares / count))}


def naive_item(path: Path) -> np.ndarray:
    """The reference's __getitem__ for the all-planes MAE: float32 [9, T, H, W] in [0, 1]."""
    data = np.load(path)
    sax, lax = data["sax"].astype(np.float32), data["lax"].astype(np.float32)
    seg_sax, seg_lax = data["seg_sax"].astype(np.int32), data["seg_lax"].astype(np.int32)
    del seg_sax, seg_lax  # decoded by the reference on every item, used only for segmentation
    images = np.concatenate([lax, sax], axis=2).transpose(2, 3, 0, 1)
    return (images - images.min()) / (images.max() - images.min())


def time_naive(
    paths: list[Path], batch_size: int, epochs: int, seed: int
) -> tuple[int, float, float]:
    rng = np.random.default_rng(seed)
    exams, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(epochs):
        order = rng.permutation(len(paths))
        for start in range(0, len(order), batch_size):
            batch = np.stack([naive_item(paths[i]) for i in order[start : start + batch_size]])
            exams += len(batch)
    return exams, time.perf_counter() - wall, time.process_time() - cpu


def time_grain(
    data_dir, batch_size: int, epochs: int, read_threads: int
) -> tuple[int, float, float]:
    it = make_pipeline(
        data_dir,
        batch_size=batch_size,
        num_epochs=epochs,
        drop_remainder=False,
        process_index=0,
        process_count=1,
        read_threads=read_threads,
    )
    exams, wall, cpu = 0, time.perf_counter(), time.process_time()
    for batch in it:
        assert batch["images"].dtype == np.uint8
        exams += len(batch["images"])
    return exams, time.perf_counter() - wall, time.process_time() - cpu


def warm(paths) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def best_of(repeats: int, fn, *args) -> dict:
    runs = [fn(*args) for _ in range(repeats)]
    exams, wall, cpu = min(runs, key=lambda r: r[1])
    return {
        "exams": exams,
        "seconds": round(wall, 3),
        "exams_per_s": round(exams / wall, 2),
        "exams_per_cpu_s": round(exams / cpu, 2),
        "all_runs_exams_per_s": [round(r[0] / r[1], 2) for r in runs],
    }


def phantom_records(work: Path, num_exams: int, size: int, frames: int, workers: int) -> Path:
    """A phantom ArrayRecord dataset under `work` (made once, then reused)."""
    data_dir = Path(work) / f"records-{num_exams}-{size}-{frames}"
    generate_dataset(
        data_dir, num_exams, size, frames, 0, max(1, num_exams // 16), workers, figure=False
    )
    return data_dir


def grain_throughput(
    data_dir, batch_size: int, epochs: int, repeats: int, read_threads: int
) -> dict:
    """Grain pipeline exams/s (best of `repeats`, from the page cache) and exams per CPU
    second (= per core) with `read_threads` reader threads (0: the calling thread only)."""
    warm(sorted(Path(data_dir).glob("*.array_record")))
    return best_of(repeats, time_grain, data_dir, batch_size, epochs, read_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/whmae_bench_input", help="scratch directory")
    parser.add_argument("--num-exams", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="passes per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--threads", type=int, default=4, help="Grain reader threads")
    parser.add_argument("--workers", type=int, default=2, help="processes writing the data")
    parser.add_argument("--out", default="bench_input.json")
    args = parser.parse_args()

    work = Path(args.work)
    config = phantom.PhantomConfig(size=args.size, frames=args.frames, seed=0)
    data_dir = phantom_records(work, args.num_exams, args.size, args.frames, args.workers)
    npz_dir = work / f"npz-{args.num_exams}-{args.size}-{args.frames}"
    quantisation = write_reference_npz(config, args.num_exams, npz_dir)
    record_paths = sorted(data_dir.glob("*.array_record"))
    # The naive loader reads the train split's subjects, like the pipeline.
    train = {
        e
        for m in shards.read_shard_markers(data_dir).values()
        for e in m["splits"]["train"]["eids"]
    }
    npz_paths = sorted(p for p in npz_dir.glob("*.npz") if p.stem in train)
    assert len(npz_paths) == num_examples(data_dir, "train")
    bytes_records, bytes_npz = warm(record_paths), warm(npz_paths)

    b, e, r = args.batch_size, args.epochs, args.repeats
    grain_single = grain_throughput(data_dir, b, e, r, 0)
    grain_threads = grain_throughput(data_dir, b, e, r, args.threads)
    naive = best_of(r, time_naive, npz_paths, b, e, 0)
    result = {
        "exam_shape": [9, args.frames, args.size, args.size],
        "train_exams": len(npz_paths),
        "batch_size": b,
        "cpu_cores": os.cpu_count(),
        "bytes_per_exam": {
            "array_record_uint8_all_splits": bytes_records // args.num_exams,
            "npz_float32": bytes_npz // len(npz_paths),
        },
        "grain_single_thread": grain_single,
        f"grain_{args.threads}_threads": grain_threads,
        "naive_npz": naive,
        "speedup_single_thread_vs_naive": round(
            grain_single["exams_per_s"] / naive["exams_per_s"], 2
        ),
        "speedup_per_cpu_second_vs_naive": round(
            grain_single["exams_per_cpu_s"] / naive["exams_per_cpu_s"], 2
        ),
        "uint8_quantisation_error": quantisation,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
