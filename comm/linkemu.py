"""A link emulator for tests and demos, no root needed: a loopback TCP relay that adds one-way delay and limits the
rate in both directions.

    python -m comm.linkemu --listen 127.0.0.1:6007 --target 127.0.0.1:6006 --rate_mbps 20 --delay_ms 10

Each direction of each relayed connection is a reader thread and a writer thread.  The reader takes up to
`piece_bytes` at a time from the source and stamps it; the writer passes the pieces through a token bucket
(rate `rate_mbps`, bucket size one piece: a piece leaves the bottleneck at max(arrival, previous departure) +
size / rate) and delivers each piece `delay_ms` after it left the bottleneck.  The queue between them holds the
bandwidth-delay product plus `buffer_kb`, so a sender that outruns the link is back-pressured by TCP as on a real
link.  Loopback socket buffers add a little extra buffering; the rate and delay hold on average.
"""
from __future__ import annotations

import argparse
import logging
import queue
import socket
import sys
import threading
import time
from typing import List, Optional, Sequence, Tuple

from errors import UserError

log = logging.getLogger(__name__)


class LinkEmuError(UserError):
    """A bad emulator address, rate or delay."""


def parse_addr(text: str, flag: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(':')
    if not sep or not host or not port.isdigit():
        raise LinkEmuError(f'{flag}: expected HOST:PORT, got {text!r}')
    return host, int(port)


class _Direction:
    """One direction of one connection: src -> (token bucket, delay) -> dst."""

    def __init__(self, src: socket.socket, dst: socket.socket, rate_bps: float, delay_s: float, piece: int,
                 buffer_bytes: int, closed: threading.Event) -> None:
        self.src, self.dst, self.rate, self.delay, self.piece = src, dst, rate_bps, delay_s, piece
        bdp = rate_bps / 8 * delay_s
        self.q: 'queue.Queue[Optional[Tuple[float, bytes]]]' = queue.Queue(maxsize=max(4, int((bdp + buffer_bytes)
                                                                                              // piece) + 1))
        self.closed = closed
        self.threads = [threading.Thread(target=self._read, daemon=True), threading.Thread(target=self._write,
                                                                                           daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _put(self, item: Optional[Tuple[float, bytes]]) -> bool:
        while not self.closed.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.src.recv(self.piece)
                if not data:
                    break
                if not self._put((time.monotonic(), data)):
                    return
        except OSError:
            pass
        self._put(None)

    def _write(self) -> None:
        depart = 0.0
        try:
            while not self.closed.is_set():
                try:
                    item = self.q.get(timeout=0.2)
                except queue.Empty:
                    continue
                if item is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                arrival, data = item
                depart = max(arrival, depart) + len(data) * 8 / self.rate
                wait = depart + self.delay - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
        except OSError:
            self.closed.set()


class LinkEmulator:
    """Relay listen -> target with `rate_mbps` and `delay_ms` per direction; a context manager (start/close).

    `port` is the bound listening port (listen port 0 picks a free one)."""

    def __init__(self, listen: Tuple[str, int], target: Tuple[str, int], rate_mbps: float, delay_ms: float = 0.0,
                 piece_bytes: int = 4096, buffer_kb: float = 64.0) -> None:
        if not rate_mbps > 0:
            raise LinkEmuError(f'--rate_mbps: expected a positive number, got {rate_mbps}')
        if not delay_ms >= 0:
            raise LinkEmuError(f'--delay_ms: expected a number >= 0, got {delay_ms}')
        self.target, self.rate_bps, self.delay_s = target, rate_mbps * 1e6, delay_ms / 1e3
        self.piece, self.buffer_bytes = int(piece_bytes), int(buffer_kb * 1024)
        try:
            self.listener = socket.create_server(listen)
        except OSError as e:
            raise LinkEmuError(f'--listen {listen[0]}:{listen[1]}: {e}') from None
        self.port: int = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.conns: List[Tuple[socket.socket, socket.socket, threading.Event]] = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> 'LinkEmulator':
        self.thread.start()
        return self

    def __enter__(self) -> 'LinkEmulator':
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                a, addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=10)
            except OSError as e:
                log.warning('target %s:%d not reachable (%s); dropping the connection from %s', *self.target, e, addr)
                a.close()
                continue
            b.settimeout(None)
            a.settimeout(None)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            closed = threading.Event()
            self.conns.append((a, b, closed))
            for src, dst in ((a, b), (b, a)):
                _Direction(src, dst, self.rate_bps, self.delay_s, self.piece, self.buffer_bytes, closed).start()
            log.info('relaying %s -> %s:%d', addr, *self.target)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for a, b, closed in self.conns:
            closed.set()
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
        if self.thread.is_alive():
            self.thread.join(2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--listen', default='127.0.0.1:6007', help='address to listen on, HOST:PORT (default: 127.0.0.1:6007)')
    p.add_argument('--target', default='127.0.0.1:6006', help='address to relay to, HOST:PORT (default: 127.0.0.1:6006)')
    p.add_argument('--rate_mbps', type=float, default=20.0, help='rate per direction in Mbit/s (default: 20)')
    p.add_argument('--delay_ms', type=float, default=10.0, help='one-way delay per direction in ms (default: 10)')
    p.add_argument('--buffer_kb', type=float, default=64.0, help='queue beyond the bandwidth-delay product in KB '
                   '(default: 64)')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(asctime)s linkemu %(message)s')
    try:
        emu = LinkEmulator(parse_addr(args.listen, '--listen'), parse_addr(args.target, '--target'), args.rate_mbps,
                           args.delay_ms, buffer_kb=args.buffer_kb)
    except UserError as e:
        log.error('error: %s', e)
        return 2
    log.info('listening on %s:%d -> %s, %g Mbit/s, %g ms one way, each direction', args.listen.rpartition(':')[0],
             emu.port, args.target, args.rate_mbps, args.delay_ms)
    with emu:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == '__main__':
    sys.exit(main())
