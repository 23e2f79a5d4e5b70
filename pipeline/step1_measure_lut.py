"""Step 1: hardware LUT.  Measure per-block x layout x batch times on each side, model or replay the edge device,
merge with the link and the FLOP/byte counts into hardware_lut_complete.json, and validate the LUT end to end.

Modes: server (lut_server.json, measured here) | client (lut_client.json, measured here: run this on the device)
| merge (hardware_lut_complete.json + link.json from the two) | pseudo (server + replayed or modelled client + merge).
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from artifacts import ArtifactError, write_artifact  # noqa: E402
from config import add_common_args, command_line, resolve_config, run_cli  # noqa: E402
from optim import lut as L  # noqa: E402
from optim.profiles import get_profile  # noqa: E402

FLAGS = {'client_profile': 'lut.client_profile', 'link': 'lut.link', 'bandwidth_mbps': 'lut.bandwidth_mbps',
         'rtt_ms': 'lut.rtt_ms', 'batch_sizes': 'lut.batch_sizes', 'repeats': 'lut.repeats', 'warmup': 'lut.warmup',
         'input_size': 'model.input_size', 'max_entry_s': 'lut.max_entry_s', 'feature_dtype': 'lut.feature_dtype'}


def measure(cfg, side, command):
    """Measure one side on this machine (cfg.device), write lut_<side>.json, validate it if asked."""
    from optim import measure as M
    model = L.model_spec(cfg)
    t0 = time.time()
    res = M.measure_side(model, cfg.model.input_size, cfg.lut.batch_sizes, cfg.device, cfg.lut.warmup,
                         cfg.lut.repeats, cfg.lut.threads, cfg.lut.max_entry_s, cfg.seed, progress=True,
                         timing=cfg.lut.timing)
    payload = L.side_payload(side, model, cfg.model.input_size, res)
    payload['settings']['measure_wall_s'] = time.time() - t0
    write_artifact(cfg.path(f'lut_{side}.json'), f'lut_{side}', payload, cfg, command)
    print(f'{side}: {len(payload["entries"])} entries measured on {res["metadata"]["device_name"]} '
          f'({cfg.device}, {res["metadata"]["threads"]} threads) in {time.time() - t0:.1f} s; roofline knee '
          f'{res["roofline"]["knee_flop_per_byte"]:.1f} flop/byte -> {cfg.path(f"lut_{side}.json")}')
    return payload


def validate(cfg, side_lut, command):
    configs = L.random_configurations(side_lut['model'], cfg.lut.validation_samples, np.random.default_rng(cfg.seed))
    rep = L.validate_side(side_lut, configs, min(cfg.lut.batch_sizes), cfg.device, cfg.lut.warmup, cfg.lut.repeats,
                          cfg.lut.max_entry_s * 4, cfg.seed, progress=True)
    write_artifact(cfg.path('lut_validation.json'), 'lut_validation', rep, cfg, command)
    s = rep['summary']
    print(f'LUT validation ({side_lut["side"]} LUT, {cfg.device}, {s["total"]["count"]} configurations): '
          f'{100 * s["total"]["share_within_tol"]:.0f} % within +/-{s["tolerance_pct"]:.0f} %, median |error| '
          f'{s["total"]["median_abs_error_pct"]:.1f} % (per part: edge {_pct(s["edge"])}, server '
          f'{_pct(s["server"])}; median signed error {s["total"]["median_signed_error_pct"]:+.1f} %) '
          f'-> {cfg.path("lut_validation.json")}')
    return rep


def _pct(part):
    return 'n/a' if part['median_abs_error_pct'] is None else f'{part["median_abs_error_pct"]:.1f} %'


def mode_server(cfg, args, command):
    side = measure(cfg, 'server', command)
    if args.validate and cfg.lut.validation_samples > 0:
        validate(cfg, side, command)


def mode_client(cfg, args, command):
    side = measure(cfg, 'client', command)
    if args.validate and cfg.lut.validation_samples > 0:
        validate(cfg, side, command)


def mode_merge(cfg, args, command):
    merge(cfg, L.load_side(cfg.path('lut_server.json'), 'server'), L.load_side(cfg.path('lut_client.json'), 'client'),
          command)


def replayable_client(cfg, server):
    """(a measured lut_client.json for the same model / input size / batch sizes or None, why not, whether a
    measured client LUT exists at that path)."""
    path = cfg.path('lut_client.json')
    if not path.is_file():
        return None, 'no lut_client.json', False
    try:
        client = L.load_side(path, 'client')
    except ArtifactError as e:
        return None, f'existing lut_client.json unreadable ({e})', False
    if client['source'] != 'measured':
        return None, 'existing lut_client.json is modelled, not measured', False
    try:
        L.check_compatible(server, client)
    except L.LutError as e:
        return None, f'existing measured lut_client.json is for another model ({e})', True
    missing = sorted(set(cfg.lut.batch_sizes) - set(client['batch_sizes']))
    if missing:
        return None, f'existing measured lut_client.json lacks batch sizes {missing}', True
    return client, '', True


def mode_pseudo(cfg, args, command):
    server = measure(cfg, 'server', command)
    if args.validate and cfg.lut.validation_samples > 0:
        validate(cfg, server, command)
    client, why, measured_exists = replayable_client(cfg, server)
    if client is not None:
        print(f'client: replaying the measured {cfg.path("lut_client.json")} '
              f'({client["metadata"].get("device_name")}, {client["created_at"]})')
    else:
        profile = get_profile(cfg.lut.client_profile)
        client = L.modelled_side(profile, server['model'], server['input_size'], cfg.lut.batch_sizes)
        # never overwrite a measured client LUT with a modelled one
        path = cfg.path('lut_client_modelled.json' if measured_exists else 'lut_client.json')
        write_artifact(path, 'lut_client', client, cfg, command)
        print(f'client: modelled from device profile {profile.name} ({why}) -> {path}')
    merge(cfg, server, client, command)


def merge(cfg, server, client, command):
    link = L.resolve_link(cfg.lut)
    payload = L.merge(server, client, link, cfg.lut.feature_dtype)
    write_artifact(cfg.path('link.json'), 'link', {'link': link.to_dict(), 'measured': False}, cfg, command)
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete', payload, cfg, command)
    print(f'merged: {payload["num_blocks"]} blocks, batch sizes {payload["batch_sizes"]}, server {server["source"]}, '
          f'client {client["source"]}, link {link.name} ({link.bandwidth_mbps} Mbit/s, rtt {link.rtt_ms} ms) '
          f'-> {cfg.path("hardware_lut_complete.json")}')


MODES = {'server': mode_server, 'client': mode_client, 'merge': mode_merge, 'pseudo': mode_pseudo}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=sorted(MODES), default='pseudo', help='what to do (default: pseudo)')
    p.add_argument('--client_profile', help='edge device profile for pseudo mode: jetson-tx2 | jetson-nano | '
                   'jetson-orin-nano | rpi4 (default: lut.client_profile = jetson-tx2)')
    p.add_argument('--link', help='link preset: 3g | 4g | wifi | ethernet (default: lut.link = 4g)')
    p.add_argument('--bandwidth_mbps', help='uplink bandwidth in Mbit/s, overrides the preset (default: preset)')
    p.add_argument('--rtt_ms', help='round-trip time in ms, overrides the preset (default: preset)')
    p.add_argument('--batch_sizes', help='comma-separated batch sizes to measure (default: lut.batch_sizes = 1)')
    p.add_argument('--repeats', help='timed runs per entry (default: lut.repeats = 20)')
    p.add_argument('--warmup', help='untimed runs before each entry (default: lut.warmup = 5)')
    p.add_argument('--max_entry_s', help='time budget per entry in s, >= 3 runs kept (default: lut.max_entry_s = 0, '
                   'no limit)')
    p.add_argument('--feature_dtype', help='dtype of features on the link: fp32 | fp16 (default: lut.feature_dtype = fp32)')
    p.add_argument('--input_size', help='input resolution in pixels (default: model.input_size = 64)')
    p.add_argument('--validate', dest='validate', action='store_true', default=True,
                   help='validate the measured LUT end to end on lut.validation_samples configurations (default: on)')
    p.add_argument('--no_validate', dest='validate', action='store_false', help='skip the validation (default: off)')
    add_common_args(p)
    args = p.parse_args(argv)
    cfg = resolve_config(args, FLAGS)
    if cfg.lut.feature_dtype not in ('fp32', 'fp16'):
        raise L.ConfigError(f'--feature_dtype / lut.feature_dtype: expected fp32 or fp16, got {cfg.lut.feature_dtype!r}')
    if cfg.lut.timing not in ('chain', 'isolated'):
        raise L.ConfigError(f'lut.timing: expected chain or isolated, got {cfg.lut.timing!r}')
    if not cfg.lut.batch_sizes or min(cfg.lut.batch_sizes) < 1:
        raise L.ConfigError(f'--batch_sizes / lut.batch_sizes: expected positive integers, got {cfg.lut.batch_sizes}')
    get_profile(cfg.lut.client_profile)
    L.resolve_link(cfg.lut)
    t0 = time.time()
    MODES[args.mode](cfg, args, command_line(argv))
    print(f'step 1 ({args.mode}) done in {time.time() - t0:.1f} s')
    return 0


if __name__ == '__main__':
    run_cli(main)
