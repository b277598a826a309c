"""Pathfinder / Path-X: the reader of the LRA layout and an offline generator.

Layout (LRA release ``lra_release/pathfinder32/curv_contour_length_14/`` and
its ``pathfinder128`` Path-X sibling)::

    <root>/<subdir>/imgs/<n>/sample_<k>.png     grey PNG, size×size
    <root>/<subdir>/metadata/<n>.npy            TEXT, one image per line

A metadata line is space separated: field 0 the image sub-folder
(``imgs/<n>``), field 1 the file name, field 3 the label (1: the two end
markers lie on the same contour); the other fields describe the generator
settings and are ignored. Despite the ``.npy`` name these are plain text files.

Input encoding (the ELM paper's): each pixel quantised to 16 grey levels
(8 for Path-X, 128×128) as in :func:`elmcore.data.images.quantize_grey`, fed
one-hot, one pixel per step in row-major order: T = H·W steps. The split is a
seeded 80 / 10 / 10 shuffle of all metadata lines (the release ships one pool).

The generator draws curved dashed contours — short straight dashes along a
trajectory whose heading turns by a random angle between dashes — two of full
length ("main") and several shorter distractors, keeps every contour at least
``clearance`` pixels from every other, and puts two marker dots on contour
ends: both ends of main contour 0 (label 1) or one end of each main contour
(label 0). Every image has the same number and kinds of contours and
markers, so only the connectivity distinguishes the classes.
"""

import io
import json
import math
import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from elmcore.errors import DataError
from elmcore.storage.fileio import atomic_write_bytes, atomic_write_text
from elmcore.engine.optional import require
from elmcore.data.images import EncodedSequenceTask, one_hot, quantize_grey, split_indices

RESOLUTIONS = {32: "pathfinder32", 64: "pathfinder64", 128: "pathfinder128"}
DEFAULT_SUBDIR = "curv_contour_length_14"
RECORD_FILE = "record.json"
SOURCE = ("the LRA release tarball lra_release.gz from https://github.com/google-research/"
          "long-range-arena (folders lra_release/pathfinder32, pathfinder128), or run "
          "`elm data generate {task} --out DIR`")


def default_levels(resolution):
    """Grey levels of the paper's one-hot encoding: 8 for Path-X (128×128), 16 otherwise."""
    return 8 if resolution >= 128 else 16


# ---- reader ----------------------------------------------------------------------------

def _numeric_key(name):
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _has_metadata(path):
    return os.path.isdir(os.path.join(path, "metadata"))


def find_pathfinder_dir(data_dir, resolution, subdir=None, task="pathfinder"):
    """The directory holding ``metadata/`` and ``imgs/`` for ``data_dir`` (see PathfinderTask)."""
    data_dir = os.fspath(data_dir)
    nested = os.path.join(data_dir, RESOLUTIONS.get(resolution, f"pathfinder{resolution}"))
    if subdir:
        candidates = [os.path.join(data_dir, subdir), os.path.join(nested, subdir)]
    else:
        candidates = [data_dir]
        for parent in (data_dir, nested):
            if os.path.isdir(parent):
                candidates += [os.path.join(parent, c) for c in sorted(os.listdir(parent))]
    found = [c for c in candidates if _has_metadata(c)]
    if not subdir and len(found) > 1 and not _has_metadata(data_dir):
        preferred = [c for c in found if os.path.basename(c) == DEFAULT_SUBDIR]
        if not preferred:
            raise DataError(f"several Pathfinder data sets under {data_dir}: "
                            f"{', '.join(os.path.basename(c) for c in found)}; choose one with subdir=")
        found = preferred
    if not found:
        looked = ", ".join(os.path.join(c, "metadata") for c in candidates[:4])
        raise DataError(f"no Pathfinder metadata/ folder found for {data_dir} (looked in {looked}"
                        f"{', …' if len(candidates) > 4 else ''}). Get it from "
                        f"{SOURCE.format(task=task)}")
    return found[0]


