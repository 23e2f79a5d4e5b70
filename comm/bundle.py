"""The device side, declared once: the files the edge device (Jetson TX2: Python 3.6, PyTorch 1.10, numpy) needs to
run client_worker.py, and the command that packs them.

    python -m comm.bundle OUT.tar.gz     # or `-` for stdout:
    python -m comm.bundle - | ssh nvidia@tx2 'mkdir -p hyperrepvgg && tar xzf - -C hyperrepvgg \
        && cd hyperrepvgg && sha256sum -c --quiet SHA256SUMS'

The tarball holds DEVICE_FILES at their repository paths plus SHA256SUMS (`sha256sum -c` format) and is
byte-reproducible (sorted members, fixed mtime and owner).  This module is server-side: it is not in DEVICE_FILES
and the device never imports it.  tests/test_device_compat.py checks that the files import nothing outside this
list except the Python standard library, DEVICE_PACKAGES and (guarded) DEVICE_OPTIONAL_PACKAGES, and pass
`vermin -t=3.6-`.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from errors import UserError

REPO = Path(__file__).resolve().parent.parent
# Repository-relative paths, in import order: the worker, what it imports, and the package files on the way.
DEVICE_FILES: Tuple[str, ...] = (
    'client_worker.py',
    'step1_measure_lut.py',
    'hyper_repvgg.py',
    'chain_nets.py',
    'nets.py',
    'errors.py',
    'comm/__init__.py',
    'comm/protocol.py',
    'comm/parts.py',
    'data/__init__.py',
    'data/normalize.py',
    'timing/__init__.py',
    'timing/measure.py',
    'timing/flops.py',
    'timing/edge_lut.py',
)
# What the device runs: the worker, and step 1's --mode client (the seed's `python step1_measure_lut.py --mode
# client` on the Jetson, which dispatches to timing/edge_lut.py); DEVICE_FILES is their import closure.
DEVICE_ENTRY_POINTS: Tuple[str, ...] = ('client_worker.py', 'step1_measure_lut.py')
DEVICE_PACKAGES: Tuple[str, ...] = ('numpy', 'torch')  # installed on the device (NVIDIA's torch 1.10 wheel)
DEVICE_OPTIONAL_PACKAGES: Tuple[str, ...] = ('paramiko', 'tqdm')  # used when present (--ssh, progress bars)
SUMS_NAME = 'SHA256SUMS'
MTIME = 946684800  # 2000-01-01: a fixed member mtime, so the same files give the same tarball


def device_sources(root: Path = REPO) -> Dict[str, bytes]:
    """{path: bytes} of every device file under `root`; UserError naming a missing one."""
    out: Dict[str, bytes] = {}
    for rel in DEVICE_FILES:
        f = root / rel
        if not f.is_file():
            raise UserError(f'device bundle: {f} is missing (listed in comm/bundle.py DEVICE_FILES)')
        out[rel] = f.read_bytes()
    return out


def sha256sums(sources: Dict[str, bytes]) -> str:
    """The SHA256SUMS text (`<hex>  <path>` per line, as sha256sum writes and `sha256sum -c` reads)."""
    return ''.join(f'{hashlib.sha256(data).hexdigest()}  {rel}\n' for rel, data in sorted(sources.items()))


def bundle_bytes(root: Path = REPO) -> bytes:
    """The gzip tarball of the device files plus SHA256SUMS, byte-reproducible."""
    sources = device_sources(root)
    members: List[Tuple[str, bytes]] = sorted(sources.items()) + [(SUMS_NAME, sha256sums(sources).encode())]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode='wb', mtime=MTIME) as gz:
        with tarfile.open(fileobj=gz, mode='w', format=tarfile.USTAR_FORMAT) as tar:
            for rel, data in members:
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ''
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_bundle(out: str, root: Path = REPO) -> bytes:
    """Write the tarball to `out` atomically (`-`: stdout); returns its bytes."""
    data = bundle_bytes(root)
    if out == '-':
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        from artifacts import atomic_write_bytes
        path = Path(out)
        if path.is_dir():
            raise UserError(f'device bundle: OUT {path} is a directory; expected a file name such as bundle.tar.gz')
        atomic_write_bytes(path, data)
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='python -m comm.bundle', description=(
        'Write the tarball of the device-side files (comm/bundle.py DEVICE_FILES) with a SHA256SUMS manifest, '
        'for the edge device: unpack it in a directory there and run client_worker.py from it.'))
    ap.add_argument('out', help='output .tar.gz path, or - for stdout (e.g. piped through ssh to the device)')
    args = ap.parse_args(argv)
    try:
        data = write_bundle(args.out)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    where = 'stdout' if args.out == '-' else args.out
    print(f'device bundle: {len(DEVICE_FILES)} files + {SUMS_NAME}, {len(data)} bytes -> {where}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
