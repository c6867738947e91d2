"""Secure aggregation (SecAgg+, Bell et al. 2020 on Bonawitz et al. 2017) as pure state machines.

One module per primitive: :mod:`quantization` (fixed point + modulus check), :mod:`shamir` (GF(2^256+297)),
:mod:`keys` (X25519, HKDF-SHA256, AES-256-GCM, Ed25519 signatures), :mod:`prg` (AES-256-CTR masks),
:mod:`graph` (k-regular neighbour graph, seed from every client's signed nonce, threshold from the tolerated
colluders), :mod:`messages` (strict bytes), :mod:`ddp` (distributed DP calibration), :mod:`query_audit` (round-id
reuse and differencing guard, SQLite); :mod:`client` / :mod:`server` state machines and :func:`run_secagg_round`
(in-memory driver). No grpc here, and no torch: importing this package must stay light (the server imports it
on its event loop); the DP accounting stack is imported lazily by the client's ``secagg+dp`` path only.
"""

from .client import SecAggClient
from .driver import RoundStats, make_identities, run_secagg_round
from .errors import (DifferencingError, InputOutOfRange, MessageError, ParameterError, ProtocolViolation,
                     RoundReplayError, SecAggAbort, SecAggError, WeightIsolationError)
from .query_audit import QueryAudit
from .server import SecAggResult, SecAggServer
from .stages import (DEFAULT_STAGE_TIMEOUT_S, STAGE_COLLECT_MASKED, STAGE_CONSISTENCY, STAGE_SETUP, STAGE_SHARE_KEYS,
                     STAGE_UNMASK, STAGES, StageLoop)

__all__ = ["SecAggClient", "SecAggServer", "SecAggResult", "RoundStats", "run_secagg_round", "make_identities",
           "SecAggError", "SecAggAbort", "ProtocolViolation", "MessageError", "WeightIsolationError",
           "DifferencingError", "RoundReplayError", "QueryAudit",
           "InputOutOfRange", "ParameterError", "STAGES", "STAGE_SETUP", "STAGE_SHARE_KEYS", "STAGE_COLLECT_MASKED",
           "STAGE_CONSISTENCY", "STAGE_UNMASK", "DEFAULT_STAGE_TIMEOUT_S", "StageLoop"]
