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

Message types: challenge (server -> worker, first frame: nonce, whether a token is required), hello (worker:
versions, device, HMAC of the nonce), welcome (server: its HMAC of the worker's nonce), request (server: one
command), reply (worker: its result), error (either side: what failed), features (worker: one batch of a
pipelined run), heartbeat (worker, while a long command runs), bye (server: session over).

Authentication (optional): both sides hold a shared token (a flag or env HYPERREPVGG_TOKEN).  The worker proves
it knows the token by answering HMAC-SHA256(token, role + nonce) of the server's random nonce, and the server
proves the same for the worker's nonce; a wrong answer is refused before any command runs.
"""
import hashlib
import hmac
import json
import os
import socket
import struct
from collections import OrderedDict
from typing import Dict, NamedTuple

import numpy as np

MAGIC = b'HRVG'
VERSION = 1
FIXED = struct.Struct('!4sBBHIQ')  # magic, version, type, flags, json length, payload length
ALIGN = 8
TOKEN_ENV = 'HYPERREPVGG_TOKEN'

MESSAGE_TYPES = OrderedDict([('challenge', 1), ('hello', 2), ('welcome', 3), ('request', 4), ('reply', 5),
                             ('error', 6), ('features', 7), ('heartbeat', 8), ('bye', 9)])
_TYPE_NAMES = {v: k for k, v in MESSAGE_TYPES.items()}
DTYPES = ('uint8', 'int8', 'int16', 'int32', 'int64', 'float16', 'float32', 'float64', 'bool')
_CHUNK = 1 << 20  # bytes per recv call


class ProtocolError(Exception):
    """A malformed, oversized or truncated frame, a closed connection or a timeout; the message says which."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (cleanly between frames, or in the middle of one)."""


class ProtocolTimeout(ProtocolError):
    """No data arrived within the socket's timeout."""


class Limits(NamedTuple):
    max_frame_bytes: int = 512 * 2 ** 20  # fixed header + JSON + payload
    max_header_bytes: int = 16 * 2 ** 20  # the JSON header alone
    max_tensors: int = 4096  # tensors in one frame
    max_dims: int = 8  # dimensions of one tensor


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


def encode_frame(kind, header=None, tensors=None):
    # type: (str, Optional[Dict[str, object]], Optional[Sequence[Tuple[str, object]]]) -> List[object]
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
    js = json.dumps(header, separators=(',', ':')).encode('utf-8')
    for a in arrays:
        pad = _align(offset) - offset
        if pad:
            parts.append(b'\0' * pad)
        parts.append(memoryview(a.reshape(-1).view(np.uint8)))
        offset += pad + a.nbytes
    parts.insert(0, FIXED.pack(MAGIC, VERSION, MESSAGE_TYPES[kind], 0, len(js), offset) + js)
    return parts


def frame_size(parts):
    # type: (Sequence[object]) -> int
    return sum(len(memoryview(p).cast('B')) for p in parts)


def send_frame(sock, kind, header=None, tensors=None, lock=None):
    # type: (object, str, Optional[Dict[str, object]], object, object) -> int
    """Send one frame on `sock` (a socket or a paramiko Channel); returns the bytes sent.

    `lock` (a threading.Lock) serializes frames of several threads on one connection.
    """
    parts = encode_frame(kind, header, tensors)
    total = 0
    try:
        if lock is not None:
            lock.acquire()
        for p in parts:
            if len(p):
                sock.sendall(p)
                total += len(memoryview(p).cast('B'))
    except socket.timeout:
        raise ProtocolTimeout('sending a {} frame timed out after {} s'.format(kind, _timeout_of(sock)))
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


