"""Step 1: hardware LUT.  Measure per-block x layout x batch times on each side, model or replay the edge device,
merge with the link and the FLOP/byte counts into hardware_lut_complete.json, and validate the LUT end to end.

Modes: server (lut_server.json, measured here) | client (lut_edge.json: this machine measured as the edge device
with lut_server.json's settings, device-side code only; on the TX2 run `python3 step1_measure_lut.py --mode client`
from the repository root under Python 3.6, then copy lut_edge.json back) | merge (hardware_lut_complete.json +
link.json from the two) | pseudo (server + replayed or modelled edge + merge)
| real (server here, edge on client_worker.py through comm.session, link probed and measured, merge).
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from artifacts import ArtifactError, write_artifact  # noqa: E402
from config import LINK_FLAGS, Config, add_common_args, add_link_args, command_line, resolve_config, run_cli  # noqa: E402
from timing import lut as L  # noqa: E402
from timing.profiles import get_profile  # noqa: E402

FLAGS = {**LINK_FLAGS, 'edge_profile': 'lut.edge_profile', 'batch_sizes': 'lut.batch_sizes',
         'repeats': 'lut.repeats', 'rounds': 'lut.rounds', 'fit_rounds': 'lut.fit_rounds', 'warmup': 'lut.warmup', 'input_size': 'model.input_size',
         'max_entry_s': 'lut.max_entry_s', 'feature_dtype': 'lut.feature_dtype', 'port': 'real.port'}


def validation_configurations(cfg, model):
    """The unseen configurations of step 1's validation (seeded by cfg.seed)."""
    return L.random_configurations(model, cfg.lut.validation_samples, np.random.default_rng(cfg.seed))


def measure(cfg, side, command, holdout=()):
    """Measure one side on this machine (cfg.device) and write lut_<side>.json; with timing 'fit', the `holdout`
    configurations are timed in the fit's own rounds and left out of it.  Returns (the side LUT, measure_side's
    holdout results per batch)."""
    from timing import measure as M
    model = L.model_spec(cfg)
    t0 = time.time()
    res = M.measure_side(model, cfg.model.input_size, cfg.lut.batch_sizes, cfg.device, cfg.lut.warmup,
                         cfg.lut.repeats, cfg.lut.threads, cfg.lut.max_entry_s, cfg.seed, progress=True,
                         timing=cfg.lut.timing, fit_configurations=cfg.lut.fit_configurations,
                         fit_rounds=cfg.lut.fit_rounds, holdout=holdout, holdout_visits=cfg.lut.holdout_visits)
    payload = L.side_payload(side, model, cfg.model.input_size, res)
    payload['settings']['measure_wall_s'] = time.time() - t0
    payload['roofline_fit'] = L.roofline_fit(payload, min(cfg.lut.batch_sizes))
    write_artifact(cfg.path(f'lut_{side}.json'), f'lut_{side}', payload, cfg, command)
    print(f'{L.side_line(payload)} -> {cfg.path(f"lut_{side}.json")}')
    return payload, res.get('holdout') or {}


def validate(cfg, side_lut, command, configs, held):
    """lut_validation.json: the LUT against the unseen `configs` timed in the fit's rounds (`held`, timing 'fit'),
    else in a window of their own (validate_side); with lut.later_check the fit's LUT is also checked in a later
    window of its own (how far the machine's speed moved since: `later`)."""
    batch = min(cfg.lut.batch_sizes)
    if held.get(str(batch)):
        rep = L.holdout_validation(side_lut, configs, held[str(batch)], batch, cfg.device,
                                   later_rounds=cfg.lut.rounds if cfg.lut.later_check else 0, seed=cfg.seed,
                                   progress=True)
    else:
        rep = L.validate_side(side_lut, configs, batch, cfg.device, 1, cfg.lut.rounds, cfg.seed, progress=True)
    write_artifact(cfg.path('lut_validation.json'), 'lut_validation', rep, cfg, command)
    print(f'{L.validation_line(rep)} -> {cfg.path("lut_validation.json")}')
    warning = L.noise_warning(rep, cfg.lut.rounds, side_lut['metadata'].get('threads', cfg.lut.threads))
    if warning:
        print(warning, file=sys.stderr)
    return rep


def mode_measure(side):
    """The server / client (= edge) mode: measure that side here and validate it end to end unless --no_validate
    (timing 'fit': on unseen configurations timed in the fit's own rounds)."""
    def run(cfg, args, command):
        check = args.validate and cfg.lut.validation_samples > 0
        configs = validation_configurations(cfg, L.model_spec(cfg)) if check else []
        payload, held = measure(cfg, side, command, configs if cfg.lut.timing == 'fit' else ())
        if check:
            validate(cfg, payload, command, configs, held)
        return payload
    return run


