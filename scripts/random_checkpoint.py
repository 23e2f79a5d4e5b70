"""Write a checkpoint of random weights for a plain network, in torchvision's state-dict layout (nothing downloaded).

    .venv/bin/python scripts/random_checkpoint.py --model resnet50 --num_classes 10 --out /tmp/resnet50_random.pt

The file is what `--checkpoint` takes for mobilenet_v2 / resnet18 / resnet50 (loaded strictly with
torch.load(weights_only=True)): torchvision's own module built with weights=None and seeded, its BatchNorm statistics
drawn at random too (timing.measure.randomize_bn_, as the LUT's timing model), so every layer computes something.
For timing and plumbing only: its accuracy is chance.  `--wrap` stores it as {'state_dict': {'module.' + key: ...}},
the DataParallel form a trained checkpoint often has (accepted as well).
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside scripts/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from config import UserError, run_cli  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    import chain_nets as CN
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help=f'plain network: {", ".join(CN.NETS)} (required)')
    p.add_argument('--num_classes', type=int, default=10,
                   help='classifier outputs; must match the dataset step 0 uses (10 for Fashion-MNIST) (default: 10)')
    p.add_argument('--width', type=float, default=None,
                   help='mobilenet_v2 only: torchvision width_mult; give the run model.width_multiplier=W,W,W,W '
                   '(default: none, 1.0)')
    p.add_argument('--seed', type=int, default=0, help='torch seed of the weights and BN statistics (default: 0)')
    p.add_argument('--wrap', action='store_true', help="store as {'state_dict': {'module.' + key: tensor}} "
                   '(default: off, a bare state dict)')
    p.add_argument('--out', required=True, metavar='FILE', help='output file (.pt) (required)')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    import nets
    from data._torchvision import torchvision_chain_net
    from timing.measure import randomize_bn_
    try:
        name = nets.canonical_name(args.model)
    except KeyError as e:
        raise UserError(f'--model: {e.args[0]}') from None
    if not nets.is_plain(name):
        raise UserError(f'--model {args.model}: not a plain network (for RepVGG, train one with step 0)')
    if args.num_classes < 1:
        raise UserError(f'--num_classes {args.num_classes}: expected an integer >= 1')
    wm = None if args.width is None else [float(args.width)] * 4
    torch.manual_seed(args.seed)
    try:
        model = torchvision_chain_net({'name': name, 'num_classes': args.num_classes, 'width_multiplier': wm})
    except ValueError as e:
        raise UserError(f'--width: {e}') from None
    g = torch.Generator()
    g.manual_seed(args.seed + 1)
    state = randomize_bn_(model, g).state_dict()
    if args.wrap:
        state = {'state_dict': {'module.' + k: v for k, v in state.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(out))
    n = sum(v.numel() for v in model.state_dict().values())
    print(f'{name}: {n} random numbers ({args.num_classes} classes, width {args.width or 1.0}) -> {out}')  # noqa: T201
    return 0


if __name__ == '__main__':
    run_cli(main)
