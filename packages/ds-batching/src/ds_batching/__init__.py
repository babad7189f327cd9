"""ds-batching: a pure-Python continuous-batching scheduler with a paged KV block pool.

``Scheduler`` (continuous batching, chunked prefill, preemption by recompute, prefix
caching) over ``BlockManager`` (the paged KV pool), and a static
``DynamicBatchScheduler``. No torch: it schedules token ids and block ids.
"""

from ds_batching.block_manager import BlockManager
from ds_batching.config import SchedulerConfig
from ds_batching.errors import (
    DuplicateRequestError,
    NoFreeBlocksError,
    QueueFull,
    UnknownRequestError,
)
from ds_batching.outputs import (
    FinishedRequest,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
    slot_of,
)
from ds_batching.protocol import BlockManagerProtocol, SchedulerProtocol
from ds_batching.request import FinishReason, Request, RequestStatus
from ds_batching.scheduler import Scheduler
from ds_batching.static import Batch, DynamicBatchScheduler

__version__ = "0.2.0"

__all__ = [
    "Batch",
    "BlockManager",
    "BlockManagerProtocol",
    "DuplicateRequestError",
    "DynamicBatchScheduler",
    "FinishReason",
    "FinishedRequest",
    "NoFreeBlocksError",
    "QueueFull",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerProtocol",
    "SchedulerStats",
    "UnknownRequestError",
    "__version__",
    "slot_of",
]
