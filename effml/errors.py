"""The one exception type users see: the CLI prints its message on one line and exits with 2."""


class EffmlError(Exception):
    """Bad input or a broken artefact, explained in one line that says what to do."""

    exit_code = 2
    prefix = "effml: error: "


class Interrupted(EffmlError):
    """Ctrl-C: the run stops where it is, and the same command resumes it (exit code 130, as a shell's)."""

    exit_code = 130
    prefix = "effml: "


def one_line(error: BaseException) -> str:
    """The most specific message of an exception chain, on one line."""
    while error.__cause__ is not None and not getattr(error, "full_key", None):
        error = error.__cause__
    message = getattr(error, "msg", None) or str(error)
    key = getattr(error, "full_key", None)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    text = "; ".join(lines)
    return f"{key}: {text}" if key and key not in text else text
