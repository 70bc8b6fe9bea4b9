"""The one client error every layer may raise: a request that cannot be answered as sent."""


class InvalidRequestError(ValueError):
    """Client error: maps to INVALID_ARGUMENT with this message."""
