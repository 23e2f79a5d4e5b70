"""The hardware LUT (docs/design.md#lut): per-side tables, link presets, merge, validated loading, loaders.

This is the only optim module that reads and writes files.  Artifacts:

* `lut_server.json` / `lut_edge.json` (kinds 'lut_server' / 'lut_edge'): one side's times per
  block x layout x batch (`entries`, keyed by `lut_key`), the head (pooling + classifier) per batch, the
  side's roofline (peak FLOP/s, memory bandwidth, knee), metadata and settings; every entry says whether it
  was `measured` or `modelled` (from a device profile, see timing/profiles.py).
* `link.json` (kind 'link'): the link used (bandwidth_mbps, rtt_ms, latency_ms = rtt/2, sources).
* `hardware_lut_complete.json` (kind 'hardware_lut_complete'): both sides, per block x layout the FLOPs,
  bytes and intensity (timing/flops.py), per-lambda transfer bytes (fp32 and fp16 features), the link,
  both roofline knees, block shapes, model spec and input size.
* `lut_validation.json` (kind 'lut_validation'): LUT sums against end-to-end timings of whole configurations.

`cost_tables(lut, batch)` and `block_stats(lut)` turn a loaded LUT into the arrays optim/cost.py and the
solvers use.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from artifacts import ArtifactError, load_artifact
from config import Config, ConfigError, UserError
import nets
from hyper_repvgg import LAYOUTS, NUM_LAYOUTS
from timing import flops as F
from timing.edge_lut import lut_key, side_payload  # noqa: F401 - device-side, so the TX2 writes what this reads
from optim.cost import CostTables
from timing.profiles import DeviceProfile

SIDES = ('server', 'edge')
TIMING_METHODS = ('fit', 'chain', 'isolated')  # as timing.measure.TIMING_METHODS (not imported: torch)
ENTRY_SOURCES = ('measured', 'modelled')
SIDE_FIELDS = {'side': str, 'model': dict, 'input_size': int, 'num_blocks': int, 'batch_sizes': list,
               'entries': dict, 'head': dict, 'roofline': dict, 'source': str}
COMPLETE_FIELDS = {'model': dict, 'input_size': int, 'num_blocks': int, 'batch_sizes': list, 'blocks': list,
                   'server': dict, 'edge': dict, 'link': dict, 'link_bytes': dict, 'feature_dtype': str,
                   'roofline': dict, 'head_cost': dict}


def upgrade_edge_naming(obj: Dict[str, Any]) -> Dict[str, Any]:
    """A LUT artifact written before the edge device had one name (kind 'lut_client', side 'client', a
    'client' key in hardware_lut_complete.json) with the current names ('lut_edge', 'edge'); current ones as is."""
    obj = dict(obj)
    if obj.get('kind') == 'lut_client':
        obj['kind'] = 'lut_edge'
    if obj.get('side') == 'client':
        obj['side'] = 'edge'
    if 'client' in obj and 'edge' not in obj:
        obj['edge'] = obj.pop('client')
    return obj


class LutError(UserError, ValueError):
    """A LUT that does not fit the request (missing entry, mismatched model, unknown batch)."""


# ----------------------------------------------------------------------------------------------------------
# Model spec and link
# ----------------------------------------------------------------------------------------------------------

def num_classes_for_config(cfg: Config) -> int:
    """Classes of cfg's dataset: 10 (fashion-mnist, cifar10, synthetic), 100 (cifar100), imagefolder: counted
    from its class folders when they exist, else 1000 (ImageNet)."""
    from data.datasets import DatasetError, num_classes_for
    try:
        return num_classes_for(cfg.data.dataset, cfg)
    except DatasetError:
        if cfg.data.dataset == 'imagefolder':
            return 1000
        raise


def model_spec(cfg: Config) -> Dict[str, Any]:
    """JSON-able architecture of cfg (as RepVGG.spec_dict() / ChainNet.spec_dict()), checked to build a block plan."""
    try:
        name = nets.canonical_name(cfg.model.name)
    except KeyError as e:
        raise ConfigError(f'--model / model.name: {e.args[0]}') from None
    wm = cfg.model.width_multiplier
    spec = {'name': name, 'num_classes': num_classes_for_config(cfg),
            'width_multiplier': None if wm is None else [float(w) for w in wm],
            'small_input': bool(cfg.model.small_input)}
    if nets.is_plain(name) and spec['small_input']:
        raise ConfigError(f'model.small_input: {name} has no small-input stem; set it to false')
    try:
        nets.plan_of(spec)
    except ValueError as e:
        raise ConfigError(f'model.width_multiplier: {e}') from None
    if cfg.model.input_size < 8:
        raise ConfigError(f'--input_size / model.input_size: expected at least 8 pixels, got {cfg.model.input_size}')
    return spec


def plan_of(model: Dict[str, Any]) -> list:
    return nets.plan_of(model)


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth_mbps: float  # uplink, Mbit/s
    rtt_ms: float  # round-trip time, ms
    bandwidth_source: str
    rtt_source: str

    @property
    def latency_ms(self) -> float:
        """One-way latency, ms (rtt / 2)."""
        return self.rtt_ms / 2.0

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['latency_ms'] = self.latency_ms
        return d


_DADS = 'DADS (Hu et al., INFOCOM 2019): average {} uplink bandwidth'
LINK_PRESETS: Dict[str, LinkSpec] = {
    '3g': LinkSpec('3g', 1.1, 200.0, _DADS.format('3G'),
                   'assumption: typical UMTS/HSPA round-trip time (100-300 ms range)'),
    '4g': LinkSpec('4g', 5.85, 70.0, _DADS.format('4G'),
                   'assumption: typical LTE round-trip time to a cloud server (50-100 ms range)'),
    'wifi': LinkSpec('wifi', 18.88, 10.0, _DADS.format('WiFi'),
                     'assumption: typical WLAN round-trip time to a nearby server (5-20 ms range)'),
    'ethernet': LinkSpec('ethernet', 1000.0, 0.5, 'nominal Gigabit Ethernet (IEEE 802.3ab) line rate',
                         'assumption: switched LAN round-trip time'),
}


def resolve_link(lut_config: Any, base: Optional[LinkSpec] = None) -> LinkSpec:
    """The one link resolver (steps 1-3): `base` (a LUT's own link, step 2 / 3) or else the `link` preset of
    cfg.lut, with explicit `bandwidth_mbps` (Mbit/s) / `rtt_ms` (ms) taking precedence; named 'custom' when both
    are explicit, '<base>+explicit' when one is.  ConfigError naming the flag / key."""
    if lut_config.link not in LINK_PRESETS:
        raise ConfigError(f'--link / lut.link: unknown link preset {lut_config.link!r}; valid choices: '
                          f'{", ".join(LINK_PRESETS)}')
    link = base if base is not None else LINK_PRESETS[lut_config.link]
    bw, rtt = lut_config.bandwidth_mbps, lut_config.rtt_ms
    if bw is not None and not (bw > 0 and math.isfinite(bw)):
        raise ConfigError(f'--bandwidth_mbps / lut.bandwidth_mbps: expected a positive number, got {bw}')
    if rtt is not None and not (rtt >= 0 and math.isfinite(rtt)):
        raise ConfigError(f'--rtt_ms / lut.rtt_ms: expected a number >= 0, got {rtt}')
    if bw is None and rtt is None:
        return link
    name = 'custom' if bw is not None and rtt is not None else f'{link.name}+explicit'
    return LinkSpec(name, link.bandwidth_mbps if bw is None else float(bw), link.rtt_ms if rtt is None else float(rtt),
                    link.bandwidth_source if bw is None else 'explicit (--bandwidth_mbps / lut.bandwidth_mbps)',
                    link.rtt_source if rtt is None else 'explicit (--rtt_ms / lut.rtt_ms)')


def link_from_dict(d: Dict[str, Any], where: str = 'link') -> LinkSpec:
    try:
        return LinkSpec(str(d['name']), float(d['bandwidth_mbps']), float(d['rtt_ms']),
                        str(d.get('bandwidth_source', '')), str(d.get('rtt_source', '')))
    except (KeyError, TypeError, ValueError) as e:
        raise LutError(f'{where}: expected name, bandwidth_mbps and rtt_ms ({e})') from None


# ----------------------------------------------------------------------------------------------------------
# Side LUTs
# ----------------------------------------------------------------------------------------------------------

def modelled_side(profile: DeviceProfile, model: Dict[str, Any], input_size: int, batch_sizes: Sequence[int],
                  side: str = 'edge', precision: str = 'fp32') -> Dict[str, Any]:
    """A side LUT predicted by `profile`'s roofline + overhead model (every entry 'modelled').

    For a batch of B: FLOPs and activation bytes scale with B, weight bytes are read once, kernels are the same.
    """
    plan = plan_of(model)
    hws = F.block_input_hw(plan, input_size)
    entries, head = {}, {}

    def row(cost: F.LayoutCost, batch: int, **ids: Any) -> Dict[str, Any]:
        ms = profile.predict_ms(cost.flops * batch, cost.weight_bytes + cost.act_bytes * batch, cost.kernels,
                                precision)
        return dict(ids, batch=int(batch), median_ms=ms, p10_ms=ms, p90_ms=ms, n=0, source='modelled')

    for b in batch_sizes:
        for spec, hw in zip(plan, hws):
            for g in F.measurable_layouts(spec):
                entries[lut_key(spec.index, g, b)] = row(F.layout_cost(spec, hw, g), b, block=spec.index, layout=g)
        head[lut_key('head', None, b)] = row(F.head_cost(plan, input_size, model['num_classes']), b)
    roofline = {'peak_flops_per_s': profile.peak_flops(precision),
                'mem_bandwidth_bytes_per_s': profile.mem_bandwidth.value,
                'knee_flop_per_byte': profile.knee_flop_per_byte(precision),
                'source': f'published (device profile {profile.name})'}
    return {'side': side, 'model': model, 'input_size': int(input_size), 'num_blocks': len(plan),
            'batch_sizes': [int(b) for b in batch_sizes], 'source': 'modelled', 'profile': profile.to_dict(),
            'entries': entries, 'head': head, 'roofline': roofline,
            'metadata': {'device_name': profile.description, 'model': 'roofline + per-kernel overhead'},
            'settings': {'precision': precision, 'batch_sizes': [int(b) for b in batch_sizes]}}


def _num(obj: Dict[str, Any], name: str, where: str, minimum: float = 0.0) -> float:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
        raise ArtifactError(f'{where}.{name}: expected a finite number >= {minimum}, got {v!r}')
    return float(v)


def _check_side(side: Dict[str, Any], where: str) -> None:
    """Deep checks of one side's tables; errors name the file and the field."""
    for name, tp in SIDE_FIELDS.items():
        if name != 'side' and not isinstance(side.get(name), tp):
            raise ArtifactError(f'{where}.{name}: missing or not a {tp.__name__}')
    for key, e in side['entries'].items():
        w = f'{where}.entries[{key}]'
        if not isinstance(e, dict):
            raise ArtifactError(f'{w}: expected an object')
        for f in ('block', 'layout', 'batch'):
            if not isinstance(e.get(f), int):
                raise ArtifactError(f'{w}.{f}: expected an integer, got {e.get(f)!r}')
        if lut_key(e['block'], e['layout'], e['batch']) != key:
            raise ArtifactError(f'{w}: key does not match its block/layout/batch fields')
        for f in ('median_ms', 'p10_ms', 'p90_ms'):
            _num(e, f, w)
        if e.get('source') not in ENTRY_SOURCES:
            raise ArtifactError(f'{w}.source: expected one of {ENTRY_SOURCES}, got {e.get("source")!r}')
    for b in side['batch_sizes']:
        k = lut_key('head', None, b)
        if k not in side['head']:
            raise ArtifactError(f'{where}.head: no entry {k} for batch {b}')
        _num(side['head'][k], 'median_ms', f'{where}.head[{k}]')
    _num(side['roofline'], 'knee_flop_per_byte', f'{where}.roofline')
    _num(side['roofline'], 'peak_flops_per_s', f'{where}.roofline')
    offsets = side.get('edge_part_offset_ms')
    if offsets is not None:
        if not isinstance(offsets, dict):
            raise ArtifactError(f'{where}.edge_part_offset_ms: expected an object batch -> list of ms')
        n = side.get('num_blocks')
        for b, vals in offsets.items():
            if (not isinstance(vals, list) or len(vals) != n or
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in vals)):
                raise ArtifactError(f'{where}.edge_part_offset_ms[{b}]: expected {n} finite times in ms (one per '
                                    f'block), got {vals!r}')
    timing = (side.get('settings') or {}).get('timing')
    if side['source'] == 'measured' and timing not in TIMING_METHODS:
        raise ArtifactError(f'{where}.settings.timing: unknown timing method {timing!r}; this version reads '
                            f'{", ".join(TIMING_METHODS)} (re-measure this side with step 1)')


