"""Errors raised for bad input. Every message names the problem and the fix."""


class KBError(ValueError):
    """A knowledge base is missing, damaged, or does not fit the request."""


class KBMismatchError(KBError):
    """A knowledge base was built with settings that differ from the query's."""


class KBChangedError(KBError):
    """Another process committed to the knowledge base since this one opened it: reopen and retry."""
