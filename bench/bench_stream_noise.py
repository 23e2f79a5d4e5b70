"""How much a real-mode stream moves on the local stand-in device, and where from: the closed loop's noise budget.

The closed loop (pipeline/closed_loop.py) decides and judges on streams of `loop.real_samples` images through the
split pipeline (client_worker.py on one core, the server on the other, the link emulator between: comm/localdevice.py).
Whether a decision should buy more passes or longer streams depends on what the noise is:

* back to back in one deployment: `--repeats` streams of `--samples` images right after each other, same deployment;
* between deployments: the same configuration deployed again in each of `--passes` interleaved passes (forward,
  then reverse order), its streams' mean compared pass to pass after the pass's common shift is removed;
* the pass effect: how much a whole pass runs faster or slower than the others (drift that hits all alike);
* a long stream: one stream of `--long_factor` x `--samples` images per deployment, its spread over the passes
  against a short stream's.

Noise that is fast (within a stream) averages out in a longer stream; noise that is slow (seconds) or comes with a
deployment does not, and only more interleaved passes beat it.  Each stream's throughput is read two ways, as
the closed loop reads it (its median period: comm.session.period_fps) and as the steady throughput (samples / span,
every pause included), so the estimators' noise is compared on the same streams.  Configurations: the embedded default model with every
block in its deploy form (one fused kernel), split at `--splits` evenly spaced lambdas (random weights: the timing does not depend on
them).  Standard deviations are of log throughput, in percent.  Measured on this machine under its load (recorded
before and after): not a property of the method.  Writes bench/results/stream_noise.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import os  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from config import Config, UserError, run_cli  # noqa: E402

NAME = 'stream_noise'


def noise_components(short: np.ndarray, long: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Noise of stream throughputs, percent standard deviations of log throughput.

    `short`: (configurations K, passes P, repeats R) throughputs of back-to-back streams in one deployment per pass
    (R >= 2, P >= 2); `long`: (K, P) one longer stream per deployment, or None.  Returns per configuration
    'within_pct' (sd over the repeats, averaged over passes), 'between_pct' (sd over the passes of the deployment's
    mean after each pass's mean shift over the configurations is removed), 'stream_pct' (sd over the passes of one
    short stream, its first repeat: what one pass of the closed loop sees), 'long_pct' (the same for the long
    stream); and 'pass_effect_pct' (P,): each pass's mean shift; medians over configurations under 'median'."""
    x = np.log(np.asarray(short, dtype=np.float64))
    if x.ndim != 3 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f'noise_components: expected (configurations, passes >= 2, repeats >= 2), got {x.shape}')
    dep = x.mean(axis=2)  # (K, P) deployment means
    centred = dep - dep.mean(axis=1, keepdims=True)
    shift = centred.mean(axis=0)  # (P,) the pass's common shift
    out: Dict[str, Any] = {
        'within_pct': 100.0 * x.std(axis=2, ddof=1).mean(axis=1),
        'between_pct': 100.0 * (centred - shift[None, :]).std(axis=1, ddof=1),
        'stream_pct': 100.0 * x[:, :, 0].std(axis=1, ddof=1),
        'pass_effect_pct': 100.0 * shift,
    }
    if long is not None:
        out['long_pct'] = 100.0 * np.log(np.asarray(long, dtype=np.float64)).std(axis=1, ddof=1)
    out['median'] = {k: float(np.median(v)) for k, v in out.items() if k != 'pass_effect_pct'}
    out['median']['pass_effect_range_pct'] = float(shift.max() - shift.min()) * 100.0
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}


