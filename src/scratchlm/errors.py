"""The one exception type for a user's mistake.

Anything raised as `UserError` is printed by the CLI as a single line and exits non-zero; everything
else is a bug in scratchlm and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, a bad value. The message says what to do."""
