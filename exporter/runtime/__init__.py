"""Device-side runtime: runs an exported bundle with only numpy and the format's runtime installed.

This package imports nothing from the rest of ``exporter`` (only relative imports), so the device
adapters copy the folder as it is next to the bundle. A runner for format F lives in ``F_runner.py``
and is found by that name: adding a format's runner is adding one file.
"""

from .base import (  # noqa: F401
    RUNTIME_SPEC,
    CausalLMRunner,
    EncoderRunner,
    greedy_generate,
    open_runner,
    read_spec,
)
