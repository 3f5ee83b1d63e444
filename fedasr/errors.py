"""User-facing errors.

Every problem caused by the user's input (a missing file, a bad option, a corrupt
transcript) is raised as :class:`FedasrError` with a message that names the file or
option. The CLI prints it as a single line and exits with the error's ``exit_code``:
1 for a runtime error (the input's content, a file, the machine), 2 for a usage error (a
bad option value or combination, as Click's own usage errors).
"""


class FedasrError(Exception):
    """An error in the user's input; printed as one line by the CLI (exit status 1)."""

    exit_code = 1


class OptionError(FedasrError):
    """A bad command-line option value or combination, found after parsing (exit status 2,
    as Click's usage errors)."""

    exit_code = 2
