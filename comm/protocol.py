"""The wire protocol between the server session (comm/session.py) and the edge worker (client_worker.py).

DEVICE-SIDE module: Python 3.6 + numpy only (torch tensors are accepted duck-typed), prints nothing.
No pickle and no torch.load: a frame is fixed binary fields, a UTF-8 JSON object and raw little-endian tensor bytes.

Frame layout (docs/design.md#wire-protocol):

    fixed header, 20 bytes, network byte order (struct '!4sBBHIQ'):
        magic b'HRVG' | version (u8) | message type (u8) | flags (u16, 0) | JSON length (u32) | payload length (u64)
    JSON header (UTF-8 object); its optional "tensors" field lists {"name", "dtype", "shape"} per tensor
    payload: the tensors' raw bytes in that order, each starting at an 8-byte aligned offset (zero padding)

Reading loops until a frame is complete.  Every length is checked against `Limits` BEFORE anything of that size
is allocated, and anything malformed raises ProtocolError naming what was wrong.  The decoder never trusts the
sender's offsets: the layout is recomputed from dtype and shape and must add up to the payload length exactly.

Message types: challenge (server -> worker, first frame: its nonce, whether a token is required), hello (worker:
its nonce), proof (server, then worker: the HMAC proof of the token; the worker's also carries its device info),
welcome (server: session established), request (server: one command), reply (worker: its result), error (either
side: what failed), features (worker: one batch of a pipelined run), heartbeat (either side: alive; the worker's
while a long command runs, the server's while idle between commands), bye (server: session over).

Handshake (version 2), bounded by PREAUTH_LIMITS (small frames, no tensors) and one overall deadline:

    server  challenge {version, nonce_s, auth_required, heartbeat_s}
    worker  hello     {nonce_w}
    server  proof     {mac: proof(token, 'server', nonce_s, nonce_w)}    (absent without a token)
    worker  proof     {mac: proof(token, 'worker', nonce_s, nonce_w), info}   only after checking the server's
    server  welcome   {}

Authentication (optional): both sides hold a shared token (a flag or env HYPERREPVGG_TOKEN).  The SERVER proves
first, so a process the worker dials by mistake (a wrong address, a hijacked port) gets no answer it could relay;
each proof is HMAC-SHA256 over the protocol version, the role ('server' / 'worker') and BOTH nonces, so neither a
proof of one connection nor one side's proof for the other side is accepted (no replay, no reflection).  After
the handshake every frame carries an HMAC-SHA256 trailer under a key derived from the token and both nonces, over
the direction, a frame counter and the frame's bytes (flag FLAG_MAC): a process in the middle that relays the
handshake can neither inject, alter, reorder nor replay a frame; it can only pass them on or drop the link.
"""
import hashlib
import hmac
import json
import os
import queue
import re
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import Dict, NamedTuple

import numpy as np

from errors import one_line

MAGIC = b'HRVG'
VERSION = 2  # 2: server proves first, proofs cover both nonces and the role, MAC trailer on every frame
FIXED = struct.Struct('!4sBBHIQ')  # magic, version, type, flags, json length, payload length
ALIGN = 8
TOKEN_ENV = 'HYPERREPVGG_TOKEN'
FLAG_MAC = 0x0001  # the frame ends in a 32-byte HMAC-SHA256 trailer (authenticated session)
MAC_BYTES = 32

MESSAGE_TYPES = OrderedDict([('challenge', 1), ('hello', 2), ('welcome', 3), ('request', 4), ('reply', 5),
                             ('error', 6), ('features', 7), ('heartbeat', 8), ('bye', 9), ('proof', 10)])
_TYPE_NAMES = {v: k for k, v in MESSAGE_TYPES.items()}
DTYPES = ('uint8', 'int8', 'int16', 'int32', 'int64', 'float16', 'float32', 'float64', 'bool')
_CHUNK = 1 << 20  # bytes per recv call


class ProtocolError(Exception):
    """A malformed, oversized or truncated frame, a closed connection or a timeout; the message says which."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (cleanly between frames, or in the middle of one)."""


class ProtocolTimeout(ProtocolError):
    """No data arrived within the socket's timeout."""


class AuthRefused(ProtocolError):
    """The handshake's authentication failed: the peer refused this side (an error frame; its text is in
    .peer_message), could not prove that it holds the token, or wants one this side lacks."""

    def __init__(self, message, peer_message=None):
        # type: (str, Optional[str]) -> None
        ProtocolError.__init__(self, message)
        self.peer_message = peer_message


