"""Edge worker for real mode: runs on the Jetson TX2 (JetPack 4.6: Python 3.6, torch 1.10) and serves the server
session of comm/session.py (docs/design.md#real-mode).  "client" is its role in the protocol (it dials the server);
everywhere else the device is the "edge" (lut_edge.json, lut.edge_profile).

    python client_worker.py [--server_ip 127.0.0.1] [--port 6006] [--device cuda] [--token T | env HYPERREPVGG_TOKEN]
                            [--ssh user@host[:port] [--ssh_key FILE]]
                            [--listen 127.0.0.1:PORT] [--next_ssh user@host[:port]]    (a hop of a chain of devices)

It dials the server (directly, through a tunnel you opened with `ssh -N -L 6006:127.0.0.1:6006 user@server`,
or through its own paramiko tunnel with --ssh), authenticates (with a token, only a server that proves it first
gets an answer: comm/protocol.py), and answers commands until the session ends; then, or when the link drops, or
when a peer sends anything malformed or fails to prove the token, it logs one line and dials again with bounded
exponential backoff (0.5 s doubling up to --backoff_max_s).  Between commands it expects the server's heartbeat:
silence for comm.protocol.idle_timeout_s (4 heartbeats + 2 s) means the link or the server is gone, and it redials.  Commands: measure_lut (timing.measure, the
same code as step 1), probe (link probe payloads), clock (clock offset), load_edge (rebuild the edge part with
nets.build_edge from raw tensors: a RepVGG's, or a plain network's blocks from chain_nets), load_part (this hop's
part from a part file, comm/parts.py), upload (uint8 images), run (pipelined: the part runs batch after batch while a sender thread streams its output),
round_trips (single requests with the result sent back), memory (peak RSS with the edge part against the full
model).  A failing command answers an error frame; the worker stays usable.

A chain of devices (camera -> edge box -> server; comm.session.run_chain): every hop is this worker, each with its
own connection to the server.  The first hop computes on uploaded images; a relay hop is started with --listen and
takes the previous hop's stream there: each connection to it is authenticated first (the listening hop proves the
token first, as the server does; a connection that fails is logged in one line and closed), and its first frame must
name the run.  The last worker hop streams to the server on its own connection, any other dials the next hop's
--listen address the server gives it (as seen from this hop: the next hop's address, the local end of an
`ssh -N -L` tunnel, or through --next_ssh's paramiko tunnel).  Device-side: imports only
hyper_repvgg, nets, chain_nets, errors, comm.protocol, comm.parts, data.normalize, timing.measure, timing.flops, numpy
and torch (the files: comm/bundle.py DEVICE_FILES).
"""
import argparse
import ipaddress
import logging
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import hyper_repvgg as H  # noqa: E402
import nets  # noqa: E402
from comm import parts as PF  # noqa: E402
from comm import protocol as P  # noqa: E402
from data.normalize import normalize_batch  # noqa: E402
from timing import measure as M  # noqa: E402

log = logging.getLogger('client_worker')


def _line(e):
    # type: (object) -> str
    """An exception (or a peer's text) as one short log line."""
    return ' '.join(str(e).split())[:300]


class CommandError(Exception):
    """A command with missing or bad arguments; answered as an error frame."""


def pick_device(name):
    # type: (str) -> str
    """`name`, or 'cpu' (with a message) when CUDA was asked for and is not available."""
    if name.startswith('cuda') and not torch.cuda.is_available():
        log.warning('--device %s: CUDA is not available here, falling back to cpu', name)
        return 'cpu'
    return name


class Heartbeat(object):
    """While a command runs, send a heartbeat frame every `interval_s` so the server knows we are alive."""

    def __init__(self, sock, lock, interval_s):
        self.sock, self.lock, self.interval_s = sock, lock, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name='heartbeat', daemon=True)

    def _loop(self):
        while not self.stop.wait(self.interval_s):
            try:
                P.send_frame(self.sock, 'heartbeat', {'t': time.monotonic()}, lock=self.lock)
            except P.ProtocolError:
                return

    def __enter__(self):
        if self.interval_s > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(self.interval_s + 5)