def read_metadata(dataset_dir):
    """All (image path, label) pairs listed in ``dataset_dir/metadata/*.npy``, in file order."""
    meta_dir = os.path.join(dataset_dir, "metadata")
    names = sorted((n for n in os.listdir(meta_dir) if n.endswith(".npy")), key=_numeric_key)
    if not names:
        raise DataError(f"no metadata files (*.npy) in {meta_dir}")
    paths, labels = [], []
    for name in names:
        meta_path = os.path.join(meta_dir, name)
        try:
            with open(meta_path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"cannot read {meta_path}: {e}") from None
        if raw.startswith(b"\x93NUMPY"):
            raise DataError(f"{meta_path} is a binary NumPy file; the Pathfinder layout expects text "
                            f"lines 'imgs/<n> sample_<k>.png <i> <label> …'")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{meta_path} is not a text file") from None
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4:
                raise DataError(f"{meta_path} line {number}: expected at least 4 fields "
                                f"(folder, file, index, label), got {len(fields)}")
            if fields[3] not in ("0", "1"):
                raise DataError(f"{meta_path} line {number}: label (field 3) must be 0 or 1, "
                                f"got {fields[3]!r}")
            paths.append(os.path.join(dataset_dir, fields[0], fields[1]))
            labels.append(int(fields[3]))
    return paths, np.asarray(labels, dtype=np.int64)


def load_grey_png(path, resolution):
    """(resolution, resolution) uint8 pixels of one image; colour images are converted to grey."""
    Image = require("PIL.Image")
    try:
        with Image.open(path) as img:
            # The header's size, checked before decoding: a tiny PNG can declare 30000×30000 pixels.
            if img.size != (resolution, resolution):
                raise DataError(f"image {path} is {img.size[0]}×{img.size[1]}, expected "
                                f"{resolution}×{resolution}")
            img.load()
            if img.mode != "L":
                img = img.convert("L")
            pixels = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    if pixels.shape != (resolution, resolution):
        raise DataError(f"image {path} decodes to {pixels.shape}, expected ({resolution}, {resolution})")
    return pixels


class PathfinderTask(EncodedSequenceTask):
    """Pathfinder (32×32, 64×64) or Path-X (128×128) from the LRA layout.

    Parameters
    ----------
    data_dir : str
        Either the folder holding ``metadata/`` and ``imgs/``, or one above it:
        ``<data_dir>/<subdir>`` or ``<data_dir>/pathfinder<resolution>/<subdir>``
        (the LRA release root). Without ``subdir`` a single data set found there
        is used, or ``curv_contour_length_14`` (LRA's benchmark set) among several.
    resolution : int
        Image side; every image is checked against it.
    levels : int, optional
        Grey levels of the one-hot encoding; default 16, or 8 at 128×128.
    valid_fraction, test_fraction : float
        Shares of the seeded shuffle of all examples.
    seed : int
        Seed of that shuffle.
    skip_missing : bool
        Drop metadata lines whose image file does not exist (the LRA release
        lists a few) instead of raising.

    Images are decoded batch by batch, so memory holds only the file list.
    """

    # What the labels mean (``elm data info --preview`` says it).
    label_names = {0: "not connected", 1: "connected"}
    label_meaning = "label 1: the two dots lie on one contour (connected); label 0: on two different contours"

    def __init__(self, data_dir, resolution=32, levels: Optional[int] = None, subdir=None,
                 valid_fraction=0.1, test_fraction=0.1, seed=0, skip_missing=False, task=None):
        super().__init__()
        self.resolution = int(resolution)
        self.name = task or {32: "pathfinder", 64: "pathfinder64", 128: "pathx"}.get(
            self.resolution, f"pathfinder{self.resolution}")
        self.levels = int(levels) if levels is not None else default_levels(self.resolution)
        quantize_grey(np.zeros(1, np.uint8), self.levels)  # validates levels early
        self.dataset_dir = find_pathfinder_dir(data_dir, self.resolution, subdir, self.name)
        paths, labels = read_metadata(self.dataset_dir)
        exists = np.array([os.path.isfile(p) for p in paths], dtype=bool)
        if not exists.all():
            missing = [p for p, e in zip(paths, exists) if not e]
            if not skip_missing:
                raise DataError(f"{len(missing)} image(s) listed in {self.dataset_dir}/metadata are "
                                f"missing, e.g. {missing[0]}; pass skip_missing=True to drop them")
            paths = [p for p, e in zip(paths, exists) if e]
            labels = labels[exists]
        if not paths:
            raise DataError(f"no images listed in {self.dataset_dir}/metadata")
        self.paths = np.asarray(paths, dtype=object)
        self.seq_len = self.resolution * self.resolution
        self.num_input = self.levels
        self.num_output = 2
        parts = split_indices(len(paths), valid_fraction, test_fraction, seed)
        self.split_index = parts  # {split: positions in self.paths}
        self.labels = {split: labels[idx] for split, idx in parts.items()}

    def images(self, split, indices):
        """(B, H, W) uint8 pixels of the examples ``indices`` of ``split``."""
        chosen = self.split_index[split][np.asarray(indices)]
        return np.stack([load_grey_png(p, self.resolution) for p in self.paths[chosen]])

    def inputs(self, split, indices):
        pixels = self.images(split, indices).reshape(len(indices), self.seq_len)
        return one_hot(quantize_grey(pixels, self.levels), self.levels)


