"""The errors a user can meet, by what the command line does with them: bad input (exit code 2,
refused before any work) and failures at run time (exit code 1). Both carry a one-line message
that names the field, file or step and what to change; the CLI prints it without a traceback."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """Bad input (a config value, a file, a run folder): the message starts with the dotted path
    of the field or the name of the file. Raised before any work, so nothing was written."""


class RunStateError(ConfigError):
    """A run folder whose state cannot be resumed (a corrupt checkpoint, lost metrics, another
    kind of run, a run in progress); the message names the file and the way out."""


class RunError(RuntimeError):
    """A failure after the work started (exit code 1): what was saved up to it is kept."""


class Diverged(RunError):
    """A NaN or exploding loss: the run stopped before applying the step that produced it."""

    def __init__(self, where: str, detail: str, checkpoint: Path | None, saved_at: str | None, knob: str) -> None:
        kept = f"the last good checkpoint is {checkpoint} ({saved_at})" if checkpoint else "no checkpoint was saved"
        super().__init__(f"{where}: the loss diverged ({detail}); stopped before applying it; {kept}. {knob}")
        self.where, self.checkpoint = where, checkpoint
