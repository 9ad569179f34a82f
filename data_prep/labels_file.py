"""Multi-hot label matrices from .npy or MATLAB .mat files (one row per image).

.mat files come in two kinds: v5 (read with scipy) and v7.3, which is HDF5
(read with h5py; MATLAB stores column-major, so the matrix arrives transposed).
Either way the result is oriented to (n_images, n_classes) by matching the
expected row count. scipy and h5py are optional (`pip install .[real-data]`)
and imported only here, only when needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .entries import InputError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: Path) -> bool:
    # A v7.3 .mat file is HDF5 with a 512-byte user block; plain HDF5 starts at 0.
    with open(path, "rb") as f:
        head = f.read(520)
    return head[:8] == HDF5_SIGNATURE or head[512:520] == HDF5_SIGNATURE


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"reading this label file needs {module}: pip install '.[real-data]' "
                         f"(or pip install scipy h5py)") from None


def _pick(names, var: str, path: Path) -> str:
    if var in names:
        return var
    raise InputError(f"{path} has no variable {var!r} (has: {', '.join(sorted(names))}); "
                     f"name it with --labels-var")


def _read_mat(path: Path, var: str) -> np.ndarray:
    if _is_hdf5(path):
        h5py = _need("h5py")
        with h5py.File(path, "r") as f:
            names = [k for k in f.keys() if not k.startswith("#")]
            return np.asarray(f[_pick(names, var, path)][()])
    _need("scipy")
    from scipy.io import loadmat
    data = loadmat(path)
    return np.asarray(data[_pick([k for k in data if not k.startswith("__")], var, path)])


def read_matrix(path, var: str = "LAll") -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".mat":
            return _read_mat(path, var)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read label file {path}: {type(e).__name__}: {e}") from None
    raise InputError(f"label file {path}: expected .npy or .mat")


def oriented(matrix: np.ndarray, n_rows: int, path) -> np.ndarray:
    """(n_rows, n_classes) 0/1 ints; transposed when the images are along the columns."""
    if matrix.ndim != 2:
        raise InputError(f"labels in {path} have shape {matrix.shape}; expected a 2-D images x classes matrix")
    if matrix.shape[0] != n_rows and matrix.shape[1] == n_rows:
        matrix = matrix.T
    if matrix.shape[0] != n_rows:
        raise InputError(f"labels in {path} have shape {matrix.shape} but {n_rows} images need "
                         f"one row each (in the order of the Karpathy file): wrong file or --labels-split?")
    if not np.isin(matrix, (0, 1)).all():
        raise InputError(f"labels in {path} are not all 0/1")
    return matrix.astype(np.int8)


def load_labels(path, n_rows: int, var: str = "LAll") -> np.ndarray:
    return oriented(read_matrix(path, var), n_rows, path)


def row_to_indices(row) -> list[int]:
    return [int(i) for i in np.flatnonzero(row)]
