"""The one exception type for user mistakes.

The CLI turns a :class:`UserError` into one line on stderr and exit status 2, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input (file, column, option, model name), stated in one line."""
