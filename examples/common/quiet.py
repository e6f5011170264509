"""Hide the known start-up noise of torch / torchao / transformers while the apps load a model.

Importing transformers pulls in torchao, which logs "Failed to load ..._C_mxfp8...so" (kernels for
GPUs this machine does not have) and torch's pytree logs "KernelPreference is an Enum subclass ...
deprecated"; transformers draws a "Loading weights" bar. None of it is actionable for a user of the
demo apps, and in chat it lands between the messages. Scoped: the loggers' levels, the warning
filters and the progress bar are restored when the block ends, so later real warnings still show;
``SLM_VERBOSE=1`` (or ``verbose=True``) shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "transformers")
# Deprecation / future-behaviour notices of these libraries while importing and loading.
NOISY_MODULES = r"(torch|torchao|transformers|copyreg)(\.|$)"


@contextlib.contextmanager
def quiet_libraries(verbose: bool | None = None):
    """Within the block, known library noise at import and model load is not printed."""
    if verbose is None:
        verbose = os.environ.get("SLM_VERBOSE", "") not in ("", "0")
    if verbose:
        yield
        return
    saved = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
            bar = _hf_progress_bar(False)  # imports transformers: inside the filters
            try:
                yield
            finally:
                _hf_progress_bar(bar)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _hf_progress_bar(enabled: bool) -> bool:
    """Turn transformers' progress bars on or off (if transformers is installed); the previous state."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return enabled
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return before
