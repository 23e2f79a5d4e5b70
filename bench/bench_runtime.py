"""Real-mode runtime: the link emulator, the framing throughput and a pipelined split run against the LUT's prediction.

1. Emulated link: comm.linkemu at 5 and 20 Mbit/s (10 ms one way) between a ServerSession and a client_worker.py
   process; probe_link's fitted bandwidth and latency against the configured ones.
2. Framing throughput on loopback TCP: comm.protocol frames carrying one 1 MB or 10 MB float32 tensor, sent by
   one thread and decoded by another, in MB/s of tensor payload; the same bytes through plain sendall/recv_into
   as the baseline.
3. Split run vs LUT: a tiny HyperRepVGG (RepVGG-A0, width 0.25, 32 px, small input, 10 classes).  The LUT is
   measured as step 1 --mode real does (server side here, edge side on the worker, link probed, timing.lut.merge),
   optim.cost.evaluate predicts each split's pipelined throughput B / max(T_edge, T_link, T_server), and
   ServerSession.run measures it with the same worker (loopback, and over the 20 Mbit/s emulated link).
   Worker and server are both on this machine (one torch thread each): on a shared 2-core box they compete
   for the cores, which the LUT (each side measured alone) does not see.  optim.cost counts the link's
   occupancy bytes / bandwidth in the period and its latency once per frame (batches streamed over one TCP
   connection overlap the latency); this bench is where that was measured.

Writes bench/results/runtime.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from config import run_cli  # noqa: E402

log = logging.getLogger('bench_runtime')
NAME = 'runtime'
ARCH = {'name': 'RepVGG-A0', 'num_classes': 10, 'width_multiplier': [0.25, 0.25, 0.25, 0.25], 'small_input': True}
INPUT = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def start_worker(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(common.REPO_ROOT / 'client_worker.py'), '--port', str(port),
                             '--device', 'cpu', '--threads', '1', '--backoff_max_s', '1'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Worker:
    """A ServerSession (optionally behind a link emulator) with a client_worker.py process connected."""

    def __init__(self, stack: ExitStack, rate_mbps: Optional[float] = None, delay_ms: float = 10.0) -> None:
        from comm.linkemu import LinkEmulator
        from comm.session import ServerSession
        self.sess = stack.enter_context(ServerSession(port=0, connect_timeout_s=120, io_timeout_s=300))
        port = self.sess.port
        if rate_mbps is not None:
            port = stack.enter_context(LinkEmulator(('127.0.0.1', 0), ('127.0.0.1', port), rate_mbps, delay_ms)).port
        self.proc = start_worker(port)
        stack.callback(self._stop)
        self.hello = self.sess.accept()

    def _stop(self) -> None:
        self.sess.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def bench_link(rates: Sequence[float], sizes: Sequence[int], repeats: int) -> List[Dict[str, Any]]:
    out = []
    for rate in rates:
        with ExitStack() as stack:
            w = Worker(stack, rate, 10.0)
            p = w.sess.probe_link(sizes, repeats)
        out.append({'configured_mbps': rate, 'configured_delay_ms': 10.0, 'measured_mbps': p['bandwidth_mbps'],
                    'error_pct': 100 * (p['bandwidth_mbps'] / rate - 1), 'latency_ms': p['latency_ms'],
                    'rms_residual_ms': p['fit']['rms_residual_ms'], 'samples': len(p['samples'])})
        log.info('link %g Mbit/s: measured %.3f Mbit/s, latency %.2f ms', rate, p['bandwidth_mbps'], p['latency_ms'])
    return out


def bench_framing(size_mb: float, count: int) -> Dict[str, Any]:
    """MB/s of tensor payload through comm.protocol frames on loopback TCP, and of the raw bytes."""
    from comm import protocol as P
    x = np.random.default_rng(0).standard_normal(int(size_mb * 2 ** 20 / 4)).astype(np.float32)
    res = {}
    for mode in ('frames', 'raw'):
        srv = socket.create_server(('127.0.0.1', 0))
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
        srv.close()
        for s in (a, b):
            s.settimeout(60)
        try:
            def send() -> None:
                for _ in range(count):
                    if mode == 'frames':
                        P.send_frame(a, 'features', {'batch': 0}, [('x', x)])
                    else:
                        a.sendall(memoryview(x.view(np.uint8)))
            t = threading.Thread(target=send)
            t0 = time.perf_counter()
            t.start()
            buf = bytearray(x.nbytes)
            for _ in range(count):
                if mode == 'frames':
                    f = P.recv_frame(b)
                    assert f.tensors['x'].nbytes == x.nbytes
                else:
                    view, got = memoryview(buf), 0
                    while got < x.nbytes:
                        got += b.recv_into(view[got:])
            dt = time.perf_counter() - t0
            t.join()
        finally:
            a.close()
            b.close()
        res[f'{mode}_mb_per_s'] = count * x.nbytes / 2 ** 20 / dt
    res.update({'tensor_mb': size_mb, 'frames': count})
    log.info('framing %g MB: %.0f MB/s (raw %.0f MB/s)', size_mb, res['frames_mb_per_s'], res['raw_mb_per_s'])
    return res


def measure_lut(w: Worker, batch: int, repeats: int) -> Dict[str, Any]:
    """The hardware_lut_complete payload, measured as step 1 --mode real does."""
    from comm.session import link_from_probe
    from timing import lut as L
    from timing import measure as M
    torch.set_num_threads(1)
    server = L.side_payload('server', ARCH, INPUT, M.measure_side(ARCH, INPUT, [batch], 'cpu', 2, repeats, 1))
    edge = L.side_payload('edge', ARCH, INPUT, w.sess.measure_lut(ARCH, INPUT, [batch], 2, repeats, 1, 0.0, 0,
                                                                       'chain'))
    probe = w.sess.probe_link([16384, 131072, 524288], 2)
    return L.merge(server, edge, link_from_probe(probe), 'fp32')


def bench_split(w: Worker, lams: Sequence[int], batch: int, samples: int, repeats: int, label: str) -> List[Dict]:
    import hyper_repvgg as H
    from timing import lut as L
    from optim.cost import evaluate
    from timing.measure import random_model
    lut = measure_lut(w, batch, repeats)
    tables = L.cost_tables(lut, batch)
    model = random_model(ARCH, 0)
    gammas = model.layouts()
    images = torch.randint(0, 256, (samples, 3, INPUT, INPUT), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(samples, dtype=torch.long)
    rows = []
    for lam in lams:
        pred = evaluate(gammas, lam, tables)
        w.sess.deploy(model, gammas, lam, MEAN, STD)
        server = None if lam == model.num_blocks else H.deploy_part(model.split(lam)[1])
        r = w.sess.run(server, images, labels, batch)
        rows.append({'link': label, 'lam': lam, 'batch': batch, 'samples': samples,
                     'predicted_fps': pred['throughput_fps'], 'measured_fps': r['throughput_fps'],
                     'measured_steady_fps': r['steady_throughput_fps'],
                     'error_pct': 100 * (r['steady_throughput_fps'] / pred['throughput_fps'] - 1)
                     if r['steady_throughput_fps'] else None,
                     'measured_over_predicted': r['steady_throughput_fps'] / pred['throughput_fps']
                     if r['steady_throughput_fps'] else None,
                     'predicted_bottleneck': pred['bottleneck'],
                     'predicted_ms': {k: pred[f'{k}_ms'] for k in ('edge', 'link', 'server')},
                     'measured_ms': {k: r[f'{k}_ms'] for k in ('edge', 'link', 'server')},
                     'measured_latency_ms': r['latency_ms'], 'link_bandwidth_mbps': lut['link']['bandwidth_mbps']})
        log.info('%s lam=%d: predicted %.1f fps (%s-bound), measured %.1f fps steady (%.1f overall)', label, lam,
                 pred['throughput_fps'], pred['bottleneck'], r['steady_throughput_fps'] or 0, r['throughput_fps'])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_runtime: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--batch', type=int, default=8, help='batch size of the split runs and the LUT (default: 8)')
    p.add_argument('--samples', type=int, default=400, help='images per split run (default: 400)')
    args = p.parse_args(argv)
    machine = common.machine_info()
    q = args.quick
    torch.set_num_threads(1)
    link = bench_link([20.0] if q else [5.0, 20.0], [16384, 131072] if q else [16384, 131072, 524288, 1048576],
                      1 if q else 3)
    framing = [bench_framing(mb, n) for mb, n in ([(1, 3), (10, 1)] if q else [(1, 100), (10, 20)])]
    samples, repeats = (16, 2) if q else (args.samples, 10)
    with ExitStack() as stack:
        w = Worker(stack)
        split = bench_split(w, [0, 6, 22] if q else [0, 6, 14, 22], args.batch, samples, repeats, 'loopback')
    with ExitStack() as stack:
        w = Worker(stack, 20.0, 10.0)
        split += bench_split(w, [6] if q else [0, 6, 22], args.batch, samples, repeats, 'emulated 20 Mbit/s')
    link_cols = ['configured Mbit/s', 'measured Mbit/s', 'error %', 'latency ms (10 configured)', 'rms residual ms']
    link_rows = [[r['configured_mbps'], r['measured_mbps'], r['error_pct'], r['latency_ms'], r['rms_residual_ms']]
                 for r in link]
    frame_cols = ['tensor MB', 'frames', 'framed MB/s', 'raw socket MB/s']
    frame_rows = [[r['tensor_mb'], r['frames'], r['frames_mb_per_s'], r['raw_mb_per_s']] for r in framing]
    split_cols = ['link', 'lambda', 'predicted fps', 'bottleneck', 'measured fps (steady)', 'measured fps (wall)',
                  'error %', 'measured / predicted', 'pred edge/link/server ms',
                  'meas edge/link/server ms']
    split_rows = [[r['link'], r['lam'], r['predicted_fps'], r['predicted_bottleneck'], r['measured_steady_fps'],
                   r['measured_fps'], r['error_pct'], r['measured_over_predicted'],
                   '/'.join(common.fmt(r['predicted_ms'][k]) for k in ('edge', 'link', 'server')),
                   '/'.join(common.fmt(r['measured_ms'][k]) for k in ('edge', 'link', 'server'))] for r in split]
    headline = [[f'probe_link at {r["configured_mbps"]:g} Mbit/s emulated', r['measured_mbps'], 'Mbit/s'] for r in link]
    headline += [[f'framing throughput, {r["tensor_mb"]:g} MB tensors (loopback)', r['frames_mb_per_s'], 'MB/s']
                 for r in framing]
    errs = [abs(r['error_pct']) for r in split if r['error_pct'] is not None]
    headline.append(['split run vs LUT (optim.cost): median |throughput error|', float(np.median(errs)) if errs
                     else None, '%'])
    for label in dict.fromkeys(r['link'] for r in split):
        ratios = [r['measured_over_predicted'] for r in split if r['link'] == label and r['measured_over_predicted']]
        headline.append([f'split run, {label}: measured / LUT-predicted throughput (median over splits)',
                         float(np.median(ratios)) if ratios else None, 'x'])
    tables = [common.table('Link emulator: probe_link fit vs configured rate (10 ms one way)', link_cols, link_rows),
              common.table('Framing throughput on loopback TCP (one sender thread, one receiver)', frame_cols,
                           frame_rows),
              common.table(f'Pipelined split run vs LUT prediction (tiny A0, {INPUT} px, batch {args.batch})',
                           split_cols, split_rows)]
    path = common.write_result(args.out_dir, NAME, {'link': link, 'framing': framing, 'split': split}, machine,
                               q, headline, tables, argv)
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
