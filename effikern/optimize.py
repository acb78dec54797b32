"""``effikern.optimize`` (work in progress)."""


def optimize(model, inplace=True):
    """Placeholder; being written."""
    raise NotImplementedError
