"""GPU clocks, temperature and driver version through NVML, when ``pynvml``
(the nvidia-ml-py package) is importable and a driver answers; every reading
is ``None`` otherwise, so results say "not recorded" rather than guess.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: NVML is simply not there
        return None
    return pynvml


@functools.cache
def _handle(index: int) -> Any | None:
    """The NVML handle of torch's CUDA device ``index``, found by PCI bus id
    (indices differ between the two under ``CUDA_VISIBLE_DEVICES``)."""
    nvml = _nvml()
    if nvml is None:
        return None
    props = torch.cuda.get_device_properties(index)
    bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    try:
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except nvml.NVMLError:
        return None


def sensors() -> dict[str, int | None]:
    """SM clock (MHz) and temperature (°C) of the current CUDA device, now."""
    handle = _handle(torch.cuda.current_device())
    if handle is None:
        return {"sm_clock_mhz": None, "gpu_temp_c": None}
    nvml = _nvml()
    return {
        "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
        "gpu_temp_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
    }


def driver_version() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    version = nvml.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else version
