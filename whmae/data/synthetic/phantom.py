"""The synthetic multi-view cine CMR phantom: the embedded default dataset.

Each exam is a heart built in millimetres (`phantom_heart`: truncated ellipsoid
chambers over the cardiac cycle, true phenotypes from the continuous geometry) for a
subject drawn from a population of healthy hearts and four pathology groups
(`phantom_heart.GROUPS`, recorded as `Subject.group`), placed
in a chest with a per-subject pose and cut by nine oblique planes (`phantom_planes`).
Pixels are rendered by evaluating the implicit shapes at each pixel's world position,
vectorised over planes x frames x pixels, with bSSFP-like contrast: bright blood and
fat, dark-grey myocardium, dark lungs, partial-volume edges, a smooth bias field,
tissue texture and Rician noise. Exam `index` under `seed` is always the same exam.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from whmae import layout
from whmae.data.synthetic import phantom_heart, phantom_planes
from whmae.data.synthetic.phantom_heart import Heart, ellipsoid_distance
from whmae.data.synthetic.phantom_planes import PlaneGeometry, Planning

# Classes each plane keeps (UK Biobank: seg_sa 1-3, seg_la_2ch LA, seg_la_4ch LA and RA).
_VIEW_CLASSES = {
    "la_2ch": (layout.LA,),
    "la_3ch": (),
    "la_4ch": (layout.LA, layout.RA),
    "short_axis": layout.SHORT_AXIS_CLASSES,
}


# Field of view: the reference crop is 128 pixels at ~1.64 mm (210 mm). A smaller image keeps
# that spacing while the heart still fits, then zooms out no further than needed to hold it
# (`default_fov_mm`). TIGHT_FOV_MM, measured on 1100 subjects with their planning jitter,
# tilts and in-plane rotations: the short axis needs p99 ~130 mm, at most 144 mm (a large
# DCM heart) for its ventricles, so 140 mm holds ~99.5 % of hearts; the long axis needs
# p99 ~200 mm, at most 216 mm, for ventricles and atria, so it keeps 210 mm at every size.
REFERENCE_FOV_MM = 210.0
REFERENCE_SIZE = 128
TIGHT_FOV_MM = {"short_axis": 140.0, "long_axis": 210.0}


def default_fov_mm(view: str, size: int) -> float:
    """Field of view (mm) of a "short_axis" or "long_axis" plane of size x size pixels:
    the reference spacing, but never less than what holds the heart (TIGHT_FOV_MM) nor more
    than 210 mm (the 128-pixel crop; larger images get finer pixels)."""
    native = REFERENCE_FOV_MM * size / REFERENCE_SIZE
    return float(min(max(TIGHT_FOV_MM[view], native), REFERENCE_FOV_MM))


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    size: int = 128  # H = W
    frames: int = 50  # T
    seed: int = 0
    # Fields of view (mm; pixel spacing = FOV / size). None: fov_mm if given, else
    # default_fov_mm(view, size) (210 mm at 128 pixels).
    short_axis_fov_mm: float | None = None
    long_axis_fov_mm: float | None = None
    fov_mm: float | None = None  # both views at once (a view's own field wins)
    slice_spacing_mm: float = 10.0  # between consecutive short-axis slices
    noise: float = 0.04  # Rician noise sigma relative to the blood signal (per subject x0.6-1.4)
    tilt_degrees: float = 4.0  # largest planning error of each view
    # Largest shift of a view's centre off the heart's middle: small on the short axis (the
    # reference crop is centred on the segmentation), a planner's error on the long axis.
    short_axis_jitter_mm: float = 3.0
    long_axis_jitter_mm: float = 6.0

    def view_fov_mm(self, view: str) -> float:
        """The field of view (mm) of the "short_axis" or "long_axis" planes."""
        own = {"short_axis": self.short_axis_fov_mm, "long_axis": self.long_axis_fov_mm}[view]
        if own is not None:
            return float(own)
        return default_fov_mm(view, self.size) if self.fov_mm is None else float(self.fov_mm)


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
    """Per-subject parameters; a deterministic function of (seed, index, frames)."""

    eid: str
    group: str  # population group, a key of phantom_heart.GROUPS ("healthy", "dcm", ...)
    heart: Heart
    planning: Planning
    heart_rate: float  # bpm
    body_scale: float
    contrast: dict[str, float]  # tissue -> signal (blood about 1)
    texture_waves: np.ndarray  # [K, 4] world wave vector (rad/mm) and phase of the texture
    bias_gradient: np.ndarray  # [3] log-signal change per 100 mm of the coil bias field
    phenotypes: np.ndarray  # float32 [18], layout.PHENOTYPE_COLUMNS order

    @property
    def frame_duration(self) -> float:
        return 60.0 / self.heart_rate / len(self.heart.base_z)


def _population_draw(rng: np.random.Generator) -> tuple[float, str, dict[str, float]]:
    # Shared body-size factor (correlates the volumes), a standard normal without outliers.
    size = phantom_heart.soft_clip(rng.standard_normal(), -2.75, 2.75)
    group = phantom_heart.sample_group(rng)
    return size, group, phantom_heart.sample_targets(rng, size, group)


def sample_population(config: PhantomConfig, index: int) -> tuple[str, float, dict[str, float]]:
    """(group, body-size draw, phenotype targets) of exam `index`: the first draws of
    `sample_subject`, without building the heart (cheap, for population statistics).
    The targets are what the heart is built towards: its true phenotypes equal them but
    for the RV, solved numerically (~0.1 %, RVEF within ~0.1 points)."""
    size, group, targets = _population_draw(np.random.default_rng([config.seed, index]))
    return group, size, targets


def sample_subject(config: PhantomConfig, index: int) -> Subject:
    """Deterministic per-subject parameters of exam `index` (rng seeded by [seed, index])."""
    rng = np.random.default_rng([config.seed, index])
    size, group, targets = _population_draw(rng)
    heart = phantom_heart.sample_heart(rng, config.frames, targets, group)
    # Views centred on the heart (as the short-axis crop on the segmentation's bounding
    # box), up to the planning jitter: short axis on the ventricles, 2ch and 3ch on the LV
    # axis, 4ch between the LV's septum and the RA; along the long axis apex to atria.
    extent = phantom_heart.heart_extent(heart)
    middle = {key: (low + high) / 2 for key, (low, high) in extent.items()}
    planning = phantom_planes.sample_planning(
        rng,
        config.tilt_degrees,
        short_axis_centre=(middle["x"], 0.0),
        long_axis_centre=[(0.0, middle["z"]), (0.0, middle["z"]), (-middle["x_4ch"], middle["z"])],
        short_axis_jitter_mm=config.short_axis_jitter_mm,
        long_axis_jitter_mm=config.long_axis_jitter_mm,
    )
    heart_rate = phantom_heart.bounded(
        rng.standard_normal() - 0.3 * size + (0.6 if group == "dcm" else 0.0), 51.0, 89.0
    )
    contrast = {
        "blood": rng.uniform(0.85, 1.0),
        "myocardium": rng.uniform(0.18, 0.3),
        "fat": rng.uniform(0.65, 0.9),
        "muscle": rng.uniform(0.22, 0.32),
        "tissue": rng.uniform(0.35, 0.5),
        "lung": rng.uniform(0.02, 0.07),
        "liver": rng.uniform(0.3, 0.42),
        "bone": rng.uniform(0.45, 0.6),
        "noise": config.noise * rng.uniform(0.6, 1.4),
    }
    directions = rng.standard_normal((8, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(8.0, 40.0, (8, 1))
    texture_waves = np.concatenate(
        [directions * 2 * math.pi / wavelengths, rng.uniform(0, 2 * math.pi, (8, 1))], axis=1
    )
    truth = phantom_heart.true_phenotypes(heart, heart_rate)
    return Subject(
        eid=f"phantom-{config.seed}-{index:06d}",
        group=group,
        heart=heart,
        planning=planning,
        heart_rate=heart_rate,
        body_scale=1.0 + 0.06 * size,
        contrast=contrast,
        texture_waves=texture_waves,
        bias_gradient=rng.uniform(-0.3, 0.3, 3),
        phenotypes=np.array([truth[c] for c in layout.PHENOTYPE_COLUMNS], np.float32),
    )


def exam_planes(config: PhantomConfig, subject: Subject) -> PlaneGeometry:
    """The nine planes of the reference layout (2ch, 3ch, 4ch, six short-axis base->apex)."""
    top = subject.planning.short_axis_top
    depths = top - config.slice_spacing_mm * np.arange(len(layout.SHORT_AXIS_PLANES))
    return phantom_planes.concatenate(
        phantom_planes.long_axis_planes(
            subject.planning,
            subject.heart.outflow_angle,
            config.size,
            config.view_fov_mm("long_axis"),
        ),
        phantom_planes.short_axis_planes(
            subject.planning, depths, config.size, config.view_fov_mm("short_axis")
        ),
    )


def plane_affines(config: PhantomConfig, subject: Subject) -> dict[str, np.ndarray]:
    """4x4 voxel (row, col, slice, 1) -> world (RAS mm) affine of each exam plane, by name.

    "sa" is the short-axis stack's affine: its slice axis steps base -> apex.
    """
    planes = exam_planes(config, subject)
    affines = dict(zip(planes.names, planes.affines(), strict=True))
    stack = affines["sa_0"].copy()
    stack[:3, 2] = (
        planes.centre[layout.SHORT_AXIS_PLANES[1]] - planes.centre[layout.SHORT_AXIS_PLANES[0]]
    )
    affines["sa"] = stack
    return affines


def _paint(image, distance, inverse_spacing, value):
    """Blend `value` over `image` with partial-volume occupancy from a signed distance."""
    occupancy = np.clip(0.5 - distance * inverse_spacing, 0.0, 1.0)
    return image + occupancy * (value - image)


def _static_anatomy(subject: Subject, world: np.ndarray, inverse_spacing) -> np.ndarray:
    """[P, 1, H, W] chest around the heart (time-invariant), world coordinates [P, H, W, 3]."""
    c, s = subject.contrast, subject.body_scale
    x, y, z = (world[..., i][:, None] for i in range(3))
    zero, flat = np.zeros(3), 1e6  # a huge semi-axis makes an infinite cylinder

    def ellipsoid(centre, axes):
        return ellipsoid_distance(x, y, z, np.asarray(centre, float), np.asarray(axes, float))

    body = ellipsoid(zero, [165 * s, 115 * s, flat])
    image = _paint(np.zeros_like(x), body, inverse_spacing, c["fat"])
    image = _paint(image, body + 12.0, inverse_spacing, c["muscle"])
    image = _paint(image, body + 25.0, inverse_spacing, c["tissue"])
    for centre, axes in (([-80, -15, 35], [55, 80, 130]), ([75, -15, 45], [60, 80, 130])):
        image = _paint(image, ellipsoid(np.array(centre) * s, axes), inverse_spacing, c["lung"])
    image = _paint(image, ellipsoid([45, 5, -125], [115, 90, 75]), inverse_spacing, c["liver"])
    image = _paint(image, ellipsoid([0, -90 * s, 0], [20, 18, flat]), inverse_spacing, c["bone"])
    image = _paint(image, ellipsoid([-28, -55, 0], [11, 11, flat]), inverse_spacing, c["blood"])
    waves = subject.texture_waves
    texture = np.cos(world @ waves[:, :3].T.astype(np.float32) + waves[:, 3]).mean(-1)
    return image * (1.0 + 0.25 * texture[:, None])


def _quadrics(heart: Heart) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each heart part as f(p) = p'Qp + 2b'p + c per frame (Q [T,3,3], b [T,3], c [T]):
    negative inside, and close to the signed distance in mm near the surface."""
    frames = len(heart.base_z)
    quadrics = {}
    for name in ("lv_endo", "lv_epi", "rv", "la", "ra"):
        centre, axes = getattr(heart, name)
        # (q - 1) * m / 2 with m the axes' geometric mean: q's slope at the surface is 2 / axis.
        scale = np.cbrt(axes.prod(-1)) / 2
        diagonal = scale[:, None] / axes**2
        quadrics[name] = (
            diagonal[:, :, None] * np.eye(3),
            -diagonal * centre,
            (diagonal * centre**2).sum(-1) - scale,
        )
    zeros = np.zeros((frames, 3, 3))
    up = np.tile([0.0, 0.0, 0.5], (frames, 1))
    quadrics["below_base"] = (zeros, up, -heart.base_z)
    # Aortic root: a tube along aorta_axis from a point of the (moving) base plane.
    origin = heart.aorta_origin + up * 2 * heart.base_z[:, None]
    axis, radius = heart.aorta_axis, heart.aorta_radius
    tube = np.broadcast_to((np.eye(3) - np.outer(axis, axis)) / (2 * radius), (frames, 3, 3))
    b = -np.einsum("tij,tj->ti", tube, origin)
    c = np.einsum("ti,tij,tj->t", origin, tube, origin) - radius / 2
    quadrics["aorta_tube"] = (tube, b, c)
    quadrics["aorta_along"] = (zeros, np.tile(axis / 2, (frames, 1)), -origin @ axis)
    return quadrics


