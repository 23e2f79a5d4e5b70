"""Server side of real mode: one session with the edge worker (client_worker.py) over comm.protocol frames.

Public API (step 1 and step 3 real mode are written against it; docs/design.md#real-mode):

    class ServerSession:  # context manager; close() on exit
        def __init__(self, host='127.0.0.1', port=6006, token=None, connect_timeout_s=60.0, io_timeout_s=120.0,
                     max_frame_bytes=512*2**20, allow_remote=False, handshake_timeout_s=10.0)
            # binds host:port at once (port 0 = any free port, see .port; '::1' listens on IPv6); a host other
            # than loopback needs allow_remote=True and logs a warning
        def accept(self) -> dict
            # waits up to connect_timeout_s for the worker and authenticates it (comm.protocol's handshake: the
            # server proves the token first, both proofs bound to both nonces; each connection gets
            # handshake_timeout_s in all and small pre-auth frames).  A connection that fails is logged in one
            # line and accept() waits on for the real worker.  Returns the worker's info: device, device_name,
            # python/torch/numpy versions, power_mode, ...  Call it again after a dropped worker (deploy again).
        def measure_lut(self, arch, input_size, batch_sizes, warmup, repeats, threads, max_entry_s, seed, timing) -> dict
            # timing.measure.measure_side() run on the device; feed it to timing.lut.side_payload('edge', ...)
        def probe_link(self, sizes_bytes, repeats=3) -> dict
            # {'latency_ms', 'bandwidth_mbps', 'rtt_ms', 'fit': {...}, 'samples': [{'bytes', 'time_ms', 'residual_ms'}]}
        def deploy(self, model, gammas, lam, mean, std, feature_dtype='fp32', threads=0) -> dict
            # sends the arch spec, kept sets, gammas[:lam], alpha (RepVGG) and model.edge_state_dict(lam) (+ the
            # classifier when lam == N) as raw tensors; the worker rebuilds with nets.build_edge (a RepVGG's or a
            # plain network's blocks); threads > 0: the worker's torch threads (unless its --threads was given)
            # -> {'edge_weight_bytes', 'load_ms', 'round_trip_ms', 'lam', 'device', 'blocks', 'threads'}
        def run(self, server_part, images_uint8, labels, batch_size) -> dict
            # uploads the images (untimed; skipped when the worker holds the same ones), then the pipelined run:
            # the worker computes the edge part batch after batch and streams what crosses the link (uint8 images
            # at lam 0, features, logits at lam N); a receiver thread here takes the frames while this thread runs
            # server_part (None when lam == N).
            # -> {'accuracy_pct', 'throughput_fps' (whole run), 'steady_throughput_fps' (after the first batch),
            #     'period_throughput_fps' (at the median period, period_fps), 'latency_ms', 'edge_ms', 'link_ms',
            #     'server_ms' (medians per batch), 'batches', 'samples', 'per_batch': [...], 'wall_s', 'predictions',
            #     'upload_s', ...}
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

Every wait is bounded: connect_timeout_s for the worker to dial, handshake_timeout_s for one connection's whole
handshake, io_timeout_s for silence on the connection (the worker sends heartbeats while a long command runs; this
side sends heartbeats every heartbeat_s while the connection is up, so the worker notices a silent server and
redials).  A dropped or stalled worker raises SessionError naming what happened and the timeout; nothing hangs.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import queue
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from comm import protocol as P
from config import Config, UserError, one_line
from data.normalize import normalize_batch

log = logging.getLogger(__name__)


class SessionError(UserError):
    """The worker is missing, was refused, failed a command, dropped or stalled; the message says which."""


class _Refused(Exception):
    """A connection that failed its handshake (closed, silent, malformed, wrong token); accept() waits on."""


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(v: Any) -> float:
    """A finite number a worker reported, or 0.0 (timings it adds are informative, never trusted for control)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else 0.0


def _median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


