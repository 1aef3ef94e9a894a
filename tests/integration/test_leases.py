"""The lease renewer and the single-flight lock, tested directly against a real Redis.

The renewal threads die (they are started again), the lock key vanishes while its holder
uploads (the lease resumes, or is known lost and never deletes another holder's key), a
retried ``SET NX`` is read as the win it was, and the broker connection is black-holed (the
socket timeouts cut the silent calls, renewals resume once traffic flows again).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tasks.fleet import flight
from tasks.fleet.state import alive_key
from tasks.jobs.common import first_writer
from tasks.settings import Settings
from worker import leases
from worker.app import SOCKET_TIMEOUT, configure
from worker.embedded import ServerProcess


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class DiesOnce:
    """A Redis client whose first renewal script ends the calling thread (as an uncaught
    BaseException would), then behaves."""

    def __init__(self, real: redis.Redis) -> None:
        self.real, self.died = real, False

    def eval(self, *args: Any) -> Any:
        if not self.died:
            self.died = True
            raise SystemExit("renewal thread killed")
        return self.real.eval(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def conn(redis_server: ServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_renewal_thread_is_started_again_and_the_lease_resumes(
    conn: redis.Redis,
) -> None:
    flaky = DiesOnce(conn)
    with flight.single_flight(flaky, "cacheship-flight-test-dies", ttl=1.5) as lease:
        wait_until(lambda: flaky.died, 5, "the renewal never ran")
        time.sleep(0.2)
        assert not flight.renewing(), "the thread should have died"
        # Unrenewed, the key lapses: a waiter could now take the blob.
        wait_until(lambda: conn.get(lease.name) is None, 5, "the key never lapsed")
        # The worker's lease thread (and each heartbeat) starts it again.
        assert flight.ensure_renewing() is True
        wait_until(lambda: conn.get(lease.name) == lease.token.encode(), 5, "never resumed")
        assert not lease.lost
        time.sleep(2)  # longer than the ttl: renewed meanwhile
        assert conn.get(lease.name) == lease.token.encode()
    assert conn.get(lease.name) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_worker_lease_thread_restarts_the_lock_renewer_and_itself(
    redis_server: ServerProcess, conn: redis.Redis
) -> None:
    app = Celery("leases-test", set_as_current=False)
    configure(app, Settings(redis_url=redis_server.url, visibility_timeout=6))  # renew each 1 s
    leases._stop.clear()
    thread = leases.start_keeper(app, "keeper@test")
    try:
        wait_until(lambda: conn.exists(alive_key("keeper@test")), 10, "never marked alive")
        flaky = DiesOnce(conn)
        with flight.single_flight(flaky, "cacheship-flight-test-keeper", ttl=1.5) as lease:
            wait_until(lambda: flaky.died, 5, "the renewal never ran")
            # Nobody calls ensure_renewing here: the lease thread does, every round.
            wait_until(flight.renewing, 5, "the lock renewer was not restarted")
            time.sleep(2)
            assert conn.get(lease.name) == lease.token.encode()
        # The lease thread itself: dead, noticed and started again (each heartbeat).
        leases._stop.set()
        thread.join(5)
        leases._stop.clear()
        assert leases.ensure_keeper() is True
        assert leases.ensure_keeper() is False  # running again: nothing to do
    finally:
        leases._stop.set()
        app.close()


def test_a_lock_key_that_vanishes_mid_upload_is_taken_back(conn: redis.Redis) -> None:
    with flight.single_flight(conn, "cacheship-flight-test-vanish", ttl=3) as lease:
        conn.delete(lease.name)  # a fail-over to a replica that had not seen it, a FLUSH
        wait_until(lambda: conn.get(lease.name) == lease.token.encode(), 5, "never resumed")
        other = flight.Lease(conn, lease.name, ttl=3)
        assert other.try_acquire() is False, "a second writer got the blob while we upload"
    assert conn.get(lease.name) is None


def test_a_lock_taken_by_another_holder_meanwhile_is_lost_and_left_alone(
    conn: redis.Redis,
) -> None:
    other = flight.Lease(conn, "cacheship-flight-test-stolen", ttl=30)
    with flight.single_flight(conn, other.name, ttl=3) as lease:
        conn.delete(lease.name)
        assert other.try_acquire()  # before our renewal comes round
        wait_until(lambda: lease.lost, 5, "the loss was never noticed")
    assert conn.get(other.name) == other.token.encode(), "released another holder's lock"


def test_a_retried_set_nx_whose_reply_was_lost_is_a_win(conn: redis.Redis) -> None:
    # The first attempt reached Redis, its reply did not: the retry finds the key taken.
    lease = flight.Lease(conn, "cacheship-flight-test-retried", ttl=30)
    conn.set(lease.name, lease.token, px=30_000)
    assert lease.try_acquire() is True
    assert flight.Lease(conn, lease.name, ttl=30).try_acquire() is False

    class LostFirstReply:
        """SET NX reaches Redis, but the caller sees it as failed and sends it again."""

        def __init__(self) -> None:
            self.sent = 0

        def set(self, *args: Any, **kwargs: Any) -> Any:
            self.sent += 1
            conn.set(*args, **kwargs)
            return conn.set(*args, **kwargs)  # what the retry answers: None, the key exists

        def get(self, name: str) -> Any:
            return conn.get(name)

    retried = LostFirstReply()
    assert first_writer(retried, "cacheship-finished-test", 60, "1") is True
    assert first_writer(conn, "cacheship-finished-test", 60, "0") is False


class Relay:
    """A TCP relay to Redis that can black-hole traffic: connections stay open, nothing
    passes either way (a network partition, a dead node behind a live load balancer)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.blackhole = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.blackhole.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def close(self) -> None:
        self.server.close()


def test_renewals_resume_after_the_broker_connection_is_black_holed(
    redis_server: ServerProcess, conn: redis.Redis
) -> None:
    relay = Relay(redis_server.port)
    app = Celery("blackhole-test", set_as_current=False)
    url = f"redis://127.0.0.1:{relay.port}/0"
    configure(app, Settings(redis_url=url, visibility_timeout=6))  # renew each 1 s
    assert app.conf.broker_transport_options["socket_timeout"] == SOCKET_TIMEOUT
    leases._stop.clear()
    host = "blackholed@test"

    def seen() -> float:
        raw = conn.get(f"cacheship-worker-seen-{host}")
        return float(raw) if raw else 0.0

    leases.start_keeper(app, host)
    try:
        wait_until(lambda: seen() > 0, 10, "never renewed")
        relay.blackhole.set()
        cut = time.time()
        time.sleep(SOCKET_TIMEOUT + 3)
        assert seen() < cut + 0.5, "renewed through a black hole?"
        relay.blackhole.clear()
        healed = time.time()
        # A renewal stuck on the silent connection is cut by its socket timeout, then tried
        # again on a new connection: well within one lease.
        wait_until(lambda: seen() > healed, SOCKET_TIMEOUT + 10, "renewals never resumed")
        print(f"\nrenewals resumed {seen() - healed:.1f}s after the black hole ended")
    finally:
        leases._stop.set()
        relay.close()
        app.close()
