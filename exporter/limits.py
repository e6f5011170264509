"""Bounds on work that input controls: a chat template is a program, and a bundle or model brings it."""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import SlmExportError

CHAT_TEMPLATE_SECONDS = 5.0  # real templates render in milliseconds
CHAT_TEMPLATE_MAX_CHARS = 1 << 20


class _Expired(BaseException):
    """Raised inside the bounded block by the timer (a BaseException, so user code cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Stop the block with a SlmExportError after ``seconds`` of wall time.

    Uses SIGALRM, so it bounds the block only in the main thread (where the CLI and the apps render
    templates); elsewhere the block runs unbounded.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _Expired()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise SlmExportError(f"{what} ran longer than {seconds:g} s and was stopped",
                             hint="a chat template should render in milliseconds; check the model's template") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_chat_template(render, what: str = "the chat template"):
    """``render()`` under the time bound; a result longer than ``CHAT_TEMPLATE_MAX_CHARS`` is refused."""
    with time_limit(CHAT_TEMPLATE_SECONDS, what):
        out = render()
    if isinstance(out, str) and len(out) > CHAT_TEMPLATE_MAX_CHARS:
        raise SlmExportError(f"{what} produced {len(out)} characters for one short message; refusing it")
    return out
