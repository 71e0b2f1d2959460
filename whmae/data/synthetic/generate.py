"""`whmae-generate`: write a phantom dataset (ArrayRecord shards) with a summary.

    whmae-generate --out DIR --num-exams 1000 --size 128 --frames 50 --seed 0 \
        --num-shards 8 --workers 2 [--short-axis-fov-mm 140 --long-axis-fov-mm 210]

Shards are independent (exam indices split into contiguous blocks), so a pool of
spawned worker processes writes them in parallel, and a rerun resumes: complete
shards are kept, missing ones written, then dataset_info.json. A rerun with other
arguments is refused unless --overwrite (a dataset of an earlier record schema that this
code reads is reused: phantom labels cover every frame in both). Writes summary.json
(counts per split and per population group, phenotype ranges) and summary.png (9 planes
at ED and ES with label contours; phenotype histograms stacked by population group;
scatters) beside the data.

The fields of view default to `phantom.default_fov_mm` (210 mm at 128 pixels, tighter on
smaller images); the pixel spacing each exam records is FOV / size, per plane.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import sys
import time
from pathlib import Path

import numpy as np

from whmae.data.dataset import records, shards
from whmae.data.dataset.splits import SPLITS
from whmae.data.synthetic.phantom_heart import GROUP_NAMES, GROUPS
from whmae.files import write_text_atomic
from whmae.layout import (
    LV_BLOOD_POOL,
    NUM_CLASSES,
    NUM_PLANES,
    PHENOTYPE_COLUMNS,
    PLANE_NAMES,
    SHORT_AXIS_PLANES,
)

ARGS_FILE = "generate_args.json"
# Bumped whenever the same arguments would give other exams (2: population with pathology
# groups, per-view fields of view, heart-centred planning), so an older dataset is refused.
PHANTOM_VERSION = 2
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "summary.png"


class RefusedError(RuntimeError):
    """The output directory holds something else: a different dataset or foreign files."""


def shard_indices(num_exams: int, shard: int, num_shards: int) -> range:
    """Exam indices of one shard: a contiguous block, sizes differing by at most one."""
    return range(shard * num_exams // num_shards, (shard + 1) * num_exams // num_shards)


def _write_phantom_shard(out_dir, arguments: dict, shard: int, progress=None) -> dict:
    from whmae.data.synthetic.phantom import make_exam

    config = _phantom_config(arguments)
    indices = shard_indices(arguments["num_exams"], shard, arguments["num_shards"])
    on_exam = None if progress is None else (lambda exam: progress.put(1))
    exams = (make_exam(config, index) for index in indices)
    return shards.write_shard(exams, out_dir, shard, arguments["num_shards"], on_exam=on_exam)


def _phantom_config(arguments: dict):
    from whmae.data.synthetic.phantom import PhantomConfig

    return PhantomConfig(
        size=arguments["size"],
        frames=arguments["frames"],
        seed=arguments["seed"],
        short_axis_fov_mm=arguments["short_axis_fov_mm"],
        long_axis_fov_mm=arguments["long_axis_fov_mm"],
    )


def _worker(job) -> dict:
    return _write_phantom_shard(*job)


def _prepare_directory(out_dir: Path, arguments: dict, overwrite: bool) -> str:
    """'complete', 'resume' or 'new'; refuses a directory holding anything else."""
    args_path = out_dir / ARGS_FILE
    ours = ("*.array_record", "shard-*.json", ".*.tmp", ".*.tmp.*", records.INFO_FILE, SUMMARY_FILE)
    if overwrite and out_dir.is_dir():
        for pattern in (*ours, FIGURE_FILE, ARGS_FILE):
            for path in out_dir.glob(pattern):
                path.unlink()
    if args_path.is_file():
        previous = json.loads(args_path.read_text())
        if previous.get("schema_version") in records.READABLE_SCHEMAS:
            # Phantom records of an earlier readable schema hold the same data (every frame
            # of a labelled plane is labelled in both): reused, not refused.
            previous["schema_version"] = arguments["schema_version"]
        if previous != arguments:
            changed = {
                k: (previous.get(k), v) for k, v in arguments.items() if previous.get(k) != v
            }
            raise RefusedError(
                f"{out_dir} holds a dataset generated with other arguments "
                f"(argument: (on disk, now) = {changed}); refusing to mix them. "
                "Use another --out, or --overwrite to replace it."
            )
        return "complete" if (out_dir / records.INFO_FILE).is_file() else "resume"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise RefusedError(
            f"{out_dir} is not empty and was not written by whmae-generate "
            f"(no {ARGS_FILE}); refusing to write into it. Use --overwrite to force."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args_path, json.dumps(arguments, indent=1))
    return "new"


def _run_shards(out_dir: Path, arguments: dict, shards: list[int], workers: int, bar) -> None:
    if workers <= 1 or len(shards) <= 1:
        tick = _TickQueue(bar)
        for shard in shards:
            _write_phantom_shard(out_dir, arguments, shard, tick)
        return
    context = multiprocessing.get_context("spawn")  # safe with JAX/threads in the parent
    with context.Manager() as manager, context.Pool(min(workers, len(shards))) as pool:
        ticks = manager.Queue()
        result = pool.map_async(_worker, [(out_dir, arguments, s, ticks) for s in shards])
        while not result.ready():
            try:
                bar.update(ticks.get(timeout=0.2))
            except queue.Empty:
                pass
        result.get()  # re-raises a worker's error
        while not ticks.empty():
            bar.update(ticks.get())


class _TickQueue:
    """The `put` side of a progress queue, for writing in this process."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def generate_dataset(
    out_dir,
    num_exams: int,
    size: int = 128,
    frames: int = 50,
    seed: int = 0,
    num_shards: int = 1,
    workers: int = 1,
    *,
    short_axis_fov_mm: float | None = None,
    long_axis_fov_mm: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    figure: bool = True,
) -> dict:
    """Write (or finish) a phantom dataset in `out_dir`; returns the summary dict.

    summary["status"] says what happened: "new", "resume" or "complete" (nothing to do).
    Raises RefusedError if `out_dir` holds anything else (unless overwrite).
    short_axis_fov_mm, long_axis_fov_mm: fields of view (mm); None: the default for `size`
    (`phantom.default_fov_mm`). The resolved values are recorded in generate_args.json.
    """
    from tqdm import tqdm

    from whmae.data.synthetic.phantom import default_fov_mm

    if num_exams < 1 or num_shards < 1 or num_shards > num_exams:
        raise ValueError(f"need 1 <= num_shards ({num_shards}) <= num_exams ({num_exams})")
    if size < 8 or frames < 1:
        raise ValueError(f"size must be >= 8 and frames >= 1, got {size}, {frames}")
    fovs = {"short_axis": short_axis_fov_mm, "long_axis": long_axis_fov_mm}
    for view, fov in fovs.items():
        if fov is not None and not fov > 0:
            raise ValueError(f"{view}_fov_mm must be > 0, got {fov}")
    out_dir = Path(out_dir)
    arguments = {
        "generator": "whmae.data.synthetic.phantom",
        "phantom_version": PHANTOM_VERSION,
        "schema_version": records.SCHEMA_VERSION,
        "num_exams": num_exams,
        "size": size,
        "frames": frames,
        "seed": seed,
        "num_shards": num_shards,
        **{
            f"{view}_fov_mm": float(default_fov_mm(view, size) if fov is None else fov)
            for view, fov in fovs.items()
        },
    }
    status = _prepare_directory(out_dir, arguments, overwrite)
    if status == "complete" and (out_dir / SUMMARY_FILE).is_file():
        return {**json.loads((out_dir / SUMMARY_FILE).read_text()), "status": status}
    done = set(shards.read_shard_markers(out_dir))
    todo = [s for s in range(num_shards) if s not in done]
    todo_exams = sum(len(shard_indices(num_exams, s, num_shards)) for s in todo)
    start = time.perf_counter()
    with tqdm(total=todo_exams, unit="exam", desc="phantom exams", disable=not progress) as bar:
        _run_shards(out_dir, arguments, todo, workers, bar)
    seconds = time.perf_counter() - start
    if status != "complete" or not (out_dir / records.INFO_FILE).is_file():
        shards.finalize_dataset(out_dir, {**arguments, "workers": workers})
    summary = summarize(out_dir)
    summary.update(
        status=status,
        shards_written=len(todo),
        exams_written=todo_exams,
        seconds=round(seconds, 3),
        exams_per_second=round(todo_exams / seconds, 3) if todo_exams else None,
    )
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    if figure:
        save_summary_figure(out_dir, out_dir / FIGURE_FILE)
    return summary


