"""Throughput of `whmae-prepare` on UK Biobank-sized NIfTI exams, and where the time goes.

    python benchmarks/bench_prepare.py --exams 256 --workers 1 2 --out bench_prepare.json
    python benchmarks/bench_prepare.py --exams 256 --workers 1 2 --write-to /dev/shm
    python benchmarks/bench_prepare.py --exams 256 --workers 2 --cold --prefetch 0 1 4
    python benchmarks/bench_prepare.py --exams 8 --workers --profile   # where the CPU goes
    python benchmarks/bench_prepare.py --dicom 2 --workers             # DICOM decoding only

Exams are phantom renders at UK Biobank geometry: short axis 200 x 200 x 10 slices x 50
frames (1.85 mm pixels, 10 mm slices), three long-axis views 200 x 200 x 1 x 50, int16
images and uint8 segmentations, gzip-compressed by nibabel. `--unique` subjects are
rendered (slow at this size) and copied to `--exams` folders with distinct eids. Every
file is read once before timing (page cache; a network file system adds its own cost),
unless `--cold`.

Reports, per worker count and output folder, exams/s of the whole `prepare_dataset` run
(start the workers, read, preprocess, write shards, finalize; with several workers whole
shards of 16 exams are written in the workers: take --exams a multiple of 16 x workers,
or the last shards run on fewer workers; starting the workers costs ~1 s (0.75-1.2 s:
2 workers, 32 vs 256 exams), 8 % of a 120-exam run, so use a few hundred exams for the
rate of a long run) and its CPU seconds per exam (parent + workers; the kernel's part apart):
on a shared, busy machine wall time mostly measures the neighbours, CPU time the work.
Writing new files to a disk costs kernel time that depends on the file system and on how
much dirty page cache is waiting (measured here: 0.002-0.05 CPU-s per 7 MB file on this
machine's ext4); `--write-to /dev/shm` measures the same run without it. Also, in one
process and side by side, the CPU seconds per exam spent inflating the gzip streams with
each installed inflater, the whole preprocess_exam with glibc's default malloc vs
`worker_pool.keep_freed_memory`, and the 100k-exam plan: CPU seconds per exam x 100,000 /
cores. `--profile`: cProfile (CPU time) of reading, preprocessing, encoding and writing
`--exams` exams in one process. `--cold` drops the page cache before each run, so the
input comes from the disk; `--prefetch 0 1` then shows what reading the next exams'
files in the background (`whmae-prepare --prefetch`) hides of the disk's latency.
`--dicom N`: N subjects written as UK Biobank DICOM zips (tests/dicom_fixtures.py: 20209
with one series per short-axis slice plus the derived InlineVF series, 20208 with the three
long-axis series; uncompressed 16-bit, 1,150 files per exam at the geometry above), and per
exam, in one process: seconds to open the zips and parse every header
(`dicom_exam.open_exam`), to decode and assemble the four views, the whole
`preprocess_exam` from the zips, and `preprocess_exam` of the same exam's NIfTI twin.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ukbb_fixtures import make_exam_folder, write_phenotype_csv  # noqa: E402

from whmae.data.dataset import records, shards  # noqa: E402
from whmae.data.ingest import dicom_exam, nifti_io  # noqa: E402
from whmae.data.ingest.nifti_exam import preprocess_exam  # noqa: E402
from whmae.data.ingest.prepare import prepare_dataset  # noqa: E402


def build_cohort(store: Path, cohort: Path, exams: int, unique: int) -> Path:
    """`exams` exam folders in `cohort`: links to copies (in `store`, kept between runs) of
    `unique` rendered subjects. Returns their phenotype CSV (beside `cohort`)."""
    rows = {}
    for index in range(unique):
        eid = f"{5_000_000 + index}"
        if not (store / eid / "seg_la_4ch.nii.gz").is_file():
            make_exam_folder(store, eid, index, size=200, frames=50, num_slices=10, fov_mm=370)
    sources = [store / f"{5_000_000 + i}" for i in range(unique)]
    cohort.mkdir(parents=True)
    for k in range(exams):
        eid, source = f"{5_000_000 + k}", sources[k % unique]
        if not (store / eid).is_dir():
            shutil.copytree(source, store / eid)
        (cohort / eid).symlink_to(store / eid)  # exactly these exams, whatever else is stored
        rows[eid] = [float(k)] * 18
    csv_path = cohort.parent / "phenotypes.csv"
    write_phenotype_csv(csv_path, rows)
    return csv_path


def _inflaters() -> dict:
    """Every gzip inflater installed: name -> bytes -> bytes."""
    import zlib

    out = {"zlib": lambda data: zlib.decompress(data, wbits=31)}
    try:
        from isal import isal_zlib

        out["python-isal"] = lambda data: isal_zlib.decompress(data, wbits=31)
    except ImportError:
        pass
    try:
        import deflate

        out["libdeflate"] = deflate.gzip_decompress
    except ImportError:
        pass
    return out


_MALLOC_PROBE = """
import resource, sys, time
from pathlib import Path
from whmae.data.ingest.nifti_exam import preprocess_exam
from whmae.data.worker_pool import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
folders = sorted(Path(sys.argv[2]).iterdir())[: int(sys.argv[3])]
preprocess_exam(folders[0])
start = time.process_time()
for folder in folders:
    preprocess_exam(folder)
