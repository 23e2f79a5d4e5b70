"""JSON artifacts: atomic writing with provenance, and validated loading.

Every artifact is a JSON object with `schema_version`, `kind`, `created_at` (UTC ISO-8601), `command` (the
producing command line) and `config` (the resolved Config), plus the fields its kind defines.  Writing goes
to a temporary file in the same directory followed by os.replace, so a reader never sees half a file.
Loading checks the common fields and the kind's required fields and raises `ArtifactError` naming the file
and the field.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from config import Config, UserError, parse_json_bytes

SCHEMA_VERSION = 1
JOINT_DIR = 'joint_optimization'  # step 3's per-domain artifacts, under results_dir
COMMON_FIELDS: Dict[str, Any] = {'schema_version': int, 'kind': str, 'created_at': str, 'command': str,
                                 'config': dict}
FieldType = Union[type, Tuple[type, ...]]


class ArtifactError(UserError, ValueError):
    """A missing, corrupt or incompatible artifact; the message names the file and the field."""


def _default(o: Any) -> Any:
    if hasattr(o, 'tolist'):  # numpy arrays and scalars, torch tensors
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f'not JSON-serializable: {type(o).__name__}')


def fingerprint(obj: Any) -> str:
    """The one cache-key digest: SHA-256 (hex) of `obj`'s canonical JSON (keys sorted, json's default separators;
    numpy values, sets and paths as write_artifact stores them).  A cache records it and is reused only when equal."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_default).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes: what a cache key holds for an input file (a LUT, a checkpoint)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f'{where}: non-finite number {obj} cannot go into a JSON artifact')
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f'{where}.{k}')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(v, f'{where}[{i}]')


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and os.replace: all or nothing.

    The file gets the mode a plain open() would give it (0666 minus the umask, usually 0644), not mkstemp's 0600,
    so that others on a shared server can read the results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_artifact(path: Path, kind: str, payload: Mapping[str, Any], config: Optional[Config],
                   command: str, created_at: Optional[str] = None) -> Dict[str, Any]:
    """Write `payload` plus the provenance fields as JSON, atomically; returns the written object.

    `created_at` may be fixed by the caller (e.g. for byte-identical reruns); default: now (UTC).
    """
    obj: Dict[str, Any] = {
        'schema_version': SCHEMA_VERSION,
        'kind': kind,
        'created_at': created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'),
        'command': command,
        'config': config.to_dict() if config is not None else {},
    }
    clash = set(obj) & set(payload)
    if clash:
        raise ValueError(f'artifact {kind}: payload may not set reserved fields {sorted(clash)}')
    obj.update(payload)
    _check_finite(dict(payload), f'{path}')
    text = json.dumps(obj, indent=1, default=_default, allow_nan=False)
    atomic_write_bytes(Path(path), (text + '\n').encode())
    return json.loads(text)


def pct_names(obj: Any) -> Any:
    """`obj` with every key ending in `_percent` (step-0 artifacts before one suffix was chosen) renamed to the
    `_pct` the artifacts use now; the old-artifact boundary for those fields."""
    if isinstance(obj, dict):
        return {(k[:-len('_percent')] + '_pct' if isinstance(k, str) and k.endswith('_percent') else k): pct_names(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [pct_names(v) for v in obj]
    return obj


def joint_path(results_dir: Path, domain: Any) -> Path:
    """Step 3's result for one domain: <results_dir>/joint_optimization/domain_<d>_joint.json (step 3 writes it,
    step 4 reads it)."""
    return Path(results_dir) / JOINT_DIR / f'domain_{domain}_joint.json'


def load_artifact(path: Path, kind: Optional[str] = None, fields: Optional[Mapping[str, FieldType]] = None,
                  upgrade: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Read and validate an artifact; `fields` maps required top-level fields to their JSON types; `upgrade`
    maps an older artifact's names onto the current ones before validation (the one old-artifact boundary)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f'{path}: artifact file does not exist (run the step that writes it first)')
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f'{path}: cannot read ({e.strerror or e})') from None
    obj = parse_json_bytes(raw, str(path), ArtifactError)
    if not isinstance(obj, dict):
        raise ArtifactError(f'{path}: expected a JSON object at the top level')
    if upgrade is not None:
        obj = upgrade(obj)
    for name, tp in {**COMMON_FIELDS, **(fields or {})}.items():
        if name not in obj:
            raise ArtifactError(f'{path}: missing field {name!r}')
        if tp is float:
            tp = (int, float)
        if not isinstance(obj[name], tp) or (isinstance(obj[name], bool) and tp in (int, (int, float))):
            want = tp.__name__ if isinstance(tp, type) else '/'.join(t.__name__ for t in tp)
            raise ArtifactError(f'{path}: field {name!r} should be {want}, got {type(obj[name]).__name__}')
    if obj['schema_version'] != SCHEMA_VERSION:
        raise ArtifactError(f'{path}: field "schema_version" is {obj["schema_version"]}, this code reads '
                            f'{SCHEMA_VERSION}; rerun the step that wrote it')
    if kind is not None and obj['kind'] != kind:
        raise ArtifactError(f'{path}: field "kind" is {obj["kind"]!r}, expected {kind!r}')
    return obj
