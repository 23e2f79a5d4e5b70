"""Datasets: a registry of image sources, their class counts and normalization, and the one normalizer.

Every dataset yields uint8 images as numpy arrays (H, W, C) with C = 1 (grayscale) or 3 and integer
labels, from a 'train' and a 'test' source.  The model-side view (`SampleDataset`) resizes each image to
`model.input_size`, optionally applies a per-domain corruption (data/domains.py), repeats grayscale to
3 channels and delivers `(uint8 tensor 3 x S x S, int label)`.  `normalize_batch` is the only place a
uint8 batch becomes model input.

Registry (`DATASETS`; an unknown name is a UserError listing the valid ones):

  fashion-mnist  28x28 grayscale, 10 classes.  Looked up in <data_root>/fashion-mnist/,
                 <data_root>/FashionMNIST/raw/ (torchvision's layout), then Debian's
                 /usr/share/datasets/fashion-mnist/ (package dataset-fashion-mnist); where none has the
                 files, torchvision downloads them into <data_root>; where that fails too, a UserError says
                 what to install.
  cifar10        32x32 RGB, 10 classes: <data_root>/cifar-10-batches-bin/ (binary version) or
                 <data_root>/cifar-10-batches-py/ (python version, local files only).
  cifar100       32x32 RGB, 100 fine classes: <data_root>/cifar-100-binary/ or <data_root>/cifar-100-python/.
  imagefolder    <data_root>/<class>/<image> (e.g. ImageNet-val by class folder), loaded lazily with PIL;
                 <data_root>/train and <data_root>/val are used as the train/test sources when both exist,
                 otherwise the whole folder is the test source and there is no train source.
  synthetic      a small deterministic, learnable 16x16 RGB set for tests (class-specific patterns plus
                 noise); never used as a fallback.
"""
from __future__ import annotations

import functools
import gzip
import pickle  # local CIFAR python-version files only (never bytes from the network)
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from config import Config, UserError, resolve_path
from data.normalize import normalize_batch  # noqa: F401 - re-exported: the one uint8 -> model-input function

FASHION_MNIST_SYSTEM_DIR = Path('/usr/share/datasets/fashion-mnist')
SPLITS = ('train', 'test')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.webp', '.tif', '.tiff')


class DatasetError(UserError, ValueError):
    """A dataset that is unknown, missing or malformed; the message names the dataset, path and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------------------

class ImageSource:
    """Indexable uint8 images (H, W, C) with labels; subclasses hold arrays or file paths."""

    labels: np.ndarray  # (N,) int64
    description: str

    def __len__(self) -> int:
        return int(len(self.labels))

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError


class ArraySource(ImageSource):
    def __init__(self, images: np.ndarray, labels: np.ndarray, description: str):
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DatasetError(f'{description}: expected uint8 images (N, H, W, C) and N labels, '
                               f'got {images.dtype} {images.shape} and {len(labels)} labels')
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.description = description

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


class FileSource(ImageSource):
    """Images read lazily from files with PIL (imagefolder)."""

    def __init__(self, paths: List[Path], labels: np.ndarray, description: str):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.description = description

    def image(self, i: int) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                return np.asarray(im.convert('RGB'), dtype=np.uint8)
        except OSError as e:
            raise DatasetError(f'imagefolder: cannot read image {self.paths[i]} ({e})') from None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    mean: Tuple[float, float, float]  # per-channel mean of the 3-channel [0, 1] image
    std: Tuple[float, float, float]  # per-channel standard deviation
    loader: Callable[[Path, int], Dict[str, Optional[ImageSource]]]  # (root, synthetic samples) -> {'train', 'test'}
    needs_root: bool  # False: the dataset can come from elsewhere (system files, generated)


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its declared dtype and shape."""
    opener = gzip.open if str(path).endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f'{path}: cannot read IDX file ({e})') from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f'{path}: not an IDX file (bad magic number)')
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
    if data[2] not in dtypes:
        raise DatasetError(f'{path}: unknown IDX element type 0x{data[2]:02x}')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    offset = 4 + 4 * ndim
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DatasetError(f'{path}: IDX header says shape {shape} ({expected} bytes) but the file holds '
                           f'{len(data) - offset} bytes of data')
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder('='))


FMNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for suffix in ('.gz', ''):
        p = directory / (stem + suffix)
        if p.is_file():
            return p
    return None


