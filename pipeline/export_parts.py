"""Export the chosen configuration's edge part and server part as separate weight files (deployed, fused form).

    python pipeline/export_parts.py                  # step 2's configuration (base model, nothing pruned)
    python pipeline/export_parts.py --domain_id 3    # step 3's result for domain 3 (pruned, alpha, its lambda)

Writes <results_dir>/parts/ (or parts/domain_<d>/): edge_part.npz, server_part.npz (comm/parts.py: plain arrays and
a JSON description, no pickle) and parts_manifest.json (bytes and SHA-256 of each file, the configuration).  Copy
edge_part.npz to the device: `comm.parts.load_part` (Python 3.6 + torch 1.10) rebuilds only the edge blocks from
it; `python -m comm.parts --probe edge_part.npz` reports the memory of a process holding it.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
from typing import Any, Dict, Optional, Sequence  # noqa: E402

from artifacts import ArtifactError, atomic_write_bytes, load_artifact, write_artifact  # noqa: E402
from config import Config, UserError, add_common_args, command_line, resolve_config, run_cli  # noqa: E402

PARTS_DIR = 'parts'
MANIFEST = 'parts_manifest.json'


def chosen_configuration(cfg: Config, domain: Optional[int] = None) -> Dict[str, Any]:
    """{'model', 'gammas', 'lam', 'source'}: without a domain, the base model in step 2's layouts and split; with
    one, domain d's model in step 3's configuration (domain_<d>_state.json), or in step 2's when step 3 has not run
    for it.  The model is in eval mode with the configuration applied (kept sets and layouts)."""
    from accuracy import pruning, training
    from pipeline import joint
    step2 = cfg.path('initial_throughput_config.json')
    state_file = joint.state_path(cfg, domain) if domain is not None else None
    if state_file is not None and state_file.is_file():
        state = load_artifact(state_file, 'joint_state', {'gammas': list, 'lam': int, 'blocks': list})
        model = training.load_domain_model(cfg, domain)
        try:
            model.load_hyper_weights(state)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f'{state_file}: {e}') from None
        gammas, lam, source = [int(g) for g in state['gammas']], int(state['lam']), f'step 3 ({state_file.name})'
    else:
        obj = load_artifact(step2, 'initial_throughput_config', {'gammas': list, 'lam': int})
        model = training.load_domain_model(cfg, domain) if domain is not None else training.load_base_model(cfg)
        gammas, lam = [int(g) for g in obj['gammas']], int(obj['lam'])
        source = f'step 2 ({step2.name})' + ('' if domain is None else f'; no step-3 result for domain {domain}')
    if len(gammas) != model.num_blocks or not 0 <= lam <= model.num_blocks:
        raise ArtifactError(f'{source}: configuration has {len(gammas)} layouts and lambda {lam}, the model '
                            f'{model.num_blocks} blocks; re-run the step for this model')
    pruning.apply_config(model, gammas)
    return {'model': model.eval(), 'gammas': gammas, 'lam': lam, 'source': source}


def parts_dir(cfg: Config, domain: Optional[int]) -> Path:
    return cfg.path(PARTS_DIR) if domain is None else cfg.path(PARTS_DIR, f'domain_{domain}')


def export(cfg: Config, domain: Optional[int], command: str, lam: Optional[int] = None) -> Dict[str, Any]:
    """Write both part files and the manifest; returns the manifest payload."""
    from comm import parts
    from data.datasets import dataset_stats
    chosen = chosen_configuration(cfg, domain)
    model = chosen['model']
    lam = chosen['lam'] if lam is None else int(lam)
    if not 0 <= lam <= model.num_blocks:
        raise UserError(f'--lam {lam}: expected a split point in 0..{model.num_blocks}')
    mean, std = dataset_stats(cfg)
    out = parts_dir(cfg, domain)
    files = {}
    for part in parts.PARTS:
        data = parts.part_bytes(model, lam, part, cfg.model.input_size, mean, std, cfg.lut.feature_dtype)
        path = out / f'{part}_part.npz'
        atomic_write_bytes(path, data)
        _, meta = parts.load_part(data)  # what a reader gets back: checked before the manifest names it
        files[part] = {'file': path.name, 'bytes': len(data), 'sha256': parts.sha256_hex(data),
                       'blocks': [b['index'] for b in meta['blocks']], 'has_classifier': bool(meta['head']),
                       'format': f'{parts.FORMAT} v{parts.VERSION} (.npz, allow_pickle=False)'}
    payload = {'domain': domain, 'lam': lam, 'gammas': chosen['gammas'], 'num_blocks': model.num_blocks,
               'configuration_source': chosen['source'] + ('' if lam == chosen['lam'] else f', split --lam {lam}'),
               'arch': model.spec_dict(), 'input_size': cfg.model.input_size, 'mean': list(mean), 'std': list(std),
               'feature_dtype': cfg.lut.feature_dtype, 'files': files}
    write_artifact(out / MANIFEST, 'parts_manifest', payload, cfg, command)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--domain_id', type=int, default=None, help='export domain d\'s step-3 configuration (default: '
                   'none, step 2\'s configuration of the base model)')
    p.add_argument('--lam', type=int, default=None, help='split point to export instead of the configuration\'s own, '
                   '0..N blocks on the edge (default: the configuration\'s lambda)')
    add_common_args(p)
    args = p.parse_args(argv)
    cfg = resolve_config(args)
    m = export(cfg, args.domain_id, command_line(argv), args.lam)
    d = parts_dir(cfg, args.domain_id)
    for part, f in m['files'].items():
        print(f'{part} part: blocks {len(f["blocks"])}, {f["bytes"]} bytes, sha256 {f["sha256"][:16]}... -> '
              f'{d / f["file"]}')
    print(f'lambda {m["lam"]} of {m["num_blocks"]} ({m["configuration_source"]}) -> {d / MANIFEST}')
    return 0


if __name__ == '__main__':
    run_cli(main)
