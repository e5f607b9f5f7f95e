"""Exceptions shared by every layer."""


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run the given inputs here.

    The message names the backend and the reason (not built, no GPU, wrong
    device or dtype).
    """
