class MimoError(Exception):
    """An error the user can cause or fix: the CLI prints its one-line message and exits 1."""
