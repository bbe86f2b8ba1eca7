"""Retry policies and backoff: deterministic, so the engine stays a pure function.

Jitter is derived from a hash of the saga id, step and attempt instead of a random number
generator: two sagas that fail together spread their retries apart, yet replaying the same saga
gives the same schedule (and a property test can check it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sagas_abstractions import ErrorInfo

__all__ = [
    "TIMEOUT_CODE",
    "Backoff",
    "ExponentialBackoff",
    "FixedBackoff",
    "RetryPolicy",
    "exponential",
    "fixed",
    "no_retry",
]

TIMEOUT_CODE = "timeout"
"""Error code the engine records when an attempt got no reply before its deadline."""


@runtime_checkable
class Backoff(Protocol):
    """Computes how long to wait before the next attempt."""

    def delay(self, failed_attempts: int, seed: str) -> timedelta:
        """Delay after ``failed_attempts`` failures (>= 1); ``seed`` feeds deterministic jitter."""
        ...


_MAX_EXPONENT = 64


def _unit_interval(seed: str, failed_attempts: int) -> float:
    digest = hashlib.blake2b(f"{seed}#{failed_attempts}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """``initial * multiplier ** (n - 1)``, capped at ``maximum``, minus up to ``jitter`` of it.

    Attributes:
        initial: Delay after the first failure, in seconds.
        maximum: Cap, in seconds.
        multiplier: Growth factor per failure.
        jitter: Fraction of the delay (0..1) that is randomized (deterministically per saga).
    """

    initial: float
    maximum: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0:
            raise ValueError("backoff delays must not be negative")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be between 0 and 1")

    def delay(self, failed_attempts: int, seed: str) -> timedelta:
        """Delay after ``failed_attempts`` failures, jittered deterministically by ``seed``."""
        exponent = max(failed_attempts - 1, 0)
        # Cap the exponent first: multiplier ** large overflows float.
        base = (
            self.maximum
            if exponent > _MAX_EXPONENT
            else min(self.maximum, self.initial * self.multiplier**exponent)
        )
        spread = base * self.jitter * _unit_interval(seed, failed_attempts)
        return timedelta(seconds=base - spread)


@dataclass(frozen=True, slots=True)
class FixedBackoff:
    """The same delay after every failure.

    Attributes:
        seconds: The delay.
    """

    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError("backoff delay must not be negative")

    def delay(self, failed_attempts: int, seed: str) -> timedelta:  # noqa: ARG002 - protocol
        """Always ``seconds``."""
        return timedelta(seconds=self.seconds)


def exponential(
    initial: float,
    *,
    max: float = 60.0,  # noqa: A002 - reads as exponential(0.2, max=5)
    multiplier: float = 2.0,
    jitter: float = 0.2,
) -> ExponentialBackoff:
    """Exponential backoff starting at ``initial`` seconds and capped at ``max`` seconds."""
    return ExponentialBackoff(initial=initial, maximum=max, multiplier=multiplier, jitter=jitter)


def fixed(seconds: float) -> FixedBackoff:
    """A fixed delay of ``seconds`` between attempts."""
    return FixedBackoff(seconds=seconds)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and when a step's command is tried again.

    Attributes:
        attempts: Total attempts, the first included (1 = no retry).
        backoff: Delay between attempts.
        retry_on_timeout: Whether an attempt that timed out is retried.
        retry_codes: Error codes retried even when the reply says not retryable.
        never_retry_codes: Error codes never retried even when the reply says retryable.
    """

    attempts: int = 1
    backoff: Backoff = field(default_factory=lambda: ExponentialBackoff(initial=0.2, maximum=5))
    retry_on_timeout: bool = True
    retry_codes: frozenset[str] = frozenset()
    never_retry_codes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry attempts must be >= 1 (the first attempt counts)")

    def is_retryable(self, error: ErrorInfo) -> bool:
        """Whether ``error`` may be retried under this policy (attempts aside)."""
        if error.code in self.never_retry_codes:
            return False
        if error.code == TIMEOUT_CODE:
            # Our own timeouts are retryable; a participant may still say its "timeout" is not.
            return error.retryable and self.retry_on_timeout
        return error.retryable or error.code in self.retry_codes

    def describe(self) -> dict[str, object]:
        """A stable, JSON-compatible description (part of the definition fingerprint)."""
        return {
            "attempts": self.attempts,
            "backoff": repr(self.backoff),
            "retry_on_timeout": self.retry_on_timeout,
            "retry_codes": sorted(self.retry_codes),
            "never_retry_codes": sorted(self.never_retry_codes),
        }


def no_retry() -> RetryPolicy:
    """A policy with a single attempt."""
    return RetryPolicy(attempts=1)
