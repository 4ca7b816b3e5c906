"""The tuned tables a test sees (`deft.kernels.tuned` reads them once per process)."""

from deft.kernels import tuned


def forget_tables():
    """Forget the tables read so far and every lookup made from them (a test wrote new ones)."""
    tuned._tables.cache_clear()
    tuned._lookup.cache_clear()
