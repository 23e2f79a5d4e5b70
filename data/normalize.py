"""The one place a uint8 image batch becomes model input.  Device-importable: Python 3.6 + torch 1.10, torch only.

Re-exported as data.datasets.normalize_batch.
"""
import torch


def normalize_batch(x, mean, std):
    # type: (torch.Tensor, object, object) -> torch.Tensor
    """uint8 batch (B, 3, S, S) -> float32 model input (x / 255 - mean) / std, per channel, on x's device."""
    m = torch.tensor(list(mean), dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s