# ---- generator -------------------------------------------------------------------------

# Geometry in pixels of a 32×32 image; every length scales with size / 32, so
# Path-X (128×128) shows the same kind of scene at four times the resolution.
BASE_GEOMETRY = {"dash_length": 2.0, "dash_spacing": 1.5, "thickness": 1.0, "marker_radius": 1.5,
                 "clearance": 3.0}
SUPERSAMPLE = 4          # drawn at 4× and box-filtered down: anti-aliased grey edges
MAX_TURN = 0.45          # largest heading change between consecutive dashes (radians)
PLACEMENT_TRIES = 100    # random candidates per contour before giving that contour up
PLACEMENT_BATCH = 50     # candidates traced and tested at once
DISTRACTOR_TRIES = 10    # fresh sets of distractors around one main pair before redrawing it
SCENE_TRIES = 100        # main pairs before the settings are declared impossible


class _Scene:
    """Contours placed so far as sampled centre-line points with their clearance radii."""

    def __init__(self):
        self.points = np.zeros((0, 2))
        self.radii = np.zeros(0)

    def fits(self, points, radii, gap):
        """(K,) bool: which of K candidate point sets (K, P, 2) with radii (P,) keep the gap."""
        if not len(self.points):
            return np.ones(len(points), dtype=bool)
        dx = points[:, :, 0, None] - self.points[None, None, :, 0]
        dy = points[:, :, 1, None] - self.points[None, None, :, 1]
        need = (radii[:, None] + self.radii[None, :] + gap) ** 2
        return (dx * dx + dy * dy >= need).all(axis=(1, 2))

    def add(self, points, radii):
        self.points = np.concatenate([self.points, points])
        self.radii = np.concatenate([self.radii, radii])

    def copy(self):
        other = _Scene()
        other.points, other.radii = self.points, self.radii  # add() never mutates in place
        return other


def _trace(rng, count, n_dashes, dash_length, spacing):
    """``count`` contours as dash segments (count, n, 2, 2) starting at the origin.

    The heading turns by up to MAX_TURN between consecutive dashes.
    """
    turns = rng.uniform(-MAX_TURN, MAX_TURN, (count, n_dashes - 1))
    headings = rng.uniform(0, 2 * math.pi, (count, 1)) + np.concatenate(
        [np.zeros((count, 1)), np.cumsum(turns, axis=1)], axis=1)
    directions = np.stack([np.cos(headings), np.sin(headings)], axis=-1)
    steps = directions * (dash_length + spacing)
    starts = np.concatenate([np.zeros((count, 1, 2)), np.cumsum(steps, axis=1)[:, :-1]], axis=1)
    return np.stack([starts, starts + dash_length * directions], axis=2)


def _sample(segments, step):
    """Points every ≤ ``step`` pixels along every (equal-length) dash: (count, n·m, 2)."""
    t = np.linspace(0.0, 1.0, max(2, int(math.ceil(np.linalg.norm(segments[0, 0, 1] - segments[0, 0, 0])
                                                     / step)) + 1))[:, None]
    a, b = segments[:, :, None, 0], segments[:, :, None, 1]
    return (a + t * (b - a)).reshape(len(segments), -1, 2)


