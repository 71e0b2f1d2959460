"""Oblique image planes of the phantom: the heart's pose and the planning of each view.

World space is the scanner's patient frame in mm, RAS+ (x right, y anterior, z
superior), as in NIfTI. A plane is a centre, a row direction (down the image) and a
column direction (across): pixel (i, j) of an H x W plane lies at

  centre + (i - (H - 1) / 2) * dy * row_direction + (j - (W - 1) / 2) * dx * col_direction

Planning follows the heart (short axis perpendicular to the LV long axis, 4ch through
LV, RV and both atria, 2ch orthogonal to it through LV and LA, 3ch along the outflow
tract) with small per-subject planning errors: tilts of a few degrees, in-plane shifts
and rotations of the field of view.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from whmae import layout


@dataclasses.dataclass(frozen=True, eq=False)
class PlaneGeometry:
    """P oblique planes of H x W pixels in world space (RAS mm)."""

    names: tuple[str, ...]
    centre: np.ndarray  # [P, 3] world position of the image centre
    row_direction: np.ndarray  # [P, 3] unit vector, increasing row index
    col_direction: np.ndarray  # [P, 3] unit vector, increasing column index
    pixel_spacing: np.ndarray  # [P, 2] (row, col) mm
    shape: tuple[int, int]  # (H, W)

    @property
    def normal(self) -> np.ndarray:
        """[P, 3] unit normals, row x col (the direction of increasing slice index)."""
        return np.cross(self.row_direction, self.col_direction)

    @property
    def origin(self) -> np.ndarray:
        """[P, 3] world position of pixel (0, 0)."""
        half = (np.asarray(self.shape, np.float64) - 1) / 2
        return (
            self.centre
            - half[0] * self.pixel_spacing[:, :1] * self.row_direction
            - half[1] * self.pixel_spacing[:, 1:] * self.col_direction
        )

    def affines(self, slice_spacing: float = 1.0) -> np.ndarray:
        """[P, 4, 4] voxel (row, col, slice, 1) -> world (RAS mm) affine of each plane.

        The slice axis is the normal scaled by slice_spacing (for stacking planes).
        """
        affine = np.zeros((len(self.names), 4, 4))
        affine[:, :3, 0] = self.row_direction * self.pixel_spacing[:, :1]
        affine[:, :3, 1] = self.col_direction * self.pixel_spacing[:, 1:]
        affine[:, :3, 2] = self.normal * slice_spacing
        affine[:, :3, 3] = self.origin
        affine[:, 3, 3] = 1.0
        return affine

    def world_coordinates(self) -> np.ndarray:
        """[P, H, W, 3] float32 world position of every pixel centre."""
        rows = np.arange(self.shape[0], dtype=np.float64)[None, :, None, None]
        cols = np.arange(self.shape[1], dtype=np.float64)[None, None, :, None]
        points = (
            self.origin[:, None, None, :]
            + rows * (self.pixel_spacing[:, None, None, :1] * self.row_direction[:, None, None])
            + cols * (self.pixel_spacing[:, None, None, 1:] * self.col_direction[:, None, None])
        )
        return points.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Planning:
    """Per-subject pose of the heart and planning of the views (mm, radians)."""

    rotation: np.ndarray  # [3, 3] heart frame -> world; columns are heart x, y, z
    origin: np.ndarray  # [3] world position of the heart frame origin
    short_axis_centre: np.ndarray  # [2] heart-frame (x, y) of the short-axis image centre
    short_axis_top: float  # heart-frame z of the basal short-axis slice (below the ED base)
    long_axis_centre: np.ndarray  # [3, 2] in-plane (across, along z) centre per long-axis view
    in_plane_angle: np.ndarray  # [4] image rotation: 2ch, 3ch, 4ch, short axis
    tilt: np.ndarray  # [4, 3] small rotation vectors (planning error): 2ch, 3ch, 4ch, SA


def rotation_matrix(rotation_vector: np.ndarray) -> np.ndarray:
    """Rodrigues: [3] axis * angle (radians) -> [3, 3] rotation."""
    angle = float(np.linalg.norm(rotation_vector))
    if angle < 1e-12:
        return np.eye(3)
    k = np.asarray(rotation_vector) / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _random_rotation_vector(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return direction * math.radians(rng.uniform(0.0, max_degrees))


def sample_planning(
    rng: np.random.Generator,
    tilt_degrees: float = 4.0,
    short_axis_centre=(12.0, 0.0),
    long_axis_centre=((0.0, -10.0), (0.0, -10.0), (-15.0, -10.0)),
    short_axis_jitter_mm: float = 8.0,
    long_axis_jitter_mm: float = 8.0,
) -> Planning:
    """Heart pose in the chest and the planning of the views for one subject.

    short_axis_centre: heart-frame (x, y) the short-axis images are centred on;
    long_axis_centre: per long-axis view (2ch, 3ch, 4ch) the in-plane (across, along z)
    centre. Each is shifted by up to the view's jitter (mm, uniform), as a planner would.
    """
    # LV long axis points apex-wards to the left, anteriorly and inferiorly.
    apex = np.array([-0.55, 0.5, -0.67])
    base = -apex / np.linalg.norm(apex)
    base = rotation_matrix(_random_rotation_vector(rng, 12.0)) @ base
    towards_rv = np.array([0.6, 0.8, 0.0])  # the RV lies anterior and to the right
    towards_rv -= towards_rv @ base * base
    towards_rv /= np.linalg.norm(towards_rv)
    towards_rv = rotation_matrix(base * math.radians(rng.uniform(-15, 15))) @ towards_rv
    rotation = np.stack([towards_rv, np.cross(base, towards_rv), base], axis=1)
    return Planning(
        rotation=rotation,
        origin=np.array([-5.0, 10.0, 15.0]) + rng.uniform(-10, 10, 3),
        short_axis_centre=np.asarray(short_axis_centre, np.float64)
        + rng.uniform(-short_axis_jitter_mm, short_axis_jitter_mm, 2),
        short_axis_top=-rng.uniform(8.0, 16.0),
        long_axis_centre=np.asarray(long_axis_centre, np.float64)
        + rng.uniform(-long_axis_jitter_mm, long_axis_jitter_mm, (3, 2)),
        in_plane_angle=np.radians(rng.uniform(-15, 15, 4)),
        tilt=np.stack([_random_rotation_vector(rng, tilt_degrees) for _ in range(4)]),
    )


def _in_plane(rows: np.ndarray, cols: np.ndarray, angle: float):
    """Rotate an in-plane (row, col) pair of directions by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    return c * rows + s * cols, -s * rows + c * cols


