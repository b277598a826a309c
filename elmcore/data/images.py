"""Pixel-per-step image tasks and the encode-per-batch machinery the LRA tasks share.

Sequential images feed one pixel per time step in row-major order (step
``t = row·W + col``), so an H×W image is a sequence of length T = H·W and the
model reads its class from the output of the last step.

Two encodings (``encoding=``):

* ``"grey"`` (default, the ELM paper's LRA encoding): colour images are first
  turned grey with the ITU-R 601 weights LRA uses (0.2989 R + 0.5870 G +
  0.1140 B, rounded to the nearest integer), then quantised to ``levels``
  grey levels with ``level = floor(pixel · levels / 256)`` — for 16 levels
  pixels 0–15 are level 0, 16–31 level 1, …, 240–255 level 15 — and fed
  one-hot: ``num_input = levels``.
* ``"raw"``: every channel divided by 255 (values in [0, 1], no mean/std
  standardisation), ``num_input = C`` (1 for grey images, 3 for RGB).

Inputs are stored as uint8 and encoded batch by batch: one-hot float32 would
take ``4·levels`` times the memory, which for LRA-sized splits (96k ListOps
sequences of 2000 steps, 16384-step Path-X images) does not fit.
"""

import os
from typing import Optional

import numpy as np

from elmcore.errors import DataError
from elmcore.storage.fileio import read_npy, read_npz
from elmcore.data.base import SPLITS, Batch, Task

# tf.image.rgb_to_grayscale, which the LRA image pipeline applies.
GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])


def one_hot(codes, depth):
    """(…) integer codes in [0, depth) → (…, depth) float32 one-hot."""
    return np.eye(depth, dtype=np.float32)[np.asarray(codes, dtype=np.intp)]


def quantize_grey(pixels, levels):
    """uint8 grey pixels → level index ``floor(pixel · levels / 256)`` as uint8."""
    if not 2 <= int(levels) <= 256:
        raise DataError(f"grey levels must be in [2, 256], got {levels}")
    return ((np.asarray(pixels, dtype=np.uint16) * int(levels)) >> 8).astype(np.uint8)


def to_grey(images):
    """(N, H, W) or (N, H, W, C) uint8 → (N, H, W) uint8; C = 3 uses LRA's grey weights."""
    if images.ndim == 3:
        return images
    if images.shape[-1] == 1:
        return images[..., 0]
    grey = np.rint(images.astype(np.float64) @ GREY_WEIGHTS)
    return np.clip(grey, 0, 255).astype(np.uint8)


