"""The engine and sessions: one async engine per process, built from the settings, and its
long-lived sessions leased to requests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any
from uuid import uuid4

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import (
    AsyncAdaptedQueuePool,
    ConnectionPoolEntry,
    NullPool,
    PoolProxiedConnection,
)

from service import queries
from service.config import CLIENT_TIMEOUT_MARGIN_SECONDS, Settings

log = logging.getLogger("service.db")


def ssl_connect_arg(
    sslmode: str | None, sslrootcert: str | None
) -> ssl.SSLContext | str | bool | None:
    """Translate libpq's sslmode/sslrootcert into asyncpg's `ssl` argument.

    asyncpg understands the mode names itself but looks for the CA bundle only in
    ~/.postgresql/root.crt, so when a root certificate is named (or verification is asked for) we
    build the context here. `sslrootcert=system`, as in libpq 16, means the system's CA store,
    which is also the default for verify-ca/verify-full because containers have no root.crt.
    """
    if sslmode is None:
        return None
    if sslmode == "disable":
        return False
    verify = sslmode in ("verify-ca", "verify-full") or (
        sslmode == "require" and sslrootcert is not None
    )
    if not verify:
        return sslmode
    if sslrootcert is None or sslrootcert == "system":
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=sslrootcert)
    context.check_hostname = sslmode == "verify-full"
    return context


def client_timeout_seconds(settings: Settings) -> float | None:
    """How long the client waits for a statement's answer, or None when statements are unbounded.

    Behind a transaction-mode pooler the client is the only enforcer (poolers reject the
    `statement_timeout` startup parameter). On a direct connection the server cancels a slow
    statement itself and the client gives up a little later, for when no answer can come at
    all (a NAT or firewall dropping packets without a reset).
    """
    timeout_ms = settings.db_statement_timeout_ms
    if not timeout_ms:
        return None
    if settings.behind_pooler:
        return timeout_ms / 1000
    return timeout_ms / 1000 + CLIENT_TIMEOUT_MARGIN_SECONDS


def lease_deadline_seconds(settings: Settings) -> float | None:
    """The longest a request may hold a pooled connection: the statement timeout and a margin.

    Past it the connection is aborted (see `SessionPool`); behind a pooler the margin also
    covers the BEGIN and COMMIT around the statement.
    """
    timeout_ms = settings.db_statement_timeout_ms
    return timeout_ms / 1000 + CLIENT_TIMEOUT_MARGIN_SECONDS if timeout_ms else None


def engine_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `create_async_engine`, kept apart so tests can read them."""
    connect_args: dict[str, Any] = {
        # asyncpg waits 60 s by default; a dead host must not hold a request past a pool wait.
        "timeout": settings.db_pool_timeout,
        "server_settings": {"application_name": settings.db_application_name},
    }
    ssl_arg = ssl_connect_arg(settings.db_sslmode, settings.db_sslrootcert)
    if ssl_arg is not None:
        connect_args["ssl"] = ssl_arg
    client_timeout = client_timeout_seconds(settings)
    if client_timeout is not None:
        connect_args["command_timeout"] = client_timeout
    if settings.prepares_per_transaction:
        # A transaction-mode pooler that does not track prepared statements hands each
        # transaction to any server connection, so a statement prepared on one is unknown (or, by
        # name, already taken) on another: prepare under a fresh name every time, cache nothing.
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid4()}__"
    if not settings.behind_pooler:
        # Poolers refuse these as startup parameters: behind one, the statement timeout is
        # enforced by the client, which cancels the query (see `client_timeout_seconds`), and
        # the pooler's own settings (PgBouncer's idle_transaction_timeout, tcp_keepalive) bound
        # idle transactions and vanished peers (see the README).
        connect_args["server_settings"].update(session_limits(settings))
    # No pool of the engine's own: `SessionPool` owns every connection's lifetime (its size,
    # overflow, waits, recycling), so a connection the pool gives back is closed, not kept by a
    # second pool with rules of its own. No pre-ping either: it costs a round trip per request.
    return {"poolclass": NullPool, "connect_args": connect_args}