def _to_world(planning: Planning, centre, rows, cols, tilt):
    """Heart-frame plane (centre, row, col) -> world, tilted about the plane centre."""
    tilt_rotation = rotation_matrix(tilt)
    r = planning.rotation
    return (
        planning.origin + r @ centre,
        r @ tilt_rotation @ rows,
        r @ tilt_rotation @ cols,
    )


def short_axis_planes(
    planning: Planning, depths: np.ndarray, size: int, fov_mm: float
) -> PlaneGeometry:
    """Short-axis planes at heart-frame heights `depths` [Z] (base -> apex), parallel.

    Rows run from the anterior RV insertion side; the RV appears on the image's left.
    """
    rows, cols = _in_plane(np.array([0.0, 1.0, 0.0]), np.array([-1.0, 0.0, 0.0]),
                           planning.in_plane_angle[3])  # fmt: skip
    tilt_rotation = planning.rotation @ rotation_matrix(planning.tilt[3])
    normal = tilt_rotation @ np.array([0.0, 0.0, 1.0])
    centre = planning.origin + planning.rotation @ np.array([*planning.short_axis_centre, 0.0])
    depths = np.asarray(depths, dtype=np.float64)
    spacing = fov_mm / size
    return PlaneGeometry(
        names=tuple(f"sa_{i}" for i in range(len(depths))),
        centre=centre + depths[:, None] * normal,
        row_direction=np.tile(tilt_rotation @ rows, (len(depths), 1)),
        col_direction=np.tile(tilt_rotation @ cols, (len(depths), 1)),
        pixel_spacing=np.full((len(depths), 2), spacing),
        shape=(size, size),
    )


def long_axis_planes(
    planning: Planning, outflow_angle: float, size: int, fov_mm: float
) -> PlaneGeometry:
    """The 2ch, 3ch and 4ch planes (layout order), apex at the top of the image."""
    along = np.array([0.0, 0.0, 1.0])  # rows run from apex to atria
    across = {
        "la_2ch": np.array([0.0, -1.0, 0.0]),
        "la_3ch": -np.array([math.cos(outflow_angle), math.sin(outflow_angle), 0.0]),
        "la_4ch": np.array([-1.0, 0.0, 0.0]),  # RV on the image's left
    }
    centres, row_dirs, col_dirs = [], [], []
    for view, name in enumerate(("la_2ch", "la_3ch", "la_4ch")):
        shift_across, shift_along = planning.long_axis_centre[view]
        rows, cols = _in_plane(along, across[name], planning.in_plane_angle[view])
        centre = shift_across * across[name] + shift_along * along
        world = _to_world(planning, centre, rows, cols, planning.tilt[view])
        centres.append(world[0])
        row_dirs.append(world[1])
        col_dirs.append(world[2])
    return PlaneGeometry(
        names=tuple(layout.PLANE_NAMES[i] for i in layout.LONG_AXIS_PLANES),
        centre=np.stack(centres),
        row_direction=np.stack(row_dirs),
        col_direction=np.stack(col_dirs),
        pixel_spacing=np.full((3, 2), fov_mm / size),
        shape=(size, size),
    )


def concatenate(*planes: PlaneGeometry) -> PlaneGeometry:
    """Stack plane sets of the same image shape."""
    return PlaneGeometry(
        names=sum((p.names for p in planes), ()),
        centre=np.concatenate([p.centre for p in planes]),
        row_direction=np.concatenate([p.row_direction for p in planes]),
        col_direction=np.concatenate([p.col_direction for p in planes]),
        pixel_spacing=np.concatenate([p.pixel_spacing for p in planes]),
        shape=planes[0].shape,
    )