def split_indices(n, valid_fraction, test_fraction, seed):
    """Shuffle ``range(n)`` with ``seed`` and cut it into train / valid / test index arrays."""
    for field, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{field} must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1.0:
        raise DataError(f"valid_fraction + test_fraction must be < 1, got "
                        f"{valid_fraction} + {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_valid, n_test = int(round(n * valid_fraction)), int(round(n * test_fraction))
    return {"train": np.sort(order[n_valid + n_test:]), "valid": np.sort(order[:n_valid]),
            "test": np.sort(order[n_valid:n_valid + n_test])}


def split_sizes(n, valid_fraction=0.1, test_fraction=0.1):
    """{split: count} for ``n`` generated examples; validation and test get at least one each."""
    if n < 3:
        raise DataError(f"need n >= 3 examples (one per split), got {n}")
    n_valid = max(1, int(round(n * valid_fraction)))
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_valid - n_test < 1:
        raise DataError(f"n={n} leaves no training examples after the validation and test shares")
    return {"train": n - n_valid - n_test, "valid": n_valid, "test": n_test}


class EncodedSequenceTask(Task):
    """A classification task whose inputs are built batch by batch from compact storage.

    Subclasses fill ``self.labels`` ({split: (N,) int64}), ``num_input``,
    ``num_output``, ``seq_len`` and implement :meth:`inputs`.
    """

    loss = "cross_entropy_last"
    metric = "accuracy"
    higher_is_better = True
    seq_len: int = 0

    def __init__(self):
        self.labels = {}

    def inputs(self, split: str, indices: np.ndarray) -> np.ndarray:
        """(B, T, num_input) float32 model input of the examples ``indices`` of ``split``."""
        raise NotImplementedError

    def num_examples(self, split):
        return int(len(self.labels.get(split, ())))

    def batches(self, split, batch_size, rng: Optional[np.random.Generator] = None, shuffle=False):
        if split not in self.labels:
            return
        order = np.arange(self.num_examples(split))
        if shuffle and rng is not None:
            rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            sel = order[start:start + batch_size]
            yield Batch(self.inputs(split, sel), self.labels[split][sel])

    def describe(self):
        info = super().describe()
        info["seq_len"] = self.seq_len
        for split in SPLITS:
            if split in self.labels:
                info[f"class_counts_{split}"] = np.bincount(
                    self.labels[split], minlength=self.num_output).tolist()
        return info


# Files looked for when ``path`` is a directory, in this order.
SCIFAR_FILES = ("scifar.npz", "cifar10.npz", "x_train.npy")
SCIFAR_SOURCE = ("CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar.html and save it as scifar.npz "
                 "with uint8 arrays x_train (N,32,32,3), y_train (N,), x_test, y_test")


def _find_scifar(path):
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in SCIFAR_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return path if name.endswith(".npy") else os.path.join(path, name)
    raise DataError(f"no image array file in {path!r}: looked for {', '.join(SCIFAR_FILES)} "
                    f"(or a .npz/.npy file given directly). Get {SCIFAR_SOURCE}")


def _read_image_arrays(path):
    """{name: array} from an .npz file, or from x_*.npy / y_*.npy files in a directory."""
    names = [f"{xy}_{s}" for s in ("train", "valid", "test") for xy in "xy"]
    try:
        if os.path.isdir(path):
            return {n: read_npy(os.path.join(path, n + ".npy"), n)
                    for n in names if os.path.isfile(os.path.join(path, n + ".npy"))}
        if path.endswith(".npy"):
            raise DataError(f"{path}: a lone .npy holds no labels; put x_train.npy, y_train.npy, "
                            f"x_test.npy, y_test.npy in one directory, or use an .npz")
        arrays = read_npz(path, "image arrays")
        return {n: arrays[n] for n in names if n in arrays}
    except DataError:
        raise
    # zipfile / format / pickle-refusal errors and read_npz's refusal of a forged header
    # (sizes are checked before allocating) all mean "not a usable file"
    except Exception as e:
        raise DataError(f"cannot read image arrays from {path}: {e}") from None


class ImageSequenceTask(EncodedSequenceTask):
    """Sequential images (sequential CIFAR / the LRA Image task) from array files.

    Parameters
    ----------
    path : str
        An ``.npz`` with uint8 ``x_train`` (N, H, W[, C]), integer ``y_train`` (N,),
        ``x_test``, ``y_test`` and optionally ``x_valid``/``y_valid``; or a directory
        holding that file (``scifar.npz`` or ``cifar10.npz``) or the same arrays as
        ``x_train.npy`` … ``y_test.npy``.
    encoding : {"grey", "raw"}
        See the module docstring.
    levels : int
        Grey levels of the one-hot encoding (``encoding="grey"``).
    valid_fraction : float
        Share of the training set held out for validation when no ``x_valid`` exists.
    seed : int
        Seed of that hold-out split.
    """

    def __init__(self, path, encoding="grey", levels=16, valid_fraction=0.1, seed=0):
        super().__init__()
        if encoding not in ("grey", "raw"):
            raise DataError(f"image encoding must be 'grey' or 'raw', got {encoding!r}")
        source = _find_scifar(path)
        arrays = _read_image_arrays(source)
        for need in ("x_train", "y_train", "x_test", "y_test"):
            if need not in arrays:
                raise DataError(f"{source}: missing array '{need}' (found: {sorted(arrays) or 'none'})")
        images, labels = {}, {}
        for split in ("train", "valid", "test"):
            if f"x_{split}" in arrays:
                images[split], labels[split] = self._check(source, split, arrays)
        shapes = {x.shape[1:] for x in images.values()}
        if len(shapes) != 1:
            raise DataError(f"{source}: image shapes differ between splits: {sorted(shapes)}")
        if "valid" not in images:
            parts = split_indices(len(images["train"]), valid_fraction, 0.0, seed)
            images["valid"], labels["valid"] = images["train"][parts["valid"]], labels["train"][parts["valid"]]
            images["train"], labels["train"] = images["train"][parts["train"]], labels["train"][parts["train"]]
        shape = next(iter(shapes))
        self.name = "scifar"
        self.encoding, self.levels = encoding, int(levels)
        self.image_shape = shape
        self.seq_len = int(shape[0] * shape[1])
        self.labels = labels
        self.num_output = int(max(int(y.max(initial=-1)) for y in labels.values()) + 1)
        if encoding == "grey":
            self._pixels = {s: quantize_grey(to_grey(x), self.levels).reshape(len(x), self.seq_len)
                            for s, x in images.items()}
            self.num_input = self.levels
        else:
            channels = 1 if len(shape) == 2 else shape[2]
            self._pixels = {s: x.reshape(len(x), self.seq_len, channels) for s, x in images.items()}
            self.num_input = int(channels)

    @staticmethod
    def _check(source, split, arrays):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise DataError(f"{source}: x_{split} must be uint8 pixels 0..255, got {x.dtype}")
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
            raise DataError(f"{source}: x_{split} must have shape (N, H, W) or (N, H, W, 1|3), "
                            f"got {x.shape}")
        if y.ndim == 2 and y.shape[1] == 1:  # Keras' CIFAR-10 labels are (N, 1)
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: y_{split} must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise DataError(f"{source}: x_{split} has {len(x)} images but y_{split} {len(y)} labels")
        if len(y) and y.min() < 0:
            raise DataError(f"{source}: y_{split} has negative labels")
        return x, y.astype(np.int64)

    def images(self, split, indices):
        """Stored pixels of ``indices`` (grey levels or raw uint8) for previews."""
        return self._pixels[split][indices]

    def inputs(self, split, indices):
        pixels = self._pixels[split][indices]
        if self.encoding == "grey":
            return one_hot(pixels, self.levels)
        return pixels.astype(np.float32) / np.float32(255.0)
