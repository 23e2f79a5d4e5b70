"""Accuracy side of the pipeline: base and alpha training (`training`), branch pruning and sensitivities
(`pruning`) and the |alpha|/GFLOPs importance (`importance`)."""