def load_side(path: Path, side: str) -> Dict[str, Any]:
    """Load and validate lut_server.json / lut_edge.json (or an old lut_client.json); ArtifactError naming file and
    field."""
    obj = load_artifact(path, f'lut_{side}', SIDE_FIELDS, upgrade_edge_naming)
    _check_side(obj, str(path))
    return obj


def roofline_fit(side: Dict[str, Any], batch: int = 1) -> Dict[str, Any]:
    """How well the profiles' roofline + per-kernel-overhead model explains a MEASURED side LUT.

    With the side's own measured peak FLOP/s and bandwidth, fit the compute / memory efficiencies (grid) and the
    per-kernel overhead (median residual per kernel) to the entries at `batch`; report the fitted values and
    the model's median absolute % error and share within +/-10 %.  A yardstick for modelled (profile) entries.
    """
    rf = side['roofline']
    plan = plan_of(side['model'])
    hws = F.block_input_hw(plan, side['input_size'])
    rows = []
    for spec, hw in zip(plan, hws):
        for g in F.measurable_layouts(spec):
            e = side['entries'].get(lut_key(spec.index, g, batch))
            if e is not None:
                c = F.layout_cost(spec, hw, g)
                rows.append((c.flops * batch, c.weight_bytes + c.act_bytes * batch, c.kernels, e['median_ms'] / 1e3))
    if not rows or not rf.get('peak_flops_per_s') or not rf.get('mem_bandwidth_bytes_per_s'):
        raise LutError('roofline_fit needs measured entries and a measured roofline')
    fl, by, kn, t = (np.asarray(v, dtype=float) for v in zip(*rows))
    best = None
    grid = np.geomspace(0.01, 2.0, 47)  # above 1: kernels faster than the matmul microbenchmark (e.g. Winograd)
    for ce in grid:
        comp = fl / (rf['peak_flops_per_s'] * ce)
        for me in grid:
            base = np.maximum(comp, by / (rf['mem_bandwidth_bytes_per_s'] * me))
            over = max(0.0, float(np.median((t - base) / kn)))
            err = np.abs((base + kn * over) / t - 1.0)
            score = float(np.median(err))
            if best is None or score < best[0]:
                best = (score, ce, me, over, err)
    score, ce, me, over, err = best
    return {'compute_efficiency': float(ce), 'memory_efficiency': float(me), 'kernel_overhead_s': over,
            'median_abs_error_pct': 100 * score, 'share_within_10pct': float((err <= 0.1).mean()),
            'entries': len(rows), 'batch': int(batch), 'source': 'fitted to this measured LUT'}


