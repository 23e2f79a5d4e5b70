"""The local stand-in device (comm/localdevice.py): client_worker.py pinned to one core, the link emulator in front
of the server port, and the closed loop of steps 1-2 in real mode through them on a tiny model."""
import os
import subprocess
import sys

import pytest

from artifacts import load_artifact
from comm.localdevice import LocalDevice, LocalDeviceError, split_cores
from conftest import REPO
from pipeline import closed_loop as CL

pytestmark = pytest.mark.network
TINY = ['--dataset', 'synthetic', '--set', 'model.input_size=16', '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25']


def test_cores_are_split_into_one_edge_core_and_the_server_rest():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        with pytest.raises(LocalDeviceError, match='needs 2 usable cores'):
            split_cores()
        return
    edge, server = split_cores()
    assert edge == cores[0] and server == set(cores[1:])
    with pytest.raises(LocalDeviceError, match='--edge_cpu 9999'):
        split_cores(9999)


@pytest.mark.slow
def test_steps_1_and_2_in_real_mode_through_the_local_device_measure_what_is_chosen(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip('the local device needs 2 cores')
    from pipeline import step1_measure_lut as step1
    from pipeline import step2_initial_throughput_opt as step2
    old = os.sched_getaffinity(0)
    with LocalDevice(port=0, rate_mbps=200, delay_ms=0.5, log_dir=tmp_path / 'logs') as dev:
        pids = [p.pid for p in dev.procs]
        worker = dev.procs[-1]
        assert os.sched_getaffinity(worker.pid) == {dev.edge_cpu}
        os.sched_setaffinity(0, dev.server_cores)  # this process is the server
        try:
            common = ['--port', str(dev.port), '--results_dir', str(tmp_path), *TINY,
                      '--set', 'real.connect_timeout_s=60']
            step1.main(['--mode', 'real', '--repeats', '3', '--warmup', '1', '--no_validate',  # chain: seconds
                        '--set', 'lut.timing=chain', '--set', 'real.probe_sizes_kb=4,256,1024', '--set', 'real.probe_repeats=2', *common])
            assert step2.main(['--mode', 'real', '--steps', '60', '--restarts', '1', '--set', 'loop.top_k=3',
                               '--set', 'loop.passes=2', '--set', 'loop.real_samples=24', *common]) == 0
        finally:
            os.sched_setaffinity(0, old)
        assert dev.alive()
    # closed: the worker and the emulator are gone
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    lut = load_artifact(tmp_path / 'hardware_lut_complete.json', 'hardware_lut_complete')
    assert lut['edge']['source'] == 'measured' and lut['edge']['metadata']['threads'] == 1
    ov = lut['runtime_overhead']  # step 1 streamed 5 splits through the worker and measured the runtime's cost
    assert ov['kind'] == 'measured' and [c['lam'] for c in ov['configurations']] == [3, 6, 11, 16, 19]
    assert set(ov['from'].values()) <= {'period', 'stage'} and all(c['period_ms'] > 0 for c in ov['configurations'])
    assert ov['passes'] == CL.CALIBRATION_PASSES == 6  # each split streamed 6 times, read at loop.pace_quantile
    assert ov['edge_ms'] >= 0 and ov['server_ms'] >= 0 and all(c['measured']['throughput_fps'] > 0
                                                               for c in ov['configurations'])
    obj = load_artifact(tmp_path / 'initial_throughput_config.json', 'initial_throughput_config')
    loop = obj['closed_loop']
    assert loop['report']['mode'] == 'real' and 'worker' in loop['report']['how']
    roles = {x for r in loop['measurements'] for x in r['roles']}
    assert {'chosen', 'edge_only', 'server_only', 'best_plain_split', 'top1', 'top2', 'top3'} <= roles
    for r in loop['measurements']:
        m = r['measured']
        # 2 passes; 2 + its fresh passes for every configuration the race measured again (at most loop.confirm_passes)
        assert m['kind'] == 'measured' and m['throughput_fps'] > 0
        assert (2 < len(m['passes_fps']) <= 2 + loop['settings']['confirm_passes']) if m.get('confirmed') else \
            len(m['passes_fps']) == 2
        assert m['p10_fps'] <= m['p90_fps'] and m['worker_threads'] == 1  # the LUT's edge thread count
    assert 0 < loop['report']['chosen_over_best_measured_pct'] <= 100 + 1e-9
    chosen = next(r for r in loop['measurements'] if 'chosen' in r['roles'])
    assert (chosen['gammas'], chosen['lam']) == (obj['gammas'], obj['lam'])  # what step 2 hands on is the choice
    if loop['adoption']['adopted']:
        assert obj['optimizer_choice']['lam'] == loop['report']['predicted_choice']['lam']
    assert loop['report']['gain_over_best_plain_split']['measured_x'] > 0
    assert loop['decision']['band_pct'] >= 0


def test_cli_runs_the_command_on_the_server_cores_and_returns_its_status(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip('the local device needs 2 cores')
    code = 'import os, sys; print(sorted(os.sched_getaffinity(0)), int(sys.argv[1]) > 0); sys.exit(7)'
    out = subprocess.run([sys.executable, '-m', 'comm.localdevice', '--log_dir', str(tmp_path), '--',
                          sys.executable, '-c', code, '{port}'], cwd=str(REPO), capture_output=True, text=True,
                         timeout=120)
    edge, server = split_cores()
    assert out.returncode == 7 and out.stdout.strip() == f'{sorted(server)} True'  # {port} was substituted
    assert 'local stand-in device' in out.stderr
    assert (tmp_path / 'worker.log').is_file() and (tmp_path / 'linkemu.log').is_file()
