"""The one exception type a user should see as a message rather than a traceback."""


class MoelabError(Exception):
    """Bad input or state the user can fix; the message says what is wrong and what to do.

    The command line prints these as one line (no traceback); everything else is a bug and keeps
    its traceback.
    """
