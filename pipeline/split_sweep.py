"""Split sweep: for every split point lambda = 0..N of the chosen configuration, the edge compute, bytes on the link,
transfer time, server compute, time to receive the result back on the edge, round trip, end-to-end latency and
pipelined throughput, each with its spread (median, p10, p90, mean), next to the LUT cost model's prediction.

    python pipeline/split_sweep.py                     # pseudo mode, step 2's configuration (run_pipeline.sh does this)
    python pipeline/split_sweep.py --domain_id 3       # domain 3's step-3 configuration + accuracy per lambda
    python pipeline/split_sweep.py --mode real         # everything measured through client_worker.py and the link

pseudo: the edge side is the LUT's (modelled from the device profile, or a replayed measured edge LUT: the CSV says
which), the link is the configured one (modelled: latency + bytes / bandwidth), the server part of every lambda is
measured here (cfg.device).  real: for every lambda the configuration is deployed to the worker (comm.session), a
stream of images runs the pipelined split (edge, link and server time per batch, steady-state throughput), and
single requests make the whole round trip (edge compute, features up, server compute, the result back down to the
edge), all measured; one-way times use the session's clock offset (accurate to about half the RTT asymmetry), the
round trip and latency do not need it.

With --domain_id each row also carries the split model's accuracy on the domain's test split and whether its
predictions equal the unsplit model's.  Writes <results_dir>/split_latency_results.csv (seed 000's leading columns
split_layer, avg_compute, avg_transfer, avg_recv, avg_rtt in seconds, then the rest with units in their names),
split_latency_results.json (the same rows, docs/artifacts.md) and visualization/split_latency.png / .pdf.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from artifacts import atomic_write_bytes, write_artifact  # noqa: E402
from config import (LINK_FLAGS, Config, UserError, add_common_args, add_link_args, command_line,  # noqa: E402
                    resolve_config, resolve_path, run_cli)

log = logging.getLogger('split_sweep')
CSV_FILE = 'split_latency_results.csv'
JSON_FILE = 'split_latency_results.json'
FIGURE = 'split_latency'
STATS = ('median', 'p10', 'p90', 'mean')
TIMED = ('edge_compute', 'transfer', 'server_compute', 'recv', 'rtt', 'latency')  # ms quantities with a spread
SEED_COLUMNS = (('split_layer', 'lambda: blocks [0, lambda) on the edge'),
                ('avg_compute', 'mean edge compute, s'), ('avg_transfer', 'mean transfer of what crosses the link, s'),
                ('avg_recv', 'mean time to receive the result back on the edge, s'),
                ('avg_rtt', 'mean round trip: transfer + server compute + result back, s'))


def columns() -> List[tuple]:
    """(CSV column, description with unit): the seed's leading columns, then the rest, units in the names."""
    cols = list(SEED_COLUMNS) + [('split_after', 'last edge block (official name), "input" at lambda 0'),
                                 ('link_bytes', 'bytes crossing the link per batch (features, image or logits)')]
    for q, what in (('edge_compute', 'edge compute per batch'), ('transfer', 'transfer time per batch'),
                    ('server_compute', 'server compute per batch'), ('recv', 'result back to the edge'),
                    ('rtt', 'round trip (transfer + server + result back)'),
                    ('latency', 'end to end, edge compute + round trip')):
        cols += [(f'{q}_{s}_ms', f'{what}, {s}, ms') for s in STATS]
    cols += [(f'throughput_{s}_fps', f'pipelined throughput, {s} (pseudo: over the server repeats; real: median = the '
              'whole stream\'s steady rate, p10/p90 over 10 windows of it), frames/s') for s in STATS[:3]]
    cols += [('bottleneck', 'slowest pipeline stage: edge | link | server'),
             ('predicted_throughput_fps', 'LUT cost model (optim/cost.py), frames/s'),
             ('predicted_latency_ms', 'LUT cost model, ms'),
             ('edge_source', 'how the edge time was obtained'), ('transfer_source', 'how the transfer was obtained'),
             ('server_source', 'how the server time was obtained'), ('chosen', 'the configuration\'s own lambda'),
             ('best_measured', 'highest median throughput of the sweep'),
             ('best_predicted', 'highest predicted throughput'),
             ('accuracy_pct', 'split model\'s top-1 on the domain\'s test split, %'),
             ('unsplit_accuracy_pct', 'unsplit model\'s top-1 on the same images, %'),
             ('equals_unsplit', 'split predictions identical to the unsplit model\'s')]
    return cols