class ServerSession:
    """See the module docstring."""

    def __init__(self, host: str = '127.0.0.1', port: int = 6006, token: Optional[str] = None,
                 connect_timeout_s: float = 60.0, io_timeout_s: float = 120.0, max_frame_bytes: int = 512 * 2 ** 20,
                 allow_remote: bool = False, handshake_timeout_s: float = 10.0) -> None:
        if not _is_loopback(host):
            if not allow_remote:
                raise SessionError(f'real.host {host!r} is not a loopback address; the worker reaches the server '
                                   'through an SSH tunnel to 127.0.0.1. To listen on {host} anyway set '
                                   'real.allow_remote=true (then use a token)')
            log.warning('listening on %s:%d, reachable from other machines%s', host, port,
                        '' if token else ' WITHOUT a token')
        for name, v in (('connect_timeout_s', connect_timeout_s), ('io_timeout_s', io_timeout_s),
                        ('handshake_timeout_s', handshake_timeout_s)):
            if not v > 0:
                raise SessionError(f'real.{name} must be > 0 s, got {v}')
        self.host, self.token = host, token
        self.connect_timeout_s, self.io_timeout_s = float(connect_timeout_s), float(io_timeout_s)
        self.handshake_timeout_s = float(handshake_timeout_s)
        self.heartbeat_s = max(0.5, min(5.0, self.io_timeout_s / 4))
        self.limits = P.Limits(max_frame_bytes=int(max_frame_bytes))
        try:
            family = socket.AF_INET6 if ':' in host else socket.AF_INET
            self._listener = socket.create_server((host, port), family=family)
        except (OSError, ValueError) as e:  # socket.gaierror is an OSError
            raise SessionError(f'cannot listen on {host}:{port} (real.host / real.port): {e}') from None
        self.port: int = self._listener.getsockname()[1]
        self._conn: Optional[Any] = None  # a socket, or a comm.protocol.SecureChannel when a token is set
        self._send_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._ids = 0
        self._offset_s = 0.0  # our monotonic clock minus the worker's
        self._deployed: Optional[Dict[str, Any]] = None
        self._images_fp: Optional[str] = None  # fingerprint of the images the worker holds (upload()); None: unknown
        self.hello: Optional[Dict[str, Any]] = None

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> 'ServerSession':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- connection ------------------------------------------------------------------------------------------
    def _drop(self) -> None:
        self._beat_stop.set()
        if self._conn is not None:
            try:  # shutdown first: a receiver thread blocked on the socket would hold back the FIN of close()
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self._conn.close()
            except OSError:
                pass
        self._conn = None
        self._deployed = None
        self._images_fp = None

    def accept(self) -> Dict[str, Any]:
        self._drop()
        if self._listener is None:
            raise SessionError('session is closed')
        deadline = time.monotonic() + self.connect_timeout_s
        refused: List[str] = []
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                self._listener.settimeout(left)
                conn, addr = self._listener.accept()
            except socket.timeout:
                last = f'; {len(refused)} connection(s) refused, the last: {refused[-1]}' if refused else ''
                raise SessionError(f'no worker connected to {self.host}:{self.port} within real.connect_timeout_s = '
                                   f'{self.connect_timeout_s:g} s; start `python client_worker.py --port {self.port}` '
                                   f'on the device (through the SSH tunnel){last}') from None
            try:
                return self._establish(conn, addr)
            except _Refused as e:  # a stale dial, a silent or garbage peer, a wrong token: wait for the real one
                log.warning('%s; waiting for the worker', e)
                refused.append(str(e))

    def _establish(self, conn: socket.socket, addr: Any) -> Dict[str, Any]:
        """Handshake, then the clock exchange; a connection that fails either is closed and _Refused."""
        peer = f'{addr[0]}:{addr[1]}'
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            P.tune_keepalive(conn, self.heartbeat_s * 2)
            conn.settimeout(self.handshake_timeout_s)
            info, secure = self._handshake(conn, peer, time.monotonic() + self.handshake_timeout_s)
        except (P.ProtocolError, OSError) as e:
            conn.close()
            raise _Refused(f'connection from {peer} failed the handshake: {e}') from None
        except _Refused:
            conn.close()
            raise
        secure.settimeout(self.io_timeout_s)
        self._conn, self.hello = secure, info
        try:
            self.sync_clock()
        except SessionError as e:
            raise _Refused(f'worker at {peer} dropped right after the handshake ({e})') from None
        self._start_heartbeats()
        log.info('worker connected: %s (%s), python %s, torch %s', info.get('device_name'), info.get('device'),
                 info.get('python_version'), info.get('torch_version'))
        return dict(info)

    def _handshake(self, conn: socket.socket, peer: str, deadline: float) -> Tuple[Dict[str, Any], Any]:
        """comm.protocol's version-2 handshake: (the worker's info, the connection to use from now on)."""
        try:
            return P.answer_handshake(conn, self.token, self.heartbeat_s, deadline)
        except P.AuthRefused as e:
            if e.peer_message is not None:
                raise _Refused(f'worker at {peer} refuses: {e.peer_message}') from None
            raise _Refused(f'worker at {peer} refused: wrong or missing token (real.token / env {P.TOKEN_ENV}); '
                           'nothing was run') from None

    def _start_heartbeats(self) -> None:
        """A heartbeat to the worker every heartbeat_s while this connection is up: its read timeout between
        commands (comm.protocol.idle_timeout_s) tells a silent server from an idle one."""
        self._beat_stop = stop = threading.Event()
        conn, lock, interval = self._conn, self._send_lock, self.heartbeat_s

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    P.send_frame(conn, 'heartbeat', {'t': time.monotonic()}, lock=lock)
                except P.ProtocolError:
                    return
        threading.Thread(target=beat, name='server-heartbeat', daemon=True).start()

    def close(self) -> None:
        if self._conn is not None:
            try:
                P.send_frame(self._conn, 'bye', {}, lock=self._send_lock)
            except P.ProtocolError:
                pass
        self._drop()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _need_conn(self) -> Any:
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
            return P.send_frame(self._need_conn(), kind, header, tensors, lock=self._send_lock)
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
                result = frame.header.get('result')
                if not isinstance(result, dict):
                    raise self._lost(P.ProtocolError(f'reply to {cmd} has no "result" object'), f'command {cmd}')
                return dict(result), frame
            raise self._lost(P.ProtocolError(f'unexpected {frame.kind} frame (id {frame.header.get("id")})'),
                             f'command {cmd}')

    def sync_clock(self, exchanges: int = 5) -> float:
        """Offset of our monotonic clock over the worker's (min-RTT exchange), seconds; stored for run()."""
        best = None
        for _ in range(exchanges):
            t0 = time.monotonic()
            res, _ = self.request('clock')
            t1 = time.monotonic()
            if isinstance(res.get('t'), bool) or not isinstance(res.get('t'), (int, float)) \
                    or not np.isfinite(res['t']):
                raise self._lost(P.ProtocolError(f'clock reply without a finite "t": {res.get("t")!r}'), 'clock')
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
                t = time.perf_counter() - t0 - _number(res.get('worker_ms', 0.0)) / 1e3
                got = frame.tensors['data'].nbytes if 'data' in frame.tensors else None
                if got != s:
                    raise SessionError(f'probe: asked for {s} bytes, got {got}')
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
                'mean': [float(v) for v in mean], 'std': [float(v) for v in std], 'feature_dtype': feature_dtype,
                'threads': int(threads)}  # > 0: the worker runs with it (the LUT's edge thread count)
        if not getattr(model, 'plain', False):  # a plain network (chain_nets) has no hyper-weights
            args['alpha'] = [[float(v) for v in b.alpha.detach().cpu().tolist()] for b in model.blocks[:lam]]
        t0 = time.perf_counter()
        res, _ = self.request('load_edge', args, list(tensors.items()))
        res['round_trip_ms'] = (time.perf_counter() - t0) * 1e3
        self._deployed = {'lam': lam, 'num_blocks': n, 'mean': args['mean'], 'std': args['std'],
                          'feature_dtype': feature_dtype, 'num_classes': model.num_classes}
        return res

    def upload(self, images_uint8: torch.Tensor, reuse: bool = False) -> Dict[str, Any]:
        """Send the images to the worker in frames of at most half the frame limit (not timed as link).  `reuse`:
        skip the transfer when the worker already holds exactly these images from an earlier upload on this
        connection (same shape and bytes: a SHA-256 of them; a dropped connection forgets it) -> 'reused' True."""
        x = images_uint8.detach().cpu().contiguous()
        fp = f'{tuple(x.shape)}:{hashlib.sha256(x.numpy().tobytes()).hexdigest()}'
        if reuse and fp == self._images_fp:
            return {'samples': int(len(x)), 'upload_s': 0.0, 'bytes': int(x.numel()), 'reused': True}
        per = max(1, x[:1].numel())
        chunk = max(1, (self.limits.max_frame_bytes // 2) // per)
        t0 = time.perf_counter()
        res: Dict[str, Any] = {}
        self._images_fp = None  # a failure half-way leaves the worker with part of them
        for i in range(0, len(x), chunk):
            res, _ = self.request('upload', {'reset': i == 0}, [('images', x[i:i + chunk])])
        self._images_fp = fp
        return {'samples': int(res.get('samples', 0)), 'upload_s': time.perf_counter() - t0,
                'bytes': int(x.numel()), 'reused': False}

    def run(self, server_part: Optional[torch.nn.Module], images_uint8: torch.Tensor, labels: torch.Tensor,
            batch_size: int) -> Dict[str, Any]:
        dep, labels, bs = self._check_run(server_part, images_uint8, labels, batch_size)
        up = self.upload(images_uint8, reuse=True)  # a stream of the same images again: they are still there
        self.sync_clock()
        dev = next(server_part.parameters()).device if server_part is not None and \
            any(True for _ in server_part.parameters()) else torch.device('cpu')
        if server_part is not None:
            server_part.eval()
        self._ids += 1
        rx = P.FrameReader(self._need_conn(), self.limits, name='receiver')
        t_start = time.monotonic()
        self._send('request', {'cmd': 'run', 'id': self._ids, 'args': {'batch_size': bs, 'queue': 2}}, what='run')
        rx.thread.start()
        try:
            preds, per_batch, worker = self._collect(rx, lambda x: _server_stage(server_part, dev, dep, x), t_start)
        except BaseException:
            rx.stop.set()
            if rx.thread.is_alive():  # the worker may still be streaming: drop the connection, it reconnects
                self._drop()
                rx.thread.join(5)
            raise
        rx.thread.join(self.io_timeout_s)
        wall = time.monotonic() - t_start
        rows = worker.get('per_batch') if isinstance(worker.get('per_batch'), list) else []
        for row, w in zip(per_batch, rows):
            if isinstance(w, dict):
                row['send_ms'], row['edge_queue_wait_ms'] = w.get('send_ms'), w.get('queue_wait_ms')
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        if len(pred) != len(labels):
            raise SessionError(f'run: received predictions for {len(pred)} of {len(labels)} samples')
        return dict(_run_summary(per_batch, pred, labels, wall), batch_size=bs, lam=dep['lam'],
                    feature_dtype=dep['feature_dtype'], upload_s=up['upload_s'], images_reused=up['reused'],
                    clock_offset_s=self._offset_s,
                    worker_device=(self.hello or {}).get('device'))

    def _check_run(self, server_part: Optional[torch.nn.Module], images_uint8: torch.Tensor, labels: Any,
                   batch_size: int) -> Tuple[Dict[str, Any], torch.Tensor, int]:
        """(the deployment, labels as a flat CPU tensor, batch size) of run()'s arguments, or SessionError."""
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
        return dep, labels, int(batch_size)

    def _collect(self, rx: P.FrameReader, stage: Any, t_start: float) -> Tuple[List[torch.Tensor],
                                                                           List[Dict[str, Any]], Dict[str, Any]]:
        """The server stage over the streamed batches until the worker's reply: (predictions, per-batch records,
        the worker's result)."""
        preds: List[torch.Tensor] = []
        per_batch: List[Dict[str, Any]] = []
        while True:
            try:
                item = rx.frames.get(timeout=self.io_timeout_s + 5)
            except queue.Empty:
                raise self._lost(P.ProtocolTimeout('receiver got nothing'), 'run') from None
            if isinstance(item, SessionError):  # another hop of a chain failed (run_chain)
                raise item
            if isinstance(item, P.ProtocolError):
                raise self._lost(item, f'run (after {len(per_batch)} batches)')
            f, t_ready, t_recv = item
            if f.kind == 'error':
                raise SessionError(f'worker failed command run: {f.header.get("error", "")}: '
                                   f'{f.header.get("message")}')
            if f.kind == 'reply':
                result = f.header.get('result')
                return preds, per_batch, result if isinstance(result, dict) else {}
            if f.kind != 'features' or 'x' not in f.tensors:
                raise self._lost(P.ProtocolError(f'unexpected {f.kind} frame (a features frame carries tensor x)'),
                                 'run')
            t0 = time.monotonic()
            preds.append(stage(f.tensors['x']))
            t1 = time.monotonic()
            try:
                per_batch.append(_batch_record(f.header, f.tensors['x'], self._offset_s, (t_ready, t_recv, t0, t1),
                                               t_start))
            except (KeyError, TypeError, ValueError) as e:
                raise self._lost(P.ProtocolError(f'malformed features frame header ({e!r})'), 'run') from None


def _server_stage(server_part: Optional[torch.nn.Module], dev: torch.device, dep: Dict[str, Any],
                  features: np.ndarray) -> torch.Tensor:
    """Predicted classes of one streamed batch: the server part on the features (normalized images at lambda 0),
    or the argmax of the logits the worker sent (lambda N)."""
    return _stage_logits(server_part, dev, dep['lam'] == 0, dep['mean'], dep['std'], features,
                         f'the server part at lambda {dep["lam"]}').argmax(1)


def _stage_logits(part: Optional[torch.nn.Module], dev: torch.device, images: bool, mean: Sequence[float],
                  std: Sequence[float], features: np.ndarray, what: str) -> torch.Tensor:
    """The last stage here on one streamed batch, float32 logits on the CPU: `part` on the features (on uint8
    images, normalized, when `images`), or the logits the last hop sent as they are (part None)."""
    x = torch.from_numpy(features)
    try:
        with torch.no_grad():
            if part is None:
                return x.float()
            x = x.to(dev)
            return part(normalize_batch(x, mean, std) if images else x.float()).float().cpu()
    except (RuntimeError, IndexError, ValueError) as e:
        raise SessionError(f'run: a streamed batch of shape {tuple(x.shape)} does not fit {what} '
                           f'({one_line(str(e), 200)})') from None


def _batch_record(h: Dict[str, Any], x: np.ndarray, off: float, times: Tuple[float, float, float, float],
                  t_start: float) -> Dict[str, Any]:
    """One batch's timings (module docstring): the worker's stamps mapped onto our clock by `off`; `times` are
    ours: (ready to receive, received, server stage start, server stage end)."""
    t_ready, t_recv, t0, t1 = times
    send_start, edge_start = float(h['send_start']) + off, float(h['edge_start']) + off
    return {'batch': int(h['batch']), 'samples': int(len(x)), 'edge_ms': float(h['edge_ms']),
            'link_ms': (t_recv - max(send_start, t_ready)) * 1e3, 'link_total_ms': (t_recv - send_start) * 1e3,
            'server_wait_ms': (t0 - t_recv) * 1e3, 'server_ms': (t1 - t0) * 1e3,
            'latency_ms': (t1 - edge_start) * 1e3, 'bytes': int(x.nbytes), 'done_s': t1 - t_start}


def _run_summary(per_batch: List[Dict[str, Any]], pred: torch.Tensor, labels: torch.Tensor,
                 wall: float) -> Dict[str, Any]:
    """Accuracy, whole-run, steady-state and median-period throughput, per-stage medians of a run."""
    steady = None
    if len(per_batch) >= 3:
        span = per_batch[-1]['done_s'] - per_batch[0]['done_s']
        steady = sum(r['samples'] for r in per_batch[1:]) / span if span > 0 else None
    return {'accuracy_pct': float((pred == labels).float().mean() * 100), 'throughput_fps': len(labels) / wall,
            'steady_throughput_fps': steady, 'period_throughput_fps': period_fps(per_batch),
            'latency_ms': _median([r['latency_ms'] for r in per_batch]),
            'edge_ms': _median([r['edge_ms'] for r in per_batch]),
            'link_ms': _median([r['link_ms'] for r in per_batch]),
            'server_ms': _median([r['server_ms'] for r in per_batch]),
            'batches': len(per_batch), 'samples': int(len(labels)), 'per_batch': per_batch, 'wall_s': wall,
            'predictions': pred.tolist()}


def period_fps(per_batch: Sequence[Dict[str, Any]]) -> Optional[float]:
    """A stream's pace at its median period: the median over batches 2.. of samples / (done - previous done),
    frames/s; None with fewer than 3 batches.  The steady throughput (samples / span) also counts every pause that
    other processes cause on the shared cores, which comes and goes in seconds (one stream's sd over passes on the
    local stand-in, idle: 4.2 % as samples / span, 2.4 % at the median period); the median gap is the pipeline's
    own period, as the LUT's per-call medians are its parts' (docs/design.md "Closed loop": measured 2026-12-07)."""
    rows = list(per_batch)
    if len(rows) < 3:
        return None
    rates = [b['samples'] / (b['done_s'] - a['done_s']) for a, b in zip(rows[1:], rows[2:]) if b['done_s'] > a['done_s']]
    return float(statistics.median(rates)) if rates else None


def deploy_part_file(session: ServerSession, data: bytes) -> Dict[str, Any]:
    """Load an edge part file (comm/parts.py bytes) on the worker as its edge part; afterwards run() and
    round_trips() use it.  -> {'lam', 'blocks', 'bytes', 'sha256', 'load_ms', 'device', 'round_trip_ms'}"""
    meta = _part_meta(data, '<edge part file>')
    if meta['part'] != 'edge':
        raise SessionError(f'deploy_part_file: a {meta["part"]} part file; the worker runs the edge part')
    return deploy_stage(session, data, meta)


def deploy_stage(session: ServerSession, data: bytes, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load any part file (comm/parts.py bytes: an edge part, a chain hop's stage, a server part) on the worker as
    its part.  -> {'lo', 'lam' (= hi), 'part', 'blocks', 'bytes', 'sha256', 'load_ms', 'device', 'round_trip_ms'}"""
    from comm import parts
    meta = meta if meta is not None else _part_meta(data, '<part file>')
    lo, hi = parts.part_range(meta)
    t0 = time.perf_counter()
    res, _ = session.request('load_part', {}, [('file', np.frombuffer(data, dtype=np.uint8))])
    res['round_trip_ms'] = (time.perf_counter() - t0) * 1e3
    session._deployed = {'lam': hi, 'lo': lo, 'num_blocks': int(meta['num_blocks']), 'mean': meta['mean'],
                         'std': meta['std'], 'feature_dtype': meta['feature_dtype'],
                         'num_classes': int(meta['arch']['num_classes'])}
    return res


def _part_meta(data: bytes, where: str) -> Dict[str, Any]:
    from comm import parts
    try:
        return parts.read_meta(parts._read(data)[0], where)
    except parts.PartFileError as e:
        raise SessionError(str(e)) from None


def measure_memory(session: ServerSession, edge_file: bytes, server_file: bytes, batch: int = 1) -> Dict[str, Any]:
    """The worker's memory with the edge part against the full model (comm.parts.compare_memory run there)."""
    res, _ = session.request('memory', {'batch': int(batch)},
                             [('edge_file', np.frombuffer(edge_file, dtype=np.uint8)),
                              ('server_file', np.frombuffer(server_file, dtype=np.uint8))])
    res.pop('worker_ms', None)
    return res


def round_trips(session: ServerSession, server_part: Optional[torch.nn.Module], images_uint8: torch.Tensor,
                count: int) -> Dict[str, Any]:
    """`count` single requests through the deployed split, the result sent back to the worker each time.

    Per request: edge_ms (worker), transfer_ms (features up: worker send start to received here, via the clock
    offset), server_ms (here), recv_ms (result down: sent here to arrived there, via the offset), rtt_ms (worker's
    own clock: send start to result arrived) and latency_ms = edge_ms + rtt_ms.  `images_uint8` is one batch."""
    dep = session._deployed
    if dep is None:
        raise SessionError('round_trips: nothing deployed on this connection (call deploy() first)')
    lam, n = dep['lam'], dep['num_blocks']
    if (lam == n) != (server_part is None):
        raise SessionError(f'round_trips: server_part must be None exactly when lambda == N ({n}); lambda is {lam}')
    if int(count) < 1:
        raise SessionError(f'round_trips: count must be >= 1, got {count}')
    session.upload(images_uint8)
    off = session.sync_clock()
    dev = next(server_part.parameters()).device if server_part is not None and \
        any(True for _ in server_part.parameters()) else torch.device('cpu')
    session._ids += 1
    rid = session._ids
    session._send('request', {'cmd': 'round_trips', 'id': rid,
                              'args': {'count': int(count), 'batch_size': int(len(images_uint8))}}, what='round_trips')
    rows: List[Dict[str, Any]] = []
    for i in range(int(count)):
        f = session._recv('round_trips')
        if f.kind == 'error':
            raise SessionError(f'worker failed command round_trips: {f.header.get("error", "")}: '
                               f'{f.header.get("message")}')
        if f.kind != 'features' or f.header.get('batch') != i:
            raise session._lost(P.ProtocolError(f'expected features of request {i}, got {f.kind}'), 'round_trips')
        t_recv = time.monotonic()
        x = torch.from_numpy(f.tensors['x'])
        with torch.no_grad():
            if server_part is None:
                out = x.float()
            else:
                x = x.to(dev)
                out = server_part(normalize_batch(x, dep['mean'], dep['std']) if lam == 0 else x.float())
            out = out.float().cpu().contiguous()
        t_sent = time.monotonic()
        session._send('features', {'batch': i}, [('x', out)], what='round_trips')
        rows.append({'batch': i, 'transfer_ms': (t_recv - (float(f.header['send_start']) + off)) * 1e3,
                     'server_ms': (t_sent - t_recv) * 1e3, 'bytes_up': int(f.tensors['x'].nbytes), '_sent': t_sent})
    result, _ = session._reply('round_trips', rid)
    for row, w in zip(rows, result.get('requests', [])):
        row['edge_ms'], row['rtt_ms'] = float(w['edge_ms']), float(w['rtt_ms'])
        row['recv_ms'] = (float(w['result_at']) + off - row.pop('_sent')) * 1e3
        row['latency_ms'] = row['edge_ms'] + row['rtt_ms']
        row['bytes_down'] = int(w['result_bytes'])
    if len(result.get('requests', [])) != len(rows):
        raise SessionError(f'round_trips: the worker reported {len(result.get("requests", []))} of {len(rows)} '
                           'requests')
    return {'requests': rows, 'count': len(rows), 'lam': lam, 'clock_offset_s': off}


# ----------------------------------------------------------------------------------------------------------
# A chain of devices: K stages, K - 1 links (docs/design.md#chain-of-devices)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Hop:
    """One worker hop of a chain: its own server session (accept()ed) and where it reaches its successor."""
    session: ServerSession
    next_addr: Optional[str] = None  # HOST:PORT of the successor's --listen as seen from this hop (the local end of
    # its tunnel); None for the last worker hop, which streams to this server on its session


def run_chain(parts_: Sequence[bytes], hops: Sequence[Hop], images_uint8: torch.Tensor, labels: Any,
              batch_size: int, links: Optional[Sequence[Any]] = None, device: str = 'cpu',
              queue_size: int = 2) -> Dict[str, Any]:
    """Run a split model over a chain of K devices: hops[k] (a worker) runs parts_[k], this server the last part.

    parts_ are K part files (comm/parts.py bytes, e.g. parts.chain_bytes(model, splits, ...)): part k holds blocks
    lambda_k..lambda_{k+1}-1, from 0 to N.  Each is deployed to its hop (load_part), the images are uploaded to the
    first hop (untimed), the clocks synced, then the pipelined run: hop 0 computes on the images and streams to
    hop 1's --listen (hops[0].next_addr), each relay hop receives, computes and forwards, the last worker hop
    streams to this server on its session, and this thread runs the last part as frames arrive.

    `links` (optional, K - 1 objects or dicts with bandwidth_mbps, e.g. timing.lut.LinkSpec or the emulators'
    rates) gives the prediction: period = max(every stage's measured median time, every link's occupancy = frame
    bytes / bandwidth); a streamed link overlaps its latency.  -> {
        'outputs' (float32 logits, (samples, classes)), 'predictions', 'accuracy_pct',
        'throughput_fps' (whole run), 'steady_throughput_fps' (after the first batch), 'latency_ms' (median, first
        hop's compute start to the last stage's end, queueing included), 'wall_s', 'batches', 'samples',
        'stages': [{'hop', 'where', 'lo', 'hi', 'compute_ms', 'compute_ms_p10', 'compute_ms_p90', 'device',
                    'python_version', 'torch_version'}],
        'links': [{'from', 'to', 'frame_bytes', 'link_ms', 'link_ms_p10', 'link_ms_p90', 'measured_mbps'}],
        'measured_period_ms' (max of the stage and link medians), 'predicted' ({'period_ms', 'throughput_fps',
        'bottleneck', 'link_occupancy_ms', 'how'} or None), 'per_batch': [{'stage_ms': [...], 'link_ms': [...],
        'latency_ms', 'done_s'}], 'loads': [each hop's load_part result], 'clock_offsets_s'}
    Per link, link_ms is its service time as in ServerSession.run: from the later of (the sender starts the frame,
    the receiver is ready for it) until the receiver has all of it, on this server's clock (each hop's monotonic
    clock mapped by its offset)."""
    from comm import parts as PF
    metas, ranges, bs = _check_chain(parts_, hops, batch_size)
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or len(images_uint8) != len(labels) \
            or len(labels) == 0:
        raise SessionError(f'run_chain: images must be a non-empty uint8 (B, C, H, W) tensor with one label each, '
                           f'got {images_uint8.dtype} {tuple(images_uint8.shape)} and {len(labels)} labels')
    if links is not None and len(links) != len(hops):
        raise SessionError(f'run_chain: {len(parts_)} stages have {len(hops)} links; got {len(links)} link models')
    loads = [deploy_stage(h.session, data, meta) for h, data, meta in zip(hops, parts_, metas)]
    lo, hi = ranges[-1]
    dev = torch.device(device)
    last = PF.load_part(parts_[-1])[0].to(dev).eval() if lo < hi else None
    mean, std = metas[-1]['mean'], metas[-1]['std']
    hops[0].session.upload(images_uint8)
    offsets = [h.session.sync_clock() for h in hops]
    tag = P.make_nonce()[:16]
    tail = hops[-1].session
    rx = P.FrameReader(tail._need_conn(), tail.limits, name='receiver')
    waiters: List[_ReplyWaiter] = []
    t_start = time.monotonic()
    try:
        for k in reversed(range(len(hops))):  # downstream first: each hop is waiting when its predecessor streams
            args = {'batch_size': bs, 'queue': int(queue_size), 'source': 'images' if k == 0 else 'upstream',
                    'run': tag}
            if hops[k].next_addr is not None:
                args['next'] = hops[k].next_addr
            sess = hops[k].session
            sess._ids += 1
            sess._send('request', {'cmd': 'run', 'id': sess._ids, 'args': args}, what=f'run (hop {k})')
            if k == len(hops) - 1:
                rx.thread.start()
            else:
                waiters.append(_ReplyWaiter(sess, sess._ids, k, rx))
        stage = (lambda x: _stage_logits(last, dev, lo == 0, mean, std, x, f'the last stage (blocks {lo}..{hi - 1})'))
        try:
            outs, tail_rows, tail_result = tail._collect(rx, stage, t_start)
        except SessionError as e:
            if isinstance(e, _HopFailed):
                raise SessionError(f'run_chain: hop {e.hop}: {e.cause}') from None
            for h in hops[:-1]:  # the hops before may still wait or stream: their sessions are dropped
                h.session._drop()
            causes = [f'hop {w.hop}: {r}' for w in waiters for r in [w.join(5)] if isinstance(r, _HopFailed)]
            raise SessionError(f'run_chain: hop {len(hops) - 1} (the last worker hop) failed: {e}' +
                               (f'; before it: {"; ".join(causes)}' if causes else '')) from None
        results = [w.join(h.session.io_timeout_s + 10) for w, h in zip(reversed(waiters), hops)]
        rx.stop.set()
    except BaseException:
        rx.stop.set()
        for h in hops:  # a hop may still be streaming: drop its session, it reconnects
            h.session._drop()
        raise
    rx.thread.join(tail.io_timeout_s)
    wall = time.monotonic() - t_start
    bad = [f'hop {k}: {r}' for k, r in enumerate(results) if isinstance(r, Exception)]
    if bad:
        raise SessionError('run_chain: ' + '; '.join(bad))
    outputs = torch.cat(outs) if outs else torch.zeros(0)
    if len(outputs) != len(labels):
        raise SessionError(f'run_chain: received outputs for {len(outputs)} of {len(labels)} samples')
    rows = [_rows(r, k, len(tail_rows)) for k, r in enumerate(results + [tail_result])]
    summary = _run_summary(tail_rows, outputs.argmax(1), labels, wall)
    for key in ('edge_ms', 'link_ms', 'server_ms', 'per_batch'):  # the last hop's view; the chain's replaces it
        summary.pop(key)
    summary.update(_chain_summary(rows, tail_rows, offsets, t_start, links, bs))
    summary['per_batch'] = summary.pop('chain_per_batch')
    summary['latency_ms'] = _median([r['latency_ms'] for r in summary['per_batch']])
    for k, (h, (a, b)) in enumerate(zip(hops, ranges)):
        info = h.session.hello or {}
        summary['stages'][k].update(hop=k, where='worker', lo=a, hi=b, device=info.get('device'),
                                    python_version=info.get('python_version'), torch_version=info.get('torch_version'))
    summary['stages'][-1].update(hop=len(hops), where='server', lo=lo, hi=hi, device=str(dev), python_version=None,
                                 torch_version=torch.__version__)
    return dict(summary, outputs=outputs, loads=loads, clock_offsets_s=offsets, batch_size=bs)


def _check_chain(parts_: Sequence[bytes], hops: Sequence[Hop],
                 batch_size: int) -> Tuple[List[Dict[str, Any]], List[Tuple[int, int]], int]:
    """(metas, block ranges, batch size) of run_chain's arguments, or SessionError naming what does not chain."""
    from comm import parts as PF
    if len(parts_) < 2 or len(hops) != len(parts_) - 1:
        raise SessionError(f'run_chain: K parts need K - 1 worker hops (the last part runs here), got {len(parts_)} '
                           f'parts and {len(hops)} hops')
    metas = [_part_meta(data, f'parts[{k}]') for k, data in enumerate(parts_)]
    ranges = [PF.part_range(m) for m in metas]
    n = int(metas[0]['num_blocks'])
    cuts = [ranges[0][0]] + [b for _, b in ranges]
    if cuts[0] != 0 or cuts[-1] != n or any(ranges[k][1] != ranges[k + 1][0] for k in range(len(ranges) - 1)) \
            or any(m['arch'] != metas[0]['arch'] for m in metas):
        raise SessionError(f'run_chain: the parts hold blocks {[(a, b - 1) for a, b in ranges]}; they must be one '
                           f'model\'s consecutive ranges from block 0 to {n - 1}')
    for k, h in enumerate(hops):
        if (h.next_addr is None) != (k == len(hops) - 1):
            raise SessionError(f'run_chain: hops[{k}].next_addr must be ' + ('None: the last worker hop streams to this '
                               'server' if k == len(hops) - 1 else 'the HOST:PORT at which it reaches hop '
                               f'{k + 1}\'s --listen'))
    if int(batch_size) < 1:
        raise SessionError(f'run_chain: batch_size must be >= 1, got {batch_size}')
    return metas, ranges, int(batch_size)


class _HopFailed(SessionError):
    """A hop of a chain before the last worker hop failed its run (.hop, .cause)."""

    def __init__(self, hop: int, cause: SessionError) -> None:
        super().__init__(f'hop {hop}: {cause}')
        self.hop, self.cause = hop, cause


class _ReplyWaiter:
    """A thread that waits for one hop's reply to run; join() -> its result dict or a _HopFailed, which is also
    put on the last hop's receiver queue so that run_chain stops waiting for frames that will not come."""

    def __init__(self, session: ServerSession, rid: int, hop: int, rx: P.FrameReader) -> None:
        self.session, self.rid, self.hop, self.rx = session, rid, hop, rx
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, name=f'hop{hop}-reply', daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.session._reply('run', self.rid)[0]
        except SessionError as e:
            self.result = _HopFailed(self.hop, e)
            self.rx.put(self.result)

    def join(self, timeout_s: float) -> Any:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            return SessionError(f'no reply to run within {timeout_s:g} s')
        return self.result


def _rows(result: Dict[str, Any], hop: int, batches: int) -> List[Dict[str, float]]:
    """A hop's per-batch rows (its own clock), every field a finite number, or SessionError."""
    rows = result.get('per_batch') if isinstance(result, dict) else None
    keys = ('edge_ms', 'compute_start', 'send_start', 'frame_bytes') + (('recv_ready', 'recv_done') if hop else ())
    if not isinstance(rows, list) or len(rows) != batches or not all(isinstance(r, dict) for r in rows):
        raise SessionError(f'run_chain: hop {hop} reported {len(rows) if isinstance(rows, list) else "no"} per-batch '
                           f'rows for {batches} batches')
    return [{k: _number(r.get(k)) for k in keys} for r in rows]


def _chain_summary(rows: List[List[Dict[str, float]]], tail_rows: List[Dict[str, Any]], offsets: Sequence[float],
                   t_start: float, links: Optional[Sequence[Any]], bs: int) -> Dict[str, Any]:
    """Per-stage and per-link statistics of a chain run (run_chain's docstring), all on this server's clock."""
    hops = len(rows)
    per_batch = []
    for b, tail in enumerate(tail_rows):
        stage_ms = [rows[k][b]['edge_ms'] for k in range(hops)] + [tail['server_ms']]
        link_ms = []
        for k in range(hops - 1):  # hop k -> hop k+1, both clocks mapped onto ours
            send = rows[k][b]['send_start'] + offsets[k]
            ready, done = rows[k + 1][b]['recv_ready'] + offsets[k + 1], rows[k + 1][b]['recv_done'] + offsets[k + 1]
            link_ms.append((done - max(send, ready)) * 1e3)
        link_ms.append(tail['link_ms'])  # the last worker hop -> this server (ServerSession's record)
        start = rows[0][b]['compute_start'] + offsets[0] - t_start
        per_batch.append({'batch': b, 'samples': tail['samples'], 'stage_ms': stage_ms, 'link_ms': link_ms,
                          'frame_bytes': [rows[k][b]['frame_bytes'] for k in range(hops)],
                          'latency_ms': (tail['done_s'] - start) * 1e3, 'done_s': tail['done_s']})

    def stats(values: List[float], name: str) -> Dict[str, float]:
        return {name: float(np.median(values)), f'{name}_p10': float(np.percentile(values, 10)),
                f'{name}_p90': float(np.percentile(values, 90))}
    stages = [stats([r['stage_ms'][k] for r in per_batch], 'compute_ms') for k in range(hops + 1)]
    out_links = []
    for k in range(hops):
        row = dict(stats([r['link_ms'][k] for r in per_batch], 'link_ms'), **{'from': k, 'to': k + 1})
        row['frame_bytes'] = float(np.median([r['frame_bytes'][k] for r in per_batch]))
        row['measured_mbps'] = row['frame_bytes'] * 8 / (row['link_ms'] * 1e3) if row['link_ms'] > 0 else None
        out_links.append(row)
    measured = max([s['compute_ms'] for s in stages] + [li['link_ms'] for li in out_links])
    return {'stages': stages, 'links': out_links, 'measured_period_ms': measured,
            'predicted': None if links is None else predict_chain([s['compute_ms'] for s in stages],
                                                                  [li['frame_bytes'] for li in out_links], links, bs),
            'chain_per_batch': per_batch}


def predict_chain(stage_ms: Sequence[float], frame_bytes: Sequence[float], links: Sequence[Any],
                  batch_size: int) -> Dict[str, Any]:
    """Predicted period of a pipelined chain by optim/cost.py's chain model (occupancy_ms, pipeline_times):
    max(every stage's time, every link's occupancy = bytes / bandwidth), per batch of `batch_size`; links are objects
    or dicts with bandwidth_mbps (and optionally latency_ms, one way: a streamed link overlaps it, so it adds to the
    latency, not to the period)."""
    from optim.cost import ChainLink, occupancy_ms, pipeline_times

    def field(link: Any, name: str, default: Optional[float] = None) -> Optional[float]:
        return link.get(name, default) if isinstance(link, dict) else getattr(link, name, default)

    hops = []
    for li in links:
        bw, lat = field(li, 'bandwidth_mbps'), field(li, 'latency_ms', 0.0)
        if not isinstance(bw, (int, float)) or not bw > 0 or not isinstance(lat, (int, float)) or not lat >= 0:
            raise SessionError(f'run_chain: a link model needs bandwidth_mbps > 0 (and latency_ms >= 0), got {li!r}')
        hops.append(ChainLink(float(bw), float(lat)))
    if len(stage_ms) != len(hops) + 1 or len(frame_bytes) != len(hops):
        raise SessionError(f'predict_chain: {len(stage_ms)} stages need {len(stage_ms) - 1} links and frame sizes, '
                           f'got {len(hops)} and {len(frame_bytes)}')
    occupancy = [float(occupancy_ms(b, ln)) for b, ln in zip(frame_bytes, hops)]
    order = [x for k, t in enumerate(stage_ms) for x in ([float(t)] + ([occupancy[k]] if k < len(hops) else []))]
    names = [x for k in range(len(stage_ms)) for x in ([f'stage {k}'] + ([f'link {k}->{k + 1}'] if k < len(hops)
                                                                         else []))]
    st = pipeline_times(np.asarray([order]), sum(ln.latency_ms for ln in hops), int(batch_size))
    period = float(st.period_ms[0])
    return {'period_ms': period, 'throughput_fps': float(st.throughput_fps[0]) if period > 0 else None,
            'latency_ms': float(st.latency_ms[0]), 'bottleneck': names[int(st.bottleneck[0])],
            'stage_ms': list(stage_ms), 'link_occupancy_ms': occupancy,
            'how': 'predicted by optim/cost.py (pipeline_times): period = max(per-hop measured median stage time, '
                   'per-link median frame bytes / modelled bandwidth)'}


def session_from_config(cfg: Config) -> ServerSession:
    """A ServerSession with cfg.real's settings; the token falls back to env HYPERREPVGG_TOKEN."""
    r = cfg.real
    return ServerSession(r.host, r.port, P.resolve_token(r.token), r.connect_timeout_s, r.io_timeout_s,
                         int(r.max_frame_mb * 2 ** 20), allow_remote=r.allow_remote,
                         handshake_timeout_s=r.handshake_timeout_s)


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