def _pixel_basis(planes: PlaneGeometry) -> np.ndarray:
    """[P, 6, H*W] float32 (u^2, uv, v^2, u, v, 1) of each pixel's in-plane mm offsets."""
    height, width = planes.shape
    dy, dx = planes.pixel_spacing[:, 0, None, None], planes.pixel_spacing[:, 1, None, None]
    u = (np.arange(height) - (height - 1) / 2)[None, :, None] * dy  # [P, H, 1]
    v = (np.arange(width) - (width - 1) / 2)[None, None, :] * dx  # [P, 1, W]
    u, v = np.broadcast_arrays(u, v)  # [P, H, W]
    basis = np.stack([u * u, u * v, v * v, u, v, np.ones_like(u)], axis=1)
    return basis.reshape(len(u), 6, -1).astype(np.float32)


def _plane_values(quadric, centre, rows, cols, spacing, basis, shape) -> np.ndarray:
    """A quadric over every pixel of every plane, in pixels: float32 [P, T, H, W].

    centre, rows, cols [P, 3] heart frame; restricted to a plane the quadric is a
    quadratic in the in-plane mm offsets (u, v): one small product per plane.
    """
    q, b, c = quadric
    rq = np.einsum("pi,tij->ptj", rows, q)
    kq = np.einsum("pi,tij->ptj", cols, q)
    cq = np.einsum("pi,tij->ptj", centre, q)
    coefficients = (
        np.stack(
            [
                np.einsum("ptj,pj->pt", rq, rows),
                2 * np.einsum("ptj,pj->pt", rq, cols),
                np.einsum("ptj,pj->pt", kq, cols),
                2 * (np.einsum("ptj,pj->pt", cq, rows) + rows @ b.T),
                2 * (np.einsum("ptj,pj->pt", cq, cols) + cols @ b.T),
                np.einsum("ptj,pj->pt", cq, centre) + 2 * centre @ b.T + c,
            ],
            -1,
        )
        / spacing.mean(1)[:, None, None]
    )  # mm -> pixels
    coefficients = coefficients.astype(np.float32)
    # einsum, not @: BLAS threads stall on these thin products when the cores are busy.
    values = np.einsum("ptk,pkn->ptn", coefficients, basis)
    return values.reshape(len(centre), -1, *shape)


