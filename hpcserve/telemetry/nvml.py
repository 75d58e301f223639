"""The NVML sampler: utilisation, memory, power and SM clock of the GPUs a job sees, through nvidia-ml-py.

``pynvml`` loads ``libnvidia-ml.so.1`` (the driver's NVML) with ctypes on ``nvmlInit``; this module calls
only its public entry points. The job's devices come from ``CUDA_VISIBLE_DEVICES``
(``hpcserve.telemetry.devices``).
A field the device does not report (power on some boards, everything but memory on a MIG slice) becomes None,
or, for utilisation and memory, which a sample cannot go without, skips that device's sample.

Where no NVML library or driver is present (no GPU), ``open`` raises ``NvmlUnavailable``. Tests and machines
without a GPU load a recorded device instead (``tests/nvml_recorded``: a ``libnvidia-ml.so.1`` found through
``LD_LIBRARY_PATH`` that replays ``$HPCSERVE_NVML_RECORDING``), through the same calls.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from hpcserve.errors import HpcserveError
from hpcserve.model.telemetry import GpuSample
from hpcserve.telemetry.devices import ENV, VisibleDevice, visible_devices

log = logging.getLogger(__name__)
T = TypeVar("T")
_INIT_LOCK = threading.Lock()  # pynvml's init/shutdown count is process-wide


class NvmlUnavailable(HpcserveError):
    """No NVML here: no library (no NVIDIA driver installed) or a driver that does not answer."""

    exit_code = 69  # EX_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Device:
    """A visible device with its NVML handle, UUID, name and total memory (read once, at open)."""

    visible: VisibleDevice
    handle: Any
    uuid: str
    name: str


class NvmlSampler:
    """Samples the job's GPUs. ``open()`` initialises NVML and finds the devices, ``sample()`` reads them,
    ``close()`` shuts NVML down; or use it as a context manager. ``visible`` is ``CUDA_VISIBLE_DEVICES``
    (default: this process's), ``clock`` the time each sample is stamped with."""

    def __init__(
        self,
        job_id: str,
        visible: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.job_id, self.clock = job_id, clock
        self.visible = os.environ.get(ENV) if visible is None else visible
        self.devices: tuple[Device, ...] = ()
        self.driver = ""
        self._opened = False
        self._skipped: set[tuple[str, str]] = set()  # (uuid, field) already logged once

    def __enter__(self) -> NvmlSampler:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> NvmlSampler:
        """Initialise NVML and find the visible devices; ``NvmlUnavailable`` when there is no NVML."""
        import pynvml

        with _INIT_LOCK:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise NvmlUnavailable(
                    f"NVML is not available here: {exc} (fix: run it on a GPU node with the NVIDIA driver, "
                    "or put a libnvidia-ml.so.1 on LD_LIBRARY_PATH)"
                ) from None
            self._opened = True
        try:
            self.driver = str(_optional(pynvml.nvmlSystemGetDriverVersion) or "")
            self.devices = self._find_devices()
        except pynvml.NVMLError as exc:
            self.close()
            raise NvmlUnavailable(f"NVML could not list the GPUs: {exc}") from None
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        import pynvml

        with _INIT_LOCK:
            if self._opened:
                self._opened = False
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError as exc:
                    log.debug("nvmlShutdown: %s", exc)

    def _find_devices(self) -> tuple[Device, ...]:
        import pynvml

        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        visibility = visible_devices(self.visible, uuids)
        if visibility.stopped_at is not None:
            log.warning("%s=%s: no device %r here (CUDA stops there too): sampling %d device(s) before it",
                        ENV, self.visible, visibility.stopped_at, len(visibility.devices))  # fmt: skip
        found = [self._device(v, handles) for v in visibility.devices]
        return tuple(d for d in found if d is not None)

    def _device(self, visible: VisibleDevice, handles: list[Any]) -> Device | None:
        import pynvml

        try:
            if visible.nvml_index is not None:
                handle = handles[visible.nvml_index]
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible.uuid)
        except pynvml.NVMLError as exc:
            log.warning("%s entry %s: NVML has no such device (%s): not sampled", ENV, visible.uuid, exc)
            return None
        name = str(_optional(pynvml.nvmlDeviceGetName, handle) or "")
        return Device(visible, handle, visible.uuid, name)

    def sample(self) -> list[GpuSample]:
        """One sample per visible device, all stamped with the same time."""
        at = self.clock()
        samples = (self._read(device, at) for device in self.devices)
        return [s for s in samples if s is not None]

    def _read(self, device: Device, at: datetime) -> GpuSample | None:
        import pynvml

        handle = device.handle
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError as exc:
            self._once(device.uuid, "utilization", f"no utilisation or memory reading ({exc}): not sampled")
            return None
        power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)
        clock = _optional(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM)
        return GpuSample(
            at=at,
            job_id=self.job_id,
            gpu_uuid=device.uuid,
            gpu_index=device.visible.gpu_index,
            util_pct=float(util.gpu),
            mem_used_bytes=int(memory.used),
            mem_total_bytes=int(memory.total),
            power_w=None if power_mw is None else power_mw / 1000.0,
            sm_clock_mhz=None if clock is None else int(clock),
        )

    def _once(self, uuid: str, what: str, message: str) -> None:
        if (uuid, what) not in self._skipped:
            self._skipped.add((uuid, what))
            log.info("GPU %s: %s", uuid, message)


def _optional(read: Callable[..., T], *args: Any) -> T | None:
    """``read(*args)``, or None when NVML cannot give it (not supported, no permission, ...)."""
    import pynvml

    try:
        return read(*args)
    except pynvml.NVMLError:
        return None


@contextmanager
def open_sampler(job_id: str, visible: str | None = None) -> Iterator[NvmlSampler]:
    """``NvmlSampler(job_id, visible)``, opened, closed on exit."""
    with NvmlSampler(job_id, visible) as sampler:
        yield sampler