class Worker(object):
    """State of the edge device between commands: the loaded edge part and the uploaded images."""

    def __init__(self, device, token=None, limits=P.Limits(), io_timeout_s=120.0, handshake_timeout_s=10.0,
                 threads=0):
        self.device = device
        self.threads = int(threads)  # > 0: --threads given, it wins; 0: the thread count the server asks for
        self.token = token
        self.limits = limits
        self.io_timeout_s = io_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.edge = None
        self.edge_info = {}
        self.part_meta = None  # the loaded part file's meta (load_part), for the warm-up input of a relay hop
        self.images = []
        self.listener = None  # a Listener when this hop takes its input from a predecessor (--listen)
        self.next_tunnel = None  # an SshTunnel to the successor (--next_ssh)
        self.lock = threading.Lock()
        self.heartbeat_s = 5.0
        self.started = False  # whether the last connection got through the handshake
        self._info = None
        self._probe_data = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8)

    # -- connection ------------------------------------------------------------------------------------------
    def hello_info(self):
        if self._info is None:
            info = M.device_metadata(self.device)
            info.update({'numpy_version': np.__version__, 'protocol_version': P.VERSION, 'pid': os.getpid(),
                         'cuda_available': torch.cuda.is_available(),
                         'listen_port': self.listener.port if self.listener is not None else None})
            self._info = info
        return dict(self._info)

    def handshake(self, sock, deadline):
        """comm.protocol's version-2 handshake; returns the connection to use (a SecureChannel with a token)."""
        conn, self.heartbeat_s = P.dial_handshake(sock, self.token, self.hello_info(), deadline)
        return conn

    def serve(self, sock):
        """Handshake, then answer requests until bye.  Returns normally on bye; raises ProtocolError on a drop,
        a malformed frame or a server silent for idle_timeout_s between commands."""
        self.started = False
        sock.settimeout(self.handshake_timeout_s)
        conn = self.handshake(sock, time.monotonic() + self.handshake_timeout_s)
        self.started = True
        idle = P.idle_timeout_s(self.heartbeat_s)
        log.info('session started (device %s; the server is expected to speak every %.3g s)', self.device, idle)
        while True:
            conn.settimeout(idle)
            try:
                frame = P.recv_frame(conn, self.limits)
            except P.ProtocolTimeout:
                raise P.ProtocolTimeout('the server sent nothing, not even a heartbeat, for {:.3g} s: the link or '
                                        'the server is gone'.format(idle))
            conn.settimeout(self.io_timeout_s)
            if frame.kind == 'heartbeat':
                continue
            if frame.kind == 'bye':
                log.info('session ended by the server')
                return
            if frame.kind != 'request':
                P.send_frame(conn, 'error', {'message': 'unexpected {} frame'.format(frame.kind)}, lock=self.lock)
                continue
            self.answer(conn, frame)

    def answer(self, conn, frame):
        """Run one request's command and send its reply, or an error frame naming what failed."""
        cmd, rid = frame.header.get('cmd'), frame.header.get('id')
        handler = getattr(self, 'cmd_' + cmd, None) if isinstance(cmd, str) else None
        t0 = time.monotonic()
        try:
            if handler is None:
                raise CommandError('unknown command {!r}'.format(cmd))
            with Heartbeat(conn, self.lock, self.heartbeat_s):
                result, tensors = handler(conn, frame)
        except P.ProtocolError:
            raise
        except Exception as e:  # any failure of a command is reported; the worker stays usable
            log.warning('command %s failed: %s', cmd, _line(e))
            P.send_frame(conn, 'error', {'id': rid, 'cmd': str(cmd), 'error': type(e).__name__, 'message': str(e),
                                         'traceback': traceback.format_exc()[-2000:]}, lock=self.lock)
            return
        result = dict(result or {})
        result['worker_ms'] = (time.monotonic() - t0) * 1e3
        P.send_frame(conn, 'reply', {'id': rid, 'cmd': cmd, 'result': result}, tensors, lock=self.lock)

    # -- commands: each returns (result dict, tensors) -------------------------------------------------------
    def cmd_ping(self, sock, frame):
        return {'t': time.monotonic()}, None

    def cmd_clock(self, sock, frame):
        return {'t': time.monotonic()}, None

    def cmd_measure_lut(self, sock, frame):
        a = frame.header.get('args', {})
        res = M.measure_side(a['arch'], int(a['input_size']), [int(b) for b in a['batch_sizes']], self.device,
                             int(a['warmup']), int(a['repeats']), 0 if self.threads else int(a['threads']),
                             float(a['max_entry_s']),
                             int(a['seed']), progress=False, timing=str(a['timing']))
        return res, None

    def cmd_probe(self, sock, frame):
        """Answer with `reply_bytes` random bytes (uplink probe), or echo the received 'data' tensor."""
        n = frame.header.get('args', {}).get('reply_bytes')
        if n is None:
            data = frame.tensors.get('data', np.zeros(0, np.uint8))
        else:
            n = int(n)
            if not 0 <= n <= self.limits.max_frame_bytes - (1 << 16):
                raise CommandError('probe reply_bytes {} outside 0..{}'.format(n, self.limits.max_frame_bytes))
            reps = -(-n // len(self._probe_data)) if n else 0
            data = np.tile(self._probe_data, reps)[:n] if reps > 1 else self._probe_data[:n]
        return {'bytes': int(data.nbytes)}, [('data', data)]

    def cmd_load_edge(self, sock, frame):
        a = frame.header.get('args', {})
        t0 = time.monotonic()
        if int(a.get('threads') or 0) > 0 and not self.threads:  # run with the LUT's thread count
            torch.set_num_threads(int(a['threads']))
        arch, lam = a['arch'], int(a['lam'])
        try:
            num_blocks = len(nets.plan_of(arch))
        except (KeyError, ValueError, TypeError) as e:
            raise CommandError('load_edge: args.arch does not describe a network this worker builds: {}'.format(
                _line(e)))
        state = {k: torch.from_numpy(v) for k, v in frame.tensors.items()}
        head = {k[len('linear.'):]: state.pop(k) for k in ('linear.weight', 'linear.bias') if k in state}
        if (lam == num_blocks) != bool(head):
            raise CommandError('load_edge: the classifier tensors linear.weight/bias are sent exactly when '
                               'lambda == N ({}), got lambda={} with {}'.format(num_blocks, lam, sorted(head)))
        edge = nets.build_edge(arch, lam, state, [int(g) for g in a['layouts']])
        if not nets.is_plain(str(arch['name'])):
            self.check_hyper_state(edge, state, a)
        if head:
            linear = nn.Linear(head['weight'].shape[1], head['weight'].shape[0])
            linear.load_state_dict(head, strict=True)
            edge = H.SplitPart(list(edge.blocks), (nn.AdaptiveAvgPool2d(1), linear)).eval()
        self.edge = edge.to(self.device)
        self.edge_info = {'lam': lam, 'num_blocks': num_blocks, 'mean': [float(v) for v in a['mean']],
                          'std': [float(v) for v in a['std']], 'feature_dtype': str(a.get('feature_dtype', 'fp32'))}
        if self.edge_info['feature_dtype'] not in ('fp32', 'fp16'):
            raise CommandError('load_edge: feature_dtype must be fp32 or fp16')
        size = int(a.get('input_size', 0))
        if size > 0:  # one untimed warm-up pass
            self.forward(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        weight_bytes = sum(int(v.nbytes) for v in frame.tensors.values())
        return {'load_ms': (time.monotonic() - t0) * 1e3, 'edge_weight_bytes': weight_bytes, 'lam': lam,
                'device': self.device, 'blocks': len(edge.blocks), 'threads': torch.get_num_threads()}, None

    @staticmethod
    def check_hyper_state(edge, state, a):
        """A RepVGG edge part: the header's kept sets and alpha must agree with the sent buffers."""
        for k, block in enumerate(edge.blocks):
            kept = sorted(b for b, m in zip(H.BRANCHES, state[block.spec.name + '.kept'].tolist()) if m)
            if kept != sorted(a['kept'][k]):
                raise CommandError('load_edge: block {} kept {} in the header but {} in the tensors'.format(
                    k, a['kept'][k], kept))
            alpha = state[block.spec.name + '.alpha'].tolist()
            if 'alpha' in a and any(abs(x - y) > 1e-6 for x, y in zip(alpha, a['alpha'][k])):
                raise CommandError('load_edge: block {} alpha {} in the header but {} in the tensors'.format(
                    k, a['alpha'][k], alpha))

    def cmd_load_part(self, sock, frame):
        """Load a part file (comm/parts.py: plain arrays, never unpickled) as this hop's part: its bytes in the tensor
        'file', or args.path, a file already on this device.  An edge part (blocks 0..lam-1), or any hop's stage of
        a chain (blocks lo..hi-1, a server part included); only that part's blocks are built."""
        a = frame.header.get('args', {})
        data = frame.tensors.get('file')
        if data is not None:
            source = data.tobytes()
        elif a.get('path'):
            source = str(a['path'])
        else:
            raise CommandError('load_part: send the part file as uint8 tensor "file" or give args.path')
        t0 = time.monotonic()
        try:
            edge, meta = PF.load_part(source)
        except PF.PartFileError as e:
            raise CommandError('load_part: {}'.format(e))
        lo, hi = PF.part_range(meta)
        if (lo == 0 < hi and (meta['mean'] is None or meta['std'] is None)) or \
                meta['feature_dtype'] not in ('fp32', 'fp16'):
            raise CommandError('load_part: the part file lacks the input normalization or feature dtype')
        self.edge = edge.to(self.device)
        self.edge_info = {'lo': lo, 'lam': hi, 'num_blocks': int(meta['num_blocks']), 'mean': meta['mean'],
                          'std': meta['std'], 'feature_dtype': meta['feature_dtype']}
        self.part_meta = meta
        self.forward(self.warmup_input(1))  # one untimed warm-up pass
        if isinstance(source, bytes):
            raw = source
        else:
            with open(source, 'rb') as f:
                raw = f.read()
        return {'load_ms': (time.monotonic() - t0) * 1e3, 'lam': hi, 'lo': lo, 'part': meta['part'],
                'blocks': len(edge.blocks), 'bytes': len(raw), 'sha256': PF.sha256_hex(raw), 'device': self.device}, \
            None

    def warmup_input(self, batch):
        """A batch of what this hop's part takes (uint8 images when it starts at block 0), for untimed warm-ups."""
        meta = self.part_meta
        if meta is None or self.edge_info.get('lo', 0) == 0:
            size = int(meta['input_size']) if meta is not None else 8
            return torch.zeros(batch, 3, size, size, dtype=torch.uint8)
        return PF.part_input(meta, batch)

    def cmd_memory(self, sock, frame):
        """Memory of the edge part against the full model on this device: the part files (uint8 tensors 'edge_file',
        'server_file') are each loaded by a fresh process (comm.parts.compare_memory), peak and resident RSS and,
        on a GPU, torch.cuda.max_memory_allocated."""
        import shutil
        import tempfile
        a = frame.header.get('args', {})
        files = {}
        for key in ('edge_file', 'server_file'):
            t = frame.tensors.get(key)
            if t is None or t.dtype != np.uint8 or t.ndim != 1:
                raise CommandError('memory: needs the part file bytes as 1-D uint8 tensor {!r}'.format(key))
            files[key] = t
        tmp = tempfile.mkdtemp(prefix='hyperrepvgg-parts-')
        try:
            paths = {}
            for key, t in files.items():
                paths[key] = os.path.join(tmp, key + '.npz')
                with open(paths[key], 'wb') as f:
                    f.write(t.tobytes())
            res = PF.compare_memory(paths['edge_file'], paths['server_file'], int(a.get('batch', 1)), self.device)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return res, None

    def cmd_round_trips(self, sock, frame):
        """Single requests the whole way, one after another: the edge part on the first uploaded batch, the features
        up as a 'features' frame, then wait for the server's result (a 'features' frame with the same batch number)
        coming back.  Per request: edge_ms, send_start and result_at (this clock) and the round trip rtt_ms."""
        if self.edge is None:
            raise CommandError('round_trips: no edge part loaded (send load_edge or load_part first)')
        if not self.images:
            raise CommandError('round_trips: no images uploaded (send upload first)')
        a = frame.header.get('args', {})
        count = int(a['count'])
        x = torch.from_numpy(self.images[0][:max(1, int(a.get('batch_size', 1)))])
        self.forward(x)  # untimed warm-up
        requests = []
        for i in range(count):
            t0 = time.monotonic()
            y = self.forward(x)
            t1 = time.monotonic()
            P.send_frame(sock, 'features', {'batch': i, 'edge_start': t0, 'edge_ms': (t1 - t0) * 1e3,
                                            'send_start': t1}, [('x', y)], lock=self.lock)
            back = P.recv_frame(sock, self.limits)
            while back.kind == 'heartbeat':  # the server's liveness frames may come in between
                back = P.recv_frame(sock, self.limits)
            t2 = time.monotonic()
            if back.kind != 'features' or back.header.get('batch') != i or 'x' not in back.tensors:
                raise CommandError('round_trips: expected the result of request {}, got a {} frame'.format(
                    i, back.kind))
            requests.append({'batch': i, 'edge_ms': (t1 - t0) * 1e3, 'send_start': t1, 'result_at': t2,
                             'rtt_ms': (t2 - t1) * 1e3, 'result_bytes': int(back.tensors['x'].nbytes)})
        return {'requests': requests, 'count': count}, None

    def cmd_upload(self, sock, frame):
        if frame.header.get('args', {}).get('reset'):
            self.images = []
        x = frame.tensors.get('images')
        if x is None or x.dtype != np.uint8 or x.ndim != 4:
            raise CommandError('upload: needs a uint8 tensor "images" of shape (B, C, H, W)')
        self.images.append(x)
        return {'samples': int(sum(len(c) for c in self.images))}, None

    def forward(self, x):
        """A batch in -> what crosses the next link: this hop's blocks lo..lam-1 on it (uint8 images are normalized
        when lo == 0, features cast to float32), fp16 features when asked, the logits after block N-1; an empty part
        passes on what it receives (the uint8 images at lambda 0)."""
        info = self.edge_info
        lo = info.get('lo', 0)
        if info['lam'] == lo:
            return x
        with torch.no_grad():
            x = x.to(self.device)
            y = self.edge(normalize_batch(x, info['mean'], info['std']) if lo == 0 else x.float())
            if info['feature_dtype'] == 'fp16' and info['lam'] < info['num_blocks']:
                y = y.half()
            return y.cpu()

    def cmd_run(self, sock, frame):
        """Pipelined run: compute batch i+1 while a sender thread streams batch i (bounded queue).

        args.source 'images' (default; the first hop): the uploaded images; 'upstream' (a relay hop of a chain): the
        predecessor's stream on --listen, the connection whose first frame names run args.run, read by a receiver
        thread.  Results go to the server on this connection, or with args.next (HOST:PORT as seen from this hop:
        the successor's --listen or a tunnel to it) to the successor, over an authenticated connection of their own
        (this hop dials, the successor proves first), closed by a bye frame.  A failing data link is a command error:
        this connection to the server stays up."""
        if self.edge is None:
            raise CommandError('run: no edge part loaded (send load_edge or load_part first)')
        a = frame.header.get('args', {})
        bs, source, nxt, tag = int(a['batch_size']), a.get('source', 'images'), a.get('next'), str(a.get('run', ''))
        up = down = None
        try:
            if source == 'images':
                if not self.images:
                    raise CommandError('run: no images uploaded (send upload first)')
                images = torch.from_numpy(np.concatenate(self.images) if len(self.images) > 1 else self.images[0])
                batches = ((i, images[i * bs:(i + 1) * bs], None) for i in range(-(-len(images) // bs)))
                warm = images[:bs]
            elif source == 'upstream':
                if self.listener is None:
                    raise CommandError('run: source "upstream" needs this hop started with --listen HOST:PORT')
                warm = self.warmup_input(bs)
                up = Upstream(self.listener.take(tag, self.io_timeout_s, lambda: server_gone(sock, self.limits)),
                              self.limits, self.io_timeout_s)
                batches = up.batches()
            else:
                raise CommandError('run: args.source must be "images" or "upstream", got {!r}'.format(source))
            if nxt:
                down = self.dial_next(str(nxt), tag)
            result = self.pipeline(batches, down if down is not None else sock, None if down is not None else
                                   self.lock, max(1, int(a.get('queue', 2))), warm)
            if down is not None:
                try:
                    P.send_frame(down, 'bye', {'batches': result['batches']})
                except P.ProtocolError as e:
                    raise CommandError('run: the link to the next hop at {} failed at the end: {}'.format(nxt, _line(e)))
        finally:
            for c in (up, down):
                if c is not None:
                    try:
                        c.close()
                    except OSError:
                        pass
        return result, None

    def pipeline(self, batches, out, lock, queue_size, warm):
        """Compute each (index, batch, receive stamps) of `batches` while a sender thread sends the previous result
        on `out` as a features frame: the per-batch timings of this hop (its own clock)."""
        q = queue.Queue(maxsize=queue_size)
        stop, errors, sent = threading.Event(), [], {}

        def sender():
            while True:
                item = q.get()
                if item is None:
                    return
                i, y, edge_start, edge_ms = item
                t0 = time.monotonic()
                try:
                    n = P.send_frame(out, 'features', {'batch': i, 'edge_start': edge_start, 'edge_ms': edge_ms,
                                                       'send_start': t0}, [('x', y)], lock=lock)
                except P.ProtocolError as e:
                    errors.append(e)
                    stop.set()
                    return
                sent[i] = (t0, (time.monotonic() - t0) * 1e3, n)

        if warm is not None:
            self.forward(warm)  # untimed warm-up (first-call allocations, cuDNN autotuning)
        thread = threading.Thread(target=sender, name='sender', daemon=True)
        thread.start()
        per_batch, samples = [], 0
        try:
            for i, x, received in batches:
                if stop.is_set():
                    break
                t0 = time.monotonic()
                y = self.forward(x)
                edge_ms = (time.monotonic() - t0) * 1e3
                t1 = time.monotonic()
                while not stop.is_set():
                    try:
                        q.put((i, y, t0, edge_ms), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                row = {'batch': i, 'edge_ms': edge_ms, 'compute_start': t0, 'queue_wait_ms': (time.monotonic() - t1) * 1e3}
                row.update(received or {})
                per_batch.append(row)
                samples += int(len(x))
        finally:
            while thread.is_alive():
                try:
                    q.put(None, timeout=0.5)
                    break
                except queue.Full:
                    continue
            thread.join()
        if errors:
            if lock is None:  # the data link to the next hop, not this connection to the server
                raise CommandError('run: the link to the next hop failed: {}'.format(_line(errors[0])))
            raise errors[0]
        for row in per_batch:
            send_start, send_ms, nbytes = sent.get(row['batch'], (None, None, None))
            row.update({'send_start': send_start, 'send_ms': send_ms, 'frame_bytes': nbytes})
        return {'batches': len(per_batch), 'samples': samples, 'per_batch': per_batch}

    def dial_next(self, addr, tag):
        """The authenticated connection to the successor's --listen at `addr` (HOST:PORT, through --next_ssh's
        tunnel when given), announced as run `tag`."""
        host, _, port = addr.rpartition(':')
        host = host.strip('[]')
        if not host or not port.isdigit():
            raise CommandError('run: args.next must be HOST:PORT, got {!r}'.format(addr))
        sock = None
        try:
            if self.next_tunnel is not None:
                sock = self.next_tunnel.open(host, int(port))
            else:
                sock = socket.create_connection((host, int(port)), timeout=self.handshake_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                P.tune_keepalive(sock, 10)
            sock.settimeout(self.handshake_timeout_s)
            log.info('run %s: streaming to the next hop at %s%s', tag, addr,
                     '' if self.next_tunnel is None else ' via ssh ' + self.next_tunnel.host)
            conn, _ = P.dial_handshake(sock, self.token, self.hello_info(), time.monotonic() + self.handshake_timeout_s,
                                       peer='the next hop at ' + addr)
            conn.settimeout(self.io_timeout_s)
            P.send_frame(conn, 'request', {'cmd': 'stream', 'run': tag})
            return conn
        except (OSError, P.ProtocolError) as e:
            if sock is not None:
                sock.close()
            raise CommandError('run: cannot stream to the next hop at {}: {}'.format(addr, _line(e)))


def server_gone(conn, limits):
    # type: (object, P.Limits) -> bool
    """Whether the server closed this connection (or sent anything but heartbeats) while a command runs: reads the
    heartbeats waiting on it (nothing else arrives during a command).  A paramiko Channel is not looked at (its
    transport has a keepalive of its own)."""
    raw = getattr(conn, 'sock', conn)
    if not isinstance(raw, socket.socket):
        return False
    try:
        while select.select([raw], [], [], 0)[0]:
            old = raw.gettimeout()
            raw.settimeout(2.0)  # a heartbeat is one small write: it is here whole or comes at once
            try:
                frame = P.recv_frame(conn, limits)
            finally:
                raw.settimeout(old)
            if frame.kind != 'heartbeat':
                return True
    except (P.ProtocolError, OSError, ValueError):
        return True
    return False


def _upstream_item(f, ready, done):
    """What a relay hop's FrameReader queues for a frame from its predecessor: None at its bye, a ProtocolError for
    anything but a features frame with tensor x (both end the stream), else (frame, ready, done)."""
    if f.kind == 'bye':
        return None, True
    if f.kind != 'features' or 'x' not in f.tensors:
        return P.ProtocolError('a {} frame in its stream (expected features with tensor x)'.format(f.kind)), True
    return (f, ready, done), False


class Upstream(object):
    """A relay hop's input: comm.protocol.FrameReader reads the predecessor's features frames into a bounded queue
    (a slower stage here back-pressures the link), each with the time this hop was ready for it and the time it had
    all of it."""

    def __init__(self, conn, limits, io_timeout_s, size=2):
        self.conn, self.io_timeout_s = conn, io_timeout_s
        self.reader = P.FrameReader(conn, limits, size, _upstream_item, name='upstream')
        self.frames, self.stop, self.thread = self.reader.frames, self.reader.stop, self.reader.thread
        self.thread.start()

    def batches(self):
        """(index, batch, receive stamps) of each streamed batch, in order, until the predecessor's bye."""
        expected = 0
        while True:
            try:
                item = self.frames.get(timeout=self.io_timeout_s + 5)
            except queue.Empty:
                raise CommandError('run: the predecessor sent nothing for {:.3g} s'.format(self.io_timeout_s))
            if item is None:
                return
            if isinstance(item, Exception):
                raise CommandError('run: the link from the predecessor failed: {}'.format(_line(item)))
            f, ready, done = item
            if f.header.get('batch') != expected:
                raise CommandError('run: the predecessor sent batch {!r} where {} was due'.format(
                    f.header.get('batch'), expected))
            x = f.tensors['x']
            yield expected, torch.from_numpy(x), {'recv_ready': ready, 'recv_done': done, 'bytes_in': int(x.nbytes)}
            expected += 1

    def close(self):
        self.stop.set()
        self.conn.close()
        self.thread.join(5)


class Listener(object):
    """A hop's socket for its predecessor in a chain (--listen): a thread accepts each connection and authenticates
    it with comm.protocol's handshake in the server role (this hop proves first; small pre-auth frames, one
    deadline), and queues the authenticated ones for the next run.  Whatever a connection sends or fails to send,
    it is logged in one line and closed; the hop goes on."""

    def __init__(self, host, port, token, handshake_timeout_s, limits, backlog=4):
        self.token, self.handshake_timeout_s, self.limits = token, handshake_timeout_s, limits
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(8)
        except OSError as e:
            self.sock.close()
            raise SystemExit('--listen {}:{}: cannot listen there ({})'.format(host, port, e))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.ready = queue.Queue(maxsize=backlog)
        self.thread = threading.Thread(target=self._loop, name='listener', daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:  # closed
                return
            peer = '{}:{}'.format(addr[0], addr[1])
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                P.tune_keepalive(conn, 10)
                conn.settimeout(self.handshake_timeout_s)
                _, ch = P.answer_handshake(conn, self.token, 5.0, time.monotonic() + self.handshake_timeout_s,
                                           peer='the predecessor at ' + peer)
            except Exception as e:  # noqa: BLE001 - whatever a peer sends, the hop survives it
                log.warning('--listen: connection from %s refused: %s', peer, _line(e))
                conn.close()
                continue
            try:
                self.ready.put_nowait((ch, peer))
            except queue.Full:
                log.warning('--listen: %d authenticated connections wait for a run already; closing the one from %s',
                            self.ready.maxsize, peer)
                ch.close()

    def take(self, tag, timeout_s, cancelled=lambda: False):
        """The predecessor's authenticated connection whose first frame announces run `tag`; connections of other
        runs (stale ones) are closed.  CommandError after timeout_s without one, or as soon as cancelled()."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandError('run: no predecessor streamed run {} to --listen {}:{} within {:.3g} s'.format(
                    tag, self.host, self.port, timeout_s))
            if cancelled():
                raise CommandError('run: the server dropped the session while this hop waited for its predecessor')
            try:
                ch, peer = self.ready.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            why = None
            try:
                ch.settimeout(max(0.1, min(left, self.handshake_timeout_s)))
                f = P.recv_frame(ch, self.limits)
                if f.kind == 'request' and f.header.get('cmd') == 'stream' and f.header.get('run') == tag:
                    ch.settimeout(timeout_s)  # the stream: the hop's io timeout
                    return ch
                why = 'a {} frame announcing run {!r}'.format(f.kind, f.header.get('run'))
            except P.ProtocolError as e:
                why = _line(e)
            log.warning('--listen: dropping the connection from %s, not run %s (%s)', peer, tag, why)
            ch.close()

    def close(self):
        self.sock.close()


# ----------------------------------------------------------------------------------------------------------
# Connecting
# ----------------------------------------------------------------------------------------------------------

class SshTunnel(object):
    """The worker's own `ssh -L`: a paramiko SSH connection whose direct-tcpip channels reach the server port."""

    def __init__(self, spec, key_file=None, known_hosts=None, accept_unknown=False, timeout_s=30.0):
        user, _, hostport = spec.rpartition('@')
        host, _, port = hostport.partition(':')
        if not user or not host:
            raise SystemExit('--ssh: expected user@host[:port], got {!r}'.format(spec))
        self.user, self.host, self.port = user, host, int(port or 22)
        self.key_file, self.known_hosts, self.accept_unknown = key_file, known_hosts, accept_unknown
        self.timeout_s = timeout_s
        self.client = None
        try:
            import paramiko  # noqa: F401  (optional on the device)
        except ImportError:
            raise SystemExit('--ssh needs paramiko (pip install paramiko); or open the tunnel yourself with '
                             '`ssh -N -L 6006:127.0.0.1:6006 user@server` and run without --ssh')

    def _connect(self):
        import paramiko
        logging.getLogger('paramiko').setLevel(logging.CRITICAL)  # its failures are reported by open() below
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        if self.known_hosts:
            client.load_host_keys(self.known_hosts)
        if self.accept_unknown:
            log.warning('--ssh_accept_unknown: accepting an unknown SSH host key of %s', self.host)
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(self.host, self.port, username=self.user, key_filename=self.key_file,
                       timeout=self.timeout_s, banner_timeout=self.timeout_s, auth_timeout=self.timeout_s)
        client.get_transport().set_keepalive(15)
        self.client = client

    def open(self, dest_host, dest_port):
        """A channel to dest_host:dest_port as seen from the SSH server (socket-like: sendall, recv, settimeout)."""
        if self.client is None or not self.client.get_transport() or not self.client.get_transport().is_active():
            self.close()
            self._connect()
        try:
            return self.client.get_transport().open_channel('direct-tcpip', (dest_host, dest_port),
                                                            ('127.0.0.1', 0), timeout=self.timeout_s)
        except Exception as e:  # paramiko.ChannelException (nothing listens there yet), SSHException
            raise OSError('SSH tunnel to {}:{} via {}: {}'.format(dest_host, dest_port, self.host, e))

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None


def connect(args, tunnel):
    if tunnel is not None:
        return tunnel.open(args.server_ip, args.port)
    sock = socket.create_connection((args.server_ip, args.port), timeout=args.connect_timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    P.tune_keepalive(sock, 10)  # a dead link is noticed by the kernel too, not after its default of ~2 h
    return sock


def session_once(worker, args, tunnel):
    # type: (Worker, argparse.Namespace, Optional[SshTunnel]) -> Optional[str]
    """One dial and, if it connects, one session; never raises (but on KeyboardInterrupt).  Returns None when a
    session got through the handshake (ended or dropped: logged here), else why there was none (main logs it)."""
    worker.started = False
    try:
        sock = connect(args, tunnel)
    except Exception as e:  # noqa: BLE001 - OSError, paramiko's SSHException, ...: the server is not there yet
        return 'server not reachable ({})'.format(_line(e))
    why = None
    try:
        worker.serve(sock)
    except P.AuthRefused as e:
        why = _line(e)
    except P.ProtocolError as e:  # before the handshake e.g. an ssh -L tunnel with nothing behind it yet
        why = _line(e) if worker.started else 'no session ({})'.format(_line(e))
    except Exception as e:  # noqa: BLE001 - whatever a peer provokes, the worker survives it and redials
        why = 'session failed ({}: {})'.format(type(e).__name__, _line(e))
    finally:
        try:
            sock.close()
        except Exception:  # noqa: BLE001
            pass
    if worker.started:
        if why is not None:
            log.warning('link dropped (%s); reconnecting', why)
        return None
    return why


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--server_ip', default='127.0.0.1', help='server address to dial; with --ssh, as seen from the '
                   'SSH host (default: 127.0.0.1)')
    p.add_argument('--port', type=int, default=6006, help='server port (default: 6006)')
    p.add_argument('--device', default='cuda', help='torch device of the edge part: cuda | cpu; cuda falls back to '
                   'cpu when unavailable (default: cuda)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads; 0 = the count the server asks for: '
                   'the LUT\'s (lut.threads when step 1 measures, the LUT\'s recorded count at deploy), 1 until '
                   'then, so the worker never oversubscribes the device (default: 0)')
    p.add_argument('--token', default=None, help='shared authentication token (default: env {}, else none)'.format(
        P.TOKEN_ENV))
    p.add_argument('--ssh', default=None, metavar='USER@HOST[:PORT]', help='open the SSH tunnel with paramiko '
                   '(default: none, dial --server_ip directly)')
    p.add_argument('--ssh_key', default=None, help='private key file for --ssh (default: ssh agent / ~/.ssh keys)')
    p.add_argument('--ssh_known_hosts', default=None, help='extra known_hosts file for --ssh (default: only '
                   '~/.ssh/known_hosts)')
    p.add_argument('--ssh_accept_unknown', action='store_true', help='accept an unknown SSH host key (insecure; '
                   'default: off, unknown hosts are refused)')
    p.add_argument('--listen', default=None, metavar='HOST:PORT', help='also listen there for the predecessor of '
                   'this hop in a chain of devices (a relay hop: it receives the previous hop\'s features there and '
                   'forwards its own to the next hop or the server); port 0 picks a free one, logged and reported to '
                   'the server (default: none, this hop takes uploaded images)')
    p.add_argument('--allow_remote', action='store_true', help='let --listen bind an address other than loopback '
                   '(then use a token; default: off, loopback only, reached through an SSH tunnel)')
    p.add_argument('--next_ssh', default=None, metavar='USER@HOST[:PORT]', help='reach the next hop through a '
                   'paramiko SSH tunnel to this host (the run\'s next address is then as seen from it; --ssh_key and '
                   '--ssh_known_hosts apply; default: none, dial the next address directly or through your `ssh -L`)')
    p.add_argument('--connect_timeout_s', type=float, default=10.0, help='timeout of one dial, and of the whole '
                   'handshake after it, in s (default: 10)')
    p.add_argument('--io_timeout_s', type=float, default=120.0, help='timeout of one send/receive within a command '
                   'in s (default: 120)')
    p.add_argument('--max_frame_mb', type=float, default=512.0, help='largest accepted frame in MB (default: 512)')
    p.add_argument('--backoff_max_s', type=float, default=10.0, help='longest wait between dial attempts in s '
                   '(default: 10)')
    p.add_argument('--once', action='store_true', help='exit after the first session instead of dialing again '
                   '(default: off)')
    args = p.parse_args(argv)
    for name in ('connect_timeout_s', 'io_timeout_s', 'max_frame_mb', 'backoff_max_s'):
        v = getattr(args, name)
        if not (v > 0 and v < float('inf')):
            p.error('--{}: expected a finite number > 0, got {}'.format(name, v))
    if not 0 <= args.port <= 65535:
        p.error('--port: expected 0..65535, got {}'.format(args.port))
    if args.listen is not None:
        host, _, port = args.listen.rpartition(':')
        host = host.strip('[]')
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            p.error('--listen: expected HOST:PORT with a port 0..65535, got {!r}'.format(args.listen))
        if not is_loopback(host) and not args.allow_remote:
            p.error('--listen {}: not a loopback address; the predecessor reaches this hop through an SSH tunnel to '
                    '127.0.0.1. To listen there anyway add --allow_remote (then use a token)'.format(args.listen))
        args.listen = (host, int(port))
    return args


def is_loopback(host):
    # type: (str) -> bool
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(asctime)s worker %(levelname)s %(message)s')
    args = parse_args(argv)
    token = P.resolve_token(args.token)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads if args.threads > 0 else 1)
    worker = Worker(device, token, P.Limits(max_frame_bytes=int(args.max_frame_mb * 2 ** 20)), args.io_timeout_s,
                    args.connect_timeout_s, args.threads)
    tunnel = None
    if args.ssh:
        tunnel = SshTunnel(args.ssh, args.ssh_key, args.ssh_known_hosts, args.ssh_accept_unknown,
                           args.connect_timeout_s)
    if args.next_ssh:
        worker.next_tunnel = SshTunnel(args.next_ssh, args.ssh_key, args.ssh_known_hosts, args.ssh_accept_unknown,
                                       args.connect_timeout_s)
    if args.listen is not None:
        worker.listener = Listener(args.listen[0], args.listen[1], token, args.connect_timeout_s, worker.limits)
        if not token and not is_loopback(args.listen[0]):
            log.warning('--listen %s:%d is reachable from other machines WITHOUT a token', *args.listen)
        log.info('listening for the predecessor on %s:%d', worker.listener.host, worker.listener.port)
    log.info('worker pid %d, device %s, python %s, torch %s, dialing %s:%d%s%s', os.getpid(), device,
             sys.version.split()[0], torch.__version__, args.server_ip, args.port,
             ' via ssh ' + args.ssh if args.ssh else '', ', token set' if token else '')
    backoff = 0.5
    while True:
        why = session_once(worker, args, tunnel)
        if args.once:
            return 0
        if why is None:  # a session ran: dial again at once, and reset the backoff
            backoff = 0.5
            time.sleep(0.2)
            continue
        (log.warning if 'refuse' in why or 'could not prove' in why or 'requires a token' in why else log.info)(
            '%s; dialing again in %.1f s', why, backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, args.backoff_max_s)


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