class Limits(NamedTuple):
    max_frame_bytes: int = 512 * 2 ** 20  # fixed header + JSON + payload
    max_header_bytes: int = 16 * 2 ** 20  # the JSON header alone
    max_tensors: int = 4096  # tensors in one frame
    max_dims: int = 8  # dimensions of one tensor
    max_depth: int = 32  # nesting of arrays / objects in the JSON header


# Before the peer is authenticated: small frames, no tensors (a hello claiming 500 MB allocates nothing).
PREAUTH_LIMITS = Limits(max_frame_bytes=64 * 1024, max_header_bytes=64 * 1024 - 20, max_tensors=0, max_dims=0,
                        max_depth=8)


class Frame(NamedTuple):
    kind: str  # message type name (a key of MESSAGE_TYPES)
    header: Dict[str, object]  # the JSON header without its "tensors" field
    tensors: 'OrderedDict[str, np.ndarray]'  # name -> array (a view on the received buffer)


def _align(n):
    # type: (int) -> int
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_array(t):
    """numpy array of a numpy array or a torch tensor (moved to the CPU), C-contiguous, little-endian."""
    if hasattr(t, 'detach') and hasattr(t, 'cpu'):
        t = t.detach().cpu().contiguous().numpy()
    a = np.asarray(t)
    if not a.flags['C_CONTIGUOUS']:
        a = a.copy(order='C')  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if a.dtype.name not in DTYPES:
        raise ProtocolError('tensor dtype {} cannot be sent; valid: {}'.format(a.dtype, ', '.join(DTYPES)))
    if a.dtype.byteorder == '>':
        a = a.astype(a.dtype.newbyteorder('<'))
    return a


def encode_frame(kind, header=None, tensors=None, flags=0):
    # type: (str, Optional[Dict[str, object]], Optional[Sequence[Tuple[str, object]]], int) -> List[object]
    """The buffers of one frame, in order (bytes and memoryviews; nothing is copied for the tensors).

    `tensors` is a sequence of (name, array) pairs or a dict; arrays are numpy arrays or torch tensors.
    """
    if kind not in MESSAGE_TYPES:
        raise ProtocolError('unknown message type {!r}; valid: {}'.format(kind, ', '.join(MESSAGE_TYPES)))
    header = dict(header or {})
    if 'tensors' in header:
        raise ProtocolError('header field "tensors" is reserved for the tensor descriptions')
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors or [])
    arrays, described, parts, offset = [], [], [], 0
    for name, t in items:
        a = _as_array(t)
        arrays.append(a)
        described.append({'name': str(name), 'dtype': a.dtype.name, 'shape': [int(s) for s in a.shape]})
    if described:
        header['tensors'] = described
    js = json.dumps(header, separators=(',', ':'), allow_nan=False).encode('utf-8')
    for a in arrays:
        pad = _align(offset) - offset
        if pad:
            parts.append(b'\0' * pad)
        parts.append(memoryview(a.reshape(-1).view(np.uint8)))
        offset += pad + a.nbytes
    parts.insert(0, FIXED.pack(MAGIC, VERSION, MESSAGE_TYPES[kind], flags, len(js), offset) + js)
    return parts


def frame_size(parts):
    # type: (Sequence[object]) -> int
    return sum(len(memoryview(p).cast('B')) for p in parts)