def _fmnist_dir(root: Path) -> Optional[Path]:
    for d in (root / 'fashion-mnist', root / 'FashionMNIST' / 'raw', root, FASHION_MNIST_SYSTEM_DIR):
        if all(_find_idx(d, stem) for pair in FMNIST_FILES.values() for stem in pair):
            return d
    return None


def _load_fashion_mnist(root: Path, n_synthetic: int) -> Dict[str, Optional[ImageSource]]:
    directory = _fmnist_dir(root)
    if directory is None:
        try:
            from data._torchvision import import_torchvision
            tv = import_torchvision()
            root.mkdir(parents=True, exist_ok=True)
            for train in (True, False):
                tv.datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - any failure of the fallback becomes the one clear message
            raise DatasetError(
                f'fashion-mnist: no IDX files in {root}/fashion-mnist, {root}/FashionMNIST/raw or '
                f'{FASHION_MNIST_SYSTEM_DIR}, and the torchvision download into {root} failed ({e}). '
                'Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four '
                f'*-ubyte.gz files into {root}/fashion-mnist/') from None
        directory = _fmnist_dir(root)
        if directory is None:
            raise DatasetError(f'fashion-mnist: torchvision reported success but no IDX files are in {root}')
    out: Dict[str, Optional[ImageSource]] = {}
    for split, (img_stem, lbl_stem) in FMNIST_FILES.items():
        img_path, lbl_path = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f'fashion-mnist: {img_path} / {lbl_path} have shapes {images.shape} / '
                               f'{labels.shape}; expected (N, 28, 28) and (N,)')
        out[split] = ArraySource(images, labels, f'fashion-mnist {split} ({directory})')
    return out


# ---------------------------------------------------------------- CIFAR

def _cifar_bin(files: Sequence[Path], label_bytes: int, label_index: int, what: str) -> ArraySource:
    record = label_bytes + 3072
    chunks = []
    for p in files:
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size % record:
            raise DatasetError(f'{what}: {p} has {raw.size} bytes, not a multiple of the {record}-byte record')
        chunks.append(raw.reshape(-1, record))
    raw = np.concatenate(chunks)
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArraySource(np.ascontiguousarray(images), raw[:, label_index].astype(np.int64), what)


def _cifar_py(files: Sequence[Path], label_key: str, what: str) -> ArraySource:
    images, labels = [], []
    for p in files:
        with open(p, 'rb') as f:
            entry = pickle.load(f, encoding='latin1')  # local dataset file, trusted like torchvision does
        images.append(np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(entry[label_key])
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), np.asarray(labels), what)


def _cifar_loader(kind: str) -> Callable[[Path, int], Dict[str, Optional[ImageSource]]]:
    def load(root: Path, n_synthetic: int) -> Dict[str, Optional[ImageSource]]:
        if kind == 'cifar10':
            b, p = root / 'cifar-10-batches-bin', root / 'cifar-10-batches-py'
            layouts = [(b, [f'data_batch_{i}.bin' for i in range(1, 6)], ['test_batch.bin'], 'bin', 1, 0),
                       (p, [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'labels', 0, 0)]
        else:
            b, p = root / 'cifar-100-binary', root / 'cifar-100-python'
            layouts = [(b, ['train.bin'], ['test.bin'], 'bin', 2, 1), (p, ['train'], ['test'], 'fine_labels', 0, 0)]
        for directory, train_files, test_files, how, label_bytes, label_index in layouts:
            tr, te = [directory / f for f in train_files], [directory / f for f in test_files]
            if all(f.is_file() for f in tr + te):
                if how == 'bin':
                    return {'train': _cifar_bin(tr, label_bytes, label_index, f'{kind} train ({directory})'),
                            'test': _cifar_bin(te, label_bytes, label_index, f'{kind} test ({directory})')}
                return {'train': _cifar_py(tr, how, f'{kind} train ({directory})'),
                        'test': _cifar_py(te, how, f'{kind} test ({directory})')}
        names = ' or '.join(str(x[0]) for x in layouts)
        raise DatasetError(f'{kind}: no dataset files found; expected {names} (the standard archives unpacked '
                           f'into --data_root {root})')
    return load


# ---------------------------------------------------------------- ImageFolder

def _folder_source(directory: Path, classes: Sequence[str], what: str) -> FileSource:
    paths, labels = [], []
    for c, name in enumerate(classes):
        sub = directory / name
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if sub.is_dir() else []
        paths.extend(files)
        labels.extend([c] * len(files))
    if not paths:
        raise DatasetError(f'{what}: no images ({", ".join(IMAGE_SUFFIXES)}) under {directory}/<class>/')
    return FileSource(paths, np.asarray(labels), what)


def _imagefolder_classes(directory: Path) -> List[str]:
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f'imagefolder: {directory} has no class sub-folders (<data_root>/<class>/<image>)')
    return classes


