"""Step 2 (layouts and split for throughput) from the repository root, as the seed types it:
`python step2_initial_throughput_opt.py --lut_file results/hardware_lut_complete.json` runs
pipeline/step2_initial_throughput_opt.py with the same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import run_cli  # noqa: E402
from pipeline.step2_initial_throughput_opt import main  # noqa: E402

if __name__ == '__main__':
    run_cli(main)
