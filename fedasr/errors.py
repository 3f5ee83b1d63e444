"""User-facing errors.

Every problem caused by the user's input (a missing file, a bad option, a corrupt
transcript) is raised as :class:`FedasrError` with a message that names the file or
option. The CLI prints it as a single line and exits non-zero.
"""


class FedasrError(Exception):
    """An error in the user's input; printed as one line by the CLI."""
