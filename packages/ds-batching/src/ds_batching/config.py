"""The scheduler's limits and policies."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerConfig"]

POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one ``Scheduler``.

    max_num_seqs: most requests running (holding KV) at once.
    max_num_batched_tokens: most tokens fed to the model in one step (decodes + prefill chunks).
    block_size / num_blocks: the paged KV pool; capacity is ``num_blocks * block_size`` slots.
    max_waiting: most requests waiting; ``add`` raises ``QueueFull`` beyond it (None: no limit).
    enable_chunked_prefill: split prompts across steps to fit the token budget. When off,
        a new prompt is scheduled whole or not at all (a prompt longer than the budget is
        rejected at ``add``); a preempted request still resumes in chunks.
    long_prefill_threshold: with chunked prefill, most prompt tokens one request may take
        in one step, so a long prompt cannot crowd out other prefills (0: no cap).
    policy: ``"fcfs"`` serves and keeps requests in arrival order; ``"priority"`` serves
        the lowest ``Request.priority`` first (ties by arrival) and preempts the highest.
    enable_prefix_caching: share KV blocks of equal prompt prefixes between requests.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_blocks: int = 4096
    max_waiting: int | None = None
    enable_chunked_prefill: bool = True
    long_prefill_threshold: int = 0
    policy: str = "fcfs"
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")
        if self.max_waiting is not None and (
            isinstance(self.max_waiting, bool)
            or not isinstance(self.max_waiting, int)
            or self.max_waiting < 1
        ):
            raise ValueError(
                f"SchedulerConfig.max_waiting must be None or an int >= 1, got {self.max_waiting!r}"
            )
        threshold = self.long_prefill_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(
                f"SchedulerConfig.long_prefill_threshold must be an int >= 0, got {threshold!r}"
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"SchedulerConfig.policy must be one of {POLICIES}, got {self.policy!r}"
            )