def _place(rng, scene, size, n_dashes, geo, margin, end_radius):
    """Draw random contours until one keeps its clearance; add it to the scene.

    A contour is traced from the origin and then shifted to a uniformly random
    position at which it lies inside the margins, so no draw is wasted on
    contours that leave the image. Candidates are drawn and tested in batches
    (the first that fits wins), which keeps the result a function of ``rng`` only.
    """
    for _ in range(PLACEMENT_TRIES // PLACEMENT_BATCH):
        segments = _trace(rng, PLACEMENT_BATCH, n_dashes, geo["dash_length"], geo["dash_spacing"])
        flat = segments.reshape(PLACEMENT_BATCH, -1, 2)
        low, high = flat.min(axis=1), flat.max(axis=1)
        room = (size - 2 * margin) - (high - low)
        segments = segments + (margin - low + rng.uniform(0, 1, (PLACEMENT_BATCH, 2)) * np.maximum(room, 0)
                               )[:, None, None, :]
        inside = np.flatnonzero((room >= 0).all(axis=1))
        if not len(inside):
            continue
        # Sampled every clearance/5 pixels, two contours are truly at least 4/5 of the clearance apart.
        points = _sample(segments[inside], geo["clearance"] / 5)
        radii = np.full(points.shape[1], geo["thickness"] / 2)
        # Main-contour ends may carry a marker: keep them as clear as a marker needs,
        # whether or not one is drawn, so spacing gives nothing away about the label.
        radii[[0, -1]] = end_radius
        ok = scene.fits(points, radii, geo["clearance"])
        if ok.any():
            k = int(np.argmax(ok))
            scene.add(points[k], radii)
            return segments[inside[k]]
    return None


def _scene(rng, size, path_length, distractors, distractor_length, geo):
    """Segments of the two main contours followed by the distractors."""
    margin = geo["marker_radius"] + 1.0
    for _ in range(SCENE_TRIES):
        scene, mains = _Scene(), []
        for _ in range(2):
            segments = _place(rng, scene, size, path_length, geo, margin, geo["marker_radius"])
            if segments is None:
                break
            mains.append(segments)
        if len(mains) < 2:
            continue
        # Distractors fail far more often than main contours: retry them on the kept main pair.
        for _ in range(DISTRACTOR_TRIES):
            trial, others = scene.copy(), []
            for _ in range(distractors):
                segments = _place(rng, trial, size, distractor_length, geo, margin, geo["thickness"] / 2)
                if segments is None:
                    break
                others.append(segments)
            if len(others) == distractors:
                return mains + others
    raise DataError(f"cannot fit 2 contours of {path_length} dashes and {distractors} distractors of "
                    f"{distractor_length} dashes into {size}×{size} with clearance "
                    f"{geo['clearance']:g}: lower path_length, distractors or dash_spacing")


def _render(size, contours, markers, geo):
    Image, ImageDraw = require("PIL.Image"), require("PIL.ImageDraw")
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, int(round(geo["thickness"] * SUPERSAMPLE)))
    for segments in contours:
        for a, b in segments:
            draw.line([tuple(a * SUPERSAMPLE), tuple(b * SUPERSAMPLE)], fill=255, width=width)
    r = geo["marker_radius"] * SUPERSAMPLE
    for x, y in markers:
        cx, cy = x * SUPERSAMPLE, y * SUPERSAMPLE
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return canvas.resize((size, size), Image.BOX)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_positive(**values):
    for field, value in values.items():
        if not value > 0:
            raise DataError(f"pathfinder option {field} must be positive, got {value}")


