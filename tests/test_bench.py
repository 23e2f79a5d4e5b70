"""bench/: bench_lut.py --quick end to end (tiny model, a few seconds), the run_pipeline.sh log parser and the
generated bench README."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_pipeline, common

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def lut_result(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'bench_lut.py'), '--quick', '--out_dir', str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / 'lut_fidelity.json').read_text()), proc.stdout


def test_bench_lut_quick_fields(lut_result):
    out, obj, stdout = lut_result
    assert obj['kind'] == 'bench_lut_fidelity' and obj['quick'] is True and 'bench_lut.py' in obj['command']
    m = obj['machine']
    assert m['cpu_cores'] >= 1 and m['cpu_model'] and m['torch_version'].startswith('2.')
    (row,) = obj['models'].values()
    assert row['num_blocks'] == 22 and row['batch'] == 1 and row['configurations'] == 4
    assert len(row['records']) == 4 and row['lut_entries'] > 22
    assert 0.0 <= row['share_within_10pct'] <= 1.0 and row['median_abs_error_pct'] >= 0.0
    assert row['spearman_rho'] is None or -1.0 <= row['spearman_rho'] <= 1.0
    errs = sorted(abs(r['error_pct']['total']) for r in row['records'])
    assert row['median_abs_error_pct'] == pytest.approx((errs[1] + errs[2]) / 2)
    assert row['share_within_10pct'] == pytest.approx(sum(e <= 10.0 for e in errs) / 4)
    assert [h[0] for h in obj['headline']][0].endswith('configurations within +/-10 %')
    assert obj['tables'][0]['columns'][0] == 'model' and len(obj['tables'][0]['rows']) == 1
    assert 'Spearman rho' in stdout


def test_report_readme_from_results(lut_result):
    out, obj, _ = lut_result
    results = common.collect(out)
    text = common.readme_text(results, '2000-01-01 00:00 UTC')
    assert 'Generated 2000-01-01 00:00 UTC' in text and obj['machine']['cpu_model'] in text
    assert '| lut_fidelity (quick) |' in text and obj['tables'][0]['title'] in text


def test_report_rejects_non_bench_file(tmp_path):
    (tmp_path / 'x.json').write_text('{"a": 1}')
    with pytest.raises(common.UserError, match='x.json'):
        common.collect(tmp_path)


def test_bench_lut_unknown_model_is_named(tmp_path):
    from bench import bench_lut
    with pytest.raises(common.UserError, match='b3_224'):
        bench_lut.main(['--models', 'b9', '--out_dir', str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_parse_pipeline_log():
    log = '\n'.join(['== step 0 (data, base model, hyper-weights): pipeline/step0_prepare.py',
                     '== step 0 (data, base model, hyper-weights) done in 131 s',
                     '== step 1: reusing results/hardware_lut_complete.json (delete it, or --fresh, to measure again)',
                     '== step 2 (throughput) done in 7 s',
                     'run_pipeline.sh: step 3 (joint, per domain) failed (see the message above); finished work '
                     'is kept, rerun to resume'])
    steps = bench_pipeline.parse_log(log)
    assert steps['0'] == {'description': 'data, base model, hyper-weights', 'status': 'done', 'wall_s': 131.0}
    assert steps['1']['status'] == 'reused' and steps['2']['wall_s'] == 7.0 and steps['3']['status'] == 'failed'
    rows = bench_pipeline.step_rows(steps)
    assert rows[4] == ['step 4', '', None, 'not reached']