def _load_imagefolder(root: Path, n_synthetic: int) -> Dict[str, Optional[ImageSource]]:
    if (root / 'train').is_dir() and (root / 'val').is_dir():
        classes = _imagefolder_classes(root / 'train')
        return {'train': _folder_source(root / 'train', classes, f'imagefolder train ({root / "train"})'),
                'test': _folder_source(root / 'val', classes, f'imagefolder test ({root / "val"})')}
    classes = _imagefolder_classes(root)
    return {'train': None, 'test': _folder_source(root, classes, f'imagefolder ({root})')}


def imagefolder_num_classes(root: Path) -> int:
    base = root / 'train' if (root / 'train').is_dir() and (root / 'val').is_dir() else root
    return len(_imagefolder_classes(base))


# ---------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 16
SYNTHETIC_SEED = 20240601  # fixed: the synthetic images do not depend on --seed


def _load_synthetic(root: Path, n_synthetic: int) -> Dict[str, Optional[ImageSource]]:
    """Class templates (smooth random 3-channel patterns) plus per-sample noise and a random shift."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    coarse = rng.uniform(0.0, 1.0, size=(SYNTHETIC_CLASSES, 3, 4, 4)).astype(np.float32)
    templates = F.interpolate(torch.from_numpy(coarse), size=(SYNTHETIC_SIZE, SYNTHETIC_SIZE), mode='bilinear',
                              align_corners=False).numpy()
    out: Dict[str, Optional[ImageSource]] = {}
    n_total = max(int(n_synthetic), 2 * SYNTHETIC_CLASSES)
    for split, n in (('train', n_total), ('test', max(n_total // 4, SYNTHETIC_CLASSES))):
        labels = np.arange(n) % SYNTHETIC_CLASSES
        rng.shuffle(labels)
        noise = rng.normal(0.0, 0.18, size=(n, 3, SYNTHETIC_SIZE, SYNTHETIC_SIZE)).astype(np.float32)
        shifts = rng.integers(-2, 3, size=(n, 2))
        imgs = templates[labels] + noise
        for i, (dy, dx) in enumerate(shifts):
            imgs[i] = np.roll(imgs[i], (int(dy), int(dx)), axis=(1, 2))
        imgs = np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        out[split] = ArraySource(np.ascontiguousarray(imgs), labels, f'synthetic {split}')
    return out


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS: Dict[str, DatasetSpec] = {
    'fashion-mnist': DatasetSpec('fashion-mnist', 10, (0.2860,) * 3, (0.3530,) * 3, _load_fashion_mnist, False),
    'cifar10': DatasetSpec('cifar10', 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           _cifar_loader('cifar10'), True),
    'cifar100': DatasetSpec('cifar100', 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            _cifar_loader('cifar100'), True),
    'imagefolder': DatasetSpec('imagefolder', 0, _IMAGENET_MEAN, _IMAGENET_STD, _load_imagefolder, True),
    'synthetic': DatasetSpec('synthetic', SYNTHETIC_CLASSES, (0.5,) * 3, (0.25,) * 3, _load_synthetic, False),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of `name`; an unknown name is a DatasetError listing the valid choices."""
    if name not in DATASETS:
        raise DatasetError(f'--dataset / data.dataset: unknown dataset {name!r}; valid choices: '
                           f'{", ".join(sorted(DATASETS))}')
    return DATASETS[name]


def _data_root(cfg: Config, spec: DatasetSpec) -> Path:
    root = resolve_path(cfg.data.data_root)
    if spec.needs_root and not root.is_dir():
        raise DatasetError(f'--data_root / data.data_root: directory {root} does not exist '
                           f'(dataset {spec.name} is read from there)')
    return root


def data_root(cfg: Config) -> Path:
    """The resolved data root of cfg's dataset (checked to exist where the dataset needs it)."""
    return _data_root(cfg, dataset_spec(cfg.data.dataset))


