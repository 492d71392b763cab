"""The key server's state in its database: sealed resources, release policies, RCAR sessions,
and the audit log that every change goes through.

Every write that changes what may be released (a resource, the policy, a KEK rotation)
or spends a nonce appends its audit record in the same transaction, after taking the audit
chain's lock: there is no change without its record, and concurrent writers from any worker
or replica are serialised. A session enters the database when it attests (or fails to):
under that lock its row is inserted only if its id is not there yet, so a nonce is spent
once however many replicas share the database (/auth wrote nothing: see cookies). The rows
that decide a release, sessions and policies, carry a MAC under the KEK (sealing.RowMac):
one that someone without the KEK wrote or changed is not believed.

Each protocol step writes at most once: /attest spends the nonce, stores the claims and
appends its record in one transaction, a release appends its record (unless, under that
lock, the policy it was decided on is no longer the newest or its resource changed: a change an
administrator saw committed applies to every release not yet answered). The writes of
concurrent requests are committed together (group commit: one transaction and one fsync for
every write waiting), and each request is answered only after its write is committed, so an
acknowledged release is in the audit log even if the machine crashes right after. Expired
sessions are deleted at most once a minute, through an index on their expiry.

The protocol's steps run on the HTTP workers' event loops: their writes are awaited
(``async``), and so are their reads, short indexed selects: made in place on SQLite (a local
file), on a thread with a database server, whose stall must not stall the loop (a request
waits ``READ_WAIT`` for one, then fails with :class:`StoreError`). The sessions a worker
attested are remembered in a bounded cache, so that a guest's next step on the same
connection reads nothing back. A stored session never changes, so a cached one is never stale
(its row may be purged first; the cookie's end is checked on every use).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection

from ..errors import ConfigError, StoreError
from . import schema
from .audit import Event, Record
from .groupcommit import GroupCommit, Work, discard
from .policy import NONE, Policy
from .prepared import Prepared
from .schema import open_engine, policies, resources, sessions
from .sealing import RowMac, Sealed, Sealer
from .sessions import Session, SessionCache

log = logging.getLogger("keybroker.server")


@dataclass(frozen=True)
class StoredResource:
    path: str
    sealed: Sealed
    lease: int | None


@dataclass(frozen=True)
class ResourceInfo:
    """A resource as listed. A row with a column of another type than keybroker writes (SQLite keeps
    any value in any column: only an edit puts one there) is ``altered``, that column None."""

    path: str
    size: int | None
    lease: int | None
    kek_id: str | None
    updated: float | None
    altered: bool = False


@dataclass(frozen=True)
class PolicyInfo:
    """A stored policy version; version 0 is no policy (nothing stored yet: nothing is released)."""

    version: int
    digest: str
    created: float
    actor: str


@dataclass(frozen=True)
class PolicyVersion(PolicyInfo):
    policy: Policy


#: Version 0: no policy has been set, nothing is released.
NO_POLICY = PolicyVersion(0, NONE.digest, 0.0, "none", NONE)

PURGE_INTERVAL = 60.0  # seconds between deletions of expired sessions (per process)
#: Seconds a stored session is kept after its end: it spends its nonce for that long after
#: the nonce expired too, on a replica whose clock is behind by less than that.
PURGE_MARGIN = 600.0

# The statements of the protocol's steps, built once (building one costs more than running it).
_RESOURCE = select(resources).where(resources.c.path == bindparam("path"))
_NEWEST_POLICY = select(policies.c.version, policies.c.digest).order_by(policies.c.version.desc()).limit(1)
_POLICY = select(policies).where(policies.c.version == bindparam("wanted"))
_NEWEST = _NEWEST_POLICY.subquery()
#: A release's one read: the newest policy's version and digest, and the resource if there is one.
_FOR_RELEASE = Prepared(select(_NEWEST.c.version, _NEWEST.c.digest, resources.c.path, resources.c.kek_id,
                                resources.c.sealed, resources.c.lease)
                         .select_from(_NEWEST.outerjoin(resources, resources.c.path == bindparam("path"))))
_SESSION = select(sessions).where(sessions.c.id == bindparam("session_id"))
_SESSION_EXISTS = Prepared(select(sessions.c.id).where(sessions.c.id == bindparam("session_id")))
_NEW_SESSION = Prepared(insert(sessions))
_PURGE_SESSIONS = delete(sessions).where(sessions.c.expires < bindparam("now"))

#: Seconds a protocol step waits for a read from a database server before it gives up.
READ_WAIT = 5.0
#: Seconds a request waits for its write to be committed (a database server that stopped
#: answering holds the writer, and every write queued behind it): then 503, the write still queued.
WRITE_WAIT = 10.0
#: Threads of a worker that read from a database server: reads stuck on one that stopped
#: answering take these, not the threads large attestations and collateral fetches need.
READERS = 4
#: Seconds an admin call (a read, or a change waiting for its commit) waits for a database
#: server before it gives up, and the threads of a worker such calls run on.
ADMIN_WAIT = 10.0
ADMINS = 2
T = TypeVar("T")

#: What the MACs of the rows that decide a release are derived for (see sealing.RowMac).
SESSION_MAC = b"keybroker stored session v1"
POLICY_MAC = b"keybroker release policy v1"
POLICY_VERSION_MAX = 2**31 - 1  # the column is an INTEGER: 32 bits on PostgreSQL


class Store:
    """The database of a key server (``url``). With the ``sealer`` (its KEKs) it makes and checks
    the MACs of the rows that decide releases: sessions and policies. Without it (commands that
    list, or manage resources' metadata) it can store neither, and reads policies unchecked."""

    def __init__(self, url: str, sealer: Sealer | None = None) -> None:
        self.engine = open_engine(url)
        self._sessions = RowMac(sealer, SESSION_MAC) if sealer else None
        self._policies = RowMac(sealer, POLICY_MAC) if sealer else None
        self._policy = NO_POLICY  # the last active policy read, parsed once per version
        self._writer = schema.writer_lock(url)
        self._commits = GroupCommit(self.engine, self._writer)
        self._cached = SessionCache()
        self._next_purge = 0.0
        self._on_loop = self.engine.dialect.name == "sqlite"  # reads of a local file: see _read
        self._reader: tuple[int, Connection] | None = None  # (pid, connection) of the reads on the loop
        self._pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}  # name -> (pid, pool): workers are forked
        self._readers = threading.local()  # each reader thread's connection (a database server's)

    def close_connections(self) -> None:
        """Close the pooled connections (before a fork: no connection may cross it)."""
        self._commits.close()
        self._drop_reader()
        self.engine.dispose()

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader[0] == os.getpid():
            discard(reader[1])

    async def _read(self, read: Callable[[Connection], T]) -> T:
        """``read`` in place with SQLite; on a thread with a database server, so that one that stops
        answering stalls this request (StoreError after READ_WAIT), not the loop and all it serves."""
        if self._on_loop:
            return self._read_here(read)
        return await self._bounded(lambda: self._read_kept(read), "read", READERS, READ_WAIT)

    def _read_kept(self, read: Callable[[Connection], T]) -> T:
        """``read`` on the thread's own connection, in autocommit: what READ COMMITTED shows, without BEGIN,
        ROLLBACK and the pool's ping (four round trips for one). A connection whose read failed is not
        kept; a read on a kept one the server dropped (a restart) is made again on a new one."""
        kept, self._readers.db = getattr(self._readers, "db", None), None
        while True:
            db = kept or self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                result = read(db)
            except Exception as exc:
                discard(db)
                if kept is None or not getattr(exc, "connection_invalidated", False):
                    raise
                kept = None
                continue
            self._readers.db = db
            return result

    def _read_here(self, read: Callable[[Connection], T]) -> T:
        """``read`` on this process's connection for reads on its event loop (taking one from the
        pool for every read cost more than the read). Each read ends its transaction, so that the
        next one sees what was committed meanwhile; a connection whose read failed is not kept."""
        if self._reader is None or self._reader[0] != os.getpid():
            self._reader = os.getpid(), self.engine.connect()
        db = self._reader[1]
        try:
            result = read(db)
            db.rollback()  # ends a read made by Core; pysqlite (legacy transaction control) opens none for a SELECT
            return result
        except Exception:
            self._drop_reader()
            raise

    async def admin(self, call: Callable[[], T]) -> T:
        """``call``, an admin operation of this store (blocking), on a thread, given up after
        ADMIN_WAIT (StoreError): the thread may stay stuck on a database server that stopped
        answering, or on a SQLite file whose writers' lock another process holds, the request does
        not. A change given up may still be made, once the database answers again (its audit
        record says so)."""
        return await self._bounded(call, "admin", ADMINS, ADMIN_WAIT)

    async def _bounded(self, call: Callable[[], T], name: str, threads: int, wait: float) -> T:
        pid, pool = self._pools.get(name, (0, None))
        if pool is None or pid != os.getpid():
            pool = ThreadPoolExecutor(threads, thread_name_prefix=f"keybroker-{name}")
            self._pools[name] = os.getpid(), pool
        try:  # a call still queued when its request gives up is dropped
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, call), wait)
        except TimeoutError:
            raise StoreError(f"the database did not answer within {wait:g} s") from None

    async def ping(self) -> None:
        """Raise unless the database answers."""
        await self._read(lambda db: db.execute(select(schema.audit_head.c.seq)).one())

    # -- the audit log ---------------------------------------------------------------------

    def audited(self, work: Work) -> Record | None:
        """Run ``work`` in a transaction holding the audit lock; append the event it returns, and
        return its record once committed. ``work`` that returns None must have changed nothing."""
        return self._commits.submit(work).result()

    async def committed(self, work: Work) -> Record | None:
        """:meth:`audited`, awaited on an event loop, for WRITE_WAIT at most (StoreError). Shielded:
        a caller cancelled or given up meanwhile leaves the write to be committed all the same."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._commits.submit(work))), WRITE_WAIT)
        except TimeoutError:
            raise StoreError(f"the database did not commit within {WRITE_WAIT:g} s") from None

    def audit(self, event: Event) -> Record:
        """Append ``event`` durably: when this returns, the record is committed."""
        record = self.audited(lambda db: event)
        assert record is not None
        return record

    async def record(self, event: Event) -> Record:
        """:meth:`audit`, awaited on an event loop."""
        record = await self.committed(lambda db: event)
        assert record is not None
        return record

    # -- resources -------------------------------------------------------------------------

    def put_resource(self, path: str, sealed: Sealed, lease: int | None, event: Event) -> Record:
        def work(db: Connection) -> Event:
            db.execute(delete(resources).where(resources.c.path == path))
            db.execute(insert(resources).values(path=path, kek_id=sealed.kek_id, sealed=sealed.blob, lease=lease,
                                                updated=time.time()))
            return event
        record = self.audited(work)
        assert record is not None
        return record

    def delete_resource(self, path: str, event: Event) -> Record | None:
        """Delete ``path``; None (and no record) when there was no such resource."""
        def work(db: Connection) -> Event | None:
            deleted = db.execute(delete(resources).where(resources.c.path == path)).rowcount
            return event if deleted == 1 else None
        return self.audited(work)

    def get_resource(self, path: str) -> StoredResource | None:
        with self.engine.connect() as db:
            return _resource(db, path)

    async def for_release(self, path: str) -> tuple[PolicyVersion, StoredResource | None]:
        """The active policy and the resource ``path`` (None when there is none), read together."""
        def read(db: Connection) -> tuple[PolicyVersion, StoredResource | None]:
            row = _FOR_RELEASE.first(db, {"path": path})
            if row is None:  # no policy stored: nothing is released
                return NO_POLICY, _resource(db, path)
            stored = None if row.path is None else StoredResource(row.path, Sealed(row.kek_id, row.sealed), row.lease)
            return self._policy_version(db, row.version, row.digest), stored
        return await self._read(read)

    async def released(self, decided: PolicyVersion, stored: StoredResource, event: Event) -> Record | None:
        """Append the release ``event`` of ``stored`` under the policy ``decided``, unless under the
        chain's lock either is no longer what the database holds (a newer policy, the resource put
        again, deleted or re-wrapped meanwhile): then None, nothing recorded, nothing to release."""
        def work(db: Connection) -> Event | None:
            row = _FOR_RELEASE.first(db, {"path": stored.path})  # no row: no policy
            if (row is None or (row.version, row.digest) != (decided.version, decided.digest) or row.path is None
                    or (row.kek_id, row.sealed, row.lease) != (stored.sealed.kek_id, stored.sealed.blob, stored.lease)):
                return None
            return event
        return await self.committed(work)

    def list_resources(self) -> list[ResourceInfo]:
        """Every resource's path, size and lease; the values stay in the database."""
        with self.engine.connect() as db:
            rows = db.execute(select(resources).order_by(resources.c.path)).all()
        return [_resource_info(row) for row in rows]

    def rewrap_resources(self, sealer: Sealer, event: Callable[[int], Event]) -> Record:
        """Re-seal every resource not under ``sealer``'s current KEK or sealed without its lease, and
        MAC again under it every policy whose MAC holds under an older one, in one transaction."""
        macs = RowMac(sealer, POLICY_MAC)

        def work(db: Connection) -> Event:
            count = 0
            for row in db.execute(select(resources)).all():
                fresh = sealer.rewrap(row.path, Sealed(row.kek_id, row.sealed), row.lease)
                if fresh is None:
                    continue
                db.execute(update(resources).where(resources.c.path == row.path)
                           .values(kek_id=fresh.kek_id, sealed=fresh.blob))
                count += 1
            for row in db.execute(select(policies)).all():  # one not believed stays so: see _believed
                columns = _policy_columns(row._mapping)
                if macs.verify(columns, row.mac) and not macs.current(columns, row.mac):
                    db.execute(update(policies).where(policies.c.version == row.version)
                               .values(mac=macs.mac(columns)))
            return event(count)
        record = self.audited(work)
        assert record is not None
        return record

    # -- release policies --------------------------------------------------------------------

    def active_policy(self) -> PolicyVersion:
        """The newest stored policy (read on every call, so every replica applies the same)."""
        with self.engine.connect() as db:
            return self._active_policy(db)

    def _active_policy(self, db: Connection) -> PolicyVersion:
        newest = db.execute(_NEWEST_POLICY).one_or_none()
        return NO_POLICY if newest is None else self._policy_version(db, newest.version, newest.digest)

    def _policy_version(self, db: Connection, version: int, digest: str) -> PolicyVersion:
        """The stored policy ``version`` (of ``digest``): read and parsed once, then remembered."""
        cached = self._policy  # one read: another thread may cache another version meanwhile
        if (cached.version, cached.digest) != (version, digest):
            cached = self._believed(db.execute(_POLICY, {"wanted": version}).one())
            self._policy = cached
        return cached

    def _believed(self, row: Any) -> PolicyVersion:
        """The policy of a stored row, once its MAC shows this server's KEK wrote it (unchecked
        without the KEK: the commands that only show policies)."""
        if self._policies is not None and not self._policies.verify(_policy_columns(row._mapping), row.mac):
            raise StoreError(f"release policy version {row.version} fails its MAC: it was not written with this "
                             "server's KEK (by a keybroker before policies carried one, or by someone who "
                             "can write the database): nothing is released until the policy is put again "
                             "(keybroker policy put FILE --db URL --kek-file KEK, or serve --policy FILE)")
        return PolicyVersion(row.version, row.digest, row.created, row.actor, Policy.loads(row.document))

    def put_policy(self, policy: Policy, event: Event) -> tuple[int, bool]:
        """Make ``policy`` the active one: (its version, whether that is a new version).

        A policy identical to the active one changes nothing and records nothing.
        """
        if self._policies is None:
            raise ConfigError("storing a release policy needs the key-encryption key (--kek-file, or the "
                              "systemd credential kek): the policy is stored with a MAC under it")
        macs = self._policies
        outcome: list[tuple[int, bool]] = []

        def work(db: Connection) -> Event | None:
            latest = db.execute(select(policies).order_by(policies.c.version.desc()).limit(1)).first()
            if latest is None and policy.digest == NO_POLICY.digest:
                outcome.append((NO_POLICY.version, False))
                return None
            # The same document again is no change, unless the active row is not believed (put again
            # after an upgrade, or over a row someone else wrote): then it becomes a new version.
            if (latest is not None and latest.digest == policy.digest
                    and macs.verify(_policy_columns(latest._mapping), latest.mac)):
                outcome.append((latest.version, False))
                return None
            if latest is not None and latest.version >= POLICY_VERSION_MAX:
                raise StoreError(f"the newest release policy is version {latest.version}, the last there can be: "
                                 "a row nobody put here with keybroker? (see keybroker policy list)")
            version = (latest.version if latest else 0) + 1
            row = {"version": version, "digest": policy.digest, "document": policy.dumps(),
                   "created": float(int(time.time())),  # whole seconds: see _policy_columns
                   "actor": event.clipped().actor}  # as long as its column takes, as in the audit record
            db.execute(insert(policies).values(**row, mac=macs.mac(_policy_columns(row))))
            outcome.append((version, True))
            return replace(event, policy_version=version)
        self.audited(work)
        return outcome[-1]  # the committed run's: a batch that failed runs its work again

    def get_policy(self, version: int) -> PolicyVersion | None:
        if version == 0:
            return NO_POLICY
        with self.engine.connect() as db:
            row = db.execute(select(policies).where(policies.c.version == version)).first()
        return None if row is None else self._believed(row)

    def list_policies(self) -> list[PolicyInfo]:
        columns = (policies.c.version, policies.c.digest, policies.c.created, policies.c.actor)
        with self.engine.connect() as db:
            rows = db.execute(select(*columns).order_by(policies.c.version)).all()
        return [NO_POLICY, *(PolicyInfo(row.version, row.digest, row.created, row.actor) for row in rows)]

    # -- sessions ------------------------------------------------------------------------------

    async def end_attestation(self, session: Session, event: Event) -> Record | None:
        """Store ``session``, attested (it has claims) or failed, spending its nonce, with ``event``
        recorded, in one transaction. None, and nothing changed, when the session is stored
        already (its nonce was spent, by a concurrent /attest on any replica) or has ended."""
        rows = self._session_rows()
        claims = json.dumps(session.claims) if session.claims is not None else None
        tee_pubkey = json.dumps(session.tee_pubkey) if session.tee_pubkey is not None else None

        def work(db: Connection) -> Event | None:
            now = time.time()
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL
                db.execute(_PURGE_SESSIONS, {"now": now - PURGE_MARGIN})
            if session.expires <= now:
                return None  # ended while its evidence was verified: its cookie opens no more, nothing to spend
            if _SESSION_EXISTS.first(db, {"session_id": session.id}) is not None:
                return None  # read under the chain's lock: no other writer can insert it meanwhile
            row = {"id": session.id, "tee": session.tee, "nonce": session.nonce, "state": session.state,
                   "expires": float(session.expires), "claims": claims, "tee_pubkey": tee_pubkey}
            _NEW_SESSION.rows(db, row | {"mac": rows.mac(_session_columns(row))})
            return event
        record = await self.committed(work)
        if record is not None:
            self._cached.put(session, len(claims or "") + len(tee_pubkey or ""))
        return record

    def _session_rows(self) -> RowMac:
        if self._sessions is None:
            raise TypeError("this Store was opened without the KEK: it keeps no sessions")
        return self._sessions

    def stored_here(self, session_id: str) -> bool:
        """Whether this process stored ``session_id`` lately (a replay is then refused before its
        evidence is verified; the attestation's transaction decides in any case)."""
        return self._cached.get(session_id) is not None

    async def get_session(self, session_id: str) -> Session | None:
        """The stored (attested or failed) session ``session_id``."""
        cached = self._cached.get(session_id)
        if cached is not None:
            return cached
        rows = self._session_rows()
        row = await self._read(lambda db: db.execute(_SESSION, {"session_id": session_id}).first())
        if row is None:
            return None
        if not rows.verify(_session_columns(row._mapping), row.mac):
            log.error("stored session %s... fails its MAC: its row was written under a KEK this server no "
                      "longer has (dropped after a rotation: its guest attests again) or by someone without "
                      "the KEK; it is not believed", session_id[:8])
            return None
        return Session(row.id, row.tee, row.nonce, row.state, row.expires,
                       json.loads(row.tee_pubkey) if row.tee_pubkey else None,
                       json.loads(row.claims) if row.claims else None)


