"""Every Redis key name, field name and Lua script celeriac uses, in one place.

Layout of one queue ``q`` (``<prefix>`` is the ``key_prefix`` option, empty by default)::

    <prefix>{celeriac:q}:stream:0 .. :stream:3   a stream per priority band (entries: m, p, t)
    <prefix>{celeriac:q}:delayed                 sorted set: due time -> "<nonce>|band|p|t|envelope"
    <prefix>{celeriac:q}:leases                  sorted set: lease end -> "<band>:<entry id>"
    <prefix>{celeriac:q}:dead                    the dead-letter stream of ``q``

Every key of a queue carries the hash tag ``{celeriac:q}``, so a queue lives in one Redis
Cluster slot. Every script but FETCH touches one queue; FETCH takes the keys of all the queues
a worker reads (so one call honours priorities across them), and on a Cluster would have to
run once per queue instead. Keys outside any queue::

    <prefix>celeriac:dead-queues                 set of queues that have a dead-letter stream
    <prefix>celeriac:reply:<reply_to>            list of replies, with a key expiry
    <prefix>celeriac:broadcast:<channel>         pub/sub channel (no key)
    <prefix>celery-task-meta-<task id>           a task result (string, expiry); also the
                                                 pub/sub channel its waiters listen on

Entries are read through one consumer group, :data:`GROUP`. Stream entry fields: ``m`` the
message envelope (:meth:`celeriac.protocol.Message.to_envelope`), ``p`` its priority 0-9,
``t`` the publisher's ``time.time_ns()`` (orders a batch fetched from several queues).

Leases live on the transport's injected clock rather than in Redis' idle times (which
``XAUTOCLAIM`` would read), so tests move time by hand and a lease means the same on every
transport: a fetch puts ``"<band>:<id>"`` in ``leases`` scored by the lease's end, and an
entry whose score has passed is taken over with ``XCLAIM``, which counts the delivery. The
hosts' clocks must agree to well within a lease (NTP does). Settling checks an entry is
still pending with the delivery count its tag names: each take-over increments the count,
so a tag from before it matches no more (as on the memory and SQLite transports).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass

__all__ = [
    "ACK",
    "BANDS",
    "DEAD_LETTER",
    "FETCH",
    "GROUP",
    "JANITOR",
    "PURGE",
    "QUEUE_SIZE",
    "RENEW",
    "REQUEUE",
    "REQUEUED_CONSUMER",
    "RESULT_DEADLINE_FIELD",
    "STORE_RESULT",
    "KeySpace",
    "QueueKeys",
    "Script",
    "band_of",
    "delayed_member",
    "make_tag",
    "parse_reply_item",
    "parse_tag",
    "reply_item",
]

GROUP = "celeriac"
"""The consumer group every worker reads a queue's streams through."""

REQUEUED_CONSUMER = "celeriac:requeued"
"""Owner of requeued entries until the next fetch takes them (Redis 7.0 has no XNACK)."""

BANDS = 4
_BAND_OF_PRIORITY = (0, 0, 0, 1, 1, 1, 2, 2, 3, 3)


def band_of(priority: int) -> int:
    """The stream band of a 0-9 priority: 0-2 -> 0, 3-5 -> 1, 6-7 -> 2, 8-9 -> 3.

    Fetch reads band 3 first; within a band a fetched batch is sorted by exact priority,
    but entries of one band come out in publish order (so band-mates are FIFO).
    """
    return _BAND_OF_PRIORITY[min(max(int(priority), 0), 9)]


RESULT_DEADLINE_FIELD = "celeriac_expires_at"
"""Field of a stored result document: when it expires on the backend's clock.

Redis expires the key by itself (``PX``); the field lets a backend on an injected clock see
the same expiry, and lets the store script tell an expired SUCCESS from a live one."""


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue, in the order every per-queue script takes them as KEYS."""

    streams: tuple[str, ...]
    delayed: str
    leases: str
    dead: str

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.streams, self.delayed, self.leases, self.dead)


class KeySpace:
    """Key names for one ``key_prefix``; per-queue keys are computed once and cached."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._queues: dict[str, QueueKeys] = {}
        self.dead_queues = f"{prefix}celeriac:dead-queues"

    def queue(self, name: str) -> QueueKeys:
        keys = self._queues.get(name)
        if keys is None:
            base = f"{self.prefix}{{celeriac:{name}}}"
            keys = QueueKeys(tuple(f"{base}:stream:{band}" for band in range(BANDS)),
                             f"{base}:delayed", f"{base}:leases", f"{base}:dead")
            self._queues[name] = keys
        return keys

    def reply(self, reply_to: str) -> str:
        return f"{self.prefix}celeriac:reply:{reply_to}"

    def broadcast(self, channel: str) -> str:
        return f"{self.prefix}celeriac:broadcast:{channel}"

    def result(self, task_id: str) -> str:
        return f"{self.prefix}celery-task-meta-{task_id}"


