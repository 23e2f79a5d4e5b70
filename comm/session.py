"""Server side of real mode: one session with the edge worker (client_worker.py) over comm.protocol frames.

Public API (step 1 and step 3 real mode are written against it; docs/design.md#real-mode):

    class ServerSession:  # context manager; close() on exit
        def __init__(self, host='127.0.0.1', port=6006, token=None, connect_timeout_s=60.0, io_timeout_s=120.0,
                     max_frame_bytes=512*2**20, allow_remote=False)
            # binds host:port at once (port 0 = any free port, see .port); a host other than loopback needs
            # allow_remote=True and logs a warning
        def accept(self) -> dict
            # waits up to connect_timeout_s for the worker, authenticates it (HMAC of a nonce when a token is set,
            # both directions), returns its hello: device, device_name, python/torch/numpy versions, power_mode, ...
            # Call it again after a dropped worker to resume with the reconnected one (deploy again).
        def measure_lut(self, arch, input_size, batch_sizes, warmup, repeats, threads, max_entry_s, seed, timing) -> dict
            # timing.measure.measure_side() run on the device; feed it to timing.lut.side_payload('edge', ...)
        def probe_link(self, sizes_bytes, repeats=3) -> dict
            # {'latency_ms', 'bandwidth_mbps', 'rtt_ms', 'fit': {...}, 'samples': [{'bytes', 'time_ms', 'residual_ms'}]}
        def deploy(self, model, gammas, lam, mean, std, feature_dtype='fp32', threads=0) -> dict
            # sends the arch spec, kept sets, gammas[:lam], alpha and model.edge_state_dict(lam) (+ the classifier
            # when lam == N) as raw tensors; the worker rebuilds with hyper_repvgg.build_edge; threads > 0: the
            # worker's torch threads (unless its --threads was given)
            # -> {'edge_weight_bytes', 'load_ms', 'round_trip_ms', 'lam', 'device', 'blocks', 'threads'}
        def run(self, server_part, images_uint8, labels, batch_size) -> dict
            # uploads the images (untimed), then the pipelined run: the worker computes the edge part batch after
            # batch and streams what crosses the link (uint8 images at lam 0, features, logits at lam N); a receiver
            # thread here takes the frames while this thread runs server_part (None when lam == N).
            # -> {'accuracy_pct', 'throughput_fps', 'latency_ms', 'edge_ms', 'link_ms', 'server_ms' (medians per
            #     batch), 'batches', 'samples', 'per_batch': [...], 'wall_s', 'predictions', 'upload_s', ...}
        def close(self)  # sends bye, closes the connection and the listening socket

    session_from_config(cfg) -> ServerSession   # cfg.real; the token falls back to env HYPERREPVGG_TOKEN
    link_from_probe(probe) -> timing.lut.LinkSpec  # the measured link for link.json / the cost model

Per batch of a run: edge_ms is measured on the worker (normalization + edge part + copy to the CPU); link_ms is
the link's service time: from the later of (the worker starts sending the batch, this side is ready to receive
it) until this side has all of it, so time the frame spent waiting for a busy server stage is not counted
(link_total_ms keeps the whole send-to-received time); the worker's monotonic clock is mapped onto ours with an
NTP-style offset (min-RTT of 5 exchanges; on a real network accurate to about half the RTT asymmetry);
server_ms is this side's compute; latency_ms is edge start to server end, queueing included.  Over a streamed
TCP connection consecutive batches overlap the link's latency, so a link-bound run's period per batch is about
bytes / bandwidth, not latency + bytes / bandwidth.

Every wait is bounded: connect_timeout_s for the worker to dial, io_timeout_s for silence on the connection
(the worker sends heartbeats while a long command runs).  A dropped or stalled worker raises SessionError naming
what happened and the timeout; nothing hangs.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import statistics
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from comm import protocol as P
from config import Config, UserError
from data.normalize import normalize_batch

log = logging.getLogger(__name__)


class SessionError(UserError):
    """The worker is missing, was refused, failed a command, dropped or stalled; the message says which."""


class _StaleConnection(Exception):
    """A connection that closed before the handshake finished; accept() waits for the next one."""


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


class ServerSession:
    """See the module docstring."""

    def __init__(self, host: str = '127.0.0.1', port: int = 6006, token: Optional[str] = None,
                 connect_timeout_s: float = 60.0, io_timeout_s: float = 120.0, max_frame_bytes: int = 512 * 2 ** 20,
                 allow_remote: bool = False) -> None:
        if not _is_loopback(host):
            if not allow_remote:
                raise SessionError(f'real.host {host!r} is not a loopback address; the worker reaches the server '
                                   'through an SSH tunnel to 127.0.0.1. To listen on {host} anyway set '
                                   'real.allow_remote=true (then use a token)')
            log.warning('listening on %s:%d, reachable from other machines%s', host, port,
                        '' if token else ' WITHOUT a token')
        for name, v in (('connect_timeout_s', connect_timeout_s), ('io_timeout_s', io_timeout_s)):
            if not v > 0:
                raise SessionError(f'real.{name} must be > 0 s, got {v}')
        self.host, self.token = host, token
        self.connect_timeout_s, self.io_timeout_s = float(connect_timeout_s), float(io_timeout_s)
        self.limits = P.Limits(max_frame_bytes=int(max_frame_bytes))
        try:
            self._listener = socket.create_server((host, port))
        except OSError as e:
            raise SessionError(f'cannot listen on {host}:{port} (real.host / real.port): {e}') from None
        self.port: int = self._listener.getsockname()[1]
        self._conn: Optional[socket.socket] = None
        self._ids = 0
        self._offset_s = 0.0  # our monotonic clock minus the worker's
        self._deployed: Optional[Dict[str, Any]] = None
        self.hello: Optional[Dict[str, Any]] = None

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> 'ServerSession':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- connection ------------------------------------------------------------------------------------------
    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        self._conn = None
        self._deployed = None

    def accept(self) -> Dict[str, Any]:
        self._drop()
        if self._listener is None:
            raise SessionError('session is closed')
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            self._listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, addr = self._listener.accept()
            except socket.timeout:
                raise SessionError(f'no worker connected to {self.host}:{self.port} within real.connect_timeout_s = '
                                   f'{self.connect_timeout_s:g} s; start `python client_worker.py --port {self.port}` '
                                   'on the device (through the SSH tunnel)') from None
            try:
                return self._handshake(conn, addr)
            except _StaleConnection as e:  # e.g. a dial the worker gave up on while we were busy: take the next
                log.warning('%s; waiting for the next connection', e)

    def _handshake(self, conn: socket.socket, addr: Any) -> Dict[str, Any]:
        conn.settimeout(self.io_timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = P.make_nonce()
        try:
            P.send_frame(conn, 'challenge', {'nonce': nonce, 'auth_required': self.token is not None,
                                             'heartbeat_s': max(0.5, min(5.0, self.io_timeout_s / 4)),
                                             'version': P.VERSION})
            hello = P.recv_frame(conn, self.limits)
            if hello.kind != 'hello':
                raise P.ProtocolError(f'expected a hello frame, got {hello.kind}')
            if self.token is not None and not P.check_mac(self.token, nonce, 'worker', hello.header.get('mac')):
                P.send_frame(conn, 'error', {'message': 'authentication failed: wrong or missing token'})
                conn.close()
                raise SessionError(f'worker at {addr[0]}:{addr[1]} refused: wrong or missing token (real.token / '
                                   f'env {P.TOKEN_ENV}); nothing was run')
            welcome = {}
            if self.token is not None:
                welcome['mac'] = P.auth_mac(self.token, str(hello.header.get('nonce', '')), 'server')
            P.send_frame(conn, 'welcome', welcome)
        except P.ConnectionClosed as e:
            conn.close()
            raise _StaleConnection(f'connection from {addr[0]}:{addr[1]} closed during the handshake ({e})') from None
        except P.ProtocolError as e:
            conn.close()
            raise SessionError(f'handshake with the worker at {addr[0]}:{addr[1]} failed: {e}') from None
        self._conn = conn
        self.hello = dict(hello.header.get('info') or {})
        self.sync_clock()
        log.info('worker connected: %s (%s), python %s, torch %s', self.hello.get('device_name'),
                 self.hello.get('device'), self.hello.get('python_version'), self.hello.get('torch_version'))
        return dict(self.hello)

    def close(self) -> None:
        if self._conn is not None:
            try:
                P.send_frame(self._conn, 'bye', {})
            except P.ProtocolError:
                pass
        self._drop()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _need_conn(self) -> socket.socket:
        if self._conn is None:
            raise SessionError('no worker connected: call accept() first (after a drop, accept() again)')
        return self._conn

    def _lost(self, e: P.ProtocolError, what: str) -> SessionError:
        self._drop()
        if isinstance(e, P.ProtocolTimeout):
            return SessionError(f'worker silent for real.io_timeout_s = {self.io_timeout_s:g} s during {what} (no '
                                f'data, no heartbeat): it is stalled or the link is down ({e}); restart '
                                'client_worker.py and accept() again')
        return SessionError(f'worker connection lost during {what}: {e}; client_worker.py reconnects by itself '
                            '(restart it if it died), then accept() again')

    def _recv(self, what: str) -> P.Frame:
        conn = self._need_conn()
        while True:
            try:
                frame = P.recv_frame(conn, self.limits)
            except P.ProtocolError as e:
                raise self._lost(e, what) from None
            if frame.kind != 'heartbeat':
                return frame

    def _send(self, kind: str, header: Dict[str, Any], tensors: Any = None, what: str = '') -> int:
        try:
            return P.send_frame(self._need_conn(), kind, header, tensors)
        except P.ProtocolError as e:
            raise self._lost(e, what or kind) from None

    def request(self, cmd: str, args: Optional[Dict[str, Any]] = None,
                tensors: Any = None) -> Tuple[Dict[str, Any], P.Frame]:
        """Send one command and wait for its reply: (result, reply frame).  SessionError on an error frame."""
        self._ids += 1
        rid = self._ids
        self._send('request', {'cmd': cmd, 'id': rid, 'args': args or {}}, tensors, what=f'command {cmd}')
        return self._reply(cmd, rid)

    def _reply(self, cmd: str, rid: int) -> Tuple[Dict[str, Any], P.Frame]:
        while True:
            frame = self._recv(f'command {cmd}')
            if frame.kind == 'error':
                raise SessionError(f'worker failed command {cmd}: {frame.header.get("error", "")}: '
                                   f'{frame.header.get("message")}')
            if frame.kind == 'reply' and frame.header.get('id') == rid:
                return dict(frame.header.get('result') or {}), frame
            raise self._lost(P.ProtocolError(f'unexpected {frame.kind} frame (id {frame.header.get("id")})'),
                             f'command {cmd}')

    def sync_clock(self, exchanges: int = 5) -> float:
        """Offset of our monotonic clock over the worker's (min-RTT exchange), seconds; stored for run()."""
        best = None
        for _ in range(exchanges):
            t0 = time.monotonic()
            res, _ = self.request('clock')
            t1 = time.monotonic()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, (t0 + t1) / 2 - float(res['t']))
        self._offset_s = best[1]
        return self._offset_s

    # -- commands --------------------------------------------------------------------------------------------
    def measure_lut(self, arch: Dict[str, Any], input_size: int, batch_sizes: Sequence[int], warmup: int,
                    repeats: int, threads: int, max_entry_s: float, seed: int, timing: str) -> Dict[str, Any]:
        args = {'arch': arch, 'input_size': int(input_size), 'batch_sizes': [int(b) for b in batch_sizes],
                'warmup': int(warmup), 'repeats': int(repeats), 'threads': int(threads),
                'max_entry_s': float(max_entry_s), 'seed': int(seed), 'timing': str(timing)}
        res, _ = self.request('measure_lut', args)
        res.pop('worker_ms', None)
        return res

    def probe_link(self, sizes_bytes: Sequence[int], repeats: int = 3) -> Dict[str, Any]:
        """Fit the time of a probe (small request down, `bytes` up) as t = a + bytes / bandwidth, least squares.

        a is the round trip of an empty exchange (rtt_ms), latency_ms = a / 2 is the one-way latency of the
        model T_link = latency + bytes / bandwidth; the worker's own processing time is subtracted.
        """
        sizes = sorted({int(s) for s in sizes_bytes})
        if len(sizes) < 2 or sizes[0] < 0:
            raise SessionError(f'probe_link needs at least two distinct payload sizes >= 0, got {list(sizes_bytes)}')
        self.request('probe', {}, [('data', np.zeros(0, np.uint8))])  # warm-up / echo check
        self.request('probe', {'reply_bytes': sizes[-1]})
        samples = []
        for _ in range(max(1, int(repeats))):
            for s in sizes:
                t0 = time.perf_counter()
                res, frame = self.request('probe', {'reply_bytes': s})
                t = time.perf_counter() - t0 - float(res.get('worker_ms', 0.0)) / 1e3
                if frame.tensors['data'].nbytes != s:
                    raise SessionError(f'probe: asked for {s} bytes, got {frame.tensors["data"].nbytes}')
                samples.append({'bytes': s, 'time_ms': t * 1e3})
        x = np.array([r['bytes'] for r in samples], dtype=np.float64)
        y = np.array([r['time_ms'] for r in samples]) / 1e3
        (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
        if not b > 0:
            raise SessionError(f'probe_link: the fitted time does not grow with the payload (slope {b:.3g} s/byte); '
                               f'use larger real.probe_sizes_kb than {sizes}')
        for r in samples:
            r['residual_ms'] = r['time_ms'] - (a + b * r['bytes']) * 1e3
        resid = np.array([r['residual_ms'] for r in samples])
        a, b = float(a), float(b)
        for r in samples:
            r['residual_ms'] = float(r['residual_ms'])
        return {'latency_ms': max(0.0, a) * 1e3 / 2, 'rtt_ms': max(0.0, a) * 1e3, 'bandwidth_mbps': 8.0 / b / 1e6,
                'fit': {'intercept_ms': a * 1e3, 'slope_ms_per_mb': b * 1e9, 'rms_residual_ms':
                        float(np.sqrt(np.mean(resid ** 2))), 'max_abs_residual_ms': float(np.abs(resid).max())},
                'sizes_bytes': sizes, 'repeats': int(repeats), 'samples': samples}

    def deploy(self, model: Any, gammas: list, lam: int, mean: Sequence[float], std: Sequence[float],
               feature_dtype: str = 'fp32', threads: int = 0) -> Dict[str, Any]:
        from hyper_repvgg import BRANCHES
        n = model.num_blocks
        if not 0 <= int(lam) <= n:
            raise SessionError(f'deploy: split lambda={lam} out of range 0..{n}')
        lam = int(lam)
        if len(gammas) < lam:
            raise SessionError(f'deploy: need layouts for the {lam} edge blocks, got {len(gammas)}')
        if feature_dtype not in ('fp32', 'fp16'):
            raise SessionError(f'deploy: feature_dtype must be fp32 or fp16, got {feature_dtype!r}')
        for k in range(lam):
            if int(gammas[k]) not in model.valid_layouts(k):
                raise SessionError(f'deploy: layout gamma={gammas[k]} is not valid for block {k} with kept branches '
                                   f'{sorted(model.kept(k))}; valid: {model.valid_layouts(k)}')
        tensors = {k: v.detach().cpu() for k, v in model.edge_state_dict(lam).items()}
        if lam == n:
            tensors.update({f'linear.{k}': v.detach().cpu() for k, v in model.linear.state_dict().items()})
        args = {'arch': model.spec_dict(), 'lam': lam, 'layouts': [int(g) for g in gammas[:lam]],
                'kept': [sorted(model.kept(k), key=BRANCHES.index) for k in range(lam)],
                'alpha': [[float(v) for v in b.alpha.detach().cpu().tolist()] for b in model.blocks[:lam]],
                'mean': [float(v) for v in mean], 'std': [float(v) for v in std], 'feature_dtype': feature_dtype,
                'threads': int(threads)}  # > 0: the worker runs with it (the LUT's edge thread count)
        t0 = time.perf_counter()
        res, _ = self.request('load_edge', args, list(tensors.items()))
        res['round_trip_ms'] = (time.perf_counter() - t0) * 1e3
        self._deployed = {'lam': lam, 'num_blocks': n, 'mean': args['mean'], 'std': args['std'],
                          'feature_dtype': feature_dtype, 'num_classes': model.num_classes}
        return res

    def upload(self, images_uint8: torch.Tensor) -> Dict[str, Any]:
        """Send the images to the worker in frames of at most half the frame limit (not timed as link)."""
        x = images_uint8.detach().cpu().contiguous()
        per = max(1, x[:1].numel())
        chunk = max(1, (self.limits.max_frame_bytes // 2) // per)
        t0 = time.perf_counter()
        res: Dict[str, Any] = {}
        for i in range(0, len(x), chunk):
            res, _ = self.request('upload', {'reset': i == 0}, [('images', x[i:i + chunk])])
        return {'samples': int(res.get('samples', 0)), 'upload_s': time.perf_counter() - t0,
                'bytes': int(x.numel())}

    def run(self, server_part: Optional[torch.nn.Module], images_uint8: torch.Tensor, labels: torch.Tensor,
            batch_size: int) -> Dict[str, Any]:
        dep = self._deployed
        if dep is None:
            raise SessionError('run: nothing deployed on this connection (call deploy() first)')
        lam, n = dep['lam'], dep['num_blocks']
        if (lam == n) != (server_part is None):
            raise SessionError(f'run: server_part must be None exactly when lambda == N ({n}); lambda is {lam}')
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or len(images_uint8) == 0:
            raise SessionError(f'run: images must be a non-empty uint8 (B, C, H, W) tensor, got '
                               f'{images_uint8.dtype} {tuple(images_uint8.shape)}')
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if len(labels) != len(images_uint8):
            raise SessionError(f'run: {len(images_uint8)} images but {len(labels)} labels')
        if int(batch_size) < 1:
            raise SessionError(f'run: batch_size must be >= 1, got {batch_size}')
        bs = int(batch_size)
        up = self.upload(images_uint8)
        self.sync_clock()
        dev = next(server_part.parameters()).device if server_part is not None and \
            any(True for _ in server_part.parameters()) else torch.device('cpu')
        if server_part is not None:
            server_part.eval()
        self._ids += 1
        rid = self._ids
        frames: 'queue.Queue[Any]' = queue.Queue(maxsize=2)  # bounded: a slow server stage back-pressures the link
        conn = self._need_conn()
        stop = threading.Event()

        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    frames.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def receiver() -> None:
            while not stop.is_set():
                ready = time.monotonic()  # from here on this side takes bytes as fast as they come
                try:
                    f = P.recv_frame(conn, self.limits)
                except P.ProtocolError as e:
                    put(e)
                    return
                if f.kind == 'heartbeat':
                    continue
                put((f, ready, time.monotonic()))
                if f.kind != 'features':
                    return

        t_start = time.monotonic()
        self._send('request', {'cmd': 'run', 'id': rid, 'args': {'batch_size': bs, 'queue': 2}}, what='run')
        thread = threading.Thread(target=receiver, name='receiver', daemon=True)
        thread.start()
        off = self._offset_s
        preds: List[torch.Tensor] = []
        per_batch: List[Dict[str, Any]] = []
        try:
            while True:
                try:
                    item = frames.get(timeout=self.io_timeout_s + 5)
                except queue.Empty:
                    raise self._lost(P.ProtocolTimeout('receiver got nothing'), 'run') from None
                if isinstance(item, P.ProtocolError):
                    raise self._lost(item, f'run (after {len(per_batch)} batches)')
                f, t_ready, t_recv = item
                if f.kind == 'error':
                    raise SessionError(f'worker failed command run: {f.header.get("error", "")}: '
                                       f'{f.header.get("message")}')
                if f.kind == 'reply':
                    worker = f.header.get('result') or {}
                    break
                if f.kind != 'features':
                    raise self._lost(P.ProtocolError(f'unexpected {f.kind} frame'), 'run')
                t0 = time.monotonic()
                x = torch.from_numpy(f.tensors['x'])
                with torch.no_grad():
                    if lam == n:
                        out = x.float()
                    else:
                        x = x.to(dev)
                        x = normalize_batch(x, dep['mean'], dep['std']) if lam == 0 else x.float()
                        out = server_part(x)
                    preds.append(out.argmax(1).cpu())
                t1 = time.monotonic()
                h = f.header
                per_batch.append({'batch': int(h['batch']), 'samples': int(len(x)), 'edge_ms': float(h['edge_ms']),
                                  'link_ms': (t_recv - max(float(h['send_start']) + off, t_ready)) * 1e3,
                                  'link_total_ms': (t_recv - (float(h['send_start']) + off)) * 1e3,
                                  'server_wait_ms': (t0 - t_recv) * 1e3, 'server_ms': (t1 - t0) * 1e3,
                                  'latency_ms': (t1 - (float(h['edge_start']) + off)) * 1e3,
                                  'bytes': int(f.tensors['x'].nbytes), 'done_s': t1 - t_start})
        except BaseException:
            stop.set()
            if thread.is_alive():  # the worker may still be streaming: drop the connection, it reconnects
                self._drop()
                thread.join(5)
            raise
        thread.join(self.io_timeout_s)
        wall = time.monotonic() - t_start
        for row, w in zip(per_batch, worker.get('per_batch', [])):
            row['send_ms'], row['edge_queue_wait_ms'] = w.get('send_ms'), w.get('queue_wait_ms')
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        if len(pred) != len(labels):
            raise SessionError(f'run: received predictions for {len(pred)} of {len(labels)} samples')
        steady = None
        if len(per_batch) >= 3:
            span = per_batch[-1]['done_s'] - per_batch[0]['done_s']
            steady = sum(r['samples'] for r in per_batch[1:]) / span if span > 0 else None
        return {'accuracy_pct': float((pred == labels).float().mean() * 100), 'throughput_fps': len(labels) / wall,
                'steady_throughput_fps': steady, 'latency_ms': _median([r['latency_ms'] for r in per_batch]),
                'edge_ms': _median([r['edge_ms'] for r in per_batch]),
                'link_ms': _median([r['link_ms'] for r in per_batch]),
                'server_ms': _median([r['server_ms'] for r in per_batch]),
                'batches': len(per_batch), 'samples': int(len(labels)), 'batch_size': bs, 'lam': lam,
                'feature_dtype': dep['feature_dtype'], 'per_batch': per_batch, 'wall_s': wall,
                'upload_s': up['upload_s'], 'predictions': pred.tolist(), 'clock_offset_s': off,
                'worker_device': (self.hello or {}).get('device')}


def session_from_config(cfg: Config) -> ServerSession:
    """A ServerSession with cfg.real's settings; the token falls back to env HYPERREPVGG_TOKEN."""
    r = cfg.real
    return ServerSession(r.host, r.port, P.resolve_token(r.token), r.connect_timeout_s, r.io_timeout_s,
                         int(r.max_frame_mb * 2 ** 20), allow_remote=r.allow_remote)


def link_from_probe(probe: Dict[str, Any]):
    """The measured LinkSpec (timing.lut) of a probe_link() result."""
    from timing.lut import LinkSpec
    how = (f'measured: link probe, least squares over {len(probe["samples"])} payloads of '
           f'{probe["sizes_bytes"][0]}..{probe["sizes_bytes"][-1]} bytes')
    return LinkSpec('measured', float(probe['bandwidth_mbps']), float(probe['rtt_ms']), how, how)


def measure_edge_side(session: ServerSession, cfg: Config) -> Dict[str, Any]:
    """The lut_edge payload (timing.lut.side_payload + roofline fit) measured on the worker with cfg.lut's settings."""
    from timing import lut as L
    model = L.model_spec(cfg)
    t0 = time.time()
    res = session.measure_lut(model, cfg.model.input_size, cfg.lut.batch_sizes, cfg.lut.warmup, cfg.lut.repeats,
                              cfg.lut.threads, cfg.lut.max_entry_s, cfg.seed, cfg.lut.timing)
    payload = L.side_payload('edge', model, cfg.model.input_size, res)
    payload['settings']['measure_wall_s'] = time.time() - t0
    payload['roofline_fit'] = L.roofline_fit(payload, min(cfg.lut.batch_sizes))
    return payload


def probe_sizes_bytes(cfg: Config) -> List[int]:
    return [int(kb) * 1024 for kb in cfg.real.probe_sizes_kb]