def _read_exact(sock, n, what, started):
    # type: (object, int, str, bool) -> bytearray
    """Exactly n bytes from sock; ConnectionClosed on EOF, ProtocolTimeout on a socket timeout."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    recv_into = getattr(sock, 'recv_into', None)
    try:
        while got < n:
            if recv_into is not None:
                k = recv_into(view[got:])
            else:
                data = sock.recv(min(n - got, _CHUNK))
                k = len(data)
                view[got:got + k] = data
            if k == 0:
                if got == 0 and not started:
                    raise ConnectionClosed('peer closed the connection')
                raise ConnectionClosed('connection closed after {} of {} bytes of the {}'.format(got, n, what))
            got += k
    except socket.timeout:
        raise ProtocolTimeout('no data from the peer for {} s while reading the {} ({} of {} bytes)'.format(
            _timeout_of(sock), what, got, n))
    except ConnectionClosed:
        raise
    except (OSError, EOFError) as e:
        raise ConnectionClosed('connection lost while reading the {} ({})'.format(what, e))
    return buf


def parse_fixed(raw, limits):
    # type: (bytes, Limits) -> Tuple[str, int, int]
    """(message type name, JSON length, payload length) of a 20-byte fixed header, checked against limits."""
    magic, version, mtype, flags, hlen, plen = FIXED.unpack(bytes(raw))
    if magic != MAGIC:
        raise ProtocolError('bad magic {!r} (expected {!r}): not a HyperRepVGG frame'.format(magic, MAGIC))
    if version != VERSION:
        raise ProtocolError('unsupported protocol version {} (this side speaks {})'.format(version, VERSION))
    if mtype not in _TYPE_NAMES:
        raise ProtocolError('unknown message type {}'.format(mtype))
    if flags != 0:
        raise ProtocolError('unknown flags 0x{:04x}'.format(flags))
    if hlen > limits.max_header_bytes:
        raise ProtocolError('JSON header of {} bytes exceeds the limit of {} bytes'.format(hlen, limits.max_header_bytes))
    if FIXED.size + hlen + plen > limits.max_frame_bytes:
        raise ProtocolError('frame of {} bytes exceeds the limit of {} bytes (max_frame)'.format(
            FIXED.size + hlen + plen, limits.max_frame_bytes))
    return _TYPE_NAMES[mtype], hlen, plen


def parse_header(raw, plen, limits):
    # type: (bytes, int, Limits) -> Tuple[Dict[str, object], List[Tuple[str, str, Tuple[int, ...], int]]]
    """(header without "tensors", [(name, dtype, shape, offset)]) of a JSON header; the layout must fill plen."""
    try:
        header = json.loads(bytes(raw).decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError('JSON header is not valid UTF-8 JSON ({})'.format(e))
    if not isinstance(header, dict):
        raise ProtocolError('JSON header must be an object, got {}'.format(type(header).__name__))
    described = header.pop('tensors', [])
    if not isinstance(described, list) or len(described) > limits.max_tensors:
        raise ProtocolError('header field "tensors" must be a list of at most {} entries'.format(limits.max_tensors))
    layout, names, offset = [], set(), 0
    for i, d in enumerate(described):
        where = 'header field "tensors[{}]"'.format(i)
        if not isinstance(d, dict) or not isinstance(d.get('name'), str) or d.get('dtype') not in DTYPES:
            raise ProtocolError('{} needs a string "name" and a "dtype" in {}'.format(where, ', '.join(DTYPES)))
        shape = d.get('shape')
        if not isinstance(shape, list) or len(shape) > limits.max_dims or \
                not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ProtocolError('{} "shape" must list at most {} integers >= 0'.format(where, limits.max_dims))
        if d['name'] in names:
            raise ProtocolError('{}: duplicate tensor name {!r}'.format(where, d['name']))
        names.add(d['name'])
        count = 1
        for s in shape:
            count *= s
            if count > limits.max_frame_bytes:
                raise ProtocolError('{}: shape {} exceeds the frame limit'.format(where, shape))
        offset = _align(offset)
        layout.append((d['name'], d['dtype'], tuple(shape), offset))
        offset += count * np.dtype(d['dtype']).itemsize
        if offset > plen:
            raise ProtocolError('{}: tensors need more than the {} payload bytes the frame has'.format(where, plen))
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
        out[name] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
    return out


def recv_frame(sock, limits=Limits()):
    # type: (object, Limits) -> Frame
    """Read one complete frame from `sock` (a socket, a paramiko Channel or anything with recv)."""
    fixed = _read_exact(sock, FIXED.size, 'fixed frame header', False)
    kind, hlen, plen = parse_fixed(fixed, limits)
    header, layout = parse_header(_read_exact(sock, hlen, 'JSON header', True), plen, limits)
    payload = _read_exact(sock, plen, 'payload', True) if plen else bytearray()
    return Frame(kind, header, _tensors(payload, layout))


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


def auth_mac(token, nonce, role):
    # type: (str, str, str) -> str
    """HMAC-SHA256 of `role` + nonce under the token (role 'worker' or 'server', so answers cannot be replayed
    in the other direction), hex."""
    return hmac.new(token.encode('utf-8'), (role + ':' + nonce).encode('ascii'), hashlib.sha256).hexdigest()


def check_mac(token, nonce, role, mac):
    # type: (str, str, str, object) -> bool
    if not isinstance(mac, str):
        return False
    try:
        return hmac.compare_digest(auth_mac(token, nonce, role), mac)
    except TypeError:  # non-ASCII text
        return False
