"""segjax: image segmentation with U-Net and ResNet in JAX/Flax."""

__version__ = "0.1.0"

from segjax import host as _host  # noqa: E402

# Several CPU devices in one process (XLA_FLAGS=--xla_force_host_platform_device_count=N) must not deadlock a
# data-parallel step: choose XLA:CPU's in-order scheduler for them, before JAX creates its backends.
_host.use_safe_cpu_scheduler()