def stat(values: Sequence[float]) -> Dict[str, float]:
    """median / p10 / p90 / mean of a list of ms values (timing.measure.summarize_ms)."""
    from timing.measure import summarize_ms
    s = summarize_ms(values)
    return {k: float(s[f'{k}_ms']) for k in STATS}


def const(v: float) -> Dict[str, float]:
    """A modelled value: one number, no spread."""
    return {k: float(v) for k in STATS}


def shifted(base: Dict[str, float], add: float) -> Dict[str, float]:
    """The stats of base + a constant (quantiles shift with it)."""
    return {k: v + add for k, v in base.items()}


def throughput_of(edge_ms: float, link_ms: float, server: Dict[str, float], batch: int) -> Dict[str, float]:
    """B / max(edge, link, server): decreasing in the server time, so its p10 comes from the server's p90."""
    def fps(s: float) -> float:
        return batch * 1e3 / max(edge_ms, link_ms, s, 1e-9)
    return {'median': fps(server['median']), 'p10': fps(server['p90']), 'p90': fps(server['p10']),
            'mean': fps(server['mean'])}


def flat_row(lam: int, split_after: str, q: Dict[str, Dict[str, float]], extra: Dict[str, Any]) -> Dict[str, Any]:
    """One CSV/JSON row from the per-quantity stats `q` (ms) and the plain fields `extra`."""
    row: Dict[str, Any] = {'split_layer': lam, 'avg_compute': q['edge_compute']['mean'] / 1e3,
                           'avg_transfer': q['transfer']['mean'] / 1e3, 'avg_recv': q['recv']['mean'] / 1e3,
                           'avg_rtt': q['rtt']['mean'] / 1e3, 'split_after': split_after}
    for name in TIMED:
        for s in STATS:
            row[f'{name}_{s}_ms'] = q[name][s]
    for s in STATS[:3]:
        row[f'throughput_{s}_fps'] = q['throughput'][s]
    row.update(extra)
    return row


def mark_best(rows: List[Dict[str, Any]], chosen_lam: int) -> Dict[str, Any]:
    """Set the chosen / best_measured / best_predicted flags; returns the summary of the three lambdas."""
    best_m = max(rows, key=lambda r: (r['throughput_median_fps'], -r['latency_median_ms']))['split_layer']
    best_p = max(rows, key=lambda r: (r['predicted_throughput_fps'], -r['predicted_latency_ms']))['split_layer']
    for r in rows:
        r['chosen'], r['best_measured'], r['best_predicted'] = (r['split_layer'] == chosen_lam,
                                                                r['split_layer'] == best_m, r['split_layer'] == best_p)
    by = {r['split_layer']: r for r in rows}
    return {'chosen_lam': chosen_lam, 'best_measured_lam': best_m, 'best_predicted_lam': best_p,
            'best_measured_throughput_fps': by[best_m]['throughput_median_fps'],
            'best_measured_throughput_p10_p90_fps': [by[best_m]['throughput_p10_fps'],
                                                     by[best_m]['throughput_p90_fps']],
            'chosen_throughput_fps': by[chosen_lam]['throughput_median_fps'],
            'best_predicted_throughput_fps': by[best_p]['predicted_throughput_fps'],
            'measured_at_best_predicted_fps': by[best_p]['throughput_median_fps']}


def stream_rates(per_batch: Sequence[Dict[str, Any]], windows: int = 10) -> Dict[str, float]:
    """Throughput of a streamed run, frames/s: 'median' and 'mean' are the whole stream's steady-state rate (samples
    after the first batch, which fills the pipeline, over their span), 'p10' / 'p90' the spread of the rate over
    `windows` consecutive windows of batches.  A median over windows (or over batch-to-batch gaps) would be biased
    high: frames that queued behind a stalled stage are then processed in a burst, so a few windows hold the stalls
    and the others look fast."""
    import numpy as np
    done = [float(r['done_s']) for r in per_batch]
    samples = [int(r['samples']) for r in per_batch]
    if len(done) < 3:
        raise UserError(f'split sweep: a stream of {len(done)} batches is too short for a throughput; raise --samples')
    win = max(2, (len(done) - 1) // windows)
    rates = []
    for start in range(1, len(done) - win + 1, win):
        span = done[start + win - 1] - done[start - 1]
        if span > 0:
            rates.append(sum(samples[start:start + win]) / span)
    overall = sum(samples[1:]) / (done[-1] - done[0]) if done[-1] > done[0] else float(np.median(rates))
    return {'median': float(overall), 'p10': float(np.percentile(rates, 10)), 'p90': float(np.percentile(rates, 90)),
            'mean': float(overall)}


def csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    names = [c for c, _ in columns()]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, extrasaction='ignore', lineterminator='\n')
    w.writeheader()
    for r in rows:
        w.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in names})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Accuracy per lambda (with a domain)
