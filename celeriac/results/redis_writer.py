"""Results stored by prefork children on Redis, without loading redis-py.

A child stores the results of the outcomes it is about to report in one round trip (see
:func:`celeriac.results.open_child_store`): the store script the Redis result backend uses
(``EVALSHA``; ``SCRIPT LOAD`` when a restarted server forgot it) on a :class:`RespConnection`
of its own. A failure raises :class:`ResultBackendError`; the child then hands the results to
the worker, which stores them through the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..exceptions import CeleriacError, ResultBackendError
from ..protocol import dumps
from ..transports import redis_keys as K
from ..transports.redis_url import redis_params
from ..transports.resp import ErrorReply, RespConnection

__all__ = ["ResultWriter", "result_document"]


def result_document(meta: dict[str, Any], serializer: str, clock: Callable[[], float],
                    expires: float | None) -> tuple[bytes, int]:
    """The bytes stored for ``meta`` and their time to live in ms (0: forever); the
    document carries its expiry on ``clock`` in :data:`K.RESULT_DEADLINE_FIELD`."""
    if not expires:
        return dumps(meta, serializer)[0], 0
    return (dumps({**meta, K.RESULT_DEADLINE_FIELD: clock() + expires}, serializer)[0],
            max(1, int(expires * 1000)))


class ResultWriter:
    """Stores results with the store script (JSON documents only, as the script reads them)."""

    def __init__(self, url: str, *, clock: Callable[[], float], expires: float | None,
                 options: Mapping[str, Any] | None = None) -> None:
        self.params = redis_params(url, options)
        self.keys = K.KeySpace(self.params.key_prefix)
        self.clock = clock
        self.expires = expires
        self._conn = RespConnection(self.params, "celeriac-pool-child")

    def store_many(self, metas: Sequence[dict[str, Any]], reply_to: str | None = None) -> None:
        now = repr(self.clock())
        calls = [("EVALSHA", K.STORE_RESULT.sha, 1, self.keys.result(meta["task_id"]),
                  *result_document(meta, "json", self.clock, self.expires), now,
                  K.RESULT_DEADLINE_FIELD) for meta in metas]
        try:
            replies = self._conn.call(calls)
            again = [call for call, reply in zip(calls, replies, strict=True)
                     if isinstance(reply, ErrorReply) and reply.startswith("NOSCRIPT")]
            if again:  # a restarted server forgot the script
                replies = self._conn.call([("SCRIPT", "LOAD", K.STORE_RESULT.source), *again])
        except CeleriacError as exc:
            raise ResultBackendError(f"Could not store {len(calls)} result(s): {exc}") from exc
        errors = [reply for reply in replies if isinstance(reply, ErrorReply)]
        if errors:
            raise ResultBackendError(f"Redis refused to store a result: "
                                     f"{self.params.scrub(errors[0])}")

    def close(self) -> None:
        self._conn.close()