print((time.process_time() - start) / len(folders))
"""


def stage_seconds(root: Path, exams: int, repeats: int = 3) -> dict:
    """CPU seconds per exam, side by side in this run: inflating its .nii.gz files with
    each installed inflater, and the whole preprocess_exam (in fresh processes) with
    glibc's default malloc vs `worker_pool.keep_freed_memory`."""
    folder = root / "5000000"
    files = [path.read_bytes() for path in sorted(folder.glob("*.nii.gz"))]
    inflate = {}
    for name, inflater in _inflaters().items():
        times = []
        for _ in range(repeats):
            start = time.process_time()
            for data in files:
                inflater(data)
            times.append(time.process_time() - start)
        inflate[name] = round(min(times), 4)
    preprocess = {}
    for mode in ("default", "keep"):
        command = [sys.executable, "-c", _MALLOC_PROBE, mode, str(root), str(min(exams, 20))]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        preprocess[f"malloc_{mode}"] = round(float(out.stdout), 4)
    sizes = {p.name: p.stat().st_size for p in sorted(folder.glob("*.nii.gz"))}
    return {
        "inflate_backend": nifti_io.inflate_backend(),
        "gzip_inflate_cpu_s": inflate,
        "preprocess_exam_cpu_s": preprocess,
        "compressed_bytes": sizes,
    }


def profile(folders: list[Path], scratch: Path, top: int = 16) -> str:
    """cProfile (CPU time) of preprocess + encode (the workers' part) + write_shard."""

    def run():
        exams = (preprocess_exam(folder)[0] for folder in folders)
        encoded = (records.encode_exam(exam) for exam in exams)
        shards.write_shard(encoded, scratch / "profile", 0, 1)

    profiler = cProfile.Profile(time.process_time)
    profiler.runcall(run)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    return f"{len(folders)} exams\n" + text.getvalue()


def dicom_seconds(store: Path, subjects: int, repeats: int = 3) -> dict:
    """Per-exam wall and CPU seconds of the DICOM route (module docstring, `--dicom`)."""
    from dicom_fixtures import make_dicom_exam

    made = []
    for index in range(subjects):
        eid = f"{6_000_000 + index}"
        folder, twin = store / "dicom" / eid, store / "dicom_nifti" / eid
        if not (folder / f"{eid}_20208_2_0.zip").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            make_dicom_exam(store / "dicom", eid, index, size=200, frames=50, num_slices=10,
                            fov_mm=370, inline_vf=True)  # fmt: skip
        made.append((folder, twin))
    for folder, twin in made:  # page cache
        for path in [*folder.glob("*.zip"), *twin.glob("*.nii.gz")]:
            path.read_bytes()

    def timed(work) -> tuple[float, float]:
        best = (math.inf, math.inf)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            for folder, twin in made:
                work(folder, twin)
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
        return best[0] / len(made), best[1] / len(made)

    def decode(folder, twin):
        source = dicom_exam.open_exam(folder)
        for view in dicom_exam.VIEWS:
            source.read(view)

    stages = {
        "open_and_parse_headers": lambda folder, twin: dicom_exam.open_exam(folder),
        "open_and_decode_views": decode,
        "preprocess_exam_dicom": lambda folder, twin: preprocess_exam(dicom_exam.open_exam(folder)),
        "preprocess_exam_nifti_twin": lambda folder, twin: preprocess_exam(twin),
    }
    out = {"exams": len(made), "files_per_exam": None, "zip_bytes_per_exam": None}
    with (
        zipfile.ZipFile(next(made[0][0].glob("*_20209_2_0.zip"))) as sa,
        zipfile.ZipFile(next(made[0][0].glob("*_20208_2_0.zip"))) as la,
    ):
        out["files_per_exam"] = len(sa.namelist()) + len(la.namelist())
    out["zip_bytes_per_exam"] = sum(p.stat().st_size for p in made[0][0].glob("*.zip"))
    for name, work in stages.items():
        wall, cpu = timed(work)
        out[name] = {
            "seconds_per_exam": round(wall, 4),
            "cpu_seconds_per_exam": round(cpu, 4),
            "exams_per_second": round(1 / wall, 3),
        }
    return out


