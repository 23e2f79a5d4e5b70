"""Named edge-device profiles and the roofline + per-kernel-overhead model that predicts LUT entries from them.

A profile's peak throughput and memory bandwidth are published figures (each value carries its `source`);
the achievable-efficiency factors and the per-kernel overhead are ASSUMPTIONS (labelled as such): eager
PyTorch with cuDNN / oneDNN reaches only a fraction of the peak on the small convolutions of a RepVGG block,
and every kernel pays a launch/dispatch cost on the device's (slow) CPU.

Model (docs/design.md#device-profiles), for one LUT entry with `flops` FLOPs, `bytes` moved and `kernels` launched:

    time_s = max(flops / (peak_flops * compute_efficiency), bytes / (mem_bandwidth * memory_efficiency))
             + kernels * kernel_overhead_s

It is non-decreasing in flops, bytes and kernels (tested).  Predicted entries are marked "modelled".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from errors import UserError


class ProfileError(UserError, KeyError):
    """Unknown device profile name; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Value:
    value: float
    source: str  # where the number comes from: a datasheet, a derivation, or 'assumption: ...'


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    peak_flops_fp32: Value  # FLOP/s
    peak_flops_fp16: Value  # FLOP/s
    mem_bandwidth: Value  # bytes/s
    compute_efficiency: Value  # achievable share of the peak FLOP/s on conv kernels (0..1)
    memory_efficiency: Value  # achievable share of the memory bandwidth (0..1)
    kernel_overhead_s: Value  # launch / dispatch time per kernel, s

    def peak_flops(self, precision: str = 'fp32') -> float:
        if precision not in ('fp32', 'fp16'):
            raise ValueError(f'precision must be fp32 or fp16, got {precision!r}')
        return (self.peak_flops_fp32 if precision == 'fp32' else self.peak_flops_fp16).value

    def knee_flop_per_byte(self, precision: str = 'fp32') -> float:
        """Roofline ridge point I_knee = peak FLOP/s / memory bandwidth (published figures)."""
        return self.peak_flops(precision) / self.mem_bandwidth.value

    def predict_ms(self, flops: float, nbytes: float, kernels: int, precision: str = 'fp32') -> float:
        """Roofline + overhead prediction of one entry's time, ms."""
        if flops < 0 or nbytes < 0 or kernels < 0:
            raise ValueError(f'flops, bytes and kernels must be >= 0, got {flops}, {nbytes}, {kernels}')
        compute = flops / (self.peak_flops(precision) * self.compute_efficiency.value)
        memory = nbytes / (self.mem_bandwidth.value * self.memory_efficiency.value)
        return (max(compute, memory) + kernels * self.kernel_overhead_s.value) * 1e3

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d['knee_flop_per_byte'] = self.knee_flop_per_byte()
        return d


_EFF_GPU = Value(0.5, 'assumption: eager PyTorch/cuDNN FP32 convolutions of RepVGG size reach about half '
                      'of the GPU peak')
_MEM_GPU = Value(0.7, 'assumption: about 70 % of the theoretical DRAM bandwidth is achievable (stream-copy level)')

PROFILES: Dict[str, DeviceProfile] = {
    'jetson-tx2': DeviceProfile(
        'jetson-tx2', 'NVIDIA Jetson TX2 (256-core Pascal GP10B @ 1.3 GHz, 8 GB 128-bit LPDDR4), MAXN',
        Value(665.6e9, 'NVIDIA Jetson TX2 module datasheet: 256 CUDA cores x 2 FLOP x 1.30 GHz = 665.6 GFLOP/s FP32'),
        Value(1.33e12, 'NVIDIA Jetson TX2 developer blog / datasheet: 1.33 TFLOP/s FP16 (2x FP32 rate)'),
        Value(59.7e9, 'NVIDIA Jetson TX2 module datasheet: 128-bit LPDDR4, 59.7 GB/s'),
        _EFF_GPU, _MEM_GPU,
        Value(40e-6, 'assumption: ~40 us per PyTorch op (dispatch on the Denver2/A57 CPU + CUDA launch)')),
    'jetson-nano': DeviceProfile(
        'jetson-nano', 'NVIDIA Jetson Nano (128-core Maxwell GM20B @ 921.6 MHz, 4 GB 64-bit LPDDR4), MAXN',
        Value(236e9, 'derived from NVIDIA Jetson Nano datasheet: 128 CUDA cores x 2 FLOP x 0.9216 GHz = 236 GFLOP/s FP32'),
        Value(472e9, 'NVIDIA Jetson Nano datasheet: 472 GFLOP/s FP16'),
        Value(25.6e9, 'NVIDIA Jetson Nano datasheet: 64-bit LPDDR4, 25.6 GB/s'),
        _EFF_GPU, _MEM_GPU,
        Value(50e-6, 'assumption: ~50 us per PyTorch op (dispatch on the Cortex-A57 CPU + CUDA launch)')),
    'jetson-orin-nano': DeviceProfile(
        'jetson-orin-nano', 'NVIDIA Jetson Orin Nano 8 GB (1024-core Ampere @ 625 MHz, 128-bit LPDDR5), 15 W',
        Value(1.28e12, 'derived from NVIDIA Jetson Orin Nano datasheet: 1024 CUDA cores x 2 FLOP x 0.625 GHz '
                       '= 1.28 TFLOP/s FP32 (non-tensor)'),
        Value(2.56e12, 'derived: 2x the FP32 rate for FP16 on Ampere CUDA cores (tensor cores not modelled)'),
        Value(68e9, 'NVIDIA Jetson Orin Nano datasheet: 128-bit LPDDR5, 68 GB/s (102 GB/s in the later "Super" mode)'),
        _EFF_GPU, _MEM_GPU,
        Value(20e-6, 'assumption: ~20 us per PyTorch op (dispatch on the Cortex-A78AE CPU + CUDA launch)')),
    'rpi4': DeviceProfile(
        'rpi4', 'Raspberry Pi 4 Model B (4x Cortex-A72 @ 1.5 GHz, LPDDR4-3200 32-bit), CPU inference',
        Value(48e9, 'derived: 4 cores x 1.5 GHz x 8 FP32 FLOP/cycle (one 128-bit NEON FMA per cycle) = 48 GFLOP/s'),
        Value(48e9, 'derived: no faster FP16 arithmetic path is used by PyTorch on the A72; same as FP32'),
        Value(12.8e9, 'derived from the Raspberry Pi 4 product brief: LPDDR4-3200 on a 32-bit bus = 12.8 GB/s'),
        Value(0.3, 'assumption: PyTorch CPU convolutions reach ~30 % of the NEON peak on a Cortex-A72'),
        Value(0.4, 'assumption: ~40 % of the theoretical LPDDR4 bandwidth is achievable on the Pi 4'),
        Value(15e-6, 'assumption: ~15 us per PyTorch CPU op (dispatch + thread-pool wake-up)')),
}


def get_profile(name: str) -> DeviceProfile:
    """The profile `name`; an unknown name is a ProfileError listing the valid choices."""
    if name not in PROFILES:
        raise ProfileError(f'--edge_profile / lut.edge_profile: unknown device profile {name!r}; '
                           f'valid choices: {", ".join(sorted(PROFILES))}')
    return PROFILES[name]
