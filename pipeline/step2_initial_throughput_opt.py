"""Step 2: layouts (gamma per block) and split (lambda) of the unpruned model for pipelined throughput, from the LUT.

Reads hardware_lut_complete.json (step 1), solves the relaxed problem by LUT gradient descent (optim/relax.py),
compares it with the exact optimum (optim/exact.py) and with the plain-model baselines on the same LUT and link
(edge only, server only, best split of the plain deploy model), and writes initial_throughput_config.json.
Then it closes the loop (pipeline/closed_loop.py): the splits whose predicted throughput lies within the LUT's
uncertainty of the chosen one (a coin toss when there are any), and the chosen configuration, its baselines and the
loop.top_k best-predicted measured (--mode pseudo: the server part here; --mode real: through the worker).
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from artifacts import write_artifact  # noqa: E402
from config import (LINK_FLAGS, Config, add_common_args, add_link_args, command_line, resolve_config,  # noqa: E402
                    resolve_path, run_cli)

log = logging.getLogger('step2')
FLAGS = {'objective': 'optim.objective', 'omega': 'optim.omega', 'batch_size': 'optim.batch_size',
         'steps': 'optim.steps', 'restarts': 'optim.restarts', 'edge_profile': 'lut.edge_profile', 'port': 'real.port',
         'chain': 'optim.chain',
         **LINK_FLAGS}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o, d = Config().optim, Config().lut
    p.add_argument('--lut_file', help='the step-1 LUT (default: <results_dir>/hardware_lut_complete.json)')
    p.add_argument('--objective', help=f'throughput (maximize B / max stage) | latency (minimize the sum of the '
                   f'stages) | weighted (omega * latency + (1 - omega) * period) (default: {o.objective})')
    p.add_argument('--omega', help=f'weight of latency in the weighted objective, 0..1 (default: {o.omega})')
    p.add_argument('--batch_size', help=f'batch B of the cost model, frames per pipeline step; must be a batch '
                   f'size of the LUT (default: {o.batch_size})')
    p.add_argument('--steps', help=f'Adam steps per restart of the relaxed solver (default: {o.steps})')
    p.add_argument('--restarts', help=f'random restarts of the relaxed solver (default: {o.restarts})')
    add_link_args(p, reevaluate=True)
    p.add_argument('--edge_profile', help='edge device profile the LUT must have been modelled with; an error if '
                   "it was not (re-run step 1 then) (default: none asked, the LUT's own edge side is used; step 1 "
                   f'default {d.edge_profile})')
    p.add_argument('--chain', help='also optimize a chain of devices, e.g. rpi4:wifi,jetson-orin-nano:ethernet,server '
                   '(each device but the last with the link preset of its hop; device = edge | server: that side of '
                   'the LUT, or a device profile: modelled), or a JSON file {"chain": [{"device": .., "link": ..}, '
                   '..]}; predicted, in the "chain" field; --mode real also runs its chosen configuration over K - 1 '
                   'workers (hop k dials real.chain_port + k, default --port + 1 + k; every hop after the first '
                   'started with --listen) and measures every stage and link (default: none, the two-device split only)')
    p.add_argument('--mode', choices=('pseudo', 'real'), default='pseudo', help='closed loop: pseudo measures the '
                   'server part of the chosen configuration, its baselines and the loop.top_k best-predicted here '
                   '(edge part from the LUT); real measures them end to end through client_worker.py and the link '
                   '(needs a LUT whose edge side was measured on the worker) (default: pseudo)')
    p.add_argument('--port', help=f'real mode: port the session listens on (default: {Config().real.port})')
    add_common_args(p)
    return p.parse_args(argv)


def main(argv=None):
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='step2: %(message)s', stream=sys.stderr)
    t_start = time.perf_counter()
    args = parse(argv)
    cfg = resolve_config(args, FLAGS)
    from optim import cost as C
    from timing import lut as L
    from pipeline import closed_loop as CL
    from pipeline import throughput as T
    C.check_objective(cfg.optim.objective, cfg.optim.omega)
    lut_file = resolve_path(args.lut_file) if args.lut_file else cfg.path('hardware_lut_complete.json')
    lut = L.load_lut(lut_file)
    T.check_edge_profile(lut, T.requested_profile(args.edge_profile is not None, cfg), str(lut_file))
    link, link_source = T.link_for(lut, cfg.lut, args.link is not None)
    tables = L.cost_tables(lut, cfg.optim.batch_size, link)
    payload = {'lut_file': str(lut_file), 'model': lut['model'], 'input_size': lut['input_size'],
               'num_blocks': lut['num_blocks'], 'link': link.to_dict(), 'link_source': link_source,
               'feature_dtype': lut['feature_dtype'], 'edge': T.edge_info(lut)}
    payload.update(T.solve_step2(tables, T.unpruned_valid(lut), cfg.optim, cfg.seed))
    if cfg.optim.chain:
        from pipeline import chain as CH
        chain, info = CH.chain_tables(lut, CH.parse_chain(cfg.optim.chain), cfg.optim.batch_size)
        payload['chain'] = dict(info, **CH.solve_chain(chain, T.unpruned_valid(lut), cfg.optim, cfg.seed))
    t_loop = time.perf_counter()
    payload['mode'] = args.mode
    payload['closed_loop'] = CL.step2_closed_loop(cfg, lut, lut_file, tables, T.unpruned_valid(lut), payload,
                                                  args.mode)
    payload['wall_s']['closed_loop'] = time.perf_counter() - t_loop
    if 'chain' in payload and args.mode == 'real':  # each hop a worker: real.chain_port + k
        payload['chain']['real'] = CH.measure_chain(cfg, lut, payload['chain'])
    payload['wall_s']['script'] = time.perf_counter() - t_start
    out = cfg.path('initial_throughput_config.json')
    write_artifact(out, 'initial_throughput_config', payload, cfg, command_line(argv))
    print(f'{lut["model"]["name"]} ({lut["num_blocks"]} blocks, {lut["input_size"]} px), batch {tables.batch}, '
          f'link {link.name}: {link.bandwidth_mbps:g} Mbit/s, rtt {link.rtt_ms:g} ms ({link_source}); '
          f'objective {cfg.optim.objective}')
    print(T.table_text(payload))
    for line in CL.closed_loop_lines(payload['closed_loop']):
        print(line)
    if 'chain' in payload:
        print(CH.chain_text(payload['chain']))
        if 'real' in payload['chain']:
            print(CH.real_text(payload['chain']['real'], payload['chain']))
    w = payload['wall_s']
    print(f'gap to the exact optimum: {payload["gap_pct"]:.3g} % (gradient descent alone, before the local search: '
          f'{payload["gradient_descent"]["gap_pct"]:.3g} %); solvers: relaxed {w["relaxed"]:.2f} s, exact '
          f'{1e3 * w["exact"]:.2f} ms; step 2 wall {time.perf_counter() - t_start:.2f} s -> {out}')
    return 0


if __name__ == '__main__':
    run_cli(main)
