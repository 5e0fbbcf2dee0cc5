"""One exception type for everything a user can fix (bad file, bad flag, bad data).

The CLI prints these as a single ``error: ...`` line instead of a traceback.
"""


class MoECLIPError(Exception):
    """A problem with the user's input: the message names the file and what is wrong."""