def mode_client(cfg, args, command):
    """Measure this machine as the edge device with the settings lut_server.json recorded, with device-side code
    only (timing/edge_lut.py: what `python step1_measure_lut.py --mode client` runs on the TX2 under Python 3.6)."""
    from timing import edge_lut
    obj = edge_lut.measure_edge(str(cfg.path(edge_lut.SERVER_LUT)), cfg.device, None, progress=True)
    edge_lut.write_json(str(cfg.path(edge_lut.EDGE_LUT)), obj)
    print(f'{L.side_line(L.load_side(cfg.path(edge_lut.EDGE_LUT), "edge"))} -> {cfg.path(edge_lut.EDGE_LUT)}')


def mode_merge(cfg, args, command):
    """Both side LUTs from files (the edge one measured on the device by --mode client and copied here)."""
    server = L.load_side(cfg.path('lut_server.json'), 'server')
    edge = L.load_side(edge_lut_path(cfg), 'edge')
    if edge['source'] == 'measured' and not edge.get('roofline_fit'):  # the device does not fit it
        edge['roofline_fit'] = L.roofline_fit(edge, min(edge['batch_sizes']))
    merge(cfg, server, edge, command)


def edge_lut_path(cfg):
    """lut_edge.json, or the lut_client.json an older version wrote when only that one exists."""
    path, legacy = cfg.path('lut_edge.json'), cfg.path('lut_client.json')
    return legacy if legacy.is_file() and not path.is_file() else path


def replayable_edge(cfg, server):
    """(a measured lut_edge.json for the same model / input size / batch sizes or None, why not, whether a
    measured edge LUT exists at that path)."""
    path = edge_lut_path(cfg)
    if not path.is_file():
        return None, 'no lut_edge.json', False
    try:
        edge = L.load_side(path, 'edge')
    except ArtifactError as e:
        return None, f'existing lut_edge.json unreadable ({e})', False
    if edge['source'] != 'measured':
        return None, 'existing lut_edge.json is modelled, not measured', False
    try:
        L.check_compatible(server, edge)
    except L.LutError as e:
        return None, f'existing measured lut_edge.json is for another model ({e})', True
    missing = sorted(set(cfg.lut.batch_sizes) - set(edge['batch_sizes']))
    if missing:
        return None, f'existing measured lut_edge.json lacks batch sizes {missing}', True
    return edge, '', True


def mode_pseudo(cfg, args, command):
    server = MODES['server'](cfg, args, command)
    edge, why, measured_exists = replayable_edge(cfg, server)
    if edge is not None:
        print(f'edge: replaying the measured {edge_lut_path(cfg)} '
              f'({edge["metadata"].get("device_name")}, {edge["created_at"]})')
    else:
        profile = get_profile(cfg.lut.edge_profile)
        edge = L.modelled_side(profile, server['model'], server['input_size'], cfg.lut.batch_sizes)
        # never overwrite a measured edge LUT with a modelled one
        path = cfg.path('lut_edge_modelled.json' if measured_exists else 'lut_edge.json')
        write_artifact(path, 'lut_edge', edge, cfg, command)
        print(f'edge: modelled from device profile {profile.name} ({why}) -> {path}')
    merge(cfg, server, edge, command)


def mode_real(cfg, args, command):
    """Server measured here, edge measured on client_worker.py (comm.session), link probed, merged."""
    from comm import session as S
    server = MODES['server'](cfg, args, command)
    with S.session_from_config(cfg) as sess:
        print(f'waiting up to {cfg.real.connect_timeout_s:g} s for client_worker.py on {cfg.real.host}:{sess.port}')
        hello = sess.accept()
        print(f'worker: {hello.get("device_name")} ({hello.get("device")}), python {hello.get("python_version")}, '
              f'torch {hello.get("torch_version")}, power mode {hello.get("power_mode")}')
        edge = S.measure_edge_side(sess, cfg)
        write_artifact(cfg.path('lut_edge.json'), 'lut_edge', edge, cfg, command)
        print(f'{L.side_line(edge)} -> {cfg.path("lut_edge.json")}')
        probe = sess.probe_link(S.probe_sizes_bytes(cfg), cfg.real.probe_repeats)
        link = S.link_from_probe(probe)
        overhead = None
        if cfg.real.calibrate_runtime:
            from pipeline import closed_loop as CL
            overhead = CL.calibrate_runtime(sess, L.merge(server, edge, link, cfg.lut.feature_dtype), cfg,
                                            min(cfg.lut.batch_sizes))
            print(CL.runtime_line(overhead))
    merge(cfg, server, edge, command, link, probe, overhead)