def drop_page_cache() -> None:
    """Write dirty pages, then drop the clean page cache (Linux, root): the next run reads
    its input from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root on Linux to drop the page cache ({e})") from None


def _cpu_seconds() -> tuple[float, float, float]:
    """(this process, its joined children, kernel part of both) CPU seconds."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return (*(u.ru_utime + u.ru_stime for u in usage), sum(u.ru_stime for u in usage))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exams", type=int, default=40)
    parser.add_argument("--unique", type=int, default=2, help="rendered subjects (slow)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--profile", action="store_true", help="print a cProfile by CPU time")
    parser.add_argument("--data", default=None, help="keep the NIfTI cohort here (reuse)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--flush-mb",
        nargs="*",
        default=["8"],
        help="runs with these WHMAE_WRITE_FLUSH_MB (MiB between flushes; 0: at the end only)",
    )
    parser.add_argument(
        "--write-to",
        nargs="*",
        default=[],
        help="also run with the dataset written under these folders (e.g. /dev/shm: "
        "without the disk's page-cache writeback, which the kernel bills to the writer)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        nargs="*",
        default=[1],
        help="runs with these read-ahead depths (exams; 0: off)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start every run with the page cache dropped (root): the input comes from disk",
    )
    parser.add_argument(
        "--dicom",
        type=int,
        default=0,
        help="also time the DICOM route on this many subjects written as UK Biobank zips",
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    store = Path(args.data) if args.data else scratch / "store"
    store.mkdir(parents=True, exist_ok=True)
    if args.dicom:
        dicom = dicom_seconds(store, args.dicom)
        print(json.dumps({"dicom": dicom}, indent=1))
        if not args.workers and not args.profile:  # DICOM figures only
            if args.out:
                Path(args.out).write_text(json.dumps({"dicom": dicom}, indent=1))
            shutil.rmtree(scratch)
            return
    root = scratch / "exams"
    start = time.perf_counter()
    csv_path = build_cohort(store, root, args.exams, args.unique)
    print(f"cohort of {args.exams} exams in {store} ({time.perf_counter() - start:.0f} s)")
    for folder in root.iterdir():  # warm the page cache (or rely on it in the probes below)
        for path in folder.glob("*.nii.gz"):
            path.read_bytes()
    results = {
        "exams": args.exams,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "stages": stage_seconds(root, args.exams),
        "runs": [],
    }
    if args.dicom:
        results["dicom"] = dicom
    print(json.dumps(results["stages"]))
    if args.profile:
        print(profile(sorted(root.iterdir())[: args.exams], scratch))
    runs = [
        (t, f, d, w)
        for t in [scratch, *map(Path, args.write_to)]
        for f in args.flush_mb
        for d in args.prefetch
        for w in args.workers
    ]
    for target, flush_mb, prefetch, workers in runs:
        os.environ[shards.FLUSH_ENV] = flush_mb  # read by write_shard (also in workers)
        out = Path(tempfile.mkdtemp(prefix="bench_prepare_out_", dir=target))
        if args.cold:
            drop_page_cache()
        cpu_before = _cpu_seconds()
        summary = prepare_dataset(
            root,
            csv_path,
            out,
            workers=workers,
            exams_per_shard=16,
            progress=False,
            prefetch=prefetch,
        )
        parent, children, kernel = (b - a for a, b in zip(cpu_before, _cpu_seconds(), strict=True))
        cpu = parent + children  # this process and its (joined) workers
        run = {
            "workers": workers,
            "written_to": str(target),
            "flush_mb": flush_mb,
            "prefetch": prefetch,
            "input": "disk" if args.cold else "page cache",
            "seconds": summary["seconds"],
            "exams_per_second": summary["exams_per_second"],
            "cpu_seconds_per_exam": round(cpu / args.exams, 4),
            "kernel_cpu_seconds_per_exam": round(kernel / args.exams, 4),
            "parent_cpu_seconds_per_exam": round(parent / args.exams, 4),
            "written": summary["written"],
            "shards": summary["shards_written"],
        }
        # On idle cores a worker spends about cpu / exams seconds per exam.
        run["plan_100k_hours_per_16_cores"] = round(cpu / args.exams * 100_000 / 16 / 3600, 2)
        results["runs"].append(run)
        print(json.dumps(run))
        shutil.rmtree(out)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