# -- formats of the values kept under those keys ------------------------------------------------
def delayed_member(priority: int, envelope: bytes) -> bytes:
    """A ``delayed`` member: ``"<nonce>|<band>|<priority>|<time_ns>|" + envelope``.

    The nonce keeps two equal messages apart (a sorted set would merge them); FETCH parses it.
    """
    return (f"{os.urandom(6).hex()}|{band_of(priority)}|{priority}|{time.time_ns()}|".encode()
            + envelope)


def make_tag(band: object, entry_id: str, deliveries: object, queue: str) -> str:
    """A delivery tag: ``"<band>:<entry id>:<delivery count>:<queue>"`` (queue last: any text)."""
    return f"{band}:{entry_id}:{deliveries}:{queue}"


def parse_tag(tag: str) -> tuple[str, str, str, str] | None:
    """``(band, entry id, delivery count, queue)`` of a tag, or None if it is not one."""
    band, entry_id, count, queue = [*tag.split(":", 3), "", "", ""][:4]
    if len(band) != 1 or band not in "0123" or not count.isdigit() or "-" not in entry_id:
        return None
    return band, entry_id, count, queue


def reply_item(expires: float, payload: bytes) -> bytes:
    """An element of a reply list: its expiry on the transport's clock, ``|``, the payload."""
    return f"{expires!r}|".encode() + payload


def parse_reply_item(item: bytes) -> tuple[float, bytes]:
    expires, _, payload = item.partition(b"|")
    return float(expires), payload


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, so callers can EVALSHA without loading it first."""

    name: str
    source: str

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8")).hexdigest()


# -- Lua ------------------------------------------------------------------------------------------
# Per-queue scripts take the seven keys of QueueKeys.all (per queue, for FETCH): streams of
# bands 0-3 at KEYS[1..4], delayed at KEYS[5], leases at KEYS[6], dead at KEYS[7].

_COMMON = """
local function pending_count(stream, group, id)
  local ok, p = pcall(redis.call, 'XPENDING', stream, group, id, id, 1)
  if ok and p[1] then return tostring(p[1][4]) end
  return nil
end
"""

PUBLISH_MANY = Script("publish_many", """
-- KEYS: one stream. ARGV: priority, then (ordinal, envelope) pairs. Each pair becomes an
-- entry as a lone publish's XADD makes it, in order. Returns how many were added.
local priority, n = ARGV[1], 0
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', 'm', ARGV[i + 1], 'p', priority, 't', ARGV[i])
  n = n + 1
end
return n
""")

PUBLISH_COPIES = Script("publish_copies", """
-- KEYS: one stream. ARGV: priority, the ordinal's digits but its last three (the ordinal is
-- a publish's time in ns: at most 1000 ids per call), id length, the ids end to end, then the
-- envelope cut at each place the template's id appears. One entry per id, in order: the
-- envelope put together with that id, as a lone publish's XADD makes it.
local priority, ordinal, width, ids = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local parts = {}
for i = 5, #ARGV do parts[#parts + 1] = ARGV[i] end
local n = 0
for at = 1, #ids, width do
  local m = table.concat(parts, string.sub(ids, at, at + width - 1))
  redis.call('XADD', KEYS[1], '*', 'm', m, 'p', priority, 't', ordinal .. string.format('%03d', n))
  n = n + 1
end
return n
""")

FETCH = Script("fetch", _COMMON + """
-- ARGV: group, consumer, limit, now, lease_until, wait_info ('1': report how to wait)
local group, consumer = ARGV[1], ARGV[2]
local remaining = tonumber(ARGV[3])
local now, lease_until = ARGV[4], ARGV[5]
local nq = #KEYS / 7
local out = {}

local function key(q, i) return KEYS[(q - 1) * 7 + i] end
local function stream(q, band) return KEYS[(q - 1) * 7 + band + 1] end