def session_limits(settings: Settings) -> dict[str, str]:
    """Server settings that bound what one of our sessions can hold: a statement's time, a
    transaction left idle (a pod frozen or cut off mid-transaction holds its locks only that
    long), and TCP keepalives, so the server finds a vanished peer in a minute, not in hours.
    Zero leaves a setting to the server."""
    limits = {
        "statement_timeout": settings.db_statement_timeout_ms,
        "idle_in_transaction_session_timeout": settings.db_idle_in_transaction_timeout_ms,
        "tcp_keepalives_idle": settings.db_tcp_keepalives_idle,
        "tcp_keepalives_interval": settings.db_tcp_keepalives_interval,
        "tcp_keepalives_count": settings.db_tcp_keepalives_count,
    }
    return {name: str(value) for name, value in limits.items() if value}


def create_engine(settings: Settings, *, autocommit: bool = False) -> AsyncEngine:
    """An engine for the configured database.

    `autocommit` sets the isolation level once per connection, when it is opened (an
    `execution_options` copy would set it again at every checkout): every statement is then its
    own transaction, with no BEGIN or COMMIT on the wire. The service's request engine uses it;
    migrations, seeding and the tests' own engines need real multi-statement transactions.
    """
    return _build_engine(settings, **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}))


def create_probe_engine(settings: Settings) -> AsyncEngine:
    """A one-connection engine for `/readyz`, apart from the request pool.

    The request pool can be entirely busy under load while the database answers well; a probe
    queued behind it would fail every pod at once and leave the Service nowhere to send traffic.
    Autocommit only on a direct connection: behind a transaction-mode pooler the probe's
    statement, like every request's, must be prepared and run inside one transaction, or the
    pooler may run it on a server connection where it was never prepared (a 503 from a healthy
    pod, seen in the rolling update rehearsal).
    """
    isolation = {} if settings.prepares_per_transaction else {"isolation_level": "AUTOCOMMIT"}
    # The engine's own pool keeps this one connection: no session pool sits on top of it.
    return _build_engine(
        settings,
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout,
        pool_recycle=settings.db_pool_recycle,
        **isolation,
    )


def _build_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    if settings.database_url is None:
        raise RuntimeError("the embedded database must be started before the engine is built")
    engine = create_async_engine(settings.database_url, **{**engine_options(settings), **overrides})
    event.listen(engine.sync_engine, "checkout", _refuse_closed_connection)
    event.listen(engine.sync_engine, "handle_error", _name_driver_socket_errors)
    return engine


async def pooler_keeps_prepared_statements(settings: Settings) -> bool | None:
    """Whether the pooler in front keeps prepared statements across transactions: True when the
    server knows our statement by a name the pooler gave it, False when it kept asyncpg's name
    (or the statement was lost between server connections), None when it could not be asked.

    Asked on an engine built as the request engine is, with its statement cache.
    """
    engine = create_engine(settings, autocommit=True)
    try:
        async with engine.connect() as connection:
            return bool((await connection.execute(queries.SELECT_STATEMENT_RENAMED)).scalar())
    except DBAPIError as exc:
        if "prepared statement" in str(exc.orig):
            return False
        log.debug("the pooler check failed", exc_info=True)
        return None
    except (OSError, DatabaseUnavailable):
        return None
    finally:
        await engine.dispose()


class DatabaseUnavailable(ConnectionError):
    """The driver could not reach the database, or lost it: answered as 503.

    asyncpg reports a refused or unresolvable host, a failed TLS handshake or a broken socket
    as a plain OSError, which a bug of ours could raise as well; the engine and the session
    pool re-raise the driver's as this (the original is the cause), so only they are a 503.
    """


class DatabaseTimeout(DatabaseUnavailable, TimeoutError):
    """The database did not answer a statement in time (client-side timeout, lease deadline)."""