# ----------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------

def check_compatible(server: Dict[str, Any], edge: Dict[str, Any]) -> None:
    """Refuse side LUTs built for different models, input sizes or numbers of classes."""
    diffs = []
    for f in ('name', 'num_classes', 'width_multiplier', 'small_input'):
        if server['model'].get(f) != edge['model'].get(f):
            diffs.append(f'model.{f}: server {server["model"].get(f)!r} vs edge {edge["model"].get(f)!r}')
    if server['input_size'] != edge['input_size']:
        diffs.append(f'input_size: server {server["input_size"]} vs edge {edge["input_size"]}')
    if diffs:
        raise LutError('cannot merge LUTs built for different models: ' + '; '.join(diffs)
                       + ' (re-measure one side with the same model flags)')


def block_table(model: Dict[str, Any], input_size: int) -> List[Dict[str, Any]]:
    """Per block: shapes and, per measurable layout, MACs/FLOPs/bytes/kernels/intensity of one sample."""
    plan = plan_of(model)
    rows = F.block_shapes(plan, input_size)
    for row, spec, hw in zip(rows, plan, F.block_input_hw(plan, input_size)):
        row['available_layouts'] = F.measurable_layouts(spec)
        row['layouts'] = {}
        for g in row['available_layouts']:
            c = F.layout_cost(spec, hw, g)
            d = c._asdict()
            d['act_bytes'] = c.act_bytes
            row['layouts'][str(g)] = d
    return rows


