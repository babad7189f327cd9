"""ds-batching: a pure-Python continuous-batching scheduler with a paged KV block pool."""

from ds_batching.protocol import BlockManagerProtocol, SchedulerProtocol

__version__ = "0.1.0"

__all__ = ["BlockManagerProtocol", "SchedulerProtocol", "__version__"]