def num_classes_for(dataset_name: str, cfg: Optional[Config] = None) -> int:
    """Number of classes of a dataset (imagefolder: counted from the class folders, needs `cfg`)."""
    spec = dataset_spec(dataset_name)
    if spec.name != 'imagefolder':
        return spec.num_classes
    if cfg is None:
        raise DatasetError('imagefolder: the number of classes is read from the folders; pass the config')
    return imagefolder_num_classes(_data_root(cfg, spec))


def check_dataset(cfg: Config) -> DatasetSpec:
    """Validate the dataset name and its data root without loading images (fail before writing anything)."""
    spec = dataset_spec(cfg.data.dataset)
    _data_root(cfg, spec)
    return spec


@functools.lru_cache(maxsize=4)
def _load_sources(name: str, root: str, synthetic_samples: int) -> Dict[str, Optional[ImageSource]]:
    return DATASETS[name].loader(Path(root), synthetic_samples)


def load_sources(cfg: Config) -> Dict[str, Optional[ImageSource]]:
    """{'train': ImageSource or None, 'test': ImageSource} of cfg.data.dataset (cached per process)."""
    spec = dataset_spec(cfg.data.dataset)
    root = _data_root(cfg, spec)
    sources = _load_sources(spec.name, str(root), int(cfg.data.synthetic_samples))
    ncls = num_classes_for(spec.name, cfg)
    for split, src in sources.items():
        if src is not None and len(src) and (src.labels.min() < 0 or src.labels.max() >= ncls):
            raise DatasetError(f'{src.description}: labels outside 0..{ncls - 1}')
    return sources


def dataset_stats(cfg: Config) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of cfg.data.dataset, 3 channels each."""
    spec = dataset_spec(cfg.data.dataset)
    return spec.mean, spec.std


# ----------------------------------------------------------------------------------------------------------
# Samples as the model sees them
# ----------------------------------------------------------------------------------------------------------

CACHE_CHUNK = 1024  # images resized per batch when a dataset is cached


def resize_images(imgs: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, size, size) in [0, 1], bilinear (antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=shrink)
    return (x / 255.0).clamp_(0.0, 1.0).numpy()


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, size, size) in [0, 1]; same arithmetic as resize_images."""
    return resize_images(img[None], size)[0]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, rounding to nearest."""
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


class SampleDataset(torch.utils.data.Dataset):
    """Samples `indices` of one source, resized to `size`, each passed through `transform(img, index)`.

    Items are (uint8 tensor 3 x size x size, int label).  `transform` (a domain corruption) receives the
    float (C, size, size) image in [0, 1] and the sample's index in its source, and returns the same shape.
    With `cache=True` every sample is computed once, at construction, and kept as one uint8 tensor.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], size: int,
                 transform: Optional[Callable[[np.ndarray, int], np.ndarray]] = None, cache: bool = False):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.size = int(size)
        self.transform = transform
        self.labels = source.labels[self.indices]
        self._cache: Optional[torch.Tensor] = None  # (N, C, size, size) uint8, C = the source's channels
        if cache and len(self.indices):
            self._cache = torch.cat([self._compute_chunk(lo, min(lo + CACHE_CHUNK, len(self.indices)))
                                     for lo in range(0, len(self.indices), CACHE_CHUNK)])

    def __len__(self) -> int:
        return int(len(self.indices))

    def _compute_chunk(self, lo: int, hi: int) -> torch.Tensor:
        """Samples lo..hi-1 as uint8 (n, C, size, size); array sources are resized as one batch."""
        if not isinstance(self.source, ArraySource):
            return torch.stack([self._compute(i) for i in range(lo, hi)])
        idx = self.indices[lo:hi]
        x = resize_images(self.source.images[idx], self.size)
        if self.transform is not None:
            x = np.stack([self.transform(xi, int(j)) for xi, j in zip(x, idx)])
        return torch.from_numpy(to_uint8(x))

    def _compute(self, i: int) -> torch.Tensor:
        idx = int(self.indices[i])
        x = resize_image(self.source.image(idx), self.size)
        if self.transform is not None:
            x = self.transform(x, idx)
        return torch.from_numpy(to_uint8(x))

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        img = self._cache[i] if self._cache is not None else self._compute(i)
        return (img.expand(3, -1, -1) if img.shape[0] == 1 else img), int(self.labels[i])