def merge(server: Dict[str, Any], edge: Dict[str, Any], link: LinkSpec, feature_dtype: str) -> Dict[str, Any]:
    """The hardware_lut_complete payload from the two side LUTs (validated first) and the link."""
    check_compatible(server, edge)
    model, size = server['model'], server['input_size']
    batches = sorted(set(server['batch_sizes']) & set(edge['batch_sizes']))
    if not batches:
        raise LutError(f'cannot merge: no common batch size (server {server["batch_sizes"]}, '
                       f'edge {edge["batch_sizes"]})')
    F.dtype_bytes(feature_dtype)
    plan = plan_of(model)
    sides = {}
    for name, side in (('server', server), ('edge', edge)):
        sides[name] = {k: side.get(k) for k in ('source', 'profile', 'entries', 'head', 'roofline', 'metadata',
                                                'settings', 'batch_sizes')}
        if side.get('edge_part_offset_ms') is not None:
            sides[name]['edge_part_offset_ms'] = side['edge_part_offset_ms']
    head = F.head_cost(plan, size, model['num_classes'])._asdict()
    payload = {
        'model': model, 'input_size': size, 'num_blocks': len(plan), 'batch_sizes': batches,
        'layouts': [{'gamma': lay.gamma, 'parts': [list(p) for p in lay.parts], 'description': lay.description}
                    for lay in LAYOUTS],
        'blocks': block_table(model, size), 'head_cost': head,
        'server': sides['server'], 'edge': sides['edge'],
        'link': link.to_dict(), 'feature_dtype': feature_dtype,
        'link_bytes': {dt: F.link_bytes(plan, size, model['num_classes'], dt) for dt in ('fp32', 'fp16')},
        'roofline': {'edge': edge['roofline'], 'server': server['roofline']},
    }
    for name in SIDES:
        check_entries(payload, name)
    return payload


def check_entries(lut: Dict[str, Any], side: str) -> None:
    """Every measurable block x layout x batch has an entry on `side`; raise naming block, gamma and batch."""
    entries = lut[side]['entries']
    for b in lut['batch_sizes']:
        for row in lut['blocks']:
            for g in row['available_layouts']:
                if lut_key(row['block'], g, b) not in entries:
                    raise LutError(f'{side} LUT has no entry for block {row["block"]}, gamma {g}, batch {b}')


def _check_block_row(row: Any, i: int, where: str) -> None:
    """blocks[i] of hardware_lut_complete.json: its own index and layout ids 0..NUM_LAYOUTS-1."""
    w = f'{where}: field "blocks[{i}]"'
    if not isinstance(row, dict) or not isinstance(row.get('layouts'), dict) \
            or not isinstance(row.get('available_layouts'), list):
        raise ArtifactError(f'{w}: needs "block", "layouts" and "available_layouts"')
    if row.get('block') != i or isinstance(row.get('block'), bool):
        raise ArtifactError(f'{w}.block: expected {i}, got {row.get("block")!r}')
    for g in row['available_layouts']:
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < NUM_LAYOUTS:
            raise ArtifactError(f'{w}.available_layouts: expected layout ids 0..{NUM_LAYOUTS - 1}, got {g!r}')


def load_lut(path: Path) -> Dict[str, Any]:
    """Load and validate hardware_lut_complete.json; ArtifactError naming the file and the field."""
    obj = load_artifact(path, 'hardware_lut_complete', COMPLETE_FIELDS, upgrade_edge_naming)
    where = str(path)
    n = obj['num_blocks']
    if len(obj['blocks']) != n:
        raise ArtifactError(f'{where}: field "blocks" has {len(obj["blocks"])} rows, num_blocks is {n}')
    for i, row in enumerate(obj['blocks']):
        _check_block_row(row, i, where)
    for side in SIDES:
        _check_side(dict(obj[side], model=obj['model'], input_size=obj['input_size'], num_blocks=n, side=side),
                    f'{where}: field "{side}"')
    for dt in ('fp32', 'fp16'):
        lb = obj['link_bytes'].get(dt)
        if not isinstance(lb, list) or len(lb) != n + 1:
            raise ArtifactError(f'{where}: field "link_bytes.{dt}" must list N + 1 = {n + 1} byte counts')
        for k, v in enumerate(lb):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ArtifactError(f'{where}: field "link_bytes.{dt}[{k}]": expected a byte count >= 0, got {v!r}')
    _num(obj['link'], 'bandwidth_mbps', f'{where}: field "link"', 1e-9)
    _num(obj['link'], 'rtt_ms', f'{where}: field "link"')
    for side in ('edge', 'server'):
        if not isinstance(obj['roofline'].get(side), dict):
            raise ArtifactError(f'{where}: field "roofline.{side}" missing')
    try:
        for side in SIDES:
            check_entries(obj, side)
    except LutError as e:
        raise ArtifactError(f'{where}: {e}') from None
    return obj


# ----------------------------------------------------------------------------------------------------------
# Loaders for the solvers
# ----------------------------------------------------------------------------------------------------------

def edge_part_offsets(side: Dict[str, Any], batch: int, num_blocks: int) -> np.ndarray:
    """(N,) block k's extra cost in an edge part (blocks [0, lam)) over its entries, ms, as the fit measured it
    (timing.measure.measure_blocks; docs/design.md "Measurement protocol"); zeros for a side without (chain or
    isolated timing, a modelled side)."""
    vals = (side.get('edge_part_offset_ms') or {}).get(str(int(batch)))
    return np.zeros(num_blocks) if vals is None else np.asarray(vals, dtype=np.float64)


