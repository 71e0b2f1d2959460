"""What `whmae-pretrain` and `whmae-finetune` share around the training loop: flags,
help, checks that run before anything heavy starts, and one-line errors.

- `--help` (also -h, --helpshort, --helpfull) prints the command's usage, its flags and
  every config field with its default (of `--config` when given, else the command's
  default config file), and exits 0.
- A config file that does not load and a `--config.FIELD` that the config lacks are
  named in one line (with the closest field), before JAX starts.
- `validate_train_config` and `check_data_dir` name the offending field or path.
- `one_line_errors` turns the errors a person can fix (usage, a full disk, damaged
  checkpoints, a non-finite loss) into one `error: ...` line and exit status 1. Set
  WHMAE_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from etils import epath

HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
GENERATE_HINT = "whmae-generate --out {dir} --num-exams 24 --size 32 --frames 10"
REPO_ROOT = Path(__file__).resolve().parents[1]


class UsageError(ValueError):
    """A mistake in the command line or config, reported in one line."""


def define_training_flags(config_help: str) -> None:
    """--config, --workdir, --distributed (idempotent: pretrain and finetune share them)."""
    from absl import flags
    from ml_collections import config_flags

    from whmae.train import distributed

    if "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
    flags.DEFINE_enum(
        "distributed",
        "auto",
        distributed.MODES,
        "Multi-process start-up: auto (from the environment), on (force), off.",
    )
    flags.mark_flags_as_required(["config", "workdir"])


def run_absl(run: Callable[[list[str]], None], argv: list[str]) -> None:
    """absl's app.run(run) on `argv` (program name first), also when called again in one
    process (tests): flags parse afresh, and ml_collections finds the `--config.*`
    overrides in sys.argv, so that is `argv` meanwhile."""
    from absl import app, flags

    saved = sys.argv
    sys.argv = list(argv)
    try:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # overrides registered by an earlier parse
        app.run(run, argv=list(argv))
    finally:
        sys.argv = saved


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in `argv` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _config_path(spec: str) -> tuple[Path, str | None]:
    path, _, arg = spec.partition(":")
    return Path(path), (arg or None)


def load_config_file(spec: str) -> Any:
    """The ConfigDict of `path.py[:arg]` (as ml_collections loads it), or a UsageError."""
    path, arg = _config_path(spec)
    if not path.exists():
        raise UsageError(f"--config: no such file {str(path)!r} (from {spec!r})")
    if not path.is_file():
        raise UsageError(f"--config: {str(path)!r} is not a file (from {spec!r})")
    try:
        module_spec = importlib.util.spec_from_file_location("_whmae_config_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure: the config does not load
        raise UsageError(f"--config {spec!r} does not load: {type(e).__name__}: {e}") from e


def _keys(node: Any) -> list[str]:
    return list(node.keys()) if isinstance(node, Mapping) or hasattr(node, "keys") else []


def check_overrides(argv: Sequence[str], config: Any) -> None:
    """Every `--config.A.B[=V]` in `argv` names a field of `config`, else a UsageError."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in name.split("."):
            keys = _keys(node)
            if part in keys:
                node = node[part]
                walked.append(part)
                continue
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                walked.append(part)
                continue
            where = "config" + "".join(f".{w}" for w in walked)
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean --{where}.{close[0]}?" if close else ""
            fields = f" (it has: {', '.join(keys)})" if keys and not close else ""
            raise UsageError(f"--config.{name}: {where} has no field {part!r}{fields}{hint}")