# ----------------------------------------------------------------------------------------------------------

def split_predictions(model: Any, lam: int, x: Any, mean: Sequence[float], std: Sequence[float], batch: int,
                      device: str) -> Any:
    """Predictions of the deployed edge part [0, lam) followed by the deployed server part, on uint8 images x."""
    import torch

    from data.normalize import normalize_batch
    from hyper_repvgg import deploy_part
    edge, server = (deploy_part(p).to(device) for p in model.split(lam))
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            h = normalize_batch(x[i:i + batch].to(device), mean, std)
            out.append(server(edge(h)).argmax(1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# Pseudo mode: edge from the LUT, link modelled, server measured here
# ----------------------------------------------------------------------------------------------------------

def pseudo_rows(cfg: Config, lut: Dict[str, Any], link: Any, model: Any, gammas: Sequence[int],
                progress: bool = True) -> List[Dict[str, Any]]:
    import numpy as np
    import torch

    from hyper_repvgg import deploy_part
    from optim import cost as C
    from timing import lut as L
    from timing.measure import time_callable
    from timing.flops import block_shapes
    b = cfg.optim.batch_size
    t = L.cost_tables(lut, b, link, cfg.lut.feature_dtype)
    n = t.num_blocks
    pred = C.stage_times(np.tile(np.asarray(gammas), (n + 1, 1)), np.arange(n + 1), t)
    client = lut['edge']
    entry = lambda k, s: client['entries'][L.lut_key(k, gammas[k], b)][f'{s}_ms']  # noqa: E731
    head = client['head'][L.lut_key('head', None, b)]
    edge_src = ('modelled: LUT from device profile ' + str((client.get('profile') or {}).get('name'))
                if client.get('source') == 'modelled' else
                f'LUT measured on {(client.get("metadata") or {}).get("device_name")} (replayed)')
    link_src = f'modelled: link {link.name}, {link.bandwidth_mbps:g} Mbit/s, rtt {link.rtt_ms:g} ms'
    shapes = block_shapes(model.plan, cfg.model.input_size)
    size = cfg.model.input_size
    gen = torch.Generator()
    gen.manual_seed(cfg.seed + 7)
    x = torch.randn(b, 3, size, size, generator=gen)
    dev = torch.device(cfg.device)
    result_bytes = b * model.num_classes * 4  # fp32 logits back to the edge
    recv_ms = link.latency_ms + result_bytes * 8 / (link.bandwidth_mbps * 1e6) * 1e3
    bar = _bar(n + 1, progress, 'split sweep (pseudo: server measured here)')
    rows = []
    try:
        for lam in range(n + 1):
            edge = {s: sum(entry(k, s) for k in range(lam)) + (head[f'{s}_ms'] if lam == n else 0.0)
                    for s in ('median', 'p10', 'p90')}
            edge['mean'] = edge['median']
            nbytes = int(t.link_bytes[lam] * b)
            occupancy = float(t.link_ms()[lam])
            transfer = const(link.latency_ms + occupancy)
            if lam < n:
                server_part = deploy_part(model.split(lam)[1]).to(dev).eval()
                h = x.to(dev) if lam == 0 else torch.randn(b, *shapes[lam - 1]['output_shape'], generator=gen).to(dev)
                st = time_callable(lambda: server_part(h), dev, cfg.lut.warmup, cfg.lut.repeats, min_sample_ms=0)
                server = {s: float(st[f'{s}_ms']) for s in STATS}
                server_src = f'measured here ({cfg.device}), n={st["n"]}'
                recv = const(recv_ms)
            else:  # everything ran on the edge: the logits cross the link, nothing comes back
                server, server_src, recv = const(0.0), 'none (lambda = N)', const(0.0)
            rtt = shifted(server, transfer['median'] + recv['median'])
            q = {'edge_compute': edge, 'transfer': transfer, 'server_compute': server, 'recv': recv, 'rtt': rtt,
                 'latency': shifted(rtt, edge['median']),
                 'throughput': throughput_of(edge['median'], occupancy, server, b)}
            stage = [edge['median'], occupancy, server['median']]
            rows.append(flat_row(lam, 'input' if lam == 0 else model.plan[lam - 1].name, q, {
                'link_bytes': nbytes, 'bottleneck': C.STAGES[int(np.argmax(stage))],
                'predicted_throughput_fps': float(pred.throughput_fps[lam]),
                'predicted_latency_ms': float(pred.latency_ms[lam]), 'edge_source': edge_src,
                'transfer_source': link_src, 'server_source': server_src}))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


# ----------------------------------------------------------------------------------------------------------
# Real mode: every figure measured through the worker and the link
# ----------------------------------------------------------------------------------------------------------

def real_rows(cfg: Config, session: Any, lut: Dict[str, Any], link: Any, model: Any, gammas: Sequence[int],
              images: Any, labels: Any, mean: Sequence[float], std: Sequence[float], round_trips: int,
              progress: bool = True) -> List[Dict[str, Any]]:
    import numpy as np

    from comm import session as S
    from hyper_repvgg import deploy_part
    from optim import cost as C
    from timing import lut as L
    b = cfg.optim.batch_size
    t = L.cost_tables(lut, b, link, cfg.lut.feature_dtype)
    n = t.num_blocks
    pred = C.stage_times(np.tile(np.asarray(gammas), (n + 1, 1)), np.arange(n + 1), t)
    dev_name = (session.hello or {}).get('device_name')
    bar = _bar(n + 1, progress, 'split sweep (real: through the worker)')
    rows = []
    try:
        for lam in range(n + 1):
            session.deploy(model, list(gammas), lam, list(mean), list(std), feature_dtype=cfg.lut.feature_dtype)
            server_part = None if lam == n else deploy_part(model.split(lam)[1]).to(cfg.device)
            run = session.run(server_part, images, labels, b)
            rt = S.round_trips(session, server_part, images[:b], round_trips)
            per = run['per_batch']
            thr = stream_rates(per)
            reqs = rt['requests']
            q = {'edge_compute': stat([r['edge_ms'] for r in reqs]), 'transfer': stat([r['transfer_ms'] for r in reqs]),
                 'server_compute': stat([r['server_ms'] for r in reqs]), 'recv': stat([r['recv_ms'] for r in reqs]),
                 'rtt': stat([r['rtt_ms'] for r in reqs]), 'latency': stat([r['latency_ms'] for r in reqs]),
                 'throughput': thr}
            stage = [run['edge_ms'] or 0.0, run['link_ms'] or 0.0, run['server_ms'] or 0.0]
            extra = {'link_bytes': int(per[0]['bytes'] * b / max(1, per[0]['samples'])),
                     'bottleneck': C.STAGES[int(np.argmax(stage))],
                     'predicted_throughput_fps': float(pred.throughput_fps[lam]),
                     'predicted_latency_ms': float(pred.latency_ms[lam]),
                     'edge_source': f'measured on the worker ({dev_name}), n={len(reqs)} requests',
                     'transfer_source': f'measured through the link (clock offset {run["clock_offset_s"]:.4g} s)',
                     'server_source': f'measured here ({cfg.device})',
                     'stream': {k: run[k] for k in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms', 'throughput_fps',
                                                    'steady_throughput_fps', 'batches', 'samples', 'wall_s')},
                     'stream_predictions': run['predictions']}
            rows.append(flat_row(lam, 'input' if lam == 0 else model.plan[lam - 1].name, q, extra))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def _bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    c = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=('pseudo', 'real'), default='pseudo', help='pseudo: edge from the LUT, link '
                   'modelled, server measured here; real: all measured through client_worker.py (default: pseudo)')
    p.add_argument('--domain_id', type=int, default=None, help='sweep domain d\'s step-3 configuration and report '
                   'accuracy per lambda on its test split (default: none, step 2\'s configuration, no accuracy)')
    p.add_argument('--lut_file', help='hardware LUT (default: <results_dir>/hardware_lut_complete.json)')
    add_link_args(p, reevaluate=True)
    p.add_argument('--edge_profile', help='edge device profile the LUT must have been modelled with; an error if '
                   f'it was not (default: not checked; step 1 default {c.lut.edge_profile})')
    p.add_argument('--samples', type=int, default=200, help='real mode without a domain: random images streamed per '
                   'lambda; with a domain, its test split (real.run_samples caps it) (default: 200)')
    p.add_argument('--round_trips', type=int, default=None, help='real mode: single requests with the result sent '
                   f'back, per lambda (default: lut.repeats = {c.lut.repeats})')
    p.add_argument('--port', help=f'real mode: port the session listens on, on {c.real.host} (default: {c.real.port})')
    p.add_argument('--no_figure', action='store_true', help='skip the figure (default: off, the figure is drawn)')
    add_common_args(p)
    return p.parse_args(argv)