def side_ms(lut: Dict[str, Any], side: str, batch: int) -> np.ndarray:
    """(N, 14) median times of one side at `batch`, ms; NaN where the layout is not measurable for the block.
    The edge side runs edge parts: its entries plus its edge-part offsets (edge_part_offsets), at least 0."""
    if batch not in lut['batch_sizes']:
        raise LutError(f'batch {batch} is not in the LUT; measured batch sizes: {lut["batch_sizes"]}')
    entries = lut[side]['entries']
    out = np.full((lut['num_blocks'], NUM_LAYOUTS), np.nan)
    for row in lut['blocks']:
        for g in row['available_layouts']:
            e = entries.get(lut_key(row['block'], g, batch))
            if e is None:
                raise LutError(f'{side} LUT has no entry for block {row["block"]}, gamma {g}, batch {batch}')
            out[row['block'], g] = e['median_ms']
    if side == 'edge':
        out = np.maximum(out + edge_part_offsets(lut[side], batch, lut['num_blocks'])[:, None], 0.0)
    return out


def head_ms(lut: Dict[str, Any], side: str, batch: int) -> float:
    e = lut[side]['head'].get(lut_key('head', None, batch))
    if e is None:
        raise LutError(f'{side} LUT has no head entry for batch {batch}')
    return float(e['median_ms'])


def runtime_overhead_ms(lut: dict, batch: int) -> Tuple[float, float]:
    """(edge, server) per-frame cost of the real split runtime beyond the part times, ms, as step 1 --mode real
    measured it (`runtime_overhead`, pipeline.closed_loop.calibrate_runtime) at this batch size; (0, 0) without."""
    ov = lut.get('runtime_overhead')
    if not isinstance(ov, dict) or int(ov.get('batch', -1)) != int(batch):
        return 0.0, 0.0
    vals = []
    for k in ('edge_ms', 'server_ms'):
        v = ov.get(k)
        if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise LutError(f'field runtime_overhead.{k}: expected a time >= 0 ms, got {v!r}')
        vals.append(float(v))
    return vals[0], vals[1]


def cost_tables(lut: dict, batch: int = 1, link: Optional[LinkSpec] = None,
                feature_dtype: Optional[str] = None, runtime: bool = True) -> CostTables:
    """CostTables of `lut` at `batch` (edge = edge side); link and feature dtype default to the LUT's own.
    `runtime`: add the split runtime's measured per-frame overhead (runtime_overhead_ms) to the edge stage (on
    block 0's entries: the edge stage exists iff block 0 runs there) and to the server stage (on its head entry:
    the server stage exists iff it runs the head), so that every solver sees it without a term of its own."""
    link = link or link_from_dict(lut['link'])
    dt = feature_dtype or lut['feature_dtype']
    if dt not in lut['link_bytes']:
        raise LutError(f'feature dtype {dt!r} not in the LUT; choices: {sorted(lut["link_bytes"])}')
    edge, server_head = side_ms(lut, 'edge', batch), head_ms(lut, 'server', batch)
    if runtime:
        o_edge, o_server = runtime_overhead_ms(lut, batch)
        edge[0] += o_edge
        server_head += o_server
    return CostTables(edge_ms=edge, server_ms=side_ms(lut, 'server', batch),
                      edge_head_ms=head_ms(lut, 'edge', batch), server_head_ms=server_head,
                      link_bytes=np.asarray(lut['link_bytes'][dt], dtype=np.float64),
                      bandwidth_mbps=float(link.bandwidth_mbps), latency_ms=float(link.latency_ms), batch=int(batch))


def block_stats(lut: dict) -> Dict[str, Any]:
    """Per block x layout FLOPs, weight bytes, activation bytes (one sample) and intensity (N, 14), NaN where
    absent, plus the roofline knees (flop/byte) and peak FLOP/s of the edge and server sides."""
    n = lut['num_blocks']
    out = {k: np.full((n, NUM_LAYOUTS), np.nan) for k in ('flops', 'weight_bytes', 'act_bytes', 'intensity')}
    src = {'flops': 'flops', 'weight_bytes': 'weight_bytes', 'act_bytes': 'act_bytes',
           'intensity': 'intensity_flop_per_byte'}
    for row in lut['blocks']:
        for g, c in row['layouts'].items():
            for k, f in src.items():
                out[k][row['block'], int(g)] = c[f]
    for side in ('edge', 'server'):
        out[f'knee_{side}'] = float(lut['roofline'][side]['knee_flop_per_byte'])
        out[f'peak_flops_{side}'] = float(lut['roofline'][side]['peak_flops_per_s'])
    return out


# ----------------------------------------------------------------------------------------------------------
# Validation: LUT sums against end-to-end timings
# ----------------------------------------------------------------------------------------------------------

def random_configurations(model: Dict[str, Any], count: int, rng: np.random.Generator) -> List[Dict[str, Any]]:
    """`count` random valid configurations drawn as the fit's are (timing.measure.sample_configuration: a random
    measurable layout per block and a random split, every DEPLOY_HEAVY_EVERY-th deploy-heavy), so that the
    validation also covers the configurations the optimizer picks."""
    from timing import measure
    return measure.random_fit_configurations(plan_of(model), count, int(rng.integers(0, 2 ** 31)))


