"""Every default and timeout of the distributed pipeline, documented in one place.

Workers, the client and the CLI take these as defaults; each can be overridden by a flag, a ``COSINE_*``
environment variable or a TOML file (see ``cosine worker --help``). Times are seconds unless the name
says ``_MS``.
"""

from __future__ import annotations

# -- broker -----------------------------------------------------------------------------------------------
REDIS_URL = "redis://127.0.0.1:6379/0"
DASHBOARD_PORT = 8265  # `cosine dashboard`, and the one `cosine up` and the demo start
KEY_PREFIX = "cosine"  # all keys live under "<prefix>:"; several deployments can share one Redis
# Client socket timeout. Must exceed the longest BLOCK we issue, or redis-py raises TimeoutError mid-read.
SOCKET_TIMEOUT_S = 10.0
# Safety cap on job streams (MAXLEN ~). Streams stay short by deleting entries on ack; this only bounds a
# stream whose consumers are all gone. Trimming can drop undelivered jobs, so keep it far above any backlog.
STREAM_MAXLEN = 200_000
# Requests a deployment accepts at once, queued or in flight (the request stream's length: entries are deleted
# when their request ends); a client's submit past it raises OverloadedError instead of queueing a request
# that the safety cap above could later trim away unseen.
MAX_OUTSTANDING_REQUESTS = 10_000
PRIORITY_RESERVE = 0.1  # the last share of that bound only admits requests with priority > 0
DLQ_MAXLEN = 10_000  # dead letters kept (MAXLEN ~)
DLQ_FIELD_BYTES = 4096  # a dead letter keeps at most this much of each original field (and 16 fields)
CANCEL_MAXLEN = 10_000  # cancellation notices kept
OUTPUT_TTL_S = 600.0  # a finished request's output stream lives this long for late readers
# An unfinished request's output stream expires this long after its last chunk (so a request nobody ends,
# e.g. after Redis lost its entry, does not leave its stream forever); every chunk renews it.
OUTPUT_OPEN_TTL_S = 3600.0
RECONNECT_BACKOFF_S = (0.05, 2.0)  # workers retry a lost Redis forever, backing off between these bounds

# -- liveness and recovery --------------------------------------------------------------------------------
HEARTBEAT_INTERVAL_S = 0.5  # each worker's heartbeat (a thread that never waits on model work)
WORKER_DEAD_AFTER_S = 3.0  # no heartbeat for this long = dead (its requests and drafts move elsewhere)
# A worker silent this long is forgotten: its registry entry, its own streams (draft/verify/ask/votes) and its
# consumer in the request group once nothing is pending for it (workers named by pid never come back).
WORKER_FORGET_AFTER_S = 600.0
ADMISSION_REFRESH_S = 1.0  # the owning verifier re-claims its admission entries (XCLAIM JUSTID) this often
RECLAIM_INTERVAL_S = 0.5  # how often some verifier runs the reclaim sweep (one at a time: SET NX PX)
# Admission entries idle longer than this AND owned by a dead (or unknown) verifier are reclaimed.
RECLAIM_MIN_IDLE_S = 2.0
MAX_DELIVERIES = 5  # an admission entry delivered more often goes to the dead-letter stream (poison)