def _flatten(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    keys = _keys(node)
    if not keys:
        yield prefix, node
        return
    for key in keys:
        yield from _flatten(node[key], f"{prefix}.{key}")


def help_text(doc: str, config_spec: str, config_flag_help: str) -> str:
    """Usage, flags and the config's fields with defaults."""
    lines = [doc.strip(), "", "flags:"]
    lines += [
        f"  --config=FILE[:VARIANT]  {config_flag_help} (required)",
        "  --workdir=DIR            Checkpoints, metrics and TensorBoard go here. (required)",
        "  --distributed=auto|on|off  Multi-process start-up (default: auto).",
        "  --help                   This text.",
        "",
    ]
    try:
        config = load_config_file(config_spec)
    except UsageError as e:
        lines.append(f"(config fields not listed: {e})")
        return "\n".join(lines) + "\n"
    lines.append(f"config fields of {config_spec} with their defaults (--config.FIELD=VALUE):")
    for name, value in _flatten(config, "--config"):
        lines.append(f"  {name}={value!r}")
    return "\n".join(lines) + "\n"


def default_config_spec(argv: Sequence[str], default: str) -> str:
    """`--config` from argv, else `default` (found beside the package when not here)."""
    given = flag_value(argv, "config")
    if given:
        return given
    path, arg = _config_path(default)
    if not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    return f"{path}:{arg}" if arg else str(path)


def preflight(argv: Sequence[str], *, doc: str, default_config: str, config_help: str) -> None:
    """Before absl parses `argv` (program name first): help (exit 0), then the config file
    and override names (one-line exit 1)."""
    args = list(argv[1:])
    if any(arg in HELP_ARGS for arg in args):
        sys.stdout.write(help_text(doc, default_config_spec(args, default_config), config_help))
        raise SystemExit(0)
    spec = flag_value(args, "config")
    if spec is None:
        return  # absl names the missing required flag
    try:
        config = load_config_file(spec)
        check_overrides(args, config)
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None


def _positive_int(config: Any, section: str, field: str, *, minimum: int = 1) -> int:
    value = config[section].get(field)
    if value is None:
        return minimum
    if int(value) != value or int(value) < minimum:
        raise UsageError(f"{section}.{field}={value!r} must be an integer >= {minimum}")
    return int(value)


def validate_train_config(config: Any) -> None:
    """The loop's fields, each named when wrong (before a mesh or a model is built)."""
    steps = _positive_int(config, "train", "steps")
    for field in ("log_every", "checkpoint_every"):
        _positive_int(config, "train", field)
    keep = config.train.get("keep_checkpoints")
    if keep is not None:
        _positive_int(config, "train", "keep_checkpoints")
    _positive_int(config, "data", "batch_size")
    _positive_int(config, "data", "worker_count", minimum=0)
    _positive_int(config, "train", "eval_every", minimum=0)
    _positive_int(config, "train", "eval_exams", minimum=0)
    mode = config.train.get("best_mode")
    if mode is not None and mode not in ("min", "max"):
        raise UsageError(f"train.best_mode={mode!r} must be 'min' or 'max'")
    accum = _positive_int(config, "optim", "grad_accum_steps") if "optim" in config else 1
    if steps % accum:
        raise UsageError(f"optim.grad_accum_steps={accum} must divide train.steps={steps}")
    if "optim" in config and config.optim.get("warmup_steps") is not None:
        warmup = _positive_int(config, "optim", "warmup_steps", minimum=0)
        if config.optim.get("name") == "adamw" and warmup >= steps // accum:
            raise UsageError(
                f"optim.warmup_steps={warmup} must be below the {steps // accum} optimizer "
                f"updates (train.steps={steps}, optim.grad_accum_steps={accum})"
            )


def check_data_dir(data_dir: str | None) -> str:
    """The dataset directory, or a UsageError saying what is wrong and how to make one."""
    if not data_dir:
        raise UsageError(
            "no dataset given. Pass --config.data.dir=DIR; to make a synthetic phantom "
            f"dataset first run `{GENERATE_HINT.format(dir='DIR')}`."
        )
    path = epath.Path(data_dir)  # epath: local paths and gs:// alike
    if not path.exists():
        raise UsageError(
            f"dataset directory {data_dir!r} does not exist. Run "
            f"`{GENERATE_HINT.format(dir=data_dir)}` for a synthetic one (sized for the tiny "
            "config), or point --config.data.dir at yours."
        )
    if not path.is_dir():
        raise UsageError(
            f"--config.data.dir={data_dir!r} is a file, not a dataset directory (the "
            "directory holding dataset_info.json and the train/val/test shards)"
        )
    return data_dir


def check_dataset_fits_model(config: Any) -> None:
    """The dataset's exams ([9, frames, size, size], dataset_info.json) against the
    config's model, before anything is built: a mismatch names the config fields and the
    dataset's values (otherwise it surfaces ~20 s later inside XLA or Orbax)."""
    import json

    data_dir = config.data.get("dir")
    if not data_dir:
        return
    info_path = epath.Path(data_dir) / "dataset_info.json"
    if not info_path.exists():
        return  # an unfinished dataset: make_pipeline says so
    try:
        _, frames, height, width = json.loads(info_path.read_text())["image_shape"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{info_path}: no readable image_shape ({e})") from e
    prefix, model = ("model.encoder", config.model.encoder) if "encoder" in config.model else (
        "model", config.model)  # fmt: skip
    wrong = [
        f"{prefix}.{field}={model[field]} (dataset: {value})"
        for field, value in (("frames", frames), ("image_size", height))
        if int(model[field]) != int(value)
    ]
    if height != width:
        wrong.append(f"dataset images are {height}x{width}; the model takes square images")
    if wrong:
        raise UsageError(
            f"dataset {data_dir} holds exams of {frames} frames at {height}x{width}, which the "
            f"config's model does not take: {'; '.join(wrong)}. Set those fields or use a "
            "dataset made at the model's size"
        )


def check_batch_splits(batch_size: int, shards: int) -> None:
    """data.batch_size over the mesh's data x fsdp devices, named before compiling."""
    if batch_size % shards:
        raise UsageError(
            f"data.batch_size={batch_size} does not split over the mesh's {shards} data x "
            f"fsdp devices: use a multiple of {shards} (or set --config.mesh.data / fsdp)"
        )


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _disk_full(error: BaseException) -> OSError | None:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e) or "RESOURCE_EXHAUSTED: No space" in str(e):
            return OSError(errno.ENOSPC, "No space left on device")
    return None


def last_checkpoint_text(workdir: str | None) -> str:
    """'step N in DIR' for the newest committed checkpoint of `workdir`, or 'none'."""
    from whmae.train.checkpoint import CHECKPOINT_DIR, committed_steps

    if not workdir:
        return "none"
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    steps = committed_steps(directory)
    return f"step {steps[-1]} in {directory}" if steps else f"none in {directory}"


def failure_line(error: BaseException, workdir: str | None) -> str | None:
    """One line for an error a person can act on, else None (show the traceback)."""
    from whmae.train.checkpoint import NoIntactCheckpointError

    full = _disk_full(error)
    if full is not None:
        where = f" ({full.filename})" if getattr(full, "filename", None) else ""
        return (
            f"error: disk full{where}: {full.strerror or full}. Last good checkpoint: "
            f"{last_checkpoint_text(workdir)}. Free some space and run the same command to "
            "continue from it."
        )
    if isinstance(error, (UsageError, NoIntactCheckpointError, FloatingPointError)):
        return f"error: {error}"
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError)):
        return f"error: {' '.join(str(error).split())}"
    return None


def _quiet_closed_event_loop(unraisable) -> None:
    """Drop Orbax/TensorStore's 'Event loop is closed' noise after a failed restore."""
    value = getattr(unraisable, "exc_value", None)
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def one_line_errors(workdir: str | None) -> Iterator[None]:
    """Report fixable errors raised inside as one `error: ...` line (SystemExit, status 1)."""
    sys.unraisablehook = _quiet_closed_event_loop
    try:
        yield
    except Exception as e:
        line = None if os.environ.get("WHMAE_TRACEBACK") else failure_line(e, workdir)
        if line is None:
            raise
        raise SystemExit(line) from None
