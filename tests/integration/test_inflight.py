"""The in-flight registry against a real Redis-protocol server, with racing threads."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from tasks.fleet import inflight
from tasks.fleet.inflight import (
    PruneBusyError,
    PruneLockLostError,
    RegistryError,
    acquire_prune,
    deleted_since_registered,
    register,
    registered,
    release,
)
from worker.embedded import ServerProcess

SCOPE = "cache-bucket/blobs/"


@pytest.fixture
def redis(redis_server: ServerProcess) -> Iterator[Any]:
    client = redis_lib.Redis.from_url(redis_server.url)
    yield client
    client.close()


def digest(i: int) -> str:
    return f"sha256:{i:064x}"


def test_registered_digests_are_protected_until_released(redis: Any) -> None:
    register(redis, SCOPE, "e1", [digest(1), digest(2)], ttl=600)
    register(redis, SCOPE, "e2", [digest(2), digest(3)], ttl=600)
    assert registered(redis, SCOPE) == {digest(1), digest(2), digest(3)}
    assert registered(redis, "other-bucket/blobs/") == set()
    release(redis, SCOPE, "e1")
    assert registered(redis, SCOPE) == {digest(2), digest(3)}
    release(redis, SCOPE, "e2")
    assert registered(redis, SCOPE) == set()
    # Released without a prune running: nothing is left behind in Redis.
    assert [k for k in redis.keys("cacheship-gc:*") if b"digests" in k] == []


def test_a_release_during_a_prune_keeps_protecting_until_that_prune_ends(redis: Any) -> None:
    """The running prune may have listed names before the export wrote them."""
    register(redis, SCOPE, "e1", [digest(1)], ttl=600)
    with acquire_prune(redis, SCOPE) as prune:
        release(redis, SCOPE, "e1")
        assert digest(1) in prune.protected()
        with prune.delete_batch() as protected:
            assert digest(1) in protected
    with acquire_prune(redis, SCOPE) as later:
        assert later.protected() == set()
        with later.delete_batch() as protected:
            assert protected == set()


def test_a_registration_after_a_prune_started_is_seen_by_its_next_batch(redis: Any) -> None:
    with acquire_prune(redis, SCOPE) as prune:
        with prune.delete_batch() as protected:
            assert protected == set()
        register(redis, SCOPE, "late", [digest(7)], ttl=600)
        with prune.delete_batch() as protected:
            assert protected == {digest(7)}


def test_an_expired_registration_stops_protecting(redis: Any) -> None:
    register(redis, SCOPE, "dead", [digest(9)], ttl=0.2)
    assert registered(redis, SCOPE) == {digest(9)}
    time.sleep(0.5)
    assert registered(redis, SCOPE) == set()
    with acquire_prune(redis, SCOPE) as prune, prune.delete_batch() as protected:
        assert digest(9) not in protected


def test_one_prune_per_scope(redis: Any) -> None:
    with acquire_prune(redis, SCOPE):
        with pytest.raises(PruneBusyError, match="another prune"), acquire_prune(redis, SCOPE):
            pass
        with acquire_prune(redis, "other-bucket/blobs/"):
            pass
    with acquire_prune(redis, SCOPE):
        pass


def test_a_dead_prune_blocks_others_only_for_its_lock_ttl(redis: Any) -> None:
    dead = acquire_prune(redis, SCOPE, lock_ttl=0.5)
    dead.__enter__()
    dead._stop.set()  # the process froze: no more heartbeats
    with pytest.raises(PruneBusyError):
        acquire_prune(redis, SCOPE).__enter__()
    time.sleep(1.0)
    with acquire_prune(redis, SCOPE) as alive, alive.delete_batch():
        pass
    # The frozen prune wakes up: it must not delete anything any more.
    with pytest.raises(PruneLockLostError), dead.delete_batch():
        pytest.fail("a prune that lost its lock ran a delete batch")


def test_the_heartbeat_keeps_a_slow_prune_alive(redis: Any) -> None:
    with acquire_prune(redis, SCOPE, lock_ttl=0.4) as prune:
        time.sleep(1.2)
        with pytest.raises(PruneBusyError):
            acquire_prune(redis, SCOPE).__enter__()
        with prune.delete_batch():
            pass
        assert not prune.lost


def test_register_waits_for_a_running_batch(redis: Any) -> None:
    order: list[str] = []
    inside = threading.Event()

    def export() -> None:
        inside.wait(10)
        register(redis, SCOPE, "e", [digest(1)], ttl=600)
        order.append("registered")

    thread = threading.Thread(target=export)
    thread.start()
    with acquire_prune(redis, SCOPE) as prune:
        with prune.delete_batch() as protected:
            inside.set()
            time.sleep(0.5)  # the export registers now and must wait
            assert digest(1) not in protected
            order.append("batch done")
        thread.join(10)
        with prune.delete_batch() as protected:
            assert digest(1) in protected
    assert order == ["batch done", "registered"]


def test_register_gives_up_on_a_batch_that_never_ends(redis: Any) -> None:
    keys = inflight._keys(SCOPE)
    redis.set(keys["batch"], "someone:1", px=60_000)
    with pytest.raises(RegistryError, match="running for over"):
        register(redis, SCOPE, "e", [digest(1)], ttl=600, wait=0.3)
    # Registered all the same: any later batch sees it.
    assert registered(redis, SCOPE) == {digest(1)}


def test_deletions_since_registration_are_reported(redis: Any) -> None:
    register(redis, SCOPE, "e", [digest(1)], ttl=600)
    assert not deleted_since_registered(redis, SCOPE, "e")
    assert deleted_since_registered(redis, SCOPE, "unknown")
    with acquire_prune(redis, SCOPE) as prune, prune.delete_batch():
        pass
    assert deleted_since_registered(redis, SCOPE, "e")
    register(redis, SCOPE, "f", [digest(2)], ttl=600)
    assert not deleted_since_registered(redis, SCOPE, "f")


def test_exports_and_a_pruning_loop_race_without_losing_a_blob(redis: Any) -> None:
    """The protocol as exports and prune use it, on a bucket kept in memory.

    Exports register, look at the "bucket" (upload what is absent), check their blobs are
    there right before "writing names", then release. The prune deletes, in batches, every
    blob no registration protects, as fast as it can. No export may ever find a blob gone.
    """
    bucket: set[str] = set()
    lock = threading.Lock()
    failures: list[str] = []
    stop = threading.Event()
    deleted = [0]

    def pruner() -> None:
        while not stop.is_set():
            with acquire_prune(redis, SCOPE) as prune:
                with lock:
                    candidates = sorted(bucket)
                for start in range(0, len(candidates), 5):
                    with prune.delete_batch() as protected:
                        doomed = [d for d in candidates[start : start + 5] if d not in protected]
                        time.sleep(0.002)  # a DeleteObjects request takes a while
                        with lock:
                            for d in doomed:
                                if d in bucket:
                                    bucket.discard(d)
                                    deleted[0] += 1

    def exporter(n: int) -> None:
        rng = random.Random(n)
        for round_ in range(15):
            export_id = f"export-{n}-{round_}"
            wanted = {digest(rng.randrange(40)) for _ in range(6)}
            register(redis, SCOPE, export_id, wanted, ttl=600)
            for d in wanted:  # HEAD, upload when absent
                with lock:
                    bucket.add(d)
            time.sleep(rng.random() * 0.01)
            with lock:  # finalize: every blob still there?
                missing = wanted - bucket
            if missing:
                failures.append(f"{export_id}: {sorted(missing)[:2]}")
            release(redis, SCOPE, export_id)

    prune_thread = threading.Thread(target=pruner)
    prune_thread.start()
    exporters = [threading.Thread(target=exporter, args=(n,)) for n in range(6)]
    for thread in exporters:
        thread.start()
    for thread in exporters:
        thread.join(120)
    stop.set()
    prune_thread.join(60)
    assert failures == []
    assert deleted[0] > 0  # the prune really deleted between exports
