"""Step 3 (joint optimization per domain) from the repository root, as the seed types it:
`python step_3_joint.py --domain_id 3 --mode real` runs pipeline/step_3_joint.py with the same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import run_cli  # noqa: E402
from pipeline.step_3_joint import main  # noqa: E402

if __name__ == '__main__':
    run_cli(main)
