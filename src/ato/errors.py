"""One base class for the errors a user can fix; the CLI prints them without a traceback."""


class AtoError(RuntimeError):
    """Bad input, config or data; the message names the file, layer, pair or key at fault."""
