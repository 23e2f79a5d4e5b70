"""A local stand-in for the edge device: the whole real-mode closed loop on one machine, without a TX2.

    python -m comm.localdevice [--port 0] [--rate_mbps 100] [--delay_ms 0.5] [--edge_cpu N] -- COMMAND ...
    bash run_pipeline.sh --local_device          # the same around the whole pipeline, in real mode

It starts client_worker.py pinned to one core (`--edge_cpu`, default the first this process may use; one torch
thread, device cpu), the link emulator (comm/linkemu.py: rate and one-way delay per direction) between the worker
and the server port, and then COMMAND pinned to the other cores (the "server"); `{port}` in COMMAND is replaced
by the server port (`--port 0`: a free one).  When COMMAND ends (or fails, or is interrupted) the worker and the
emulator are stopped; their logs are in `--log_dir`.  The exit status is COMMAND's.

What it stands in for, and what not: the edge is one core of this CPU, so its LUT and its runs are measured (not a
device profile's model), and the link is rate-limited and delayed in user space.  The figures are those of this
machine, shared by whatever else runs on it: read them with the load average the steps record.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Set

from errors import UserError

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger('localdevice')


class LocalDeviceError(UserError):
    """The machine cannot host the stand-in (fewer than 2 usable cores, a bad core number) or it failed to start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def split_cores(edge_cpu: Optional[int] = None) -> tuple:
    """(edge core, set of server cores) out of the cores this process may run on; LocalDeviceError with fewer than
    two or an edge core outside them."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise LocalDeviceError(f'the local device needs 2 usable cores (one for the worker, one for the server); '
                               f'this process may use {cores}')
    edge = cores[0] if edge_cpu is None else int(edge_cpu)
    if edge not in cores:
        raise LocalDeviceError(f'--edge_cpu {edge}: not one of the usable cores {cores}')
    return edge, set(cores) - {edge}


def _pinned(cores: Set[int]):
    def pin() -> None:
        os.sched_setaffinity(0, cores)
    return pin


class LocalDevice:
    """Worker on `edge_cpu` + link emulator in front of server port `port`; a context manager (start / close).

    `server_cores` is where the caller should run the server (run() pins COMMAND there)."""

    def __init__(self, port: int = 0, rate_mbps: float = 100.0, delay_ms: float = 0.5, edge_cpu: Optional[int] = None,
                 log_dir: Optional[Path] = None, python: str = sys.executable, token: Optional[str] = None) -> None:
        if not rate_mbps > 0 or not delay_ms >= 0:
            raise LocalDeviceError(f'--rate_mbps must be > 0 and --delay_ms >= 0, got {rate_mbps} and {delay_ms}')
        self.edge_cpu, self.server_cores = split_cores(edge_cpu)
        self.port = int(port) or free_port()
        self.emu_port = free_port()
        self.rate_mbps, self.delay_ms = float(rate_mbps), float(delay_ms)
        self.log_dir = Path(log_dir or REPO / 'results' / 'local_device')
        self.python, self.token = python, token
        self.procs: List[subprocess.Popen] = []

    def _start(self, args: Sequence[str], cores: Set[int], log_name: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.token is not None:
            env['HYPERREPVGG_TOKEN'] = self.token
        with open(self.log_dir / log_name, 'w') as log:
            proc = subprocess.Popen([self.python, *args], cwd=str(REPO), env=env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_pinned(cores))
        self.procs.append(proc)
        return proc

    def start(self) -> 'LocalDevice':
        self._start(['-m', 'comm.linkemu', '--listen', f'127.0.0.1:{self.emu_port}', '--target',
                     f'127.0.0.1:{self.port}', '--rate_mbps', str(self.rate_mbps), '--delay_ms', str(self.delay_ms)],
                    self.server_cores, 'linkemu.log')
        deadline = time.monotonic() + 30
        while True:  # the worker dials the emulator: wait until it listens
            try:
                socket.create_connection(('127.0.0.1', self.emu_port), timeout=1).close()
                break
            except OSError:
                if self.procs[0].poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise LocalDeviceError('the link emulator did not start: '
                                           + (self.log_dir / 'linkemu.log').read_text()[-500:]) from None
                time.sleep(0.1)
        self._start([str(REPO / 'client_worker.py'), '--port', str(self.emu_port), '--device', 'cpu', '--threads',
                     '1', '--backoff_max_s', '1'], {self.edge_cpu}, 'worker.log')
        return self

    def __enter__(self) -> 'LocalDevice':
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs = []

    def describe(self) -> str:
        return (f'local stand-in device: client_worker.py on core {self.edge_cpu} (1 thread), link emulator '
                f'{self.rate_mbps:g} Mbit/s, {self.delay_ms:g} ms one way, server port {self.port} on cores '
                f'{sorted(self.server_cores)}; logs in {self.log_dir}')

    def run(self, command: Sequence[str]) -> int:
        """Run `command` (with {port} replaced) pinned to the server cores; its exit status."""
        cmd = [c.replace('{port}', str(self.port)) for c in command]
        return subprocess.call(cmd, cwd=str(REPO), preexec_fn=_pinned(self.server_cores))


class LocalChain:
    """A chain of devices on this machine (comm.session.run_chain over loopback): `workers` client_worker.py
    processes, hop k with a ServerSession of its own, every hop after the first listening for its predecessor on a
    free loopback port, and a link emulator (comm/linkemu.py, in this process) on each data link: rates_mbps[k] is
    the link from hop k to hop k+1, the last one from the last worker hop to this server (None: that link direct).
    .hops is run_chain's argument, .hellos the workers' infos, .logs their log files; a context manager (close()
    stops the workers and emulators and closes the sessions).  `pythons` gives each hop's interpreter."""

    def __init__(self, workers: int = 2, rates_mbps: Optional[Sequence[Optional[float]]] = None,
                 delay_ms: float = 2.0, token: Optional[str] = None, pythons: Optional[Sequence[str]] = None,
                 log_dir: Optional[Path] = None, io_timeout_s: float = 60.0, connect_timeout_s: float = 90.0,
                 handshake_timeout_s: float = 10.0) -> None:
        from comm.linkemu import LinkEmulator
        from comm.session import Hop, ServerSession
        rates = list(rates_mbps) if rates_mbps is not None else [None] * workers
        pythons = list(pythons) if pythons is not None else [sys.executable] * workers
        if workers < 1 or len(rates) != workers or len(pythons) != workers:
            raise LocalDeviceError(f'a local chain of {workers} worker hops needs {workers} link rates (hop k -> '
                                   f'k+1, the last -> this server) and interpreters, got {len(rates)} and '
                                   f'{len(pythons)}')
        self.log_dir = Path(log_dir or REPO / 'results' / 'local_chain')
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [self.log_dir / f'hop{k}.log' for k in range(workers)]
        self.sessions = [ServerSession(port=0, token=token, connect_timeout_s=connect_timeout_s,
                                       io_timeout_s=io_timeout_s) for _ in range(workers)]
        self.emus: List[LinkEmulator] = []
        self.procs: List[subprocess.Popen] = []
        self.hellos: List[dict] = [{}] * workers
        env = {k: v for k, v in os.environ.items() if k != 'HYPERREPVGG_TOKEN'}
        if token is not None:
            env['HYPERREPVGG_TOKEN'] = token
        next_addr: List[Optional[str]] = [None] * workers
        try:
            target = None  # where the hop started next sends its output: None = its session
            for k in reversed(range(workers)):  # the last hop first: each hop's --listen port is known before
                dest = target if target is not None else self.sessions[k].port  # its data link's far end
                if rates[k] is not None:
                    self.emus.append(LinkEmulator(('127.0.0.1', 0), ('127.0.0.1', dest), rates[k], delay_ms).start())
                    dest = self.emus[-1].port
                control = dest  # the last worker hop's data link is its session
                if target is not None:
                    next_addr[k], control = f'127.0.0.1:{dest}', self.sessions[k].port
                cmd = [pythons[k], str(REPO / 'client_worker.py'), '--port', str(control), '--device', 'cpu',
                       '--threads', '1', '--backoff_max_s', '1', '--connect_timeout_s', str(handshake_timeout_s)]
                if k > 0:
                    cmd += ['--listen', '127.0.0.1:0']
                with open(self.logs[k], 'w') as out:
                    self.procs.append(subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=out,
                                                       stderr=subprocess.STDOUT))
                self.hellos[k] = self.sessions[k].accept()
                target = self.hellos[k].get('listen_port')
            self.hops = [Hop(self.sessions[k], next_addr[k]) for k in range(workers)]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> 'LocalChain':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for e in self.emus:
            e.close()
        self.procs, self.emus = [], []


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--port', type=int, default=0, help='server port the session listens on; 0 = a free one, '
                   'substituted for {port} in COMMAND (default: 0)')
    p.add_argument('--rate_mbps', type=float, default=100.0, help='emulated link rate per direction in Mbit/s '
                   '(default: 100)')
    p.add_argument('--delay_ms', type=float, default=0.5, help='emulated one-way delay in ms (default: 0.5)')
    p.add_argument('--edge_cpu', type=int, default=None, help='core of the worker (default: the first usable one); '
                   'COMMAND gets the others')
    p.add_argument('--log_dir', default=None, help='where worker.log and linkemu.log go (default: '
                   'results/local_device)')
    p.add_argument('command', nargs=argparse.REMAINDER, help='the server-side command, after --')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='localdevice: %(message)s')
    cmd = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not cmd:
        p.error('give the server-side command after --, e.g. -- python pipeline/step2_initial_throughput_opt.py '
                '--mode real --port {port}')
    def stop(signum: int, frame: object) -> None:  # a SIGTERM stops COMMAND, the worker and the emulator too
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    try:
        dev = LocalDevice(args.port, args.rate_mbps, args.delay_ms, args.edge_cpu,
                          Path(args.log_dir) if args.log_dir else None)
        with dev:
            log.info('%s', dev.describe())
            return dev.run(cmd)
    except UserError as e:
        log.error('error: %s', e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
