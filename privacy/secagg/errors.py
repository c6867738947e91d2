"""Exceptions of the secure-aggregation layer."""


class SecAggError(Exception):
    """Base class: the round cannot go on for this party (the message says why)."""


class SecAggAbort(SecAggError):
    """The server aborts the round (too few survivors, failed reconstruction, ...). Nothing is revealed."""


class ProtocolViolation(SecAggError):
    """A peer or the server sent something invalid: tampered share, forged key, lying server, replay, wrong stage."""


class MessageError(ProtocolViolation):
    """A payload that does not decode strictly (wrong type, trailing bytes, bad lengths, wrong round)."""


class WeightIsolationError(SecAggError):
    """The client refuses routing weights that would isolate it (own weight above its cap, or fewer than its
    minimum number of contributors)."""


class InputOutOfRange(SecAggError):
    """An input value lies outside the declared fixed-point range (policy ``out_of_range='error'``)."""


class ParameterError(SecAggError, ValueError):
    """Round parameters that cannot be secure or correct (threshold, degree, modulus too small, ...)."""


class DifferencingError(WeightIsolationError):
    """The client's query audit refuses a plain-``secagg`` request whose sum, combined with a sum this client
    already helped produce (same item, different cohort or weights), would isolate its scores."""


class RoundReplayError(ProtocolViolation):
    """A round id this client has already taken part in (round ids are never reused)."""