local function deliver(q, band, entry, count)
  local m, p, t = '', '0', '0'
  local f = entry[2] or {}
  for i = 1, #f, 2 do
    if f[i] == 'm' then m = f[i + 1] elseif f[i] == 'p' then p = f[i + 1]
    elseif f[i] == 't' then t = f[i + 1] end
  end
  redis.call('ZADD', key(q, 6), lease_until, band .. ':' .. entry[1])
  out[#out + 1] = {q, band, entry[1], count, m, p, t}
  remaining = remaining - 1
end

local function move_due(q)
  local due = redis.call('ZRANGEBYSCORE', key(q, 5), '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(due) do
    local band, p, t, env = string.match(member, '^[^|]*|([0-3])|(%-?%d+)|(%d+)|(.*)$')
    if band then
      redis.call('XADD', stream(q, tonumber(band)), '*', 'm', env, 'p', p, 't', t)
    else  -- not ours: let a worker dead-letter it rather than drop it
      redis.call('XADD', stream(q, 0), '*', 'm', member)
    end
  end
  if #due > 0 then redis.call('ZREM', key(q, 5), unpack(due)) end
end

local function expired_by_band(q)
  local byband = {[0] = {}, {}, {}, {}}
  local members = redis.call('ZRANGEBYSCORE', key(q, 6), '-inf', now, 'LIMIT', 0, remaining)
  for _, member in ipairs(members) do
    local band, id = string.match(member, '^([0-3]):(.+)$')
    if band then table.insert(byband[tonumber(band)], id)
    else redis.call('ZREM', key(q, 6), member) end
  end
  return byband
end

local function reclaim(q, band, ids)
  if #ids == 0 or remaining <= 0 then return end
  local take = {}
  for i = 1, math.min(#ids, remaining) do take[i] = ids[i] end
  local s = stream(q, band)
  local ok, claimed = pcall(redis.call, 'XCLAIM', s, group, consumer, 0, unpack(take))
  if not ok then claimed = {} end
  local got = {}
  for _, entry in ipairs(claimed) do
    got[entry[1]] = true
    deliver(q, band, entry, tonumber(pending_count(s, group, entry[1]) or 1))
  end
  for _, id in ipairs(take) do  -- acked or deleted meanwhile: the lease is moot
    if not got[id] then redis.call('ZREM', key(q, 6), band .. ':' .. id) end
  end
end

local function read_new(q, band)
  local s = stream(q, band)
  local ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', group, consumer,
                        'COUNT', remaining, 'STREAMS', s, '>')
  if not ok then
    if not string.find(tostring(res.err or res), 'NOGROUP', 1, true) then error(res) end
    redis.call('XGROUP', 'CREATE', s, group, '0', 'MKSTREAM')
    res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining,
                     'STREAMS', s, '>')
  end
  if res then
    for _, entry in ipairs(res[1][2]) do deliver(q, band, entry, 1) end
  end
end

local expired = {}
for q = 1, nq do
  move_due(q)
  expired[q] = expired_by_band(q)
end
for band = 3, 0, -1 do
  for q = 1, nq do reclaim(q, band, expired[q][band]) end
  for q = 1, nq do if remaining > 0 then read_new(q, band) end end
end
if #out > 0 or ARGV[6] ~= '1' then return {out} end

-- Nothing to hand out: say when something may come due, and from which ids to wait.
local next_due = false
local ids = {}
for q = 1, nq do
  for i = 5, 6 do
    local first = redis.call('ZRANGE', key(q, i), 0, 0, 'WITHSCORES')
    if first[2] and (not next_due or tonumber(first[2]) < tonumber(next_due)) then
      next_due = first[2]
    end
  end
  for band = 0, 3 do
    local last = redis.call('XREVRANGE', stream(q, band), '+', '-', 'COUNT', 1)
    ids[#ids + 1] = last[1] and last[1][1] or '0-0'
  end
end
return {out, next_due or '', ids}
""")

ACK = Script("ack", _COMMON + """
-- ARGV: group, then (band, id, deliveries) triples. Acks only the delivery a tag names.
local group, n = ARGV[1], 0
for i = 2, #ARGV, 3 do
  local band, id = ARGV[i], ARGV[i + 1]
  local s = KEYS[tonumber(band) + 1]
  if pending_count(s, group, id) == ARGV[i + 2] then
    redis.call('XACK', s, group, id)
    redis.call('XDEL', s, id)
    redis.call('ZREM', KEYS[6], band .. ':' .. id)
    n = n + 1
  end
end
return n
""")

REQUEUE = Script("requeue", _COMMON + """
-- ARGV: group, requeued-consumer, then (band, id, deliveries) triples. The entry goes to a
-- neutral owner (JUSTID: the delivery count stays) with a lease that has already ended.
local group, n = ARGV[1], 0
for i = 3, #ARGV, 3 do
  local band, id = ARGV[i], ARGV[i + 1]
  local s = KEYS[tonumber(band) + 1]
  if pending_count(s, group, id) == ARGV[i + 2] then
    redis.call('XCLAIM', s, group, ARGV[2], 0, id, 'JUSTID')
    redis.call('ZADD', KEYS[6], 0, band .. ':' .. id)
    n = n + 1
  end
end
return n
""")

DEAD_LETTER = Script("dead_letter", _COMMON + """
-- ARGV: group, band, id, deliveries, queue, reason, at, envelope, maxlen
local group, band, id = ARGV[1], ARGV[2], ARGV[3]
local s = KEYS[tonumber(band) + 1]
local count = pending_count(s, group, id)
if count then
  if count ~= ARGV[4] then return 0 end  -- a stale tag: another delivery holds it now
  redis.call('XACK', s, group, id)
  redis.call('XDEL', s, id)
  redis.call('ZREM', KEYS[6], band .. ':' .. id)
elseif redis.call('XRANGE', s, id, id)[1] then
  return 0  -- waiting for a consumer again: not ours to take
end
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[9], '*', 'queue', ARGV[5], 'reason', ARGV[6],
           'deliveries', ARGV[4], 'at', ARGV[7], 'm', ARGV[8])
return 1
""")

RENEW = Script("renew", _COMMON + """
-- ARGV: group, lease_until, then (band, id, deliveries) triples: the deliveries a consumer
-- was handed and has not settled. Returns the 1-based numbers of those still its own.
local group, kept = ARGV[1], {}
for i = 3, #ARGV, 3 do
  local band, id = ARGV[i], ARGV[i + 1]
  if pending_count(KEYS[tonumber(band) + 1], group, id) == ARGV[i + 2] then
    redis.call('ZADD', KEYS[6], ARGV[2], band .. ':' .. id)
    kept[#kept + 1] = (i - 3) / 3 + 1
  end
end
return kept
""")

QUEUE_SIZE = Script("queue_size", """
-- ARGV: group, now. Entries nobody holds: never read, lease ended or requeued, delayed.
local n = 0
for band = 1, 4 do
  local length = redis.call('XLEN', KEYS[band])
  local ok, summary = pcall(redis.call, 'XPENDING', KEYS[band], ARGV[1])
  local pending = ok and summary[1] or 0
  if length > pending then n = n + length - pending end
end
return n + redis.call('ZCARD', KEYS[5]) + redis.call('ZCOUNT', KEYS[6], '-inf', ARGV[2])
""")

PURGE = Script("purge", """
-- ARGV: group, now, budget. Deletes up to ~budget unheld entries; returns {deleted, more}.
local group, budget = ARGV[1], tonumber(ARGV[3])
local n, more = 0, 0
local free = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[2], 'LIMIT', 0, budget)
for _, member in ipairs(free) do
  local band, id = string.match(member, '^([0-3]):(.+)$')
  if band then
    local s = KEYS[tonumber(band) + 1]
    pcall(redis.call, 'XACK', s, group, id)
    n = n + redis.call('XDEL', s, id)
  end
  redis.call('ZREM', KEYS[6], member)
end
if #free == budget then more = 1 end
for band = 1, 4 do
  local start = '-'
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[band])
  if ok then
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      if info['name'] == group then start = '(' .. info['last-delivered-id'] end
    end
  end
  local entries = redis.call('XRANGE', KEYS[band], start, '+', 'COUNT', budget)
  if #entries > 0 then
    local ids = {}
    for i, entry in ipairs(entries) do ids[i] = entry[1] end
    n = n + redis.call('XDEL', KEYS[band], unpack(ids))
    if #entries == budget then more = 1 end
  end
end
n = n + redis.call('ZCARD', KEYS[5])
redis.call('DEL', KEYS[5])
return {n, more}
""")

JANITOR = Script("janitor", """
-- ARGV: group, idle_ms. Forgets consumers that hold nothing and were idle that long.
local n = 0
for band = 1, 4 do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[band], ARGV[1])
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[band], ARGV[1], info['name'])
        n = n + 1
      end
    end
  end
end
return n
""")

STORE_RESULT = Script("store_result", """
-- KEYS: result key. ARGV: document, px ('0': no expiry), now, deadline field.
-- A live SUCCESS is final; otherwise store, and tell waiters on the key's channel.
local old = redis.call('GET', KEYS[1])
if old then
  local ok, meta = pcall(cjson.decode, old)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    local deadline = tonumber(meta[ARGV[4]])
    if not deadline or deadline > tonumber(ARGV[3]) then return 0 end
  end
end
if ARGV[2] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
""")