def _load_inputs(cfg: Config, args: argparse.Namespace) -> Dict[str, Any]:
    """The LUT, the link and the chosen configuration (model, gammas, lambda), checked against each other."""
    from pipeline import throughput as T
    from pipeline.export_parts import chosen_configuration
    from timing import lut as L
    lut_file = resolve_path(args.lut_file) if args.lut_file else cfg.path('hardware_lut_complete.json')
    lut = L.load_lut(lut_file)
    T.check_edge_profile(lut, T.requested_profile(args.edge_profile is not None, cfg), str(lut_file))
    link, link_source = T.link_for(lut, cfg.lut, args.link is not None)
    chosen = chosen_configuration(cfg, args.domain_id)
    model = chosen['model'].to(cfg.device)
    if lut['num_blocks'] != model.num_blocks or lut['model'] != L.model_spec(cfg):
        raise UserError(f'{lut_file}: the LUT is for {lut["model"]}, the configuration\'s model is '
                        f'{model.spec_dict()}; re-run step 1 with the same model flags')
    return {'lut_file': lut_file, 'lut': lut, 'link': link, 'link_source': link_source, 'chosen': chosen,
            'model': model, 'gammas': chosen['gammas'], 'lam0': chosen['lam']}


def _domain_test_set(cfg: Config, domain_id: Optional[int]):
    """(x, y): up to real.run_samples test images of the domain, or (None, None) without one."""
    if domain_id is None:
        return None, None
    from accuracy import pruning
    from data.domains import domain_loader, load_partition
    partition = load_partition(cfg.path('partition_info.json'), cfg)
    return pruning.collect(domain_loader(cfg, partition, domain_id, 'test', cfg.train.eval_batch_size, False),
                           cfg.real.run_samples)


