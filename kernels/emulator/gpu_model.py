"""A modelled time floor for a kernel's counted memory traffic on a named GPU.

A *model*, not a measurement: every output that shows it says so. The floor is
the largest of the times each resource needs for the traffic the counters mode
counted, each at that resource's peak rate:

- DRAM: the distinct sectors read plus those written (a perfect cache) at the
  measured copy bandwidth;
- L2: every sector the requests move, an atomic twice (read-modify-write);
- L1/LSU: every sector at 4 sectors (128 bytes) per clock per SM;
- atomics: the atomic sectors at the L2's atomic rate.

The *modelled roofline fraction* is the operator's ideal bytes at the DRAM
bandwidth over the floor: 1.0 for a kernel that moves nothing but the operator's
own tensors, once. Every rate and its source is in docs/counters.md; the rates
marked "assumption" are to be replaced by ratios calibrated against ncu.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .traced import SECTOR_BYTES, LaunchCounters


@dataclasses.dataclass(frozen=True)
class GpuRates:
    """The peak rates of one GPU that the floor is built from (docs/counters.md)."""

    name: str
    sms: int
    clock_hz: float  # SM boost clock
    dram_bytes_per_s: float  # measured (or assumed) copy bandwidth
    l2_bytes_per_s: float
    l1_sectors_per_clock_per_sm: float
    atomic_sectors_per_s: float


GPUS: dict[str, GpuRates] = {
    # H200 SXM: 132 SMs at 1980 MHz; the copy bandwidth the GPU check measured (4.3 TB/s
    # of the 4.8 TB/s HBM3e peak); L2 and atomic rates are assumptions (see the docs).
    "h200": GpuRates("NVIDIA H200 SXM (model)", sms=132, clock_hz=1.98e9,
                     dram_bytes_per_s=4.3e12, l2_bytes_per_s=2 * 4.3e12,
                     l1_sectors_per_clock_per_sm=4, atomic_sectors_per_s=4.3e12 / SECTOR_BYTES),
    # A100 SXM4 80 GB: 108 SMs at 1410 MHz; 90% of the 2.039 TB/s HBM2e peak (the H200's
    # measured copy fraction), L2 and atomics as for the H200.
    "a100": GpuRates("NVIDIA A100 SXM4 80GB (model)", sms=108, clock_hz=1.41e9,
                     dram_bytes_per_s=0.9 * 2.039e12, l2_bytes_per_s=2 * 0.9 * 2.039e12,
                     l1_sectors_per_clock_per_sm=4,
                     atomic_sectors_per_s=0.9 * 2.039e12 / SECTOR_BYTES),
}
RESOURCES = ("dram", "l2", "l1", "atomics")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """The counters the model needs, summed over one or more launches."""

    load_sectors: int = 0
    store_sectors: int = 0
    atomic_sectors: int = 0
    dram_bytes: int = 0

    @classmethod
    def of(cls, launches: Iterable[LaunchCounters]) -> Traffic:
        total = cls()
        for launch in launches:
            total = Traffic(total.load_sectors + launch.total("load").sectors,
                            total.store_sectors + launch.total("store").sectors,
                            total.atomic_sectors + launch.total("atomic").sectors,
                            total.dram_bytes + launch.dram_bytes)
        return total


@dataclasses.dataclass(frozen=True)
class Floor:
    """Modelled seconds per resource; ``seconds`` is the largest, ``bound`` its name."""

    gpu: str
    by_resource: dict[str, float]

    @property
    def seconds(self) -> float:
        return max(self.by_resource.values())

    @property
    def bound(self) -> str:
        return max(self.by_resource, key=self.by_resource.__getitem__)

    def roofline_fraction(self, ideal_bytes: float, rates: GpuRates) -> float:
        """The operator's ideal bytes at DRAM bandwidth over the floor (modelled)."""
        return ideal_bytes / rates.dram_bytes_per_s / self.seconds if self.seconds else 0.0


def gpu_rates(name: str) -> GpuRates:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"--gpu: expected one of {', '.join(GPUS)}, got {name!r}") from None


def floor(traffic: Traffic, gpu: str) -> Floor:
    """The modelled time floor of ``traffic`` on ``gpu`` ("h200" or "a100")."""
    rates = gpu_rates(gpu)
    sectors = traffic.load_sectors + traffic.store_sectors + traffic.atomic_sectors
    l2_sectors = sectors + traffic.atomic_sectors  # an atomic reads and writes its sector
    return Floor(gpu, {
        "dram": traffic.dram_bytes / rates.dram_bytes_per_s,
        "l2": l2_sectors * SECTOR_BYTES / rates.l2_bytes_per_s,
        "l1": sectors / (rates.l1_sectors_per_clock_per_sm * rates.sms * rates.clock_hz),
        "atomics": traffic.atomic_sectors / rates.atomic_sectors_per_s,
    })


__all__ = ["GPUS", "RESOURCES", "Floor", "GpuRates", "Traffic", "floor", "gpu_rates"]
