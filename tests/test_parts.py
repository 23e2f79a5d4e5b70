"""Part files (comm/parts.py, pipeline/export_parts.py): the deployed edge and server parts on disk, pickle-free;
the edge file loads under Python 3.6 + torch 1.10 without the full model and equals the model's first lambda
blocks; the memory probe; the export command's manifest."""
import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import hyper_repvgg as H
from comm import parts
from conftest import REPO, pruned_a0

WIDTH = (0.25, 0.25, 0.25, 0.5)


@pytest.fixture(scope='module')
def model():
    return pruned_a0(WIDTH, layouts=((2, 13), (4, 10), (6, 9)))


def test_edge_and_server_parts_chain_to_the_full_model(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        for lam in (0, 1, 7, model.num_blocks - 1, model.num_blocks):
            edge, em = parts.load_part(parts.part_bytes(model, lam, 'edge', 64))
            server, sm = parts.load_part(parts.part_bytes(model, lam, 'server', 64))
            assert len(edge.blocks) == lam and len(server.blocks) == model.num_blocks - lam
            assert all(isinstance(b, H.DeployedBlock) for b in list(edge.blocks) + list(server.blocks))
            assert edge.has_head == (lam == model.num_blocks) and server.has_head == (lam < model.num_blocks)
            assert em['blocks'] == [{'index': k, 'name': model.plan[k].name,
                                                             'layout': model.layouts()[k],
                                                             'kinds': [H.part_kind(p) for p in
                                                                       H.LAYOUTS[model.layouts()[k]].parts]}
                                                            for k in range(lam)]
            h = edge(x)  # at lambda N the edge part ends with the classifier, as deployed
            want = full if lam == model.num_blocks else model.split(lam)[0](x)
            torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(server(h), full, rtol=1e-4, atol=1e-4)


def test_a_part_file_never_unpickles_and_names_what_is_wrong(model, tmp_path):
    good = parts.part_bytes(model, 5, 'edge', 64)
    arrays = dict(np.load(io.BytesIO(good), allow_pickle=False))
    bad = tmp_path / 'object.npz'
    np.savez(bad, **dict(arrays, extra=np.array([{'a': 1}], dtype=object)))  # needs pickle to read
    with pytest.raises(parts.PartFileError, match='object.npz'):
        parts.load_part(str(bad))
    shape = dict(arrays)
    shape['block2.w0'] = shape['block2.w0'][:, :1]
    np.savez(tmp_path / 'shape.npz', **shape)
    with pytest.raises(parts.PartFileError, match=r'shape.npz: array block2.w0 .* needs float32'):
        parts.load_part(str(tmp_path / 'shape.npz'))
    missing = {k: v for k, v in arrays.items() if k != 'block4.b1'}
    np.savez(tmp_path / 'missing.npz', **missing)
    with pytest.raises(parts.PartFileError, match='missing array block4.b1'):
        parts.load_part(str(tmp_path / 'missing.npz'))
    with pytest.raises(parts.PartFileError, match='not a part file'):
        parts.load_part(b'PK\x03\x04 not really a zip')
    meta = json.loads(arrays[parts.META].tobytes())
    meta['version'] = 99
    np.savez(tmp_path / 'v99.npz', **dict(arrays, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    with pytest.raises(parts.PartFileError, match='version is 99'):
        parts.load_part(str(tmp_path / 'v99.npz'))


PY36_SCRIPT = r'''
import sys, json
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from comm import parts
edge, meta = parts.load_part(sys.argv[2])
heavy = [m for m in ('config', 'artifacts', 'torchvision', 'timing.lut', 'pipeline') if m in sys.modules]
x = torch.from_numpy(np.load(sys.argv[3]))
with torch.no_grad():
    np.save(sys.argv[4], edge(x).numpy())
print(json.dumps({'torch': torch.__version__, 'python': sys.version.split()[0], 'blocks': len(edge.blocks),
                  'heavy': heavy, 'full_model_built': 'HyperRepVGG' in [type(m).__name__ for m in edge.modules()]}))
'''


def test_edge_file_loads_under_python36_torch110_and_equals_the_first_lambda_blocks(py36_python, model, tmp_path):
    lam = 9
    (tmp_path / 'edge_part.npz').write_bytes(parts.part_bytes(model, lam, 'edge', 64))
    x = torch.randn(3, 3, 64, 64)
    np.save(tmp_path / 'x.npy', x.numpy())
    (tmp_path / 'run.py').write_text(PY36_SCRIPT)
    proc = subprocess.run([str(py36_python), str(tmp_path / 'run.py'), str(REPO), str(tmp_path / 'edge_part.npz'),
                           str(tmp_path / 'x.npy'), str(tmp_path / 'out.npy')], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info['torch'].startswith('1.10') and info['python'].startswith('3.6')
    assert info['blocks'] == lam and not info['heavy'] and not info['full_model_built']
    with torch.no_grad():
        want = model.split(lam)[0](x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / 'out.npy'), want, rtol=1e-4, atol=1e-4)


def test_memory_probe_edge_part_against_full_model_under_python36(py36_python, model, tmp_path):
    edge, server = tmp_path / 'edge_part.npz', tmp_path / 'server_part.npz'
    edge.write_bytes(parts.part_bytes(model, 6, 'edge', 64))
    server.write_bytes(parts.part_bytes(model, 6, 'server', 64))
    mem = parts.compare_memory(str(edge), str(server), python=str(py36_python))
    part, full = mem['edge_part'], mem['full_model']
    assert part['torch_version'].startswith('1.10') and part['blocks'] == 6 and full['blocks'] == model.num_blocks
    assert 0 < part['weight_bytes'] < full['weight_bytes']
    assert mem['saved_weight_bytes'] == full['weight_bytes'] - part['weight_bytes']
    for r in (part, full):
        assert r['peak_rss_bytes'] >= r['baseline_peak_rss_bytes'] > 0 and r['cuda_max_memory_allocated_bytes'] is None
        assert r['part_rss_bytes'] is not None and r['part_rss_bytes'] >= 0
    # the full model holds ~2.8 MB more weights than this edge part: its resident set grows by at least half that
    assert mem['saved_rss_bytes'] > 0.5 * mem['saved_weight_bytes']


def test_export_writes_both_parts_and_a_manifest_with_sha256(model, tmp_path):
    from artifacts import load_artifact, write_artifact
    from config import Config, DataConfig, ModelConfig
    from pipeline import export_parts
    base = H.build_repvgg('A0', num_classes=10, width_multiplier=WIDTH)
    ckpt = tmp_path / 'base.pt'
    torch.save({'model': {'module.' + k: v for k, v in base.state_dict().items()}}, ckpt)
    cfg = Config(model=ModelConfig(input_size=32, width_multiplier=WIDTH, checkpoint=str(ckpt)),
                 data=DataConfig(dataset='synthetic'), results_dir=str(tmp_path / 'results'))
    gammas = [4 if not s.has_identity else (13 if s.index % 2 else 9) for s in model.plan]
    write_artifact(cfg.path('initial_throughput_config.json'), 'initial_throughput_config',
                   {'gammas': gammas, 'lam': 7}, cfg, 'test')
    argv = ['--results_dir', str(tmp_path / 'results'), '--dataset', 'synthetic', '--set', 'model.input_size=32',
            '--set', 'model.width_multiplier=0.25,0.25,0.25,0.5', '--set', f'model.checkpoint={ckpt}']
    assert export_parts.main(argv) == 0
    out = cfg.path('parts')
    man = load_artifact(out / 'parts_manifest.json', 'parts_manifest', {'files': dict, 'lam': int})
    assert man['lam'] == 7 and man['gammas'] == gammas and 'step 2' in man['configuration_source']
    for part, blocks in (('edge', list(range(7))), ('server', list(range(7, model.num_blocks)))):
        f = man['files'][part]
        data = (out / f['file']).read_bytes()
        assert f['bytes'] == len(data) and f['sha256'] == hashlib.sha256(data).hexdigest() and f['blocks'] == blocks
        assert (out / f['file']).stat().st_mode & 0o044 == 0o044  # readable by others on a shared server
    edge, _ = parts.load_part(str(out / 'edge_part.npz'))
    server, _ = parts.load_part(str(out / 'server_part.npz'))
    ref = H.build_hyper_repvgg('A0', base.state_dict(), 10, WIDTH).eval()
    from accuracy.pruning import apply_config
    apply_config(ref, gammas)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(server(edge(x)), ref(x), rtol=1e-4, atol=1e-4)
    assert export_parts.main(argv + ['--lam', '0']) == 0
    assert load_artifact(out / 'parts_manifest.json', 'parts_manifest')['files']['edge']['blocks'] == []
    with pytest.raises(SystemExit):
        export_parts.main(['--help'])


def test_parts_cli_help():
    out = subprocess.run([sys.executable, '-m', 'comm.parts', '--help'], cwd=str(REPO), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and '--probe' in out.stdout


@pytest.mark.network
def test_python36_worker_runs_an_edge_part_file_round_trips_and_reports_memory(py36_python, model, tmp_path):
    """The TX2 stack loads the edge part from its file (no full model), streams and answers single round trips with
    the same predictions as the local model, and measures its memory with the part against the full model."""
    import os
    import socket
    from comm import session as S
    from data.normalize import normalize_batch
    mean, std, lam = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 8
    edge_file = parts.part_bytes(model, lam, 'edge', 64, mean, std)
    server_file = parts.part_bytes(model, lam, 'server', 64, mean, std)
    server, _ = parts.load_part(server_file)
    g = torch.Generator()
    g.manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=g)
    labels = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        ref = model(normalize_batch(images, mean, std)).argmax(1).tolist()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != 'HYPERREPVGG_TOKEN'}
    log = open(tmp_path / 'worker.log', 'w')
    with S.ServerSession(port=port, connect_timeout_s=90, io_timeout_s=60) as sess:
        worker = subprocess.Popen([str(py36_python), str(REPO / 'client_worker.py'), '--port', str(port), '--device',
                                   'cpu', '--threads', '1', '--backoff_max_s', '1'], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=str(REPO))
        try:
            assert sess.accept()['torch_version'].startswith('1.10')
            loaded = S.deploy_part_file(sess, edge_file)
            assert loaded['lam'] == lam and loaded['blocks'] == lam and loaded['sha256'] == parts.sha256_hex(edge_file)
            run = sess.run(server, images, labels, batch_size=2)
            assert run['predictions'] == ref
            rt = S.round_trips(sess, server, images[:1], 3)
            assert rt['count'] == 3 and all(r['rtt_ms'] > 0 and r['server_ms'] >= 0 for r in rt['requests'])
            assert all(r['bytes_down'] == 10 * 4 for r in rt['requests'])  # the logits come back
            mem = S.measure_memory(sess, edge_file, server_file)
            assert mem['edge_part']['torch_version'].startswith('1.10')
            assert mem['edge_part']['blocks'] == lam and mem['full_model']['blocks'] == model.num_blocks
            assert mem['saved_weight_bytes'] > 0
            with pytest.raises(S.SessionError, match='server part file'):
                S.deploy_part_file(sess, server_file)
        finally:
            sess.close()
            worker.kill()
            worker.wait(10)
            log.close()
