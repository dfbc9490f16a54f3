"""Stage isolation: a stage that fails after validation degrades, is recorded, and the search goes on.

Screening, sensitivity, repair / trim, pre-scoring, latency and the delivery extras (encodings, exports, CSV,
plot) are helpers of the search, not the search: an unexpected exception inside one of them is logged with its
traceback, recorded (``result.warnings`` and the study's ``degradations`` attribute, which the report shows) and
the stage's fallback is used. Input errors (``AutoQuantError``) and interrupts pass through. Python has no
such boundary of its own and Optuna's ``catch`` covers only the objective, hence this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

import optuna

from .errors import AutoQuantError

_log = logging.getLogger("autoquant")
#: user attribute of the study listing the degradations of every run ("stage: what happened")
DEGRADATIONS = "degradations"
MAX_RECORDED = 50
#: the stage optimize() is in, for an InternalError's message
current_stage: contextvars.ContextVar[str] = contextvars.ContextVar("autoquant_stage", default="setup")


class Degradations:
    """Collects what failed and how the search went on; ``study`` (once known) keeps a copy."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.study: optuna.Study | None = None

    @contextlib.contextmanager
    def guard(self, stage: str, fallback: str) -> Iterator[None]:
        """Run the block; an unexpected exception becomes a recorded degradation ("``stage`` failed ...;
        ``fallback``"). The caller's code after the block must then work without its result."""
        try:
            yield
        except (AutoQuantError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            _log.warning("autoquant: stage %s failed; %s", stage, fallback, exc_info=True)
            self.record(f"{stage} failed ({type(exc).__name__}: {str(exc)[:200]}); {fallback}")

    def record(self, note: str) -> None:
        if note in self.notes:
            return
        self.notes.append(note)
        if self.study is not None:
            with contextlib.suppress(Exception):  # the record is a courtesy: never a second failure
                old = list(self.study.user_attrs.get(DEGRADATIONS, []))
                if note not in old and len(old) < MAX_RECORDED:
                    self.study.set_user_attr(DEGRADATIONS, old + [note])


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the block as stage ``name`` (an InternalError raised out of it names it: on an exception the
    mark stays for optimize() to read)."""
    token = current_stage.set(name)
    yield
    current_stage.reset(token)