def _session_columns(row: Any) -> tuple[str, ...]:
    """What a stored session's MAC covers: every column but the MAC, as stored."""
    return tuple("" if row[name] is None else str(row[name])
                 for name in ("id", "tee", "nonce", "state", "expires", "tee_pubkey", "claims"))


def _resource(db: Connection, path: str) -> StoredResource | None:
    row = db.execute(_RESOURCE, {"path": path}).first()
    return None if row is None else StoredResource(row.path, Sealed(row.kek_id, row.sealed), row.lease)


#: What keybroker writes in each column a listing shows.
_RESOURCE_KINDS: dict[str, tuple[type, ...]] = {"path": (str,), "sealed": (bytes,), "lease": (int, type(None)),
                                                "kek_id": (str,), "updated": (float, int)}


def _resource_info(row: Any) -> ResourceInfo:
    def kept(name: str) -> Any:
        value = getattr(row, name)
        return value if type(value) in _RESOURCE_KINDS[name] else None
    blob = kept("sealed")
    altered = any(type(getattr(row, name)) not in kinds for name, kinds in _RESOURCE_KINDS.items())
    return ResourceInfo(str(row.path), None if blob is None else Sealed(row.kek_id, blob).size, kept("lease"),
                        kept("kek_id"), kept("updated"), altered)


def _policy_columns(row: Any) -> tuple[str, ...]:
    """What a stored policy's MAC covers: every column but the MAC, as stored; its time in whole
    seconds, as a database may give a float back with fewer digits (PostgreSQL, extra_float_digits 0); each
    as text, as SQLite keeps what a writer of the database put there (bytes, a number)."""
    created = row["created"]
    whole = str(int(created)) if isinstance(created, float | int) and math.isfinite(created) else str(created)
    return str(row["version"]), str(row["digest"]), str(row["document"]), whole, str(row["actor"])