def generate_pathfinder(out_dir, n=1000, seed=0, size=32, path_length=8, distractors=3,
                        distractor_length=3, dash_spacing=None, dash_length=None, clearance=None,
                        subdir=DEFAULT_SUBDIR, per_folder=1000, progress=False):
    """Write ``n`` Pathfinder images in the LRA layout under ``out_dir/subdir``.

    Parameters
    ----------
    size : int
        Image side (32, 64, or 128 for Path-X; any size ≥ 16 works).
    path_length : int
        Dashes per main contour (difficulty: longer paths are harder to follow).
    distractors, distractor_length : int
        Number of distractor contours and their dashes.
    dash_spacing, dash_length, clearance : float, optional
        Gap between dashes, dash length and least distance between contours in
        pixels; default 1.5, 2.0 and 3.0 scaled by size / 32.
    per_folder : int
        Images per ``imgs/<n>`` folder and per ``metadata/<n>.npy`` file.

    Labels are exactly balanced (a seeded permutation of ⌊n/2⌋ zeros and ⌈n/2⌉
    ones). Image k is drawn from its own generator seeded by (seed, k), so the
    files are byte-identical for the same arguments. Besides the LRA files, the
    generator writes ``record.json``: per image the label, the marker centres
    and the index of the contour each marker sits on (0 and 1 are the main
    contours). Returns the data set directory.
    """
    scale = size / 32.0
    geo = {k: v * scale for k, v in BASE_GEOMETRY.items()}
    geo["thickness"] = max(1.0, geo["thickness"])
    for field, value in (("dash_spacing", dash_spacing), ("dash_length", dash_length),
                         ("clearance", clearance)):
        if value is not None:
            geo[field] = float(value)
    _check_positive(n=n, size=size, path_length=path_length, distractor_length=distractor_length,
                    per_folder=per_folder, **geo)
    if size < 16:
        raise DataError(f"pathfinder size must be at least 16, got {size}")
    if distractors < 0:
        raise DataError(f"pathfinder option distractors must be >= 0, got {distractors}")
    if not subdir or os.sep in subdir or subdir in (".", ".."):
        raise DataError(f"pathfinder subdir must be a plain folder name, got {subdir!r}")
    require("PIL.ImageDraw")  # before any output or progress bar
    dataset_dir = os.path.join(os.fspath(out_dir), subdir)
    labels = np.random.default_rng(seed).permutation(np.arange(n) >= n // 2).astype(int)
    records, metadata = [], {}
    for k in tqdm(range(n), desc=f"pathfinder{size}", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, k])
        contours = _scene(rng, size, path_length, distractors, distractor_length, geo)
        ends = [(0, contours[0][0][0]), (0, contours[0][-1][1]),
                (1, contours[1][0][0]), (1, contours[1][-1][1])]
        if labels[k]:
            chosen = [ends[0], ends[1]]
        else:
            chosen = [ends[int(rng.integers(2))], ends[2 + int(rng.integers(2))]]
        image = _render(size, contours, [c for _, c in chosen], geo)
        folder, name = f"imgs/{k // per_folder}", f"sample_{k % per_folder}.png"
        atomic_write_bytes(os.path.join(dataset_dir, folder, name), png_bytes(image))
        metadata.setdefault(k // per_folder, []).append(
            f"{folder} {name} {k % per_folder} {labels[k]} {path_length} {distractors} "
            f"{distractor_length} {geo['dash_spacing']:g}")
        records.append({"path": f"{folder}/{name}", "label": int(labels[k]),
                        "marker_contours": [int(i) for i, _ in chosen],
                        "markers": [[round(float(v), 4) for v in c] for _, c in chosen],
                        "num_contours": len(contours)})
    for folder, lines in metadata.items():
        atomic_write_text(os.path.join(dataset_dir, "metadata", f"{folder}.npy"), "\n".join(lines) + "\n")
    record = {"generator": "elmcore.data.pathfinder", "size": size, "seed": seed, "n": n,
              "path_length": path_length, "distractors": distractors,
              "distractor_length": distractor_length, **{k: round(v, 6) for k, v in geo.items()},
              "images": records}
    atomic_write_text(os.path.join(dataset_dir, RECORD_FILE), json.dumps(record, indent=1) + "\n")
    return dataset_dir


def read_record(dataset_dir):
    """The generator's ``record.json`` of a generated data set."""
    path = os.path.join(os.fspath(dataset_dir), RECORD_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the generator record {path}: {e}") from None


def image_resolution(dataset_dir):
    """Side of the first image listed in ``dataset_dir/metadata`` (used to tell 32 from 128)."""
    paths, _ = read_metadata(dataset_dir)
    Image = require("PIL.Image")
    try:
        with Image.open(paths[0]) as img:
            return int(img.size[0])
    except OSError as e:
        raise DataError(f"cannot read image {paths[0]}: {e}") from None
