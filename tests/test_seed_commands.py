"""The seed's commands (seed 004) typed from the repository root: step1_measure_lut.py --mode server|client|merge
(client under Python 3.6 + torch 1.10 with only the device-side files), step2_initial_throughput_opt.py --lut_file,
step_3_joint.py --domain_id 3 --mode real, step5_visualize_results.py; and the README's map of the seed's config
constants."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SMALL = ['--dataset', 'synthetic', '--input_size', '16', '--repeats', '2', '--warmup', '1',
         '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'lut.max_entry_s=0.05']
SEED_SCRIPTS = ('step1_measure_lut.py', 'step2_initial_throughput_opt.py', 'step_3_joint.py',
                'step5_visualize_results.py')


def run(args, python=sys.executable, cwd=REPO, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'HYPERREPVGG_TOKEN')}
    return subprocess.run([str(python)] + [str(a) for a in args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize('script', SEED_SCRIPTS)
def test_seed_script_runs_from_the_repository_root(script):
    proc = run([script, '--help'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('usage: ' + script) and '--results_dir' in proc.stdout


def test_step_3_joint_as_typed_reaches_step3(tmp_path):
    proc = run(['step_3_joint.py', '--domain_id', '3', '--mode', 'real', '--results_dir', tmp_path])
    assert proc.returncode == 2 and 'hardware_lut_complete.json' in proc.stderr and 'Traceback' not in proc.stderr


def test_step1_server_client_on_python36_merge_then_step2_and_step5(py36_python, tmp_path):
    res = tmp_path / 'results'
    proc = run(['step1_measure_lut.py', '--mode', 'server', '--no_validate', '--results_dir', res] + SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the device: only the device-side files and the root entry point, Python 3.6 + torch 1.10, no config.py
    dev = tmp_path / 'tx2'
    files = device_side_files()
    for f in files:
        (dev / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, dev / f)
    (dev / 'results').mkdir()
    shutil.copy(res / 'lut_server.json', dev / 'results' / 'lut_server.json')
    assert not (dev / 'config.py').exists()
    proc = run(['step1_measure_lut.py', '--mode', 'client', '--device', 'cpu', '--no_progress'], python=py36_python,
               cwd=dev)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'copy it to the server' in proc.stdout
    edge = json.loads((dev / 'results' / 'lut_edge.json').read_text())
    assert edge['metadata']['python_version'].startswith('3.6') and edge['metadata']['torch_version'].startswith('1.10')
    assert (dev / 'results' / 'lut_edge.json').stat().st_mode & 0o044 == 0o044
    server = json.loads((res / 'lut_server.json').read_text())
    assert edge['model'] == server['model'] and set(edge['entries']) == set(server['entries'])
    for key in ('repeats', 'warmup', 'batch_sizes', 'input_size', 'timing', 'seed'):
        assert edge['settings'][key] == server['settings'][key], key
    shutil.copy(dev / 'results' / 'lut_edge.json', res / 'lut_edge.json')
    proc = run(['step1_measure_lut.py', '--mode', 'merge', '--results_dir', res] + SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lut = json.loads((res / 'hardware_lut_complete.json').read_text())
    assert lut['edge']['source'] == 'measured' and lut['edge']['metadata']['python_version'].startswith('3.6')
    proc = run(['step2_initial_throughput_opt.py', '--lut_file', res / 'hardware_lut_complete.json', '--results_dir',
                res, '--dataset', 'synthetic', '--set', 'model.input_size=16', '--steps', '30', '--restarts', '1',
                '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    step2 = json.loads((res / 'initial_throughput_config.json').read_text())
    assert step2['lut_file'] == str(res / 'hardware_lut_complete.json') and step2['edge']['source'] == 'measured'
    proc = run(['step5_visualize_results.py', '--results_dir', res, '--formats', 'png'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (res / 'visualization' / 'summary.md').is_file() and (res / 'visualization' / 'stage_times.png').is_file()


def test_client_mode_names_a_missing_server_lut(tmp_path):
    proc = run([REPO / 'step1_measure_lut.py', '--mode', 'client', '--results_dir', tmp_path / 'r'], cwd=tmp_path)
    assert proc.returncode == 2 and 'lut_server.json' in proc.stderr and '--mode server' in proc.stderr


def device_side_files():
    from comm.bundle import DEVICE_FILES
    return list(DEVICE_FILES)


SEED_CONSTANTS = ('MODEL_NAME', 'WEIGHT_PATH_SERVER', 'SERVER_IP', 'PORT_MAIN', 'MAX_PRUNING_ROUNDS',
                  'THROUGHPUT_OPTIM_STEPS')


def test_readme_maps_every_seed_config_constant_to_a_config_key_and_its_default():
    from config import Config
    text = (REPO / 'README.md').read_text()
    cfg = Config().to_dict()
    for const in SEED_CONSTANTS:
        m = re.search(r'^\| `' + const + r'` \| `([a-z_.]+)`[^|]*\| `([^`]*)`', text, re.M)
        assert m, f'README: no table row for {const}'
        key, default = m.groups()
        section, _, name = key.partition('.')
        value = cfg[section][name] if name else cfg[section]
        assert default == str(value), f'{const}: README says {default}, config.py has {value!r}'