def _paint_inplace(image: np.ndarray, distance_pixels: np.ndarray, value: float) -> np.ndarray:
    """image + occupancy * (value - image), written into distance_pixels' memory."""
    blended = np.subtract(0.5, distance_pixels, out=distance_pixels)
    np.clip(blended, 0.0, 1.0, out=blended)
    blended *= np.subtract(value, image, dtype=np.float32)
    blended += image
    return blended


def _noise(rng: np.random.Generator, shape) -> np.ndarray:
    """Zero-mean, unit-variance bell-shaped noise (sum of two uniform bytes: much cheaper
    than Gaussian draws, which dominate the render time otherwise)."""
    size = int(np.prod(shape))
    pair = np.frombuffer(rng.bytes(2 * size), np.int8).reshape(2, *shape)
    noise = pair.sum(0, dtype=np.float32)
    noise *= np.float32(1.0 / math.sqrt(2 * (256**2 - 1) / 12))
    return noise


# Later classes overwrite earlier ones (the myocardium's ellipsoid contains the LV pool).
_PAINT_ORDER = (
    layout.RV_BLOOD_POOL,
    layout.LV_MYOCARDIUM,
    layout.LV_BLOOD_POOL,
    layout.LA,
    layout.RA,
)


def _class_voxels(label: int, d: dict[str, np.ndarray], plane: int) -> np.ndarray:
    """bool [T, H, W]: the voxels of class `label` on one plane, from the signed distances."""
    if label == layout.RV_BLOOD_POOL:
        return d["rv_blood"][plane] < 0
    if label == layout.LV_MYOCARDIUM:
        return (d["lv_epi"][plane] < 0) & d["below"][plane]
    if label == layout.LV_BLOOD_POOL:
        return d["lv_blood"][plane] < 0
    atrium = "la" if label == layout.LA else "ra"
    return (d[atrium][plane] < 0) & ~d["below"][plane]


