"""Every Redis key name CoSine uses, in one place, under a configurable prefix.

Several deployments can share one Redis by using different prefixes. Names::

    {p}:requests                 stream  admission entries (group ``verifiers``); pending until the request ends
    {p}:draft:{drafter}          stream  draft jobs for one drafter worker (group ``drafters``)
    {p}:verify:{verifier}        stream  drafts coming back to one verifier worker (group ``verifiers``)
    {p}:ask:{drafter}            stream  fusion across drafter workers: asks for one expert's candidates
    {p}:votes:{drafter}          stream  the candidates coming back to the drafter that leads the fusion
    {p}:out:{request}            stream  a request's output chunks, read by the client; expires after the end
    {p}:cancel                   stream  cancellation notices, read by every verifier (no group)
    {p}:cancelled:{request}      string  set with the notice, so a request admitted later is cancelled too
    {p}:dlq                      stream  dead letters: malformed or poison messages with the reason
    {p}:workers                  zset    worker id -> last heartbeat (ms since epoch)
    {p}:worker:{id}              hash    a worker's description and latest stats (expires if it stops)
    {p}:inflight:{verifier}      string  the verifier's oldest requests (JSON), for the dashboard; kept out of
                                         the worker hash, which producers may read (expires if it stops)
    {p}:lock:{name}              string  singleton guard for maintenance (SET NX PX)
    {p}:drain                    hash    worker id -> why it was asked to drain (it finishes, then exits)
    {p}:control                  hash    the controller's versioned decisions
    {p}:control:log              stream  the controller's decisions with their inputs
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cosine.errors import InvalidParameterError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")

# Consumer group names.
VERIFIERS_GROUP = "verifiers"
DRAFTERS_GROUP = "drafters"


def check_name(kind: str, name: str) -> str:
    """Worker ids and request ids become parts of key names: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidParameterError(kind, f"must be 1-128 characters of [A-Za-z0-9_.-], got {name!r}")
    return name


@dataclass(frozen=True)
class Keys:
    prefix: str = "cosine"

    def __post_init__(self) -> None:
        """The prefix is a name, or a name in braces: a hash tag, putting every key in one Redis Cluster slot."""
        tagged = self.prefix.startswith("{") and self.prefix.endswith("}")
        check_name("prefix", self.prefix[1:-1] if tagged else self.prefix)

    def kind(self, key: str) -> str:
        """What a key is, by the name part after the prefix: ``draft`` for ``{p}:draft:{drafter}``, ``control``
        for both ``{p}:control`` and ``{p}:control:log``."""
        return key[len(self.prefix) + 1 :].split(":", 1)[0]

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    def draft(self, drafter: str) -> str:
        return f"{self.prefix}:draft:{drafter}"

    def verify(self, verifier: str) -> str:
        return f"{self.prefix}:verify:{verifier}"

    def ask(self, drafter: str) -> str:
        return f"{self.prefix}:ask:{drafter}"

    def votes(self, drafter: str) -> str:
        return f"{self.prefix}:votes:{drafter}"

    def out(self, request_id: str) -> str:
        return f"{self.prefix}:out:{request_id}"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    def cancelled(self, request_id: str) -> str:
        return f"{self.prefix}:cancelled:{request_id}"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def inflight(self, verifier: str) -> str:
        return f"{self.prefix}:inflight:{verifier}"

    @property
    def drain(self) -> str:
        return f"{self.prefix}:drain"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    @property
    def control_log(self) -> str:
        return f"{self.prefix}:control:log"
