"""The one exception type users see: the CLI prints its message on one line and exits with 2."""


class EffmlError(Exception):
    """Bad input or a broken artefact, explained in one line that says what to do."""

    exit_code = 2
