"""Stage names of one SecAgg+ round, in order. Each server->client message and the client's reply carry one."""

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
