"""Where a model runs and in which precision: `--device` and `--dtype`, resolved once.

Every command and the Python API take the same two strings:

* device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``;
* dtype: ``auto`` (bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU),
  ``float32``, ``bfloat16``, ``float16`` (``fp32``, ``bf16``, ``fp16`` also accepted).

`resolve_placement` checks both before anything is loaded, so a device that does not exist or a
dtype the device cannot run is one clear line (a `DeviceError`, a ValueError) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


class DeviceError(ValueError):
    """A device or dtype this machine cannot provide; the message says what to use instead."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A torch.device that exists here, or a DeviceError naming what does."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                              "use --device cpu or --device auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "meta":
        raise DeviceError("--device meta holds no data; use auto, cpu or cuda")
    backend = getattr(torch, device.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise DeviceError(f"--device {name}: no {device.type} backend is available here; use --device cpu or auto")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype for `device`: auto picks bf16 on a GPU that supports it (fp16 on an older one) and
    fp32 on CPU; an explicit dtype the device cannot run is a DeviceError."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        dtype = name
    else:
        key = (name or "auto").strip().lower()
        key = ALIASES.get(key, key)
        if key == "auto":
            if device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        if key not in DTYPES:
            raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[key]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use --dtype float16 or float32")
    return dtype


def resolve_placement(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto") -> Placement:
    dev = resolve_device(device)
    return Placement(dev, resolve_dtype(dtype, dev))


def model_placement(model: torch.nn.Module) -> Placement:
    """Where a model's (first floating) parameters live."""
    for p in model.parameters():
        if p.is_floating_point():
            return Placement(p.device, p.dtype)
    return Placement(torch.device("cpu"), torch.float32)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can use: free GPU memory, or available RAM (MemAvailable) on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)
