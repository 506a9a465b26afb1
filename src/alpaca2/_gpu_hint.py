"""One warning when a CPU-only build runs on a machine with an NVIDIA GPU: how to rebuild for it.

Checked at import, cheaply (no driver call): the kernel driver lists its GPUs in
/proc/driver/nvidia/gpus, or exposes /dev/nvidia0.  ALPACA2_NO_GPU_HINT=1 silences it.
"""
import logging
import os

REBUILD = "ALPACA2_CUDA=1 pip install --force-reinstall --no-deps <the alpaca2 checkout or sdist>"


def gpu_visible(proc_dir="/proc/driver/nvidia/gpus", dev="/dev/nvidia0"):
    """True when the NVIDIA kernel driver reports a GPU on this machine."""
    try:
        if os.listdir(proc_dir):
            return True
    except OSError:
        pass
    return os.path.exists(dev)


def warn_if_gpu_unused(cuda_compiled, **where):
    """Log one warning (logger "alpaca2") if a GPU is visible and this build has no CUDA backend."""
    if cuda_compiled or os.environ.get("ALPACA2_NO_GPU_HINT", "") not in ("", "0") or not gpu_visible(**where):
        return False
    logging.getLogger("alpaca2").warning(
        "alpaca2 was built for the CPU only, but this machine has an NVIDIA GPU: n_gpu_layers has no effect. "
        "Rebuild with the CUDA backend (needs the CUDA toolkit): %s", REBUILD)
    return True
