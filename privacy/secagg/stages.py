"""Stage names of one SecAgg+ round, in order (each server->client message and the client's reply carry one), and
the one loop that drives a server through them (:class:`StageLoop`)."""

STAGE_SETUP = "setup"                    # server: round config (+ the client's routing weight); client: signed keys
                                         #   and a commitment to its graph nonce
STAGE_REVEAL = "reveal"                  # server: every client's signed keys + commitments; client: its nonce
STAGE_SHARE_KEYS = "share_keys"          # server: every nonce (graph seed = hash of all); client: encrypted shares
STAGE_COLLECT_MASKED = "collect_masked"  # server: shares addressed to the client; client: masked weighted input
STAGE_CONSISTENCY = "consistency"        # server: survivor set U3; client: signature over U3
STAGE_UNMASK = "unmask"                  # server: everyone's U3 signatures; client: shares of b_j / mask keys

STAGES = (STAGE_SETUP, STAGE_REVEAL, STAGE_SHARE_KEYS, STAGE_COLLECT_MASKED, STAGE_CONSISTENCY, STAGE_UNMASK)

#: default per-stage deadline (seconds) a transport should apply; a client silent past it is a dropout
DEFAULT_STAGE_TIMEOUT_S = {STAGE_SETUP: 30.0, STAGE_REVEAL: 30.0, STAGE_SHARE_KEYS: 30.0, STAGE_COLLECT_MASKED: 60.0,
                           STAGE_CONSISTENCY: 30.0, STAGE_UNMASK: 30.0}


class StageLoop:
    """The one SecAgg+ stage loop of a server, whatever carries its messages (the in-memory driver
    :func:`privacy.secagg.run_secagg_round`, the gRPC server's transport)::

        loop = StageLoop(server)              # runs server.setup()
        while not loop.done:
            replies = deliver(loop.stage, loop.outgoing)   # {client: payload} out, {client: reply} back
            loop.advance(replies)             # the server's step for this stage (CPU work: may run off an event loop)

    ``outgoing`` holds the messages of stage ``stage`` (``STAGES[index]``); the last :meth:`advance` runs the
    server's ``finish`` and ends the loop. A ``SecAggAbort`` from a step propagates; ``server.result()`` then holds
    the outcome either way."""

    def __init__(self, server):
        self._steps = server.stage_steps()
        if len(self._steps) != len(STAGES):
            raise ValueError(f"the server has {len(self._steps)} steps after setup for {len(STAGES)} stages")
        self.index = 0
        self.outgoing: dict[str, bytes] = server.setup()

    @property
    def done(self) -> bool:
        return self.index >= len(STAGES)

    @property
    def stage(self) -> str:
        return STAGES[self.index]

    def advance(self, replies: dict[str, bytes]) -> None:
        """Hand the replies to the current stage's messages to the server; the next stage's messages follow."""
        res = self._steps[self.index](replies)
        self.outgoing = res if isinstance(res, dict) else {}
        self.index += 1
