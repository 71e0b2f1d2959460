"""Reading one NIfTI-1 file fast: the whole .nii.gz inflated in one call, the array a view.

UK Biobank-layout exams are ~28 MB of gzip per exam; inflating is most of `whmae-prepare`'s
CPU time, so the fastest installed inflater is used (libdeflate, then python-isal, then
zlib: the same bytes; benchmarks/bench_prepare.py measures them side by side).
"""

from __future__ import annotations

import io
import math
import os
import zlib
from pathlib import Path

import numpy as np

_HEADER_BYTES = 348  # NIfTI-1; parsed from a small copy, not the whole file
_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}

try:  # python-isal (the `fast` extra) inflates ~1.6x faster than zlib; same output
    from isal import isal_zlib as _inflater

    _INFLATE_ERRORS = (zlib.error, _inflater.error)
except ImportError:
    _inflater, _INFLATE_ERRORS = zlib, (zlib.error,)
try:  # libdeflate (the `fast` extra): one-shot gzip members, ~1.2x faster than python-isal
    import deflate as _libdeflate
except ImportError:
    _libdeflate = None


def inflate_gzip(data: bytes) -> bytes:
    """One gzip member -> its bytes: libdeflate, else python-isal, else zlib (same output).

    libdeflate refuses anything unusual (truncated, corrupt, several members): those go
    through the streaming inflater, whose error says what is wrong.
    """
    if _libdeflate is not None:
        try:
            return _libdeflate.gzip_decompress(data)
        except _libdeflate.DeflateError:
            pass
    return _inflater.decompress(data, wbits=31)


def inflate_backend() -> str:
    """The library `inflate_gzip` uses first."""
    return "libdeflate" if _libdeflate is not None else _inflater.__name__


class ExamError(ValueError):
    """An exam (or one of its files) that cannot be used; the message names the file."""


def nifti_name(stem: str) -> str:
    return f"{stem}.nii.gz"


def read_nifti(path: Path) -> tuple[np.ndarray, dict]:
    """Load a NIfTI-1 file: (array (X, Y, Z, T) as stored on disk, read-only; header dict).

    Fast path: the whole .nii.gz is inflated in one call (`inflate_gzip`) and the array is a
    zero-copy view of it (nibabel's streamed gzip reader is ~1.5x slower); scaling is
    applied only when the header asks for it. Other files go through nibabel.
    Raises ExamError naming the file and the problem.
    """
    import nibabel as nib

    name = path.name
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = inflate_gzip(raw)  # one gzip member, as nibabel writes
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:_HEADER_BYTES]), check=False)
        if header.sizeof_hdr != 348 or header["magic"].item() not in (b"n+1", b"ni1"):
            raise ValueError(f"not a NIfTI-1 header (magic {header['magic'].item()!r})")
        shape, dtype = header.get_data_shape(), header.get_data_dtype()
        count, offset = math.prod(shape), int(header.get_data_offset())
        if offset + count * dtype.itemsize > len(raw):
            raise ExamError(
                f"{name}: truncated data: {len(raw) - offset} bytes for shape {shape} {dtype}"
            )
        data = np.frombuffer(raw, dtype, count, offset).reshape(shape, order="F")
        slope, inter = header.get_slope_inter()
        if slope is not None and (slope != 1 or (inter or 0) != 0):
            data = data * np.float32(slope) + np.float32(inter or 0)
        zooms = [float(z) for z in header.get_zooms()]
        time_unit = header.get_xyzt_units()[1]
        affine = np.asarray(header.get_best_affine(), np.float64)
    except ExamError:
        raise
    except (EOFError, *_INFLATE_ERRORS) as e:
        raise ExamError(f"{name}: truncated or corrupt gzip stream ({e})") from None
    except Exception as e:  # a broken header raises many types
        raise ExamError(f"{name}: unreadable NIfTI ({type(e).__name__}: {e})") from None
    info = {"shape": list(shape), "zooms": zooms, "time_unit": time_unit, "affine": affine}
    return data, info


def frame_duration_seconds(info: dict) -> float:
    """Seconds per frame from the header's 4th zoom and time unit; NaN if not recorded.

    Cine frames last ~5-500 ms. With no unit, or a unit that gives an implausible frame
    (converters often write ms under "sec"), the magnitude decides: 5-500 is ms,
    0.005-0.5 is s; anything else (e.g. nibabel's default 1.0) is unknown.
    """
    if len(info["zooms"]) < 4:
        return math.nan
    value = info["zooms"][3]
    seconds = value * _TIME_UNITS.get(info["time_unit"], math.nan)
    if 0.005 <= seconds <= 0.5:
        return seconds
    if 5.0 <= value <= 500.0:
        return value * 1e-3
    return value if 0.005 <= value <= 0.5 else math.nan


def prefetch_files(folder: str | os.PathLike) -> None:
    """Ask the kernel to start reading a folder's .nii.gz and .zip files in the background
    (POSIX_FADV_WILLNEED), so that `read_nifti` later waits less for the disk.

    Never raises: a missing folder or an unreadable file is found, and named, when it is
    read. A no-op where posix_fadvise does not exist.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        paths = [*Path(folder).glob("*.nii.gz"), *Path(folder).glob("*.zip")]
    except OSError:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