def _real_sweep(cfg: Config, args: argparse.Namespace, inp: Dict[str, Any], x: Any, y: Any, mean: Sequence[float],
                std: Sequence[float]) -> List[Dict[str, Any]]:
    """The rows of real mode: each split streamed to client_worker.py (random images without a domain)."""
    import torch
    from comm.session import session_from_config
    if x is None:
        gen = torch.Generator()
        gen.manual_seed(cfg.seed + 11)
        size = cfg.model.input_size
        x = torch.randint(0, 256, (max(3 * cfg.optim.batch_size, args.samples), 3, size, size), dtype=torch.uint8,
                          generator=gen)
        y = torch.zeros(len(x), dtype=torch.long)
    with session_from_config(cfg) as sess:
        log.info('waiting up to %g s for client_worker.py on %s:%d', cfg.real.connect_timeout_s, cfg.real.host,
                 sess.port)
        hello = sess.accept()
        log.info('worker: %s (%s)', hello.get('device_name'), hello.get('device'))
        return real_rows(cfg, sess, inp['lut'], inp['link'], inp['model'], inp['gammas'], x, y, mean, std,
                         args.round_trips or cfg.lut.repeats)


def _add_accuracy(cfg: Config, rows: List[Dict[str, Any]], model: Any, x: Any, y: Any, mean: Sequence[float],
                  std: Sequence[float]) -> None:
    """Each row's accuracy on the domain's test images and whether it equals the unsplit model's predictions."""
    import torch
    from accuracy import pruning
    with torch.no_grad():
        ref = pruning.deployed(model).to(cfg.device)
        from data.normalize import normalize_batch
        unsplit = torch.cat([ref(normalize_batch(x[i:i + 256].to(cfg.device), mean, std)).argmax(1).cpu()
                             for i in range(0, len(x), 256)])
    a_ref = float((unsplit == y).float().mean() * 100)
    for r in _progress_rows(rows, 'accuracy per lambda'):
        pred = (torch.tensor(r.pop('stream_predictions')) if 'stream_predictions' in r else
                split_predictions(model, r['split_layer'], x, mean, std, 256, cfg.device))
        r['accuracy_pct'] = float((pred == y).float().mean() * 100)
        r['unsplit_accuracy_pct'] = a_ref
        r['equals_unsplit'] = bool(torch.equal(pred, unsplit))


