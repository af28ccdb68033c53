"""Process-level JAX setup shared by experiment scripts: compile cache, host devices, CPU dispatch."""
from __future__ import annotations

import os


def setup(compile_cache: str | None = None, *, host_devices: int | None = None) -> None:
    """Enable the persistent compilation cache (compile time dominates small models), and run CPU computations on
    the calling thread, so that the train loop can reuse each step's block of temporaries
    (:func:`rlhf_jax.memory.reusing_freed_host_memory`; ``RLHF_JAX_HOST_MALLOC=system`` leaves JAX's dispatch
    and the allocator as they are). Dispatch is fixed when JAX creates its CPU client: call this first.

    ``host_devices`` simulates that many CPU devices (only effective before jax is first imported).
    """
    if host_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={host_devices}".strip()
    import jax

    cache = compile_cache or os.environ.get("RLHF_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/rlhf_jax/jax_compile"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if os.environ.get("RLHF_JAX_HOST_MALLOC", "reuse") != "system":
        # CPU computations run on the calling thread, whose heap memory.reusing_freed_host_memory can keep
        # (a worker thread's arena maps large blocks anyway); set before JAX creates its CPU client
        jax.config.update("jax_cpu_enable_async_dispatch", False)
