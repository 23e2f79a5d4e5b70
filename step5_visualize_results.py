"""Step 4 (figures and summary.md) under the seed's name, from the repository root:
`python step5_visualize_results.py` runs pipeline/step4_visualize_results.py with the same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import run_cli  # noqa: E402
from pipeline.step4_visualize_results import main  # noqa: E402

if __name__ == '__main__':
    run_cli(main)