def _name_driver_socket_errors(context: ExceptionContext) -> BaseException | None:
    """Engine `handle_error` hook: an OSError raised while a statement runs is the driver's."""
    error = context.original_exception
    if isinstance(error, DatabaseUnavailable) or not isinstance(error, OSError):
        return None
    if isinstance(error, TimeoutError):
        return DatabaseTimeout("the database did not answer in time")
    return DatabaseUnavailable(f"the connection to the database failed ({type(error).__name__})")


def _refuse_closed_connection(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """Pool `checkout` hook: a connection the server already closed is replaced, not handed out.

    asyncpg learns from the socket that the server ended a session (an idle-connection reaper,
    a restart); asking it costs no round trip, unlike `pool_pre_ping`.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this connection")


def connection_was_lost(exc: BaseException) -> bool:
    """The statement failed because its connection died (the server ended the session or
    restarted, a reset): nothing came back, so a read may be sent again on a fresh connection."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def nothing_reached_server(exc: BaseException) -> bool:
    """The driver refused a connection it already knew was closed, before sending a byte: even a
    write may be sent again. (Lost in the middle of a statement, a write may have committed.)"""
    if not connection_was_lost(exc):
        return False
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    return type(getattr(orig, "__cause__", None)) is asyncpg.InterfaceError


# How often leases are checked against the deadline: a lease past it is aborted within this.
DEADLINE_SWEEP_SECONDS = 0.1


class PoolTimeout(PoolTimeoutError):
    """No session became free within DB_POOL_TIMEOUT (answered as 503)."""


class PoolClosed(PoolTimeout):
    """The pool was closed (the service is shutting down) while a request waited for a session,
    or before it asked: answered as 503, like a pool timeout, at once."""


class LeasedSession(AsyncSession):
    """The long-lived session of one pooled connection.

    On the autocommit engine a statement has committed by the time it returns, so `commit()`
    has nothing to send; when the session also holds no ORM objects to flush (the service only
    runs `text()` statements), it returns at once instead of walking SQLAlchemy's transaction
    bookkeeping, which cost a tenth of a batch's CPU on the connection's critical path. With
    ORM changes pending, or on a transactional engine, it is SQLAlchemy's own commit.
    """

    autocommit = False

    async def commit(self) -> None:
        if self.autocommit and not (self.new or self.dirty or self.deleted):
            return
        await super().commit()


class _Slot:
    """One pooled connection and the long-lived session bound to it."""

    __slots__ = ("connection", "driver", "last_used", "overflow", "session", "since")

    def __init__(self, overflow: bool) -> None:
        self.overflow = overflow  # gives its connection back after every lease
        self.connection: AsyncConnection | None = None
        self.session: AsyncSession | None = None
        self.driver: Any = None  # the asyncpg connection, to ask is_closed() without a query
        self.since = 0.0  # when `connection` was opened
        self.last_used = 0.0  # when a request last gave it back


class SessionPool:
    """Long-lived AsyncSessions, one per pooled connection, leased to one request at a time.

    A request used to build an AsyncSession, check a connection out of the engine's pool, build
    a Connection and a SessionTransaction, and undo it all afterwards: about half of a read's
    CPU. Here each slot keeps its connection and its session, and a request only borrows them.
    This pool is the only owner of the connections' lifetimes (the engine has none of its own,
    see `engine_options`): `size` slots keep theirs open, `max_overflow` more open one for a
    lease and close it afterwards. A lease waits at most `timeout` seconds (then
    `PoolTimeout`, a 503); a failed request rolls its session back and, if the connection is
    broken or in doubt, ends it; a connection the driver knows is closed, one idle longer than
    `idle_seconds` or one older than `recycle_seconds` is ended and replaced before it is
    leased; and a lease that outlives `deadline_seconds` has its connection aborted.

    Waiters are served first come, first served: a free slot is handed straight to the oldest
    waiter. (SQLAlchemy's asyncio pool sits on asyncio.Queue, where a request that has just
    arrived can take a connection returned for a waiter, which then goes to the back of the
    line: the long latency tail seen under load.)
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        size: int,
        max_overflow: int,
        timeout: float,
        recycle_seconds: float,
        idle_seconds: float = float("inf"),
        deadline_seconds: float | None = None,
        transactional: bool,
        observe_wait: Callable[[float], None] = lambda seconds: None,
        session_class: type[LeasedSession] = LeasedSession,
        observe_hold: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.engine = engine
        self.timeout = timeout
        self.recycle_seconds = recycle_seconds
        self.idle_seconds = idle_seconds
        # How long a lease may last at most: the statement timeout and a margin. asyncpg's own
        # client-side timeout fires in time, but the cancel request it then sends over a silent
        # network holds the request as long again; at the deadline the connection is aborted.
        self.deadline_seconds = deadline_seconds
        # Behind a transaction-mode pooler reads run in a transaction too, which a lease ends.
        self.transactional = transactional
        # Told each request's wait for a session (or until it gave up), and how long each lease
        # held its session: what service.admission follows.
        self.observe_wait = observe_wait
        self.session_class = session_class  # service.tracing's, to make statements spans
        self.observe_hold = observe_hold
        # Popped from the right, where regular slots are given back; overflow slots go back on
        # the left, so they are used only while every regular slot is busy, and light traffic
        # after a burst runs on the regular slots' open connections.
        self._idle: collections.deque[_Slot] = collections.deque(
            [_Slot(overflow=True) for _ in range(max_overflow)]
            + [_Slot(overflow=False) for _ in range(size)]
        )
        self._slots = tuple(self._idle)
        self._closed = False
        # Waiters in arrival order, each with the loop time at which it gives up. They all wait
        # the same `timeout`, so the first one is always the next to expire: one timer, armed
        # for it, serves them all (a timer per waiter cost a tenth of a read's CPU under load).
        self._waiters: collections.deque[tuple[float, asyncio.Future[_Slot]]] = collections.deque()
        self._waiter_expiry: asyncio.TimerHandle | None = None
        # Leases running now; a sweep every DEADLINE_SWEEP_SECONDS aborts the ones past the
        # deadline (again instead of a timer per request).
        self._leases: set[_Lease] = set()
        self._deadline_sweep: asyncio.TimerHandle | None = None

    def lease(self, timeout: float | None = None) -> _Lease:
        """`async with pool.lease() as session`: a session for one request.

        Writes commit explicitly; whatever a request leaves open is undone when it ends. With
        `timeout`, the wait for a free session is at most that many seconds, when shorter than
        the pool's own (a read that the primary can answer instead).
        """
        return _Lease(self, timeout)

    @contextlib.asynccontextmanager
    async def transaction(self, wait: float | None = None) -> AsyncIterator[AsyncSession]:
        """`async with pool.transaction() as session`: a leased session in one real transaction,
        committed when the block ends normally, rolled back when it raises.

        The request engine is in autocommit mode (each statement its own transaction), so BEGIN
        and COMMIT are sent by hand there; behind a pooler SQLAlchemy begins one itself. Either
        way a failed lease ends the transaction before the connection serves anyone else.
        `wait` as `lease`'s timeout.
        """
        async with self.lease(wait) as session:
            if not self.transactional:
                await session.execute(queries.BEGIN)
            yield session
            if self.transactional:
                await session.commit()
            else:
                await session.execute(queries.COMMIT)

    @property
    def checked_out(self) -> int:
        """Sessions leased to requests right now."""
        return len(self._slots) - len(self._idle)

    @property
    def size(self) -> int:
        """Sessions the pool can lease at once (its size and overflow)."""
        return len(self._slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a session right now (with, for an instant, any that just gave
        up: they leave the line when the next session is handed over)."""
        return len(self._waiters)

    def queue_delay(self) -> float:
        """How long the oldest request still waiting for a session has waited so far (0: none).

        In a first-come-first-served line that is about the wait a request joining now can
        expect, measured rather than estimated (service.admission sheds by it).
        """
        for expiry, waiter in self._waiters:
            if not waiter.done():  # given up or served in this instant: the next one tells
                return asyncio.get_running_loop().time() - (expiry - self.timeout)
        return 0.0

    @property
    def connections(self) -> int:
        """Database connections the slots hold right now."""
        return sum(1 for slot in self._slots if slot.connection is not None)

    @property
    def checked_in(self) -> int:
        """Open connections waiting for a request."""
        return sum(1 for slot in self._idle if slot.connection is not None)

    async def close(self) -> None:
        """Close every idle slot's connection, fail every waiter at once, and close each leased
        slot's connection when its lease ends; no lease is given out afterwards."""
        self._closed = True
        for timer in (self._waiter_expiry, self._deadline_sweep):
            if timer is not None:
                timer.cancel()
        self._waiter_expiry = self._deadline_sweep = None
        while self._waiters:
            waiter = self._waiters.popleft()[1]
            if not waiter.done():
                waiter.set_exception(PoolClosed("the service is shutting down"))
        for slot in self._idle:
            await self._discard(slot)

    async def _acquire(self, within: float | None = None) -> _Slot:
        if self._closed:
            raise PoolClosed("the service is shutting down")
        if self._idle and not self._waiters:
            self.observe_wait(0.0)
            return self._idle.pop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter: asyncio.Future[_Slot] = loop.create_future()
        self._waiters.append((started + self.timeout, waiter))
        if self._waiter_expiry is None:
            self._waiter_expiry = loop.call_at(started + self.timeout, self._expire_waiters)
        # A shorter wait gets a timer of its own; in the line it keeps the pool's expiry, so the
        # line stays in expiry order for the shared timer.
        own_expiry = (
            loop.call_at(started + within, _expire, waiter, within)
            if within is not None and within < self.timeout
            else None
        )
        try:
            slot = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over in the instant we were cancelled
            waiter.cancel()
            raise
        finally:
            if own_expiry is not None:
                own_expiry.cancel()
        self.observe_wait(loop.time() - started)
        return slot

    def _expire_waiters(self) -> None:
        """Fail the waiters whose time is up (the oldest first), then wait for the next one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiters = self._waiters
        while waiters and (waiters[0][0] <= now or waiters[0][1].done()):
            if _expire(waiters.popleft()[1], self.timeout):
                self.observe_wait(self.timeout)
        self._waiter_expiry = loop.call_at(waiters[0][0], self._expire_waiters) if waiters else None

    def _release(self, slot: _Slot) -> None:
        slot.last_used = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()[1]
            if not waiter.done():
                waiter.set_result(slot)
                return
        if slot.overflow:
            self._idle.appendleft(slot)
        else:
            self._idle.append(slot)

    def _watch(self, lease: _Lease) -> None:
        """Keep `lease` under the deadline sweep until it ends."""
        self._leases.add(lease)
        if self._deadline_sweep is None:
            loop = asyncio.get_running_loop()
            self._deadline_sweep = loop.call_later(DEADLINE_SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Abort the connections of leases past the deadline; run again while any is out."""
        loop = asyncio.get_running_loop()
        late = loop.time() - (self.deadline_seconds or 0.0)
        for lease in [lease for lease in self._leases if lease.started <= late]:
            self._leases.discard(lease)
            lease.expire()
        self._deadline_sweep = (
            loop.call_later(DEADLINE_SWEEP_SECONDS, self._sweep) if self._leases else None
        )

    def _stale(self, slot: _Slot) -> bool:
        # is_closed() is what asyncpg learnt from the socket (the server ended the session, or
        # restarted): no round trip is spent on it. A connection idle for longer than
        # `idle_seconds` is replaced before a server or pooler that drops idle sessions (Neon
        # after 5 minutes) can do it under a request.
        now = time.monotonic()
        return (
            bool(slot.driver.is_closed())
            or now - slot.since > self.recycle_seconds
            or now - slot.last_used > self.idle_seconds
        )

    async def _connect(self, slot: _Slot) -> LeasedSession:
        try:
            connection = await self.engine.connect()
        except DatabaseUnavailable:
            raise
        except OSError as exc:
            # The engine's `handle_error` hook sees statements only, not the pool's connects.
            raise DatabaseUnavailable(
                f"cannot connect to the database ({type(exc).__name__})"
            ) from exc
        try:
            raw = await connection.get_raw_connection()
        except BaseException:
            await connection.close()
            raise
        slot.connection = connection
        slot.driver = raw.driver_connection
        slot.since = time.monotonic()
        slot.session = self.session_class(bind=connection, expire_on_commit=False)
        slot.session.autocommit = not self.transactional
        return slot.session

    async def _recover(self, slot: _Slot) -> None:
        """After a failed request: roll back, or give up a connection that is in doubt."""
        if slot.session is None or slot.connection is None:
            return
        if not slot.connection.invalidated and not slot.driver.is_closed():
            try:
                await slot.session.rollback()
                if slot.driver.is_in_transaction():
                    # Begun by `transaction` on an autocommit connection, where SQLAlchemy's
                    # rollback sends nothing: the next request must not inherit it.
                    await slot.driver.execute("ROLLBACK")
                return
            except Exception:  # a broken connection, or one interrupted mid-statement
                log.debug("rollback failed; the connection is discarded", exc_info=True)
        await self._discard(slot, close=True)

    async def _discard(self, slot: _Slot, *, close: bool = False) -> None:
        """Close the slot's connection; with `close` (it is broken or in doubt) abandon it
        without a reset."""
        connection, driver = slot.connection, slot.driver
        slot.connection = slot.session = slot.driver = None
        if connection is None:
            return
        try:
            if close or driver.is_closed():
                await connection.invalidate()
            await connection.close()
        except Exception:
            log.debug("closing a pooled connection failed; invalidating it", exc_info=True)
            with contextlib.suppress(Exception):
                await connection.invalidate()


def _expire(waiter: asyncio.Future[_Slot], timeout: float) -> bool:
    """Fail a waiter for a session that is still waiting after `timeout` seconds; True if it
    was still waiting."""
    if waiter.done():
        return False
    waiter.set_exception(PoolTimeout(f"no database connection became free within {timeout:g} s"))
    return True


class _Lease:
    """What `SessionPool.lease()` returns: a class, not a generator, to keep a request cheap."""

    __slots__ = ("expired", "pool", "slot", "started", "timeout")

    def __init__(self, pool: SessionPool, timeout: float | None = None) -> None:
        self.pool = pool
        self.timeout = timeout  # the longest wait for a session, if shorter than the pool's
        self.slot: _Slot | None = None
        self.started = 0.0  # loop time the session was handed over
        self.expired = False

    async def __aenter__(self) -> AsyncSession:
        pool = self.pool
        slot = self.slot = await pool._acquire(self.timeout)
        try:
            session = slot.session
            if session is None or pool._stale(slot):
                await pool._discard(slot, close=True)
                session = await pool._connect(slot)
        except BaseException:
            pool._release(slot)
            raise
        self.started = asyncio.get_running_loop().time()
        if pool.deadline_seconds:
            pool._watch(self)
        return session

    def expire(self) -> None:
        """Past the deadline: abort the connection, which wakes everything waiting on it."""
        self.expired = True
        if self.slot is not None and self.slot.driver is not None:
            self.slot.driver.terminate()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        pool, slot = self.pool, self.slot
        assert slot is not None and slot.session is not None  # noqa: S101 (set on enter)
        pool._leases.discard(self)
        pool.observe_hold(asyncio.get_running_loop().time() - self.started)
        try:
            if error is not None or self.expired:
                await pool._recover(slot)
            elif pool.transactional and slot.session.in_transaction():
                await slot.session.rollback()
            if slot.overflow or pool._closed:
                await pool._discard(slot)
        except BaseException:
            await pool._discard(slot, close=True)
            raise
        finally:
            pool._release(slot)
        # A block that ended normally keeps its result even if the deadline fired after it
        # was done (a write committed, then its token could not be read): the connection is
        # gone, the answer is not. A block the deadline interrupted failed because of it.
        if self.expired and error is not None:
            raise DatabaseTimeout(
                f"the database did not answer within {pool.deadline_seconds:g} s"
            ) from error
