"""The one error a caller of the scheduler has to handle: a problem that does not make sense.

Solving never raises for a problem that validated: an impossible placement is an answer
(`unplaced` with reasons), not an error.
"""

from __future__ import annotations

from typing import Any


class ProblemError(ValueError):
    """A problem document is malformed or refers to something that does not exist.

    `field` is the JSON path ("deployments[3].tenant"), `value` the offending value.
    """

    def __init__(self, field: str, value: Any, message: str) -> None:
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)