def predict_parts(side: Dict[str, Any], gammas: Sequence[int], lam: int, batch: int) -> Dict[str, float]:
    """LUT sums of one side for the configuration run entirely on that side: blocks [0, lam) (entries plus the
    edge-part offsets) and [lam, N) + head."""
    def t(k: int) -> float:
        e = side['entries'].get(lut_key(k, gammas[k], batch))
        if e is None:
            raise LutError(f'LUT has no entry for block {k}, gamma {gammas[k]}, batch {batch}')
        return float(e['median_ms'])
    off = edge_part_offsets(side, batch, len(gammas))
    edge = sum(max(0.0, t(k) + float(off[k])) for k in range(lam))
    server = sum(t(k) for k in range(lam, len(gammas))) + float(side['head'][lut_key('head', None, batch)]['median_ms'])
    return {'edge_ms': edge, 'server_ms': server, 'total_ms': edge + server}


def validation_summary(records: Sequence[Dict[str, Any]], tolerance_pct: float = 10.0) -> Dict[str, Any]:
    """Share of configurations whose predicted total is within +/- tolerance of the measured one, and the median
    absolute (and signed) % error, of the total and of each part where it ran; with two passes per record also
    the noise floor (`noise`: pass_to_pass_pct = median |pass 1 - pass 2| / pass 2 of the totals, the LUT's
    error against pass 2 alone, and whether the noise floor is above half the tolerance)."""
    def stats(errs: List[float]) -> Dict[str, Any]:
        a = np.abs(np.asarray(errs, dtype=float))
        return {'share_within_tol': float((a <= tolerance_pct).mean()) if a.size else None,
                'median_abs_error_pct': float(np.median(a)) if a.size else None,
                'median_signed_error_pct': float(np.median(errs)) if a.size else None, 'count': int(a.size)}
    out = {'tolerance_pct': tolerance_pct, 'total': stats([r['error_pct']['total'] for r in records])}
    for part in ('edge', 'server'):
        out[part] = stats([r['error_pct'][part] for r in records if r['error_pct'][part] is not None])
    two = [r for r in records if len(r.get('passes') or []) >= 2]
    noise = None
    if two:
        p2p = [abs(_err(r['passes'][0]['total_ms'], r['passes'][1]['total_ms'])) for r in two]
        vs2 = [abs(_err(r.get('predicted_for_pass2_ms', r['predicted']['total_ms']), r['passes'][1]['total_ms']))
               for r in two]
        floor = float(np.median(p2p))
        noise = {'passes': 2, 'pass_to_pass_pct': floor, 'lut_vs_pass2_median_abs_pct': float(np.median(vs2)),
                 'tolerance_pct': tolerance_pct / 2, 'above_tolerance': bool(floor > tolerance_pct / 2),
                 'count': len(two)}
    out['noise'] = noise
    return out


def side_line(side: Dict[str, Any]) -> str:
    """One human-readable line summarizing a measured side LUT."""
    meta, st, fit = side['metadata'], side['settings'], side.get('roofline_fit') or {}
    line = (f'{side["side"]}: {len(side["entries"])} entries measured on {meta["device_name"]} ({meta["device"]}, '
            f'{meta["threads"]} threads, {st["timing"]} timing) in {st.get("measure_wall_s", 0):.1f} s; roofline '
            f'knee {side["roofline"]["knee_flop_per_byte"]:.1f} flop/byte')
    if fit:
        line += f'; roofline+overhead model fitted to it: median |error| {fit["median_abs_error_pct"]:.0f} %'
    for batch, f in sorted((side.get('fit') or {}).items()):
        noise = f.get('pass_to_pass_pct')
        line += (f'; entries fitted (batch {batch}) to {f["parts"]} timed parts of {f["configurations"]} random '
                 f'configurations: residual {f["residual_median_abs_pct"]:.1f} %, noise '
                 + ('n/a' if noise is None else f'{noise:.1f} %') + ' pass to pass')
    if st.get('timing') == 'chain':
        line += ('; chain timing: sums over-predict whole parts (bench/bench_lut_ablation.py), re-measure with '
                 'lut.timing=fit')
    load = (meta.get('machine_state_before') or {}).get('load_average')
    if load:
        line += f'; load average {load[0]:.2f}'
    return line


def validation_line(report: Dict[str, Any]) -> str:
    """One human-readable line summarizing a validate_side() report (with its noise floor)."""
    s = report['summary']

    def pct(part: Dict[str, Any]) -> str:
        return 'n/a' if part['median_abs_error_pct'] is None else f'{part["median_abs_error_pct"]:.1f} %'
    where = ('timed in the fit\'s own rounds' if report.get('window') == 'fit' else 'timed after the LUT')
    line = (f'LUT validation ({report["side"]} LUT, {report["device"]}, {s["total"]["count"]} unseen '
            f'configurations {where}): {100 * s["total"]["share_within_tol"]:.0f} % within +/-{s["tolerance_pct"]:.0f} %, '
            f'median |error| {pct(s["total"])} (edge part {pct(s["edge"])}, server part {pct(s["server"])}; median '
            f'signed error {s["total"]["median_signed_error_pct"]:+.1f} %)')
    n = s.get('noise')
    if n:
        load = (report.get('machine_state_before') or {}).get('load_average')
        line += (f'; noise floor {n["pass_to_pass_pct"]:.1f} % pass to pass (LUT vs pass 2: '
                 f'{n["lut_vs_pass2_median_abs_pct"]:.1f} %)' + (f', load average {load[0]:.2f}' if load else ''))
    a, sp = report.get('anchored'), report.get('speed')
    if a and sp:
        line += (f'; re-anchored to this window\'s speed ({sp["anchors"]} fit configurations re-timed: the machine '
                 f'ran x{sp["factor"]:.3f} the LUT\'s time): {100 * a["total"]["share_within_tol"]:.0f} % within '
                 f'+/-{s["tolerance_pct"]:.0f} %, median |error| {pct(a["total"])}, signed '
                 f'{a["total"]["median_signed_error_pct"]:+.1f} %')
        if a.get('noise'):
            line += f', vs pass 2 {a["noise"]["lut_vs_pass2_median_abs_pct"]:.1f} %'
    later = report.get('later')
    if later:
        ls, sp = later['summary']['total'], later.get('speed') or {}
        line += (f'; a later window of its own: median signed error {ls["median_signed_error_pct"]:+.1f} % as '
                 'measured' + (f', the machine ran x{sp["factor"]:.3f} the LUT\'s time there (drift, not an '
                               'error of the LUT)' if sp.get('factor') else ''))
    return line