def render_planes(
    subject: Subject, planes: PlaneGeometry, views: tuple[str, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 [P, T, H, W] (not normalised) and labels uint8 [P, T, H, W].

    views: per plane one of "la_2ch", "la_3ch", "la_4ch", "short_axis" (which classes
    its labels keep). Shape values are signed distances in pixels (< 0 inside).
    """
    world = planes.world_coordinates()  # [P, H, W, 3]
    inverse_spacing = (1.0 / planes.pixel_spacing.mean(1)).astype(np.float32)[:, None, None, None]
    rotation, origin = subject.planning.rotation, subject.planning.origin
    # Planes in the heart frame (rotation columns are the heart axes in world space).
    in_heart = ((planes.centre - origin) @ rotation, planes.row_direction @ rotation,
                planes.col_direction @ rotation)  # fmt: skip
    basis = _pixel_basis(planes)
    d = {
        name: _plane_values(quadric, *in_heart, planes.pixel_spacing, basis, planes.shape)
        for name, quadric in _quadrics(subject.heart).items()
    }
    c = subject.contrast
    fat_mm, wall_mm = 4.0 * inverse_spacing, 3.0 * inverse_spacing

    below = d["below_base"] <= 0
    rv_blood = np.maximum(np.maximum(d["rv"], -d["lv_epi"]), d["below_base"])
    lv_blood = np.maximum(d["lv_endo"], d["below_base"])
    distances = {**d, "lv_blood": lv_blood, "rv_blood": rv_blood, "below": below}
    labels = np.zeros(rv_blood.shape, np.uint8)
    for plane, view in enumerate(views):
        for label in _PAINT_ORDER:
            if label in _VIEW_CLASSES[view]:
                inside = _class_voxels(label, distances, plane)
                np.copyto(labels[plane], np.uint8(label), where=inside)
    del below, distances

    # Pericardial fat around every chamber, then the walls (with a 3 mm AV-plane cap), blood.
    atria = np.minimum(d["la"], d["ra"])
    fat = np.minimum(np.minimum(d["lv_epi"], d["rv"]), atria)
    image = _paint_inplace(
        _static_anatomy(subject, world, inverse_spacing),
        np.subtract(fat, fat_mm, out=fat),
        c["fat"],
    )
    cap = np.subtract(d.pop("below_base"), wall_mm)
    wall = np.minimum(np.maximum(d["lv_epi"], cap), np.maximum(d["rv"] - wall_mm, cap))
    np.minimum(wall, atria - 2.0 * inverse_spacing, out=wall)
    image = _paint_inplace(image, wall, c["myocardium"])
    blood = np.minimum(np.minimum(lv_blood, rv_blood, out=lv_blood), atria, out=lv_blood)
    aorta = np.maximum(d["aorta_tube"], -d["aorta_along"])
    np.maximum(aorta, d["aorta_along"] - 60.0 * inverse_spacing, out=aorta)
    image = _paint_inplace(image, np.minimum(blood, aorta, out=blood), c["blood"])
    del d, rv_blood, cap, atria, aorta

    bias = np.exp(
        (world - world.mean((0, 1, 2))) @ (subject.bias_gradient / 100).astype(np.float32)
    )
    image *= bias[:, None]
    sigma = np.float32(c["noise"] * c["blood"])
    real = _noise(rng, image.shape)
    real *= sigma
    real += image
    imaginary = _noise(rng, image.shape)
    imaginary *= sigma
    np.multiply(real, real, out=real)
    np.multiply(imaginary, imaginary, out=imaginary)
    real += imaginary
    return np.sqrt(real, out=real), labels


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max over the whole array, x255, rounded (the dataset's intensity convention)."""
    low, high = image.min(), image.max()
    return np.round((image - low) * (255.0 / max(high - low, 1e-6))).astype(np.uint8)


def make_exam(config: PhantomConfig, index: int) -> dict:
    """Exam `index` in the `whmae.layout` schema (planes 2ch, 3ch, 4ch, sa_0..sa_5)."""
    subject = sample_subject(config, index)
    planes = exam_planes(config, subject)
    views = ("la_2ch", "la_3ch", "la_4ch") + ("short_axis",) * len(layout.SHORT_AXIS_PLANES)
    rng = np.random.default_rng([config.seed, index, 1])
    image, labels = render_planes(subject, planes, views, rng)
    label_mask = np.zeros(labels.shape[:2], bool)  # every frame of the labelled planes
    label_mask[list(layout.LABELLED_PLANES)] = True
    return {
        "eid": subject.eid,
        "images": to_uint8(image),
        "labels": labels,
        "phenotypes": subject.phenotypes.copy(),
        "plane_mask": np.ones(layout.NUM_PLANES, bool),
        "label_mask": label_mask,
        "pixel_spacing": planes.pixel_spacing.astype(np.float32),
        "slice_spacing": np.float32(config.slice_spacing_mm),
        "frame_duration": np.float32(subject.frame_duration),
    }


def render_short_axis_stack(
    config: PhantomConfig,
    subject: Subject,
    num_slices: int,
    start_mm: float | None = None,
    spacing_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray, PlaneGeometry]:
    """A short-axis stack (base -> apex): images uint8 [Z, T, H, W], labels, geometry.

    start_mm: heart-frame height of the first slice (mm along the LV long axis above the
    ED base plane; negative is towards the apex). By default the stack is centred on the
    ventricles. spacing_mm defaults to config.slice_spacing_mm.
    """
    spacing = config.slice_spacing_mm if spacing_mm is None else spacing_mm
    if start_mm is None:
        apex = subject.heart.lv_epi.centre[0, 2] - subject.heart.lv_epi.semi_axes[0, 2]
        start_mm = apex / 2 + (num_slices - 1) / 2 * spacing
    depths = start_mm - spacing * np.arange(num_slices)
    planes = phantom_planes.short_axis_planes(
        subject.planning, depths, config.size, config.view_fov_mm("short_axis")
    )
    index = int(subject.eid.rsplit("-", 1)[1])
    rng = np.random.default_rng([config.seed, index, 2])
    image, labels = render_planes(subject, planes, ("short_axis",) * num_slices, rng)
    return to_uint8(image), labels, planes


def montage(exam: dict, frames: int = 4) -> np.ndarray:
    """uint8 [9 * H, 2 * frames * W]: each plane's images over the cycle, then its labels."""
    images, labels = exam["images"], exam["labels"]
    picks = np.linspace(0, images.shape[1] - 1, frames).round().astype(int)
    label_grey = (labels[:, picks] * (255 // (layout.NUM_CLASSES - 1))).astype(np.uint8)
    tiles = np.concatenate([images[:, picks], label_grey], axis=1)  # [S, 2F, H, W]
    s, f, h, w = tiles.shape
    return tiles.transpose(0, 2, 1, 3).reshape(s * h, f * w)