def merge(cfg, server, edge, command, link=None, probe=None, overhead=None):
    """hardware_lut_complete.json and link.json; `link` is the measured one (with its probe) in real mode, and
    `overhead` the split runtime's measured per-frame cost (real mode, real.calibrate_runtime)."""
    link = link or L.resolve_link(cfg.lut)
    payload = L.merge(server, edge, link, cfg.lut.feature_dtype)
    if overhead is not None:
        payload['runtime_overhead'] = overhead
    write_artifact(cfg.path('link.json'), 'link', {'link': link.to_dict(), 'measured': probe is not None,
                                                   'source': 'measured' if probe else 'configured', 'probe': probe},
                   cfg, command)
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete', payload, cfg, command)
    print(f'merged: {payload["num_blocks"]} blocks, batch sizes {payload["batch_sizes"]}, server {server["source"]}, '
          f'edge {edge["source"]}, link {link.name} ({link.bandwidth_mbps:.4g} Mbit/s, rtt {link.rtt_ms:.3g} ms) '
          f'-> {cfg.path("hardware_lut_complete.json")}')


MODES = {'server': mode_measure('server'), 'client': mode_client, 'merge': mode_merge, 'pseudo': mode_pseudo,
         'real': mode_real}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=sorted(MODES), default='pseudo', help='what to do (default: pseudo)')
    d, m = Config().lut, Config().model
    p.add_argument('--edge_profile', help='edge device profile for pseudo mode: jetson-tx2 | jetson-nano | '
                   f'jetson-orin-nano | rpi4 (default: {d.edge_profile})')
    add_link_args(p, reevaluate=False)
    p.add_argument('--batch_sizes', help=f'comma-separated batch sizes to measure (default: '
                   f'{",".join(map(str, d.batch_sizes))})')
    p.add_argument('--repeats', help=f'timed runs per entry (default: {d.repeats})')
    p.add_argument('--warmup', help=f'untimed runs before each entry (default: {d.warmup})')
    p.add_argument('--fit_rounds', help='interleaved rounds over the fit\'s timed parts, each part 1 untimed + 2 timed '
                   f'calls per round (default: {d.fit_rounds})')
    p.add_argument('--rounds', help='interleaved rounds of the end-to-end validation, each configuration part 1 untimed '
                   f'+ 2 timed calls per round; even and odd rounds are its two passes (default: {d.rounds})')
    p.add_argument('--max_entry_s', help=f'time budget per entry in s, >= 3 runs kept; 0 = no limit (default: '
                   f'{d.max_entry_s})')
    p.add_argument('--feature_dtype', help=f'dtype of features on the link: fp32 | fp16 (default: {d.feature_dtype})')
    p.add_argument('--port', help=f'real mode: port the session listens on, on {Config().real.host} (default: '
                   f'{Config().real.port}); the token comes from real.token or env HYPERREPVGG_TOKEN')
    p.add_argument('--input_size', help=f'input resolution in pixels (default: {m.input_size})')
    p.add_argument('--validate', dest='validate', action='store_true', default=True,
                   help='validate the measured LUT end to end on lut.validation_samples configurations (default: on)')
    p.add_argument('--no_validate', dest='validate', action='store_false', help='skip the validation (default: off)')
    add_common_args(p)
    args = p.parse_args(argv)
    cfg = resolve_config(args, FLAGS)
    if cfg.lut.feature_dtype not in ('fp32', 'fp16'):
        raise L.ConfigError(f'--feature_dtype / lut.feature_dtype: expected fp32 or fp16, got {cfg.lut.feature_dtype!r}')
    if cfg.lut.timing not in L.TIMING_METHODS:
        raise L.ConfigError(f'lut.timing: expected one of {", ".join(L.TIMING_METHODS)}, got {cfg.lut.timing!r}')
    if cfg.lut.fit_configurations < 0:
        raise L.ConfigError(f'lut.fit_configurations: expected an integer >= 0, got {cfg.lut.fit_configurations}')
    if not cfg.lut.batch_sizes or min(cfg.lut.batch_sizes) < 1:
        raise L.ConfigError(f'--batch_sizes / lut.batch_sizes: expected positive integers, got {cfg.lut.batch_sizes}')
    get_profile(cfg.lut.edge_profile)
    L.resolve_link(cfg.lut)
    t0 = time.time()
    MODES[args.mode](cfg, args, command_line(argv))
    print(f'step 1 ({args.mode}) done in {time.time() - t0:.1f} s')
    return 0


if __name__ == '__main__':
    run_cli(main)