# -- verifier ---------------------------------------------------------------------------------------------
VERIFIER_MAX_ACTIVE = 32  # requests one verifier holds at once (its batch limit)
VERIFIER_MAX_BATCH_TOKENS = 2048  # cap on tokens (roots + draft nodes) in one verification forward
# New requests a verifier admits (prefills) per loop turn, between verification passes: a burst admitted at
# once stalls every request in flight for its whole prefill (11 prompts took 0.85 s on the CPU zoo). The rest
# of what one read took waits, read and pending for this verifier, for the next turns.
VERIFIER_ADMIT_PER_TICK = 2
VERIFIER_IDLE_BLOCK_MS = 50  # blocking read when the verifier has nothing to do
CANCEL_POLL_S = 0.02  # how often a verifier looks for cancellations (one XREAD)
VERIFIER_DRAIN_TIMEOUT_S = 5.0  # on SIGTERM, finish active requests this long; the rest are reclaimed by others
SPEC_K = 4  # draft positions per round
SPEC_TREE_WIDTH = 1  # candidates per position sent by drafters (1 = chains)
# Sampling requests: "onehot" drafts (deterministic; the output is the target's own keyed samples whether or
# not drafts arrive in time, so seeded requests are reproducible) or "sampled" drafts (rejection sampling
# with the drafter's probabilities, truncated to its top SAMPLED_Q_TOP tokens so they travel sparse).
SAMPLING_PROPOSAL = "onehot"
SAMPLED_Q_TOP = 32
# A draft is late when it has not arrived within max(DRAFT_BUDGET_MIN_MS, factor x recent p90 round trip);
# the verifier then advances the request with a plain target step and drops the draft when it comes.
DRAFT_BUDGET_MIN_MS = 20.0
DRAFT_BUDGET_FACTOR = 2.0
DRAFT_BUDGET_MAX_MS = 2000.0

# -- drafter ----------------------------------------------------------------------------------------------
DRAFTER_BATCH_MAX = 64  # draft jobs taken into one batched drafting pass
# After the first job arrives, wait at most this long for more. A verifier sends a pass's jobs in one MULTI,
# so they arrive together anyway; at one request the 1 ms this used to be was 1 ms on every round's path.
DRAFTER_WINDOW_MS = 0.0
DRAFTER_BLOCK_MS = 100  # blocking read when idle
DRAFTER_IDLE_EVICT_S = 120.0  # a request's drafter KV rows are dropped after this long without a job
# Lookahead: after replying, an idle drafter drafts the next round too for the outcomes it expects (the draft
# accepted whole with its own guess of the bonus token; rejected at a depth with a runner-up there) and
# sends each to the verifier as a bet (cosine.policy.bets).
DRAFTER_LOOKAHEAD = True
# Drafter rows drafted ahead per lookahead: every request's whole-draft bet, then the likeliest other outcomes
# across requests. At one request on the demo zoo the whole draft was accepted in about 30% of rounds, so a
# bet on it alone left the verifier waiting for a fresh draft in most rounds.
DRAFTER_AHEAD_ROWS = 6
# Bets on a rejection are drafted this many positions deep (the whole-draft bet: the job's k), so that one
# batched drafting of every bet ends before the verifier's pass does.
DRAFTER_AHEAD_DEPTH = 2
# Fusion across drafter workers (verifier --cross-process-fusion): a request's experts may live on several
# workers; the one that gets the job leads the lockstep and asks the others for their candidates per depth.
CROSS_PROCESS_FUSION = False
VOTE_TIMEOUT_MS = 200.0  # the lead waits this long per depth for remote candidates; latecomers drop out
VOTE_BLOCK_MS = 100  # a worker's blocking read for asks from leads
VOTE_STREAM_MAXLEN = 10_000  # asks and votes are short-lived: their streams are trimmed to this (MAXLEN ~)

# -- client -----------------------------------------------------------------------------------------------
CLIENT_TIMEOUT_S = 120.0  # generate()/stream() give up (and cancel) after this long
CLIENT_READ_BLOCK_MS = 1000  # one XREAD BLOCK on the output stream

# -- controller -------------------------------------------------------------------------------------------
CONTROL_INTERVAL_MS = 250  # the controller samples depths and heartbeats and decides this often (100-500 ms)
# Workers check the control version (one HGET) at most this often, so a new decision is in use within one
# controller interval; the whole hash is re-read only when the version changed.
CONTROL_REFRESH_MS = 100
# The active controller's lock (SET NX PX on lock:controller, renewed every interval). A standby controller
# takes over this long after the active one dies; a clean stop hands over at once.
CONTROL_LEASE_MS = 3000
CONTROL_LOG_MAXLEN = 5000  # decisions kept in the control:log timeline (MAXLEN ~)
# An unchanged decision is still logged with its inputs this often, so the dashboard's timeline stays alive
# (changed decisions are always logged).
CONTROL_LOG_EVERY_S = 2.0
CONTROL_BUSY_WINDOW_S = 2.0  # a worker's busy share is measured over its stats of the last this many seconds