class SecureChannel(object):
    """A connection after an authenticated handshake (see the module docstring): send_frame appends, and
    recv_frame checks, an HMAC-SHA256 trailer over the direction, a per-direction frame counter and the frame.

    Wraps a socket or a paramiko Channel; every other attribute (settimeout, close, ...) is the wrapped one's.
    """

    def __init__(self, sock, key, role):
        # type: (object, bytes, str) -> None
        self.sock, self.key = sock, key
        self.send_role, self.recv_role = role, ('worker' if role == 'server' else 'server')
        self.send_seq = self.recv_seq = 0

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def tag(self, role, seq, parts):
        # type: (str, int, Sequence[object]) -> bytes
        h = hmac.new(self.key, struct.pack('!8sQ', role.encode('ascii'), seq), hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()

    def seal(self, parts):
        # type: (Sequence[object]) -> bytes
        """The trailer of the next frame this side sends (call under the send lock)."""
        self.send_seq += 1
        return self.tag(self.send_role, self.send_seq, parts)

    def verify(self, kind, parts, trailer):
        # type: (str, Sequence[object], bytes) -> None
        self.recv_seq += 1
        if not hmac.compare_digest(self.tag(self.recv_role, self.recv_seq, parts), bytes(trailer)):
            raise ProtocolError('{} frame #{} fails its MAC check: altered, injected or replayed on the way (or '
                                'the peer is not the one that authenticated)'.format(kind, self.recv_seq))


def _coalesce(parts, small=1 << 16):
    # type: (Sequence[object], int) -> List[object]
    """Consecutive small buffers joined into one: a small frame is ONE write.  Two small writes in a row meet
    Nagle's algorithm on any hop without TCP_NODELAY (sshd's forwarded connection, say) and wait for a delayed
    ACK, tens of ms; large tensor buffers are passed on uncopied."""
    out, pending = [], []
    for p in parts:
        n = len(memoryview(p).cast('B'))
        if not n:
            continue
        if n < small:
            pending.append(bytes(p))
            continue
        if pending:
            out.append(b''.join(pending))
            pending = []
        out.append(p)
    if pending:
        out.append(b''.join(pending))
    return out


def send_frame(sock, kind, header=None, tensors=None, lock=None):
    # type: (object, str, Optional[Dict[str, object]], object, object) -> int
    """Send one frame on `sock` (a socket, a paramiko Channel or a SecureChannel); returns the bytes sent.

    `lock` (a threading.Lock) serializes frames of several threads on one connection.
    """
    secure = sock if isinstance(sock, SecureChannel) else None
    raw = secure.sock if secure is not None else sock
    parts = encode_frame(kind, header, tensors, FLAG_MAC if secure is not None else 0)
    total = 0
    try:
        if lock is not None:
            lock.acquire()
        if secure is not None:
            parts.append(secure.seal(parts))
        for p in _coalesce(parts):
            raw.sendall(p)
            total += len(memoryview(p).cast('B'))
    except socket.timeout:
        raise ProtocolTimeout('sending a {} frame timed out after {} s'.format(kind, _timeout_of(raw)))
    except (OSError, EOFError) as e:
        raise ConnectionClosed('connection lost while sending a {} frame ({})'.format(kind, e))
    finally:
        if lock is not None:
            lock.release()
    return total


def _timeout_of(sock):
    try:
        return sock.gettimeout()
    except (AttributeError, OSError):
        return None


def _recv_some(sock, view, want, recv_into, deadline, what):
    # type: (object, memoryview, int, object, Optional[float], str) -> int
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProtocolTimeout('the handshake deadline passed while reading the {}'.format(what))
        sock.settimeout(left)
    if recv_into is not None:
        return recv_into(view)
    data = sock.recv(min(want, _CHUNK))
    view[:len(data)] = data
    return len(data)


def _read_exact(sock, n, what, started, deadline=None):
    # type: (object, int, str, bool, Optional[float]) -> bytearray
    """Exactly n bytes from sock; ConnectionClosed on EOF, ProtocolTimeout on a socket timeout or past the
    deadline (time.monotonic(); the socket's timeout is set to what is left before every read)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    recv_into = getattr(sock, 'recv_into', None)
    try:
        while got < n:
            k = _recv_some(sock, view[got:], n - got, recv_into, deadline, what)
            if k == 0:
                if got == 0 and not started:
                    raise ConnectionClosed('peer closed the connection')
                raise ConnectionClosed('connection closed after {} of {} bytes of the {}'.format(got, n, what))
            got += k
    except socket.timeout:
        if deadline is not None:
            raise ProtocolTimeout('the handshake deadline passed while reading the {} ({} of {} bytes)'.format(
                what, got, n))
        raise ProtocolTimeout('no data from the peer for {} s while reading the {} ({} of {} bytes)'.format(
            _timeout_of(sock), what, got, n))
    except ProtocolError:
        raise
    except (OSError, EOFError) as e:
        raise ConnectionClosed('connection lost while reading the {} ({})'.format(what, e))
    return buf


def parse_fixed(raw, limits, flags_expected=0):
    # type: (bytes, Limits, int) -> Tuple[str, int, int]
    """(message type name, JSON length, payload length) of a 20-byte fixed header, checked against limits."""
    magic, version, mtype, flags, hlen, plen = FIXED.unpack(bytes(raw))
    if magic != MAGIC:
        raise ProtocolError('bad magic {!r} (expected {!r}): not a HyperRepVGG frame'.format(magic, MAGIC))
    if version != VERSION:
        raise ProtocolError('unsupported protocol version {} (this side speaks {}; update both sides to the same '
                            'release)'.format(version, VERSION))
    if mtype not in _TYPE_NAMES:
        raise ProtocolError('unknown message type {}'.format(mtype))
    if flags != flags_expected:
        raise ProtocolError('frame flags 0x{:04x}, expected 0x{:04x} ({})'.format(
            flags, flags_expected, 'every frame of an authenticated session carries a MAC' if flags_expected
            else 'no MAC before or without authentication'))
    if hlen > limits.max_header_bytes:
        raise ProtocolError('JSON header of {} bytes exceeds the limit of {} bytes'.format(hlen, limits.max_header_bytes))
    if FIXED.size + hlen + plen > limits.max_frame_bytes:
        raise ProtocolError('frame of {} bytes exceeds the limit of {} bytes (max_frame)'.format(
            FIXED.size + hlen + plen, limits.max_frame_bytes))
    return _TYPE_NAMES[mtype], hlen, plen


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b'[]{}')


def json_depth(raw):
    # type: (bytes) -> int
    """Deepest nesting of arrays / objects in JSON text, without parsing it (string contents skipped)."""
    raw = bytes(raw)
    brackets = np.frombuffer(_JSON_STRING.sub(b'', raw).translate(None, _NOT_BRACKETS), np.uint8)
    if not len(brackets):
        return 0
    opens = (brackets == ord('[')) | (brackets == ord('{'))
    return int((opens.view(np.int8) * 2 - 1).cumsum(dtype=np.int32).max())


def _no_constant(name):
    raise ValueError('{} is not a JSON number'.format(name))


def _load_json_object(raw, max_depth):
    # type: (bytes, int) -> Dict[str, object]
    if bytes(raw).count(b'[') + bytes(raw).count(b'{') > max_depth and json_depth(raw) > max_depth:
        raise ProtocolError('JSON header nests deeper than {} levels'.format(max_depth))
    try:
        header = json.loads(bytes(raw).decode('utf-8'), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError('JSON header is not valid UTF-8 JSON ({})'.format(str(e)[:200]))
    if not isinstance(header, dict):
        raise ProtocolError('JSON header must be an object, got {}'.format(type(header).__name__))
    return header


def _tensor_entry(d, i, limits, names):
    # type: (object, int, Limits, set) -> Tuple[str, str, Tuple[int, ...], int]
    """(name, dtype, shape, byte count) of one "tensors" entry, every field checked."""
    where = 'header field "tensors[{}]"'.format(i)
    if not isinstance(d, dict) or not isinstance(d.get('name'), str) or not isinstance(d.get('dtype'), str) \
            or d['dtype'] not in DTYPES:
        raise ProtocolError('{} needs a string "name" and a "dtype" in {}'.format(where, ', '.join(DTYPES)))
    shape = d.get('shape')
    if not isinstance(shape, list) or len(shape) > limits.max_dims or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ProtocolError('{} "shape" must list at most {} integers >= 0'.format(where, limits.max_dims))
    if d['name'] in names:
        raise ProtocolError('{}: duplicate tensor name {!r}'.format(where, d['name']))
    names.add(d['name'])
    count = 1
    for s in shape:  # every dimension is bounded, also next to a zero one ([0, 2**63] describes no bytes)
        if s > limits.max_frame_bytes:
            raise ProtocolError('{}: dimension {} of shape {} exceeds the frame limit'.format(where, s, shape))
        count *= s
        if count > limits.max_frame_bytes:
            raise ProtocolError('{}: shape {} exceeds the frame limit'.format(where, shape))
    return d['name'], d['dtype'], tuple(shape), count * np.dtype(d['dtype']).itemsize


def parse_header(raw, plen, limits):
    # type: (bytes, int, Limits) -> Tuple[Dict[str, object], List[Tuple[str, str, Tuple[int, ...], int]]]
    """(header without "tensors", [(name, dtype, shape, offset)]) of a JSON header; the layout must fill plen."""
    header = _load_json_object(raw, limits.max_depth)
    described = header.pop('tensors', [])
    if not isinstance(described, list) or len(described) > limits.max_tensors:
        raise ProtocolError('header field "tensors" must be a list of at most {} entries'.format(limits.max_tensors))
    layout, names, offset = [], set(), 0
    for i, d in enumerate(described):
        name, dtype, shape, nbytes = _tensor_entry(d, i, limits, names)
        offset = _align(offset)
        layout.append((name, dtype, shape, offset))
        offset += nbytes
        if offset > plen:
            raise ProtocolError('header field "tensors[{}]": tensors need more than the {} payload bytes the frame '
                                'has'.format(i, plen))
    if offset != plen:
        raise ProtocolError('payload length {} does not match the {} bytes the tensors in the header describe'.format(
            plen, offset))
    return header, layout


def _tensors(payload, layout):
    out = OrderedDict()
    for name, dtype, shape, offset in layout:
        count = 1
        for s in shape:
            count *= s
        dt = np.dtype(dtype).newbyteorder('<')
        try:
            out[name] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
        except (ValueError, TypeError) as e:  # unreachable after parse_header's checks; never a raw exception
            raise ProtocolError('tensor {!r} of shape {} does not fit the payload ({})'.format(name, shape, e))
    return out


def recv_frame(sock, limits=Limits(), deadline=None):
    # type: (object, Limits, Optional[float]) -> Frame
    """Read one complete frame from `sock` (a socket, a paramiko Channel, a SecureChannel or anything with recv).

    `deadline` (time.monotonic()) bounds the whole frame, not each read: the handshake's overall deadline.
    """
    secure = sock if isinstance(sock, SecureChannel) else None
    raw = secure.sock if secure is not None else sock
    timeout = _timeout_of(raw) if deadline is not None else None
    try:
        fixed = _read_exact(raw, FIXED.size, 'fixed frame header', False, deadline)
        kind, hlen, plen = parse_fixed(fixed, limits, FLAG_MAC if secure is not None else 0)
        js = _read_exact(raw, hlen, 'JSON header', True, deadline)
        if secure is None:  # a bad layout is refused before its payload is read
            header, layout = parse_header(js, plen, limits)
        payload = _read_exact(raw, plen, 'payload', True, deadline) if plen else bytearray()
        if secure is not None:  # nothing of a frame is looked at before its MAC checks out
            secure.verify(kind, (fixed, js, payload), _read_exact(raw, MAC_BYTES, 'MAC trailer', True, deadline))
            header, layout = parse_header(js, plen, limits)
    finally:
        if deadline is not None:
            try:
                raw.settimeout(timeout)
            except (OSError, AttributeError):
                pass
    return Frame(kind, header, _tensors(payload, layout))


def stream_item(frame, ready, done):
    # type: (Frame, float, float) -> tuple
    """FrameReader's default sorting: every frame as (frame, ready, done); the stream ends after the first frame
    that is not features (the run's reply or an error)."""
    return (frame, ready, done), frame.kind != 'features'


class FrameReader(object):
    """A thread that takes a stream's frames off a connection into a bounded queue (a slower consumer
    back-pressures the link), each stamped with the time this side was ready for it (`ready`: from then on it takes
    bytes as fast as they come) and the time it had all of it (`done`), time.monotonic() seconds.  Heartbeats are
    skipped; a ProtocolError is queued and ends the stream.  `sort(frame, ready, done)` -> (item, last) says what
    to queue for a frame and whether the stream ends with it (default stream_item).  The server's run receiver
    (comm/session.py) and a relay hop's upstream (client_worker.py) both read through this one loop."""

    def __init__(self, conn, limits, size=2, sort=stream_item, name='frame-reader'):
        self.conn, self.limits, self.sort = conn, limits, sort
        self.frames = queue.Queue(maxsize=size)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def put(self, item):
        """Queue `item`, waiting while the queue is full, unless the reader was stopped."""
        while not self.stop.is_set():
            try:
                self.frames.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _loop(self):
        while not self.stop.is_set():
            ready = time.monotonic()
            try:
                f = recv_frame(self.conn, self.limits)
            except ProtocolError as e:
                self.put(e)
                return
            if f.kind == 'heartbeat':
                continue
            item, last = self.sort(f, ready, time.monotonic())
            self.put(item)
            if last:
                return


class _BytesSocket(object):
    """recv() over a bytes object (decode_frame, tests)."""

    def __init__(self, data):
        self.data, self.pos = memoryview(bytes(data)), 0

    def recv(self, n):
        out = self.data[self.pos:self.pos + n].tobytes()
        self.pos += len(out)
        return out


def decode_frame(data, limits=Limits()):
    # type: (bytes, Limits) -> Frame
    """Decode one frame from bytes (the same checks as recv_frame); trailing bytes are an error."""
    sock = _BytesSocket(data)
    frame = recv_frame(sock, limits)
    if sock.pos != len(sock.data):
        raise ProtocolError('{} trailing bytes after the frame'.format(len(sock.data) - sock.pos))
    return frame


def frame_bytes(kind, header=None, tensors=None):
    # type: (str, Optional[Dict[str, object]], object) -> bytes
    """One frame as bytes (tests, small messages)."""
    return b''.join(bytes(p) for p in encode_frame(kind, header, tensors))


# ----------------------------------------------------------------------------------------------------------
# Authentication
# ----------------------------------------------------------------------------------------------------------

def resolve_token(flag_value=None):
    # type: (Optional[str]) -> Optional[str]
    """The shared token: the flag's value, else env HYPERREPVGG_TOKEN, else None (no authentication)."""
    token = flag_value if flag_value else os.environ.get(TOKEN_ENV)
    return token or None


def make_nonce():
    # type: () -> str
    return os.urandom(32).hex()


_NONCE = re.compile(r'[0-9a-f]{64}')


def check_nonce(nonce, who):
    # type: (object, str) -> str
    """The peer's nonce if it is 64 lowercase hex digits, else ProtocolError naming it."""
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise ProtocolError('{} sent a malformed nonce {!r} (expected 64 hex digits)'.format(who, str(nonce)[:80]))
    return nonce


def _key(token):
    # type: (str) -> bytes
    return token.encode('utf-8', 'surrogateescape')


def auth_proof(token, role, nonce_server, nonce_worker):
    # type: (str, str, str, str) -> str
    """HMAC-SHA256 under the token of the protocol version, the prover's role ('server' or 'worker') and both
    nonces of this connection, hex: valid for one role of one connection only."""
    msg = 'hyperrepvgg proof v{}|{}|{}|{}'.format(VERSION, role, nonce_server, nonce_worker)
    return hmac.new(_key(token), msg.encode('ascii'), hashlib.sha256).hexdigest()


def check_proof(token, role, nonce_server, nonce_worker, mac):
    # type: (str, str, str, str, object) -> bool
    if not isinstance(mac, str) or len(mac) != 64:
        return False
    try:
        return hmac.compare_digest(auth_proof(token, role, nonce_server, nonce_worker), mac)
    except (TypeError, ValueError):  # non-ASCII text
        return False


def session_key(token, nonce_server, nonce_worker):
    # type: (str, str, str) -> bytes
    """The key of the frames' MAC trailers on one authenticated connection."""
    msg = 'hyperrepvgg session v{}|{}|{}'.format(VERSION, nonce_server, nonce_worker)
    return hmac.new(_key(token), msg.encode('ascii'), hashlib.sha256).digest()


def idle_timeout_s(heartbeat_s):
    # type: (float) -> float
    """How long the worker waits between commands before it calls the server silent: 4 heartbeats + 2 s."""
    return 4.0 * float(heartbeat_s) + 2.0


def tune_keepalive(sock, idle_s):
    # type: (object, float) -> None
    """TCP keepalive on a plain socket: first probe after idle_s, then every idle_s / 3, dead after 3 missed
    (Linux and macOS option names, each guarded: a platform without one keeps its default).  A paramiko
    Channel is left alone (the SSH transport has its own keepalive)."""
    if not isinstance(sock, socket.socket):
        return
    idle = max(1, int(idle_s))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (('TCP_KEEPIDLE', idle), ('TCP_KEEPALIVE', idle), ('TCP_KEEPINTVL', max(1, idle // 3)),
                            ('TCP_KEEPCNT', 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


def expect_preauth(sock, kind, deadline, refusal):
    # type: (object, str, float, str) -> Frame
    """The next handshake frame, which must be `kind` (PREAUTH_LIMITS, the handshake's deadline); an error frame
    from the peer raises AuthRefused: `refusal` with {} replaced by the peer's text."""
    frame = recv_frame(sock, PREAUTH_LIMITS, deadline)
    if frame.kind == 'error':
        text = one_line(str(frame.header.get('message')), 300)
        raise AuthRefused(refusal.format(text), text)
    if frame.kind != kind:
        raise ProtocolError('expected a {} frame, got {}'.format(kind, frame.kind))
    return frame


def dial_handshake(sock, token, info, deadline, peer='the server'):
    # type: (object, Optional[str], Dict[str, object], float, str) -> Tuple[object, float]
    """The version-2 handshake on a connection this side dialed (the 'worker' role: the worker to the server, a
    hop to its successor's --listen): (the connection to use, a SecureChannel with a token; the peer's
    heartbeat_s).  Nothing but a fresh nonce is sent before the peer proved the token; `info` goes with our proof.
    AuthRefused when the peer refuses us, fails its proof or wants a token we lack; ProtocolError on anything
    malformed (`peer` names the other side in the messages)."""
    refusal = peer + ' refused this worker: {}'
    ch = expect_preauth(sock, 'challenge', deadline, refusal)
    hb, required = ch.header.get('heartbeat_s'), ch.header.get('auth_required')
    if isinstance(hb, bool) or not isinstance(hb, (int, float)) or not 0.05 <= hb <= 3600:
        raise ProtocolError('challenge: heartbeat_s must be 0.05..3600 s, got {!r}'.format(hb))
    if not isinstance(required, bool):
        raise ProtocolError('challenge: auth_required must be true or false, got {!r}'.format(required))
    nonce_s, nonce_w = check_nonce(ch.header.get('nonce'), peer), make_nonce()
    send_frame(sock, 'hello', {'nonce': nonce_w})
    proof = expect_preauth(sock, 'proof', deadline, refusal)
    msg = None
    if token and not check_proof(token, 'server', nonce_s, nonce_w, proof.header.get('mac')):
        msg = '{} could not prove that it holds the token (a wrong address, or the tokens differ)'.format(peer)
    elif required and not token:
        msg = '{} requires a token: pass --token or set env {} on the device'.format(peer, TOKEN_ENV)
    if msg is not None:  # nothing of ours was sent but a fresh nonce
        send_frame(sock, 'error', {'error': 'AuthRefused', 'message': msg})
        raise AuthRefused(msg)
    answer = {'info': info}
    if token:
        answer['mac'] = auth_proof(token, 'worker', nonce_s, nonce_w)
    send_frame(sock, 'proof', answer)
    expect_preauth(sock, 'welcome', deadline, refusal)
    conn = SecureChannel(sock, session_key(token, nonce_s, nonce_w), 'worker') if token else sock
    return conn, float(hb)


def answer_handshake(conn, token, heartbeat_s, deadline, peer='the worker'):
    # type: (object, Optional[str], float, float, str) -> Tuple[Dict[str, object], object]
    """The version-2 handshake on a connection this side accepted (the 'server' role: the server session, a hop
    listening for its predecessor): this side proves first.  -> (the dialer's info, the connection to use: a
    SecureChannel with a token).  AuthRefused when the dialer refuses us (.peer_message set) or fails to prove the
    token (it gets an error frame, nothing was run); ProtocolError on anything malformed."""
    nonce_s, refusal = make_nonce(), peer + ' refuses: {}'
    send_frame(conn, 'challenge', {'nonce': nonce_s, 'auth_required': token is not None, 'heartbeat_s': heartbeat_s,
                                   'version': VERSION})
    nonce_w = check_nonce(expect_preauth(conn, 'hello', deadline, refusal).header.get('nonce'), peer)
    send_frame(conn, 'proof', {'mac': auth_proof(token, 'server', nonce_s, nonce_w)} if token else {})
    proof = expect_preauth(conn, 'proof', deadline, refusal)
    if token is not None and not check_proof(token, 'worker', nonce_s, nonce_w, proof.header.get('mac')):
        send_frame(conn, 'error', {'error': 'AuthRefused', 'message': 'authentication failed: wrong or missing token'})
        raise AuthRefused('{} failed to prove the token: wrong or missing token'.format(peer))
    info = proof.header.get('info')
    if not isinstance(info, dict):
        raise ProtocolError('{}\'s proof frame needs an "info" object, got {}'.format(peer, type(info).__name__))
    send_frame(conn, 'welcome', {})
    return dict(info), (SecureChannel(conn, session_key(token, nonce_s, nonce_w), 'server') if token else conn)