def _print_summary(args: argparse.Namespace, inp: Dict[str, Any], payload: Dict[str, Any], out_csv: Path,
                   y: Any) -> None:
    best, rows, lam0 = payload['best'], payload['rows'], inp['lam0']
    load_before, load_after = payload['load_average_1_5_15']['before'], payload['load_average_1_5_15']['after']
    spread = best['best_measured_throughput_p10_p90_fps']
    print(f'split sweep ({args.mode}, {inp["chosen"]["source"]}): best lambda measured {best["best_measured_lam"]} '
          f'({best["best_measured_throughput_fps"]:.1f} fps, p10-p90 {spread[0]:.1f}-{spread[1]:.1f}), predicted '
          f'{best["best_predicted_lam"]} '
          f'({best["best_predicted_throughput_fps"]:.1f} fps predicted, {best["measured_at_best_predicted_fps"]:.1f} '
          f'measured), chosen {lam0} ({best["chosen_throughput_fps"]:.1f} fps); load average '
          f'{load_before[0]:.2f} -> {load_after[0]:.2f}; {payload["wall_s"]:.1f} s -> {out_csv}')
    if args.domain_id is not None:
        print(f'accuracy per lambda on {len(y)} test images of domain {args.domain_id}: '
              f'{"all equal to" if payload["all_equal_unsplit"] else "NOT all equal to"} the unsplit model '
              f'({rows[0]["unsplit_accuracy_pct"]:.2f} %)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='split sweep: %(message)s', stream=sys.stderr)
    t_start = time.perf_counter()
    args = parse_args(argv)
    cfg = resolve_config(args, {**LINK_FLAGS, 'port': 'real.port', 'edge_profile': 'lut.edge_profile'})
    import torch

    from data.datasets import dataset_stats
    from pipeline import executor
    torch.set_num_threads(cfg.lut.threads or executor.usable_cpus())
    inp = _load_inputs(cfg, args)
    model, gammas, lam0, link = inp['model'], inp['gammas'], inp['lam0'], inp['link']
    mean, std = dataset_stats(cfg)
    x, y = _domain_test_set(cfg, args.domain_id)
    load_before = os.getloadavg()
    if args.mode == 'pseudo':
        rows = pseudo_rows(cfg, inp['lut'], link, model, gammas)
    else:
        rows = _real_sweep(cfg, args, inp, x, y, mean, std)
    load_after = os.getloadavg()
    if args.domain_id is not None:
        _add_accuracy(cfg, rows, model, x, y, mean, std)
    for r in rows:
        r.pop('stream_predictions', None)
    best = mark_best(rows, lam0)
    payload = {'mode': args.mode, 'domain': args.domain_id, 'configuration_source': inp['chosen']['source'],
               'gammas': gammas, 'num_blocks': model.num_blocks, 'batch_size': cfg.optim.batch_size,
               'link': link.to_dict(), 'link_source': inp['link_source'], 'lut_file': str(inp['lut_file']),
               'feature_dtype': cfg.lut.feature_dtype, 'server_device': cfg.device,
               'load_average_1_5_15': {'before': list(load_before), 'after': list(load_after)},
               'test_samples': None if y is None or args.domain_id is None else int(len(y)),
               'all_equal_unsplit': None if args.domain_id is None else all(r['equals_unsplit'] for r in rows),
               'best': best, 'columns': dict(columns()), 'rows': rows,
               'wall_s': time.perf_counter() - t_start}
    out_csv, out_json = cfg.path(CSV_FILE), cfg.path(JSON_FILE)
    atomic_write_bytes(out_csv, csv_text(rows).encode())
    write_artifact(out_json, 'split_latency_sweep', payload, cfg, command_line(argv))
    if not args.no_figure:
        from viz import plots
        fig = plots.split_sweep(rows, lam0, f'{model.arch}, {args.mode} mode' +
                                ('' if args.domain_id is None else f', domain {args.domain_id}') +
                                f', batch {cfg.optim.batch_size}, link {link.name}')
        plots.save_figure(fig, cfg.path('visualization'), FIGURE, ('png', 'pdf'))
    _print_summary(args, inp, payload, out_csv, y)
    return 0


def _progress_rows(rows: List[Dict[str, Any]], desc: str) -> Any:
    from tqdm import tqdm
    return tqdm(rows, desc=desc, file=sys.stderr, leave=False)


if __name__ == '__main__':
    run_cli(main)
