"""What every config section is built from: the pydantic base and the user-error class.

Its own module because sections are declared next to the code they configure (each model in
``jaxaccel/models/``, each sparsity method in ``jaxaccel/sparsity/methods.py``) and
``jaxaccel/config.py`` assembles them: those modules cannot import config.py back.
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

__all__ = ["ConfigError", "Section", "PositiveInt", "Regexes"]

# An integer >= 1, given as an integer (not 2.0, "2" or true).
PositiveInt = Annotated[StrictInt, Field(ge=1)]


def _compiles(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
    return patterns


# Regular expressions over parameter names (jaxaccel.paths), each checked to compile.
Regexes = Annotated[list[str], AfterValidator(_compiles)]


class ConfigError(ValueError):
    """A config or command-line problem the user can fix; the CLI prints it and exits 2."""


class Section(BaseModel):
    """Base of every config section."""
    # extra="forbid": an unknown key is an error, never silently ignored.
    # coerce_numbers_to_str: `workdir=2024` is a string, as the user meant.
    # allow_inf_nan=False: no float setting means anything at inf or nan (optim.learning_rate=.inf).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              coerce_numbers_to_str=True, allow_inf_nan=False)

    def differs_from_default(self, *names: str) -> list[str]:
        """Those of the fields ``names`` whose value is not their default (set to do something)."""
        fields = type(self).model_fields
        return [n for n in names if getattr(self, n) != fields[n].get_default(call_default_factory=True)]