def noise_warning(report: Dict[str, Any], rounds: int, threads: int) -> Optional[str]:
    """The warning, with its remedy, when a validation's noise floor is above half its tolerance (its passes
    disagree so much that the LUT error cannot be told from noise); None otherwise."""
    n = report['summary'].get('noise')
    if not n or not n['above_tolerance']:
        return None
    st = report.get('machine_state_before') or {}
    load = st.get('load_average')
    cores = report.get('cpu_count') or 0
    why = []
    if load and cores and load[0] > 0.25 * cores + 0.5:
        why.append(f'a busy machine (load average {load[0]:.2f} on {cores} cores: stop other work or measure '
                   'when it is idle)')
    why.append(f'too few interleaved rounds (--rounds {rounds}: raise it)')
    if threads != 1:
        why.append(f'threads ({threads}; lut.threads=1 avoids thread stalls on a shared CPU)')
    return (f'warning: LUT validation noise floor {n["pass_to_pass_pct"]:.1f} % pass to pass is above '
            f'{n["tolerance_pct"]:.0f} % (half the +/-{report["summary"]["tolerance_pct"]:.0f} % tolerance): the '
            f'LUT error above cannot be told from noise. Likely causes and remedies: ' + '; '.join(why))


def _err(p: float, q: float) -> float:
    return 100.0 * (p - q) / q


def errors_pct(pred: Dict[str, float], meas: Dict[str, float], edge_ran: bool) -> Dict[str, Optional[float]]:
    """% errors of predicted against measured parts (`total`, `edge` (None when no edge part ran), `server`)."""
    return {'total': _err(pred['total_ms'], meas['total_ms']),
            'edge': _err(pred['edge_ms'], meas['edge_ms']) if edge_ran else None,
            'server': _err(pred['server_ms'], meas['server_ms'])}


def fit_configuration_keys(side: Dict[str, Any], batch: int) -> set:
    """(gammas, lam) of the configurations a fitted side LUT was fitted on at `batch` (empty for chain LUTs)."""
    fit = (side.get('fit') or {}).get(str(int(batch))) or {}
    return {(tuple(int(g) for g in c['gammas']), int(c['lam'])) for c in fit.get('configurations_used') or []}


ANCHORS = 4  # fit configurations re-timed in every validation: the machine's speed now against the LUT's


def anchor_configurations(side: Dict[str, Any], batch: int, count: int = ANCHORS) -> List[Dict[str, Any]]:
    """The first `count` configurations a fitted side LUT was fitted on at `batch` (none for chain LUTs):
    re-timed beside a validation, they measure how fast the machine runs now against when the LUT was fitted."""
    fit = (side.get('fit') or {}).get(str(int(batch))) or {}
    return [{'gammas': [int(g) for g in c['gammas']], 'lam': int(c['lam'])}
            for c in (fit.get('configurations_used') or [])[:max(0, int(count))]]