def exam_group(eid: str, seed: int) -> str:
    """Population group of a phantom exam ("phantom-<seed>-<index>"; "unknown" otherwise),
    redrawn from its seed and index (cheap: no heart is built)."""
    from whmae.data.synthetic.phantom import PhantomConfig, sample_population

    prefix, _, index = eid.rpartition("-")
    if prefix != f"phantom-{seed}" or not index.isdigit():
        return "unknown"
    return sample_population(PhantomConfig(seed=seed), int(index))[0]


def phenotype_table(out_dir) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(eids, splits, phenotypes float64 [N, 18] (nan: missing), population groups) of
    every exam of a finished dataset, from its shard markers."""
    info = records.read_dataset_info(out_dir)
    seed = int(info.get("provenance", {}).get("seed", 0))
    eids, splits, rows = [], [], []
    for marker in shards.read_shard_markers(out_dir).values():
        for split, entry in marker["splits"].items():
            eids += entry["eids"]
            splits += [split] * len(entry["eids"])
            rows += entry["phenotypes"]
    values = np.array(rows, np.float64).reshape(-1, len(PHENOTYPE_COLUMNS))
    return eids, splits, values, [exam_group(eid, seed) for eid in eids]


def summarize(out_dir) -> dict:
    """Counts per split and population group, shapes, bytes on disk and phenotype ranges
    of a finished dataset."""
    info = records.read_dataset_info(out_dir)
    _, splits, values, groups = phenotype_table(out_dir)
    phenotypes = {}
    for j, column in enumerate(PHENOTYPE_COLUMNS):
        col = values[:, j][~np.isnan(values[:, j])]
        stats = {"mean": col.mean(), "min": col.min(), "max": col.max()} if col.size else {}
        phenotypes[column] = {"count": int(col.size), **{k: float(v) for k, v in stats.items()}}
    order = [g for g in GROUP_NAMES if g in groups] + sorted(set(groups) - set(GROUP_NAMES))
    by_split = {s: {g: 0 for g in order} for s in SPLITS}
    for split, group in zip(splits, groups, strict=True):
        by_split[split][group] += 1
    provenance = info.get("provenance", {})
    return {
        "out_dir": str(out_dir),
        "num_examples": info["num_examples"],
        "splits": {s: info["splits"][s]["num_examples"] for s in SPLITS},
        "groups": {g: groups.count(g) for g in order},
        "groups_by_split": by_split,
        "image_shape": info["image_shape"],
        "image_dtype": "uint8",
        "fov_mm": {view: provenance.get(f"{view}_fov_mm") for view in ("short_axis", "long_axis")},
        "bytes_on_disk": info["bytes"],
        "phenotypes": phenotypes,
    }


def end_systole(labels: np.ndarray) -> int:
    """ES frame: least LV blood pool over the short-axis planes. labels [9, T, H, W]."""
    short_axis = labels[list(SHORT_AXIS_PLANES)] == LV_BLOOD_POOL
    return int(np.argmin(short_axis.sum((0, 2, 3))))


GROUP_COLOURS = {
    "healthy": "#4c72b0",
    "dcm": "#c44e52",
    "hcm": "#dd8452",
    "rv": "#55a868",
    "atrial": "#8172b3",
    "unknown": "#999999",
}
# Scatters beside the histograms: (x, y) phenotype columns.
SCATTERS = (
    ("LVEDV (mL)", "LVEF (%)"),
    ("LVEDV (mL)", "LVM (g)"),
    ("LAV max (mL)", "LAEF (%)"),
)


def save_summary_figure(out_dir, path) -> None:
    """One exam's 9 planes at ED and ES with label contours, then every phenotype's
    histogram stacked by population group, and scatters of correlated phenotypes."""
    import grain
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global state
    from matplotlib.patches import Patch

    info = records.read_dataset_info(out_dir)
    split = next(s for s in SPLITS if info["splits"][s]["num_examples"])
    source = grain.sources.ArrayRecordDataSource(records.split_paths(out_dir, split, info))
    exam = records.decode_exam(source[0], ("eid", "images", "labels", "pixel_spacing"))
    frames = {"ED": 0, "ES": end_systole(exam["labels"])}
    eids, _, values, groups = phenotype_table(out_dir)
    group_of = dict(zip(eids, groups, strict=True))
    spacing = exam["pixel_spacing"][:, 0]

    # Fixed grids rather than constrained layout: 5x faster for these 41 axes.
    fig = Figure(figsize=(20, 13))
    fig.suptitle(
        f"exam {exam['eid']} ({split}, {group_of.get(exam['eid'], 'unknown')}): planes at ED "
        f"(frame 0) and ES (frame {frames['ES']}); pixel spacing long axis "
        f"{spacing[0]:.2f} mm, short axis {spacing[-1]:.2f} mm"
    )
    axes = fig.add_gridspec(
        2, NUM_PLANES, top=0.94, bottom=0.6, left=0.03, right=0.97, wspace=0.05, hspace=0.12
    ).subplots()
    colours = ["red", "yellow", "cyan", "lime", "magenta"]
    for row, (phase, t) in enumerate(frames.items()):
        for plane in range(NUM_PLANES):
            ax = axes[row, plane]
            ax.imshow(exam["images"][plane, t], cmap="gray", vmin=0, vmax=255)
            for cls, colour in zip(range(1, NUM_CLASSES), colours, strict=True):
                mask = exam["labels"][plane, t] == cls
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"{PLANE_NAMES[plane]} {phase}", fontsize=9)
            ax.set_axis_off()

    order = [g for g in GROUP_COLOURS if g in groups]
    members = {g: np.array([x == g for x in groups]) for g in order}
    legend = [
        Patch(color=GROUP_COLOURS[g], label=f"{_group_label(g)} ({members[g].sum()})")
        for g in order
    ]
    fig.text(
        0.5, 0.555, f"phenotypes of all {len(values)} exams by population group",
        ha="center", fontsize=13,
    )  # fmt: skip
    fig.legend(handles=legend, loc="center", bbox_to_anchor=(0.5, 0.53), ncol=len(order),
               fontsize=10, frameon=False)  # fmt: skip
    grid = fig.add_gridspec(
        3, 7, top=0.5, bottom=0.04, left=0.04, right=0.98, hspace=0.45, wspace=0.3
    )
    for j, column in enumerate(PHENOTYPE_COLUMNS):
        ax = fig.add_subplot(grid[j // 6, j % 6])
        present = ~np.isnan(values[:, j])
        stacks = [values[members[g] & present, j] for g in order]
        if present.any():
            fills = [GROUP_COLOURS[g] for g in order]
            ax.hist(stacks, bins=24, stacked=True, histtype="stepfilled", color=fills)
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
    for row, (x_name, y_name) in enumerate(SCATTERS):
        ax = fig.add_subplot(grid[row, 6])
        x, y = (values[:, PHENOTYPE_COLUMNS.index(name)] for name in (x_name, y_name))
        for g in order:
            ax.scatter(x[members[g]], y[members[g]], s=5, color=GROUP_COLOURS[g], alpha=0.7)
        ok = ~(np.isnan(x) | np.isnan(y))
        r = np.corrcoef(x[ok], y[ok])[0, 1] if ok.sum() > 2 else float("nan")
        ax.set_title(f"{y_name} vs {x_name.rsplit(' (', 1)[0]} (r = {r:.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=80)


def _group_label(group: str) -> str:
    return GROUPS[group].label if group in GROUPS else group


def format_summary(summary: dict) -> str:
    mib = summary["bytes_on_disk"] / 2**20
    per_exam = summary["bytes_on_disk"] / max(summary["num_examples"], 1) / 2**20
    lines = [
        f"dataset {summary['out_dir']} ({summary['status']})",
        f"  exams {summary['num_examples']}: "
        + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()),
        f"  images uint8 {summary['image_shape']} (planes, frames, rows, cols)",
        "  groups: " + ", ".join(f"{k} {v}" for k, v in summary.get("groups", {}).items()),
    ]
    fov, size = summary.get("fov_mm", {}), (summary["image_shape"] or [0])[-1]
    if size and all(fov.get(view) for view in ("short_axis", "long_axis")):
        lines.append(
            "  field of view: "
            + ", ".join(
                f"{view.replace('_', '-')} {fov[view]:g} mm ({fov[view] / size:.2f} mm/pixel)"
                for view in ("short_axis", "long_axis")
            )
        )
    lines += [
        f"  on disk {mib:.1f} MiB ({per_exam:.2f} MiB per exam)",
    ]
    if summary.get("exams_written"):
        lines.append(
            f"  wrote {summary['exams_written']} exams in {summary['seconds']:.1f} s "
            f"({summary['exams_per_second']:.2f} exams/s)"
        )
    lines.append(f"  {'phenotype':<14} {'mean':>9} {'min':>9} {'max':>9}")
    for column, s in summary["phenotypes"].items():
        if s["count"]:
            lines.append(f"  {column:<14} {s['mean']:9.2f} {s['min']:9.2f} {s['max']:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-generate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--num-exams", type=int, required=True)
    parser.add_argument("--size", type=int, default=128, help="rows = cols of every plane")
    parser.add_argument("--frames", type=int, default=50, help="frames per cardiac cycle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--short-axis-fov-mm",
        type=float,
        default=None,
        help="short-axis field of view in mm (default: phantom.default_fov_mm for --size)",
    )
    parser.add_argument(
        "--long-axis-fov-mm",
        type=float,
        default=None,
        help="long-axis field of view in mm (default: phantom.default_fov_mm for --size)",
    )
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="writer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)
    try:
        summary = generate_dataset(
            args.out,
            args.num_exams,
            args.size,
            args.frames,
            args.seed,
            args.num_shards,
            args.workers,
            short_axis_fov_mm=args.short_axis_fov_mm,
            long_axis_fov_mm=args.long_axis_fov_mm,
            overwrite=args.overwrite,
        )
    except (RefusedError, ValueError) as e:
        print(f"whmae-generate: {e}", file=sys.stderr)
        return 2
    if summary["status"] == "complete":
        print(f"{args.out} is already complete with these arguments; nothing to do.")
    print(format_summary(summary))
    print(f"  wrote {Path(args.out) / SUMMARY_FILE} and {Path(args.out) / FIGURE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
