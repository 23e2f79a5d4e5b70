"""The split sweep (pipeline/split_sweep.py): the CSV's schema (seed 000's leading columns, read with the csv module),
the JSON artifact, the figure, accuracy per lambda against the unsplit model, and real mode through a worker.
Step 0 runs once on a tiny synthetic model, the LUT is modelled, step 2 runs fast."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from artifacts import load_artifact, write_artifact
from conftest import REPO, free_port
from timing import lut as L
from timing.profiles import get_profile

from test_step3 import SETS, WIDTH, _cfg  # the tiny synthetic settings step 3's tests run on

SEED_COLUMNS = ['split_layer', 'avg_compute', 'avg_transfer', 'avg_recv', 'avg_rtt']


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """Step 0 (tiny), a modelled LUT (TX2 edge, Orin Nano as the 'server') and step 2 in a results dir."""
    from pipeline import step0_prepare, step2_initial_throughput_opt
    out = tmp_path_factory.mktemp('sweep')
    torch.set_num_threads(1)
    assert step0_prepare.main(SETS[:-2] + ['--num_domains', '2', '--epochs', '1', '--threads', '1',
                                           '--results_dir', str(out)]) == 0
    cfg = _cfg(out)
    model = L.model_spec(cfg)
    client = L.modelled_side(get_profile('jetson-tx2'), model, 32, [1], side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, 32, [1], side='server')
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete',
                   L.merge(server, client, L.resolve_link(cfg.lut), 'fp32'), cfg, 'test')
    assert step2_initial_throughput_opt.main(SETS + ['--results_dir', str(out), '--steps', '60',
                                                     '--restarts', '2']) == 0
    return out


def _sweep(argv):
    from pipeline import split_sweep
    return split_sweep.main(argv)


def read_csv(path):
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    with open(path, newline='') as f:
        header = next(csv.reader(f))
    return header, rows


def test_pseudo_sweep_csv_schema_json_and_figure(results, capsys):
    from pipeline.split_sweep import columns
    from timing.flops import link_bytes
    assert _sweep(SETS + ['--results_dir', str(results), '--set', 'lut.repeats=5']) == 0
    header, rows = read_csv(results / 'split_latency_results.csv')
    assert header[:5] == SEED_COLUMNS and header == [c for c, _ in columns()]
    assert all(h in SEED_COLUMNS or h in ('split_after', 'link_bytes', 'bottleneck', 'chosen', 'best_measured',
                                          'best_predicted', 'equals_unsplit') or '_source' in h
               or h.endswith(('_ms', '_fps', '_pct')) for h in header), 'every other column carries its unit'
    obj = load_artifact(results / 'split_latency_results.json', 'split_latency_sweep',
                        {'rows': list, 'best': dict, 'columns': dict, 'link': dict})
    n = obj['num_blocks']
    assert [int(r['split_layer']) for r in rows] == list(range(n + 1)) == [r['split_layer'] for r in obj['rows']]
    step2 = load_artifact(results / 'initial_throughput_config.json', 'initial_throughput_config')
    cfg = _cfg(results)
    plan = __import__('hyper_repvgg').block_plan('A0', WIDTH, True)
    want_bytes = link_bytes(plan, 32, 10)
    for r, j in zip(rows, obj['rows']):
        lam = int(r['split_layer'])
        for c in SEED_COLUMNS[1:]:
            assert float(r[c]) == pytest.approx(float(j[c])) and float(r[c]) >= 0  # seconds, as in seed 000
        assert float(r['avg_compute']) == pytest.approx(j['edge_compute_mean_ms'] / 1e3)
        assert float(r['avg_rtt']) == pytest.approx((j['transfer_mean_ms'] + j['server_compute_mean_ms']
                                                     + j['recv_mean_ms']) / 1e3)
        assert int(r['link_bytes']) == want_bytes[lam]
        for q in ('edge_compute', 'transfer', 'server_compute', 'recv', 'rtt', 'latency'):
            assert j[f'{q}_p10_ms'] <= j[f'{q}_median_ms'] + 1e-9 <= j[f'{q}_p90_ms'] + 2e-9, (lam, q)
        assert j['throughput_p10_fps'] <= j['throughput_median_fps'] + 1e-6 <= j['throughput_p90_fps'] + 2e-6
        assert j['latency_median_ms'] == pytest.approx(j['edge_compute_median_ms'] + j['rtt_median_ms'])
        assert j['edge_source'].startswith('modelled') and j['transfer_source'].startswith('modelled')
        assert j['server_source'].startswith('measured here') if lam < n else j['server_compute_median_ms'] == 0
        assert (r['chosen'] == 'True') == (lam == step2['lam']) and r['accuracy_pct'] == ''
    # the LUT prediction at the chosen lambda is step 2's own
    chosen = obj['rows'][step2['lam']]
    assert chosen['predicted_throughput_fps'] == pytest.approx(step2['predicted']['throughput_fps'])
    assert obj['best']['chosen_lam'] == step2['lam'] and 0 <= obj['best']['best_measured_lam'] <= n
    assert sum(r['best_measured'] for r in obj['rows']) == 1
    assert len(obj['load_average_1_5_15']['before']) == 3
    for ext in ('png', 'pdf'):
        assert (cfg.path('visualization') / f'split_latency.{ext}').stat().st_size > 10_000
    out = capsys.readouterr().out
    assert 'best lambda measured' in out and 'predicted' in out


def test_pseudo_sweep_with_a_domain_carries_accuracy_equal_to_the_unsplit_model(results):
    from accuracy import pruning, training
    from data.datasets import dataset_stats
    from data.domains import domain_loader, load_partition
    assert _sweep(SETS + ['--results_dir', str(results), '--domain_id', '1', '--set', 'lut.repeats=3',
                          '--no_figure']) == 0
    obj = load_artifact(results / 'split_latency_results.json', 'split_latency_sweep')
    cfg = _cfg(results)
    model = training.load_domain_model(cfg, 1)
    step2 = load_artifact(results / 'initial_throughput_config.json', 'initial_throughput_config')
    pruning.apply_config(model, step2['gammas'])
    x, y = pruning.collect(domain_loader(cfg, load_partition(cfg.path('partition_info.json'), cfg), 1, 'test', 256,
                                         False))
    mean, std = dataset_stats(cfg)
    want = pruning.accuracy(model, x, y, mean, std)
    assert obj['all_equal_unsplit'] is True and obj['test_samples'] == len(y) and obj['domain'] == 1
    for r in obj['rows']:
        assert r['equals_unsplit'] is True and r['accuracy_pct'] == pytest.approx(want)
        assert r['unsplit_accuracy_pct'] == pytest.approx(want)
    _, rows = read_csv(results / 'split_latency_results.csv')
    assert {r['equals_unsplit'] for r in rows} == {'True'} and all(r['accuracy_pct'] for r in rows)


def test_sweep_names_a_missing_step2_artifact(tmp_path):
    from artifacts import ArtifactError
    cfg = _cfg(tmp_path)
    model = L.model_spec(cfg)
    side = L.modelled_side(get_profile('jetson-tx2'), model, 32, [1], side='edge')
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete',
                   L.merge(dict(side, side='server'), side, L.resolve_link(cfg.lut), 'fp32'), cfg, 'test')
    with pytest.raises(ArtifactError, match='initial_throughput_config.json'):
        _sweep(SETS + ['--results_dir', str(tmp_path)])


def test_stream_rates_use_windows_not_single_gaps():
    from pipeline.split_sweep import stream_rates
    per = [{'done_s': 0.01 * i, 'samples': 2} for i in range(21)]  # 2 samples every 10 ms: 200 frames/s
    r = stream_rates(per)
    assert r['median'] == pytest.approx(200) and r['p10'] == pytest.approx(200)
    per[10]['done_s'] = per[9]['done_s']  # a burst: two batches at once
    assert stream_rates(per)['median'] == pytest.approx(200)
    stalled = [{'done_s': 0.01 * i + (0.5 if i >= 15 else 0.0), 'samples': 1} for i in range(41)]  # one 0.5 s stall
    r = stream_rates(stalled)
    # the steady rate counts the stall; the windows' spread shows it is one window's (p10 may exceed the rate then)
    assert r['median'] == pytest.approx(40 / 0.9) and r['p90'] == pytest.approx(100) and r['p10'] < r['p90']


@pytest.mark.network
def test_real_sweep_through_a_worker_measures_every_lambda(results, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != 'HYPERREPVGG_TOKEN'}
    log = open(tmp_path / 'worker.log', 'w')
    worker = subprocess.Popen([sys.executable, str(REPO / 'client_worker.py'), '--port', str(port), '--device', 'cpu',
                               '--threads', '1', '--backoff_max_s', '1'], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        assert _sweep(SETS + ['--results_dir', str(results), '--mode', 'real', '--port', str(port), '--domain_id',
                              '0', '--round_trips', '3', '--no_figure', '--set', 'real.connect_timeout_s=60']) == 0
    finally:
        worker.kill()
        worker.wait(10)
        log.close()
    obj = load_artifact(results / 'split_latency_results.json', 'split_latency_sweep')
    assert obj['mode'] == 'real' and obj['all_equal_unsplit'] is True
    for r in obj['rows']:
        assert r['edge_source'].startswith('measured on the worker') and r['transfer_source'].startswith('measured')
        for q in ('edge_compute', 'transfer', 'server_compute', 'recv', 'rtt', 'latency'):
            assert math.isfinite(r[f'{q}_median_ms']), q
        assert r['rtt_median_ms'] > 0 and r['throughput_median_fps'] > 0 and r['stream']['samples'] == \
            obj['test_samples']
        assert r['latency_median_ms'] >= r['rtt_p10_ms']
    header, rows = read_csv(results / 'split_latency_results.csv')
    assert header[:5] == SEED_COLUMNS and len(rows) == obj['num_blocks'] + 1
    json.dumps(obj)