def speed_factors(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The machine's speed now relative to the LUT's window, from the validation's re-timed fit configurations
    (`anchor` records): median of measured / predicted totals over both passes (`factor`) and over pass 1 alone
    (`factor_pass1`, for the comparison with pass 2, which it must not see), with the anchors' own spread.
    None without anchors."""
    anchors = [r for r in records if r.get('anchor')]
    if not anchors:
        return None
    ratios = [r['measured']['total_ms'] / r['predicted']['total_ms'] for r in anchors]
    first = [r['passes'][0]['total_ms'] / r['predicted']['total_ms'] for r in anchors if r.get('passes')]
    return {'factor': float(np.median(ratios)), 'factor_pass1': float(np.median(first)) if first else None,
            'min': float(min(ratios)), 'max': float(max(ratios)), 'anchors': len(anchors),
            'meaning': 'measured / LUT-predicted total of configurations the fit was fitted on, re-timed in this '
                       'validation: > 1 = the machine runs slower now than when the LUT was measured'}


def anchored_records(records: Sequence[Dict[str, Any]], factors: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Records whose predictions are the LUT's sums times the speed factor of this window (pass-2 comparisons
    use the factor measured in pass 1 only): the LUT re-anchored to the machine's speed at the time of use."""
    f = float(factors['factor'])
    out = []
    for r in records:
        pred = {k: v * f for k, v in r['predicted'].items()}
        err = errors_pct(pred, r['measured'], r['error_pct']['edge'] is not None)
        extra = {}
        if r.get('passes') and factors.get('factor_pass1'):  # the comparison with pass 2 sees pass 1's factor only
            extra['predicted_for_pass2_ms'] = r['predicted']['total_ms'] * float(factors['factor_pass1'])
        out.append(dict(r, predicted=pred, error_pct=err, **extra))
    return out


def _records(side: Dict[str, Any], timed: Sequence[Dict[str, Any]], res: Sequence[Dict[str, Any]], batch: int,
             anchors_from: int) -> List[Dict[str, Any]]:
    """Validation records of configurations `timed` against their measurements `res` (measure_configurations'
    records); those from index `anchors_from` on are re-timed fit configurations (anchors)."""
    seen = fit_configuration_keys(side, batch)
    records = []
    for i, (c, m) in enumerate(zip(timed, res)):
        pred = predict_parts(side, c['gammas'], c['lam'], batch)
        edge_ms = m['edge']['median_ms'] if m['edge'] else 0.0
        # the sum of the parts' medians: what a LUT sum predicts (not the median of per-visit sums, ~1 % higher
        # under right-skewed noise: timing.measure.configuration_results)
        meas = {'edge_ms': edge_ms, 'server_ms': m['server']['median_ms'], 'total_ms': edge_ms + m['server']['median_ms']}
        records.append({
            'gammas': [int(g) for g in c['gammas']], 'lam': int(c['lam']), 'predicted': pred, 'measured': meas,
            'measured_spread': {'total_p10_ms': m['total']['p10_ms'], 'total_p90_ms': m['total']['p90_ms']},
            'measured_n': {'edge': m['edge']['n'] if m['edge'] else 0, 'server': m['server']['n']},
            'passes': m['passes'], 'anchor': i >= anchors_from,
            'seen_by_fit': (tuple(int(g) for g in c['gammas']), int(c['lam'])) in seen,
            'error_pct': errors_pct(pred, meas, bool(m['edge']))})
    return records


WINDOWS = ('fit', 'later')  # a validation timed in the fit's own rounds, or in a window of its own afterwards


def holdout_validation(side: Dict[str, Any], configs: Sequence[Dict[str, Any]], results: Sequence[Dict[str, Any]],
                       batch: int, device: str, tolerance_pct: float = 10.0, later_rounds: int = 0, seed: int = 0,
                       progress: bool = False) -> Dict[str, Any]:
    """The validation of a fitted side LUT on configurations the fit never saw but timed in its own rounds
    (timing.measure.measure_side(holdout=...): `results`, one per configuration): same time window, so the
    machine's drift between windows cannot pass for an error of the LUT.  Same report as validate_side's, with
    window 'fit' (no anchors: the speed is the fit's own).  `later_rounds` > 0: the same configurations are also
    checked in a later window of their own (validate_side with that many rounds, seeded by `seed`) as 'later'."""
    records = _records(side, configs, results, batch, len(configs))
    unseen = [r for r in records if not r['seen_by_fit']]
    st, meta = side.get('settings') or {}, side.get('metadata') or {}
    rep = {'side': side['side'], 'device': device, 'batch': int(batch), 'lut_timing': st.get('timing'),
            'window': 'fit', 'summary': validation_summary(unseen, tolerance_pct), 'speed': None, 'anchored': None,
            'records': records, 'machine_state_before': meta.get('machine_state_before'),
            'machine_state_after': meta.get('machine_state_after'), 'cpu_count': os.cpu_count(),
            'settings': {'rounds': results[0]['rounds'] if results else None,
                         'burst': results[0]['burst'] if results else None, 'passes': len(results[0]['passes'])
                         if results else None, 'seed': st.get('seed'), 'anchors': 0,
                         'visits_per_round': st.get('holdout_visits')}}
    if later_rounds > 0:
        rep['later'] = validate_side(side, configs, batch, device, 1, later_rounds, seed, progress=progress,
                                     tolerance_pct=tolerance_pct)
    return rep


def validate_side(side: Dict[str, Any], configs: Sequence[Dict[str, Any]], batch: int, device: str, warmup: int,
                  rounds: int, seed: int = 0, progress: bool = False, passes: int = 2,
                  tolerance_pct: float = 10.0, anchors: int = ANCHORS) -> Dict[str, Any]:
    """Measure each configuration end to end on this device (timing.measure.measure_configurations: `rounds`
    fine-grained interleaved rounds in a seeded random order, even and odd rounds the two passes) and compare it
    with `side`'s LUT sums, in a window of its own after the LUT's (window 'later').  Configurations the fit was
    fitted on are measured but left out of the summary; the first `anchors` of them are re-timed in the same rounds
    (speed_factors): `summary` is the LUT as measured, `anchored` the LUT re-anchored to the machine's speed in
    this window (None for chain LUTs)."""
    from timing import measure
    model = measure.random_model(side['model'], seed)
    anchor_confs = anchor_configurations(side, batch, anchors)
    before = measure.machine_state()
    timed = list(configs) + anchor_confs
    res = measure.measure_configurations(model, side['input_size'], timed, batch, device, warmup, rounds, passes,
                                         seed + 17, progress=progress)
    after = measure.machine_state()
    records = _records(side, timed, res, batch, len(configs))
    unseen = [r for r in records if not r['seen_by_fit']]
    factors = speed_factors(records)
    timing = (side.get('settings') or {}).get('timing')
    return {'side': side['side'], 'device': device, 'batch': int(batch), 'lut_timing': timing, 'window': 'later',
            'summary': validation_summary(unseen, tolerance_pct), 'speed': factors,
            'anchored': validation_summary(anchored_records(unseen, factors), tolerance_pct) if factors else None,
            'records': records,
            'machine_state_before': before, 'machine_state_after': after, 'cpu_count': os.cpu_count(),
            'settings': {'warmup': warmup, 'rounds': res[0]['rounds'] if res else int(rounds),
                         'burst': res[0]['burst'] if res else None, 'passes': passes, 'seed': seed,
                         'anchors': len(anchor_confs)}}
