"""What a node's file says about its guest beyond the VM: when it counts as ready.

Apart from `topology.py` (the lab's shape); both are pydantic models of the file.
"""

from __future__ import annotations

import regex
from pydantic import BaseModel, ConfigDict, field_validator

MAX_PATTERN = 1000


class Readiness(BaseModel):
    """`ready: {console: REGEX}`: the node is ready once a line its guest prints on the serial
    console matches (a login prompt, a NOS's own banner). Works for any guest, whatever it
    runs, since QEMU logs the console itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    console: str

    @field_validator("console")
    @classmethod
    def _compiles(cls, value: str) -> str:
        if not value:
            raise ValueError("an empty pattern matches before the guest says anything")
        if len(value) > MAX_PATTERN:
            raise ValueError(f"a pattern of at most {MAX_PATTERN} characters")
        try:
            regex.compile(value)
        except regex.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return value