def measure(splits: int, passes: int, repeats: int, samples: int, long_factor: int, seed: int,
            progress: bool) -> Dict[str, Any]:
    """Stream the deploy-form default at `splits` lambdas through a local stand-in device; raw throughputs."""
    import torch

    from comm.localdevice import LocalDevice
    from comm.session import ServerSession
    from comm import protocol as P
    from hyper_repvgg import apply_config, deploy_part
    from timing import measure as M
    from timing.lut import model_spec
    cfg = Config()
    spec = model_spec(cfg)
    model = M.random_model(spec, seed)
    n = model.num_blocks
    deploy = [M._fallback_layout(spec_k, 13) for spec_k in model.plan]  # each block's deploy form
    lams = sorted({int(round(n * (i + 1) / (splits + 1))) for i in range(splits)})
    size = cfg.model.input_size
    gen = torch.Generator()
    gen.manual_seed(seed + 7)
    n_img = max(samples * long_factor, samples)
    images = torch.randint(0, 256, (n_img, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.zeros(n_img, dtype=torch.long)
    apply_config(model, deploy)
    token = P.resolve_token(None) if os.environ.get('HYPERREPVGG_TOKEN') else 'bench-stream-noise'
    short = np.zeros((len(lams), passes, repeats))
    long = np.zeros((len(lams), passes)) if long_factor > 1 else None
    short_steady, long_steady = np.zeros_like(short), None if long is None else np.zeros_like(long)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=passes * len(lams), desc='stream noise', leave=False)
    load_before = common.load_average()
    old_cores, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
    with LocalDevice(token=token, log_dir=Path(common.REPO_ROOT) / 'results' / 'local_device_bench') as dev:
        os.sched_setaffinity(0, dev.server_cores)  # this process is the server; restored below
        torch.set_num_threads(1)
        sess = ServerSession('127.0.0.1', dev.port, token, 60.0, 120.0, 256 * 2 ** 20)
        try:
            sess.accept()
            for p in range(passes):
                order = range(len(lams)) if p % 2 == 0 else reversed(range(len(lams)))
                for i in order:
                    lam = lams[i]
                    sess.deploy(model, deploy, lam, [0.5] * 3, [0.25] * 3, feature_dtype='fp32', threads=1)
                    server = None if lam == n else deploy_part(model.split(lam)[1]).eval()
                    for r in range(repeats):
                        res = sess.run(server, images[:samples], labels[:samples], 1)
                        short[i, p, r], short_steady[i, p, r] = _paces(res)
                    if long is not None:
                        res = sess.run(server, images, labels, 1)
                        long[i, p], long_steady[i, p] = _paces(res)
                    if bar is not None:
                        bar.update(1)
        finally:
            sess.close()
            os.sched_setaffinity(0, old_cores)
            torch.set_num_threads(old_threads)
            if bar is not None:
                bar.close()
    return {'lams': lams, 'short_fps': short.tolist(), 'long_fps': None if long is None else long.tolist(),
            'short_steady_fps': short_steady.tolist(),
            'long_steady_fps': None if long_steady is None else long_steady.tolist(),
            'load_average': {'before': load_before, 'after': common.load_average()}, 'device': dev.describe()}


def _paces(res: Dict[str, Any]) -> tuple:
    """(median-period, steady) throughput of one run, frames/s."""
    steady = res.get('steady_throughput_fps') or res['throughput_fps']
    return res.get('period_throughput_fps') or steady, steady


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--splits', type=int, default=None, help='configurations: the default in deploy form split at this many '
                   'evenly spaced lambdas (default: 5; --quick: 2)')
    p.add_argument('--passes', type=int, default=None, help='interleaved passes, each deploying every configuration '
                   'once (default: 8; --quick: 2)')
    p.add_argument('--repeats', type=int, default=None, help='back-to-back short streams per deployment (default: 3; '
                   '--quick: 2)')
    p.add_argument('--samples', type=int, default=None, help='images per short stream (default: 240, as '
                   'loop.real_samples; --quick: 24)')
    p.add_argument('--long_factor', type=int, default=4, help='the long stream has this many times --samples images '
                   '(default: 4; 1 = none)')
    p.add_argument('--seed', type=int, default=0, help='random weights and images (default: 0)')
    args = p.parse_args(argv)
    q = args.quick
    splits = args.splits if args.splits is not None else (2 if q else 5)
    passes = args.passes if args.passes is not None else (2 if q else 8)
    repeats = args.repeats if args.repeats is not None else (2 if q else 3)
    samples = args.samples if args.samples is not None else (24 if q else Config().loop.real_samples)
    if splits < 1 or passes < 2 or repeats < 2 or samples < 3 or args.long_factor < 1:
        raise UserError(f'--splits {splits} / --passes {passes} / --repeats {repeats} / --samples {samples} / '
                        f'--long_factor {args.long_factor}: expected >= 1 / >= 2 / >= 2 / >= 3 / >= 1')
    machine = common.machine_info()
    data = measure(splits, passes, repeats, samples, args.long_factor, args.seed, progress=not q)
    comp = noise_components(np.array(data['short_fps']),
                            None if data['long_fps'] is None else np.array(data['long_fps']))
    comp_steady = noise_components(np.array(data['short_steady_fps']),
                                   None if data['long_steady_fps'] is None else np.array(data['long_steady_fps']))
    load = data['load_average']
    loaded = common.is_loaded(load['before'])
    flag = ' (LOADED: not claimed)' if loaded else ''
    rows: List[List[Any]] = []
    for i, lam in enumerate(data['lams']):
        rows.append([lam, comp['within_pct'][i], comp['between_pct'][i], comp['stream_pct'][i],
                     comp['long_pct'][i] if 'long_pct' in comp else None,
                     float(np.median(np.array(data['short_fps'])[i]))])
    long_col = f'one {samples * args.long_factor}-image stream, sd over passes %'
    table = common.table(
        f'Stream throughput noise on the local stand-in device (default model, deploy-form layouts, batch 1, '
        f'{samples}-image streams, {passes} passes x {repeats} back-to-back streams); measured, load average '
        f'{load["before"]} -> {load["after"]}{flag}',
        ['lambda', 'back to back, same deployment: sd %', 'between deployments (pass shift removed): sd %',
         f'one {samples}-image stream, sd over passes %', long_col, 'median fps'], rows)
    med, med_s = comp['median'], comp_steady['median']
    head = [[f'{samples}-image streams back to back in one deployment, median sd{flag}', med['within_pct'], '%'],
            ['one stream, sd over passes (what one closed-loop pass sees)', med['stream_pct'], '%'],
            ['whole-pass shift, range over passes', med['pass_effect_range_pct'], '%'],
            ['the same, steady throughput (samples / span): back to back', med_s['within_pct'], '%'],
            ['the same, steady throughput: one stream over passes', med_s['stream_pct'], '%']]
    if 'long_pct' in med:
        head.append([f'one {samples * args.long_factor}-image stream, sd over passes', med['long_pct'], '%'])
    compare = common.table(
        f'The two readings of the same streams, median over the lambdas: sd of log throughput, %; measured{flag}',
        ['component', 'median period (the closed loop\'s)', 'steady (samples / span)'],
        [[k, med[k], med_s[k]] for k in ('within_pct', 'between_pct', 'stream_pct', 'long_pct',
                                         'pass_effect_range_pct') if k in med])
    path = common.write_result(args.out_dir, NAME, {'loaded': loaded, 'components': comp,
                                                    'components_steady': comp_steady, **data}, machine, q,
                               head, [table, compare], argv)
    common.print_tables([table, compare], path)
    return 0


if __name__ == '__main__':
    run_cli(main)
