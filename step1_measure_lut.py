"""Step 1 (hardware LUT) from the repository root, as typed in the seed: `python step1_measure_lut.py --mode
server|client|merge|pseudo|real ...` runs pipeline/step1_measure_lut.py.  `--mode client` is the edge device's
part ("run this on the Jetson"): it needs only the device-side files and runs under Python 3.6 + torch 1.10
(timing/edge_lut.py, never config.py).  Python 3.6-clean on purpose."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _mode(argv):
    for i, a in enumerate(argv):
        if a == '--mode' and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith('--mode='):
            return a.split('=', 1)[1]
    return None


if __name__ == '__main__':
    if _mode(sys.argv[1:]) == 'client':
        from timing.edge_lut import main
        sys.exit(main())
    # every other mode is server-side (config.py, Python >= 3.7): imported by name, so that this file's static import
    # closure, which the device bundle ships (comm/bundle.py), stays device-side
    import importlib
    run_cli = importlib.import_module('config').run_cli
    run_cli(importlib.import_module('pipeline.step1_measure_lut').main)
