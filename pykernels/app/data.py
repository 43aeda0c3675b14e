"""Data for the demo: handwritten digits (scikit-learn's bundled 8x8 set, or MNIST from
IDX files) and the sequence-reversal task for a small Transformer.

Nothing here downloads: the 8x8 digits ship inside scikit-learn, MNIST is read from files
the user already has (``--data DIR``), and the reversal sequences are generated.
"""

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Targets equal to this do not count (cross_entropy's ignore_index default).
IGNORE_INDEX = -100


class DataError(ValueError):
    """Data that cannot be loaded: a missing or malformed file, a missing package."""


# IDX type codes (the third byte of the magic number) and the big-endian dtypes they name.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """The array stored in an IDX file (the MNIST format), plain or gzip-compressed.

    Layout: two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32, then the values, big-endian, row-major. Raises DataError naming the
    file when the magic number, the type code or the size does not match.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (its magic number does not start with "
                        f"two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header names {ndim} dimensions but the "
                        f"file has {len(raw)} bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is {'truncated' if len(raw) < expected else 'too long'}: "
                        f"dimensions {dims} of {dtype.name} need {expected} bytes, the file "
                        f"has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


@dataclass
class Digits:
    """Flattened images (float32, pixels in [0, 1] as loaded) and their labels (int64)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def standardized(self):
        """The same data with each pixel shifted and scaled to mean 0, std 1 over the
        training images (the test images use the training statistics)."""
        mean, std = self.train_x.mean(0), self.train_x.std(0).clamp_min(1e-3)
        return Digits(self.name, (self.train_x - mean) / std, self.train_y,
                      (self.test_x - mean) / std, self.test_y)

    @property
    def num_features(self):
        return self.train_x.shape[1]

    @property
    def num_classes(self):
        return int(max(self.train_y.max(), self.test_y.max())) + 1


# The MNIST names as distributed, and with a dot (as some mirrors spell them); .gz or not.
_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def _find(directory, stem):
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            if (directory / (name + suffix)).is_file():
                return directory / (name + suffix)
    raise DataError(f"{directory} has no {stem} (nor {stem}.gz): expected the four MNIST IDX "
                    f"files {', '.join(_MNIST_FILES.values())}")


def load_mnist(directory):
    """MNIST (or any data set in its layout: uint8 images N x H x W, uint8 labels N) from
    the four IDX files in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--data {directory}: no such directory")
    arrays = {key: read_idx(_find(directory, stem)) for key, stem in _MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{split} images must be uint8 of shape (N, H, W); got "
                            f"{images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(f"{split} labels must be uint8 of shape (N,); got {labels.dtype} "
                            f"{labels.shape}")
        if len(images) != len(labels) or len(images) == 0:
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
        if labels.max() > 9:
            raise DataError(f"{split} labels must be digits 0-9; found {labels.max()}")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"train images are {arrays['train_x'].shape[1:]} but test images are "
                        f"{arrays['test_x'].shape[1:]}")

    def images(a):
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    h, w = arrays["train_x"].shape[1:]
    return Digits(f"MNIST {h}x{w} from {directory}", images(arrays["train_x"]),
                  labels(arrays["train_y"]), images(arrays["test_x"]), labels(arrays["test_y"]))


def load_digits(seed=0, test_fraction=0.2):
    """scikit-learn's 1,797 handwritten 8x8 digits (no download), split at random."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError("the default data set needs scikit-learn (pip install scikit-learn); "
                        "or pass --data DIR with the MNIST IDX files") from None
    x, y = sklearn_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = torch.from_numpy(x.astype(np.float32) / 16.0)[order]  # pixel values are 0..16
    y = torch.from_numpy(y.astype(np.int64))[order]
    n_test = int(len(x) * test_fraction)
    return Digits("scikit-learn digits 8x8", x[n_test:], y[n_test:], x[:n_test], y[:n_test])


@dataclass
class Reversal:
    """Sequences ``a_1 .. a_n SEP a_n .. a_1`` of digits ``0 .. vocab-1`` (SEP = vocab).

    The model reads ``a_1 .. a_n SEP a_n .. a_2`` and must predict the reversed half, one
    token ahead; the prompt positions carry target IGNORE_INDEX so only the answer counts.
    Reversing needs attention: answer position i must copy prompt position n - i.
    """

    length: int
    vocab: int

    @property
    def vocab_size(self):
        return self.vocab + 1  # the digits and the separator

    @property
    def seq_len(self):
        return 2 * self.length

    def batch(self, n, generator):
        """(idx, targets), both int64 of shape (n, 2 * length)."""
        digits = torch.randint(0, self.vocab, (n, self.length), generator=generator)
        sep = torch.full((n, 1), self.vocab)
        full = torch.cat([digits, sep, digits.flip(1)], 1)
        targets = full[:, 1:].clone()
        targets[:, : self.length] = IGNORE_INDEX  # the digits and SEP are not answers
        return full[:, :-1], targets
