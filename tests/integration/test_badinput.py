"""Bad input: every case of ``tests/badinput/cases.json`` is refused clearly, writing nothing.

Request-level cases are checked against the request model; every case then goes through
the real pipeline: it is sent to a real worker as a raw message (skipping the client's own
validation, as a hand-written producer would) and must end in an error that names the
field, with the target bucket still empty and no multipart upload left open.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.request import RequestError, parse_request
from tests.stack import Worker, s3_client, start_worker, worker_env
from worker.client import Client, submitted_key
from worker.embedded import ServerProcess, start_redis

CORPUS = Path(__file__).resolve().parents[1] / "badinput" / "cases.json"
CASES: list[dict[str, Any]] = json.loads(CORPUS.read_text())["cases"]
REQUEST_CASES = [c for c in CASES if c["stage"] == "request"]

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CACHE_CONFIG = "application/vnd.buildkit.cacheconfig.v0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
FAKE_SECRET = "FAKE-secret-" + uuid.uuid4().hex
LONG_NAME = "n" * 1100

# What the cache of every case starts from: two layers, the second on the first.
CONFIG: dict[str, Any] = {
    "layers": [{"blob": "$L0", "parent": -1}, {"blob": "$L1"}],
    "records": [
        {"digest": "$K0", "layers": [{"layer": 0, "createdAt": "2026-01-01T00:00:00Z"}]},
        {
            "digest": "$K1",
            "inputs": [[{"selector": "", "link": 0}]],
            "layers": [{"layer": 1, "createdAt": "2026-01-02T00:00:00.123456789Z"}],
        },
    ],
}
SINGLE: dict[str, Any] = {
    "layers": [{"blob": "$L0", "parent": -1}],
    "records": [{"digest": "$K0", "layers": [{"layer": 0, "createdAt": "2026-01-01T00:00:00Z"}]}],
}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fill(value: Any, words: dict[str, Any]) -> Any:
    """Replace $-words: a string that is exactly one word takes the word's value (any type)."""
    if isinstance(value, str):
        if value in words:
            return words[value]
        for word in sorted(words, key=len, reverse=True):
            if word in value:
                value = value.replace(word, str(words[word]))
        return value
    if isinstance(value, list):
        return [fill(item, words) for item in value]
    if isinstance(value, dict):
        return {fill(k, words): fill(v, words) for k, v in value.items()}
    return value


def patch(document: Any, changes: list[list[Any]], words: dict[str, Any]) -> Any:
    """Apply [dotted path, value] changes; the value {"$delete": true} removes the item."""
    document = copy.deepcopy(document)
    for path, value in changes:
        *parents, last = str(path).split(".")
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if value == {"$delete": True}:
            del node[key]
        else:
            node[key] = fill(value, words)
    return document


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass
class Stage:
    """Everything the cases run against, shared by the whole module."""

    root: Path
    outside: Path
    blobs: list[bytes]
    words: dict[str, Any]
    s3: Any
    client: Client
    worker: Worker
    redis: ServerProcess
    built: dict[str, Path] = field(default_factory=dict)

    @property
    def bucket(self) -> str:
        return str(self.words["$BUCKET"])

    def write_blob(self, directory: Path, data: bytes) -> str:
        digest = sha(data)
        path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    def build(self, name: str, spec: dict[str, Any]) -> Path:
        """A local cache as the case describes it (see the corpus's ``about``)."""
        directory = self.root / "cases" / name
        words = dict(self.words)
        blobs = self.blobs[:1] if spec.get("single") else self.blobs
        for data in blobs:
            self.write_blob(directory, data)
        if "config_text" in spec:
            config = str(fill(spec["config_text"], words)).encode()
        else:
            base = fill(SINGLE if spec.get("single") else CONFIG, words)
            config = dumps(patch(base, spec.get("config_patch", []), words))
        config_digest = self.write_blob(directory, config)
        layer_descs = [
            {
                "mediaType": LAYER_GZIP,
                "digest": sha(data),
                "size": len(data),
                "annotations": {"containerd.io/uncompressed": words[f"$D{i}"]},
            }
            for i, data in enumerate(blobs)
        ]
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                *layer_descs,
                {"mediaType": CACHE_CONFIG, "digest": config_digest, "size": len(config)},
            ],
        }
        if "manifest_text" in spec:
            manifest = str(fill(spec["manifest_text"], words)).encode()
        else:
            manifest = dumps(patch(manifest_doc, spec.get("manifest_patch", []), words))
        manifest_digest = self.write_blob(directory, manifest)
        words["$MANIFEST"] = manifest_digest
        words["$MANIFEST_UPPER"] = "sha256:" + manifest_digest[7:].upper()
        index_doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_INDEX,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {REF_NAME: "latest"},
                }
            ],
        }
        if "index_text" in spec:
            (directory / "index.json").write_text(str(fill(spec["index_text"], words)))
        else:
            index = patch(index_doc, spec.get("index_patch", []), words)
            (directory / "index.json").write_bytes(dumps(index))
        (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        if "blob" in spec:
            named = {"manifest": manifest_digest, "config": config_digest}
            self.mutate(directory, spec["blob"], named)
        return directory

    def mutate(self, directory: Path, change: list[Any], named: dict[str, str]) -> None:
        which, operation = change
        digest = named[which] if which in named else sha(self.blobs[int(which)])
        path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
        data = path.read_bytes()
        if operation == "truncate":
            path.write_bytes(data[:-100])
        elif operation == "extend":
            path.write_bytes(data + b"more bytes than the descriptor says")
        elif operation == "flip":
            at = len(data) // 2
            path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
        elif operation == "delete":
            path.unlink()
        elif operation == "symlink-out":
            elsewhere = self.outside / "loose" / digest.removeprefix("sha256:")
            elsewhere.parent.mkdir(parents=True, exist_ok=True)
            elsewhere.write_bytes(data)
            path.unlink()
            path.symlink_to(elsewhere)
        else:
            raise ValueError(f"unknown blob change {operation!r}")

    def request_for(self, case: dict[str, Any]) -> Any:
        words = dict(self.words)
        if "cache" in case:
            words["$CASE"] = str(self.build(case["id"], case["cache"]))
        if "s3_config_text" in case:
            text = str(fill(case["s3_config_text"], words))
            self.s3.put_object(
                Bucket=words["$SOURCE_BUCKET"], Key=f"manifests/{case['id']}", Body=text.encode()
            )
        return fill(case["request"], words)

    def objects(self) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.bucket)
        return [obj["Key"] for obj in listed.get("Contents", [])]

    def uploads(self) -> list[str]:
        listed = self.s3.list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in listed.get("Uploads", [])]

    def run(self, request: Any, timeout: float = 60.0) -> tuple[str, str]:
        """Send the request as a raw message; returns (state, error or final status)."""
        export_id = str(uuid.uuid4())
        # What Client.submit records first: without it, a queued export reads as unknown.
        self.client.app.backend.client.set(submitted_key(export_id), "1")  # type: ignore[attr-defined]
        self.client.app.send_task("cacheship.export", args=[request], task_id=export_id)
        deadline = time.monotonic() + timeout
        while True:
            snap = self.client.snapshot(export_id, with_steps=False)
            if snap.ready:
                break
            assert time.monotonic() < deadline, f"export {export_id} did not end"
            time.sleep(0.05)
        if snap.state == "SUCCESS":
            return snap.state, str((snap.result or {}).get("status"))
        return snap.state, snap.error or ""


def s3_config(words: dict[str, Any], blobs: list[bytes], drop: str = "", size: int = 0) -> str:
    """The cache config in BuildKit's S3 form (layer annotations), optionally damaged."""
    document = copy.deepcopy(CONFIG)
    for i, data in enumerate(blobs):
        annotations: dict[str, Any] = {
            "mediaType": LAYER_GZIP,
            "diffID": words[f"$D{i}"],
            "size": size if (i == 0 and size) else len(data),
            "createdAt": "2026-01-01T00:00:00Z",
        }
        if i == 0 and drop:
            del annotations[drop]
        document["layers"][i]["annotations"] = annotations
    return str(fill(json.dumps(document, separators=(",", ":")), words))


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory, s3_server: ServerProcess) -> Iterator[Stage]:
    base = tmp_path_factory.mktemp("badinput")
    root = base / "sources"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a-file").write_text("not a cache")
    (root / "link-out").symlink_to(outside, target_is_directory=True)

    blobs = [os.urandom(300_000), os.urandom(20_000)]
    words: dict[str, Any] = {
        "$BUCKET": f"bad-target-{uuid.uuid4().hex[:10]}",
        "$SOURCE_BUCKET": f"bad-source-{uuid.uuid4().hex[:10]}",
        "$OTHER_BUCKET": f"not-allowed-{uuid.uuid4().hex[:10]}",
        "$ROOT": str(root),
        "$LINK_OUT": str(root / "link-out"),
        "$LONG": LONG_NAME,
        "$FAKE_SECRET": FAKE_SECRET,
    }
    for i, data in enumerate(blobs):
        words[f"$L{i}"] = sha(data)
        words[f"$L{i}_UPPER"] = "sha256:" + sha(data)[7:].upper()
        words[f"$S{i}"] = len(data)
        words[f"$D{i}"] = sha(b"uncompressed " + data[:64])
        words[f"$K{i}"] = sha(f"step {i}".encode())
    words["$S3_CONFIG"] = s3_config(words, blobs)
    words["$S3_CONFIG_NO_DIFFID"] = s3_config(words, blobs, drop="diffID")
    words["$S3_CONFIG_NEGATIVE_SIZE"] = s3_config(words, blobs, size=-1)

    s3 = s3_client(s3_server.url)
    for bucket in (words["$BUCKET"], words["$SOURCE_BUCKET"], words["$OTHER_BUCKET"]):
        s3.create_bucket(Bucket=bucket)
    for data in blobs:
        s3.put_object(Bucket=words["$SOURCE_BUCKET"], Key=f"blobs/{sha(data)}", Body=data)

    redis = start_redis()
    env = worker_env(
        redis.url,
        s3_server.url,
        root,
        CACHESHIP_ALLOWED_BUCKETS=f"{words['$BUCKET']},{words['$SOURCE_BUCKET']}",
        CACHESHIP_PART_SIZE=str(5 * 1024 * 1024),
        CACHESHIP_COPY_MAX_RETRIES="1",
    )
    worker = start_worker(env, base, name="badinput", concurrency=2)
    stage = Stage(root, outside, blobs, words, s3, Client(redis.url), worker, redis)
    words["$SRC"] = str(stage.build("good", {}))
    # A good cache outside the roots, reachable through the symlink and through "..".
    stage.build("../../outside", {})
    try:
        yield stage
    finally:
        worker.stop()
        redis.stop()


def expected(case: dict[str, Any], words: dict[str, Any]) -> list[str]:
    return [str(fill(text, words)) for text in case["expect"]]


def test_the_corpus_is_large_and_covers_every_kind_of_bad_input() -> None:
    assert len(CASES) >= 40
    assert len({c["id"] for c in CASES}) == len(CASES)
    kinds = " ".join(c["why"] for c in CASES)
    for kind in (
        "malformed JSON",
        "unknown fields",
        "wrong types",
        "wrong form",
        "wrong algorithm",
        "negative",
        "enormous",
        "a loop in layers",
        "a loop in records",
        "out-of-range index",
        "empty input",
        "shorter than its size",
        "longer than its size",
        "other bytes",
        "missing blob",
        "index.json pointing nowhere",
        "path escape",
        "absolute",
        "symlink out of the source root",
        "/..",
        "control characters",
        "1,024 bytes",
        "CACHESHIP_ALLOWED_BUCKETS",
        "credentials in the request",
    ):
        assert kind in kinds, f"no case of {kind}"


@pytest.mark.parametrize("case", REQUEST_CASES, ids=[c["id"] for c in REQUEST_CASES])
def test_request_model_refuses_naming_the_field(case: dict[str, Any]) -> None:
    words = {"$BUCKET": "some-bucket", "$SOURCE_BUCKET": "other-bucket", "$SRC": "/srv/cache"}
    words |= {"$LONG": LONG_NAME, "$FAKE_SECRET": FAKE_SECRET}
    with pytest.raises(RequestError) as refused:
        parse_request(fill(case["request"], words))
    message = str(refused.value)
    for text in expected(case, words):
        assert text in message
    assert FAKE_SECRET not in message
    assert "\n" not in message


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_pipeline_refuses_naming_the_field_and_writes_nothing(
    stage: Stage, case: dict[str, Any]
) -> None:
    request = stage.request_for(case)
    if case["stage"] == "worker":
        parse_request(request)  # the model lets it through: the worker is what refuses it
    state, message = stage.run(request)
    assert stage.objects() == [], "nothing is written to the bucket"
    assert stage.uploads() == [], "no multipart upload is left open"
    if case.get("outcome") == "empty":
        assert (state, message) == ("SUCCESS", "empty")
        return
    assert state == "FAILURE"
    for text in expected(case, stage.words):
        assert text in message, f"{text!r} not in {message!r}"
    assert FAKE_SECRET not in message
    assert "Traceback" not in message and "\n" not in message


def test_refused_credentials_are_kept_nowhere(stage: Stage) -> None:
    """The cases above sent credentials in requests: not a trace in Redis or in the log."""
    for case in CASES:
        if case.get("secret"):
            stage.run(stage.request_for(case))
    from tests.integration.test_security import scan_redis

    key_count, _, hits = scan_redis(stage.redis.url, FAKE_SECRET)
    assert key_count > 0 and hits == []
    assert FAKE_SECRET not in stage.worker.log()


def test_a_config_over_1_mib_is_exported_with_a_warning(stage: Stage) -> None:
    """BuildKit's local and registry importers read at most 1 MiB of a cache config.

    The export still happens (the S3 layout has no limit and ``cache.manifest`` is still
    a valid OCI document), but the result carries a warning and the worker logs it.
    """
    words = stage.words
    created = "2026-01-01T00:00:00Z"
    records: list[dict[str, Any]] = [
        {"digest": sha(b"base"), "layers": [{"layer": 0, "createdAt": created}]}
    ]
    records += [
        {
            "digest": sha(f"cache mount {i}".encode()),
            "inputs": [[{"selector": f"/cache/mount/{i:05d}", "link": 0}]],
        }
        for i in range(11_000)
    ]
    annotations = {
        "mediaType": LAYER_GZIP,
        "diffID": words["$D0"],
        "size": words["$S0"],
        "createdAt": created,
    }
    config = {
        "layers": [{"blob": words["$L0"], "parent": -1, "annotations": annotations}],
        "records": records,
    }
    source = str(words["$SOURCE_BUCKET"])
    stage.s3.put_object(Bucket=source, Key="manifests/big", Body=dumps(config))
    client = stage.client
    export_id = client.submit(
        {
            "source": {"type": "s3", "bucket": source, "name": "big"},
            "target": {"type": "s3", "bucket": stage.bucket, "prefix": "big/"},
        }
    )
    try:
        result = client.wait(export_id, timeout=120)
        assert result["status"] == "complete"
        [warning] = result["warnings"]
        assert f"cache config {result['config']}" in warning and "1048576" in warning
        size = stage.s3.head_object(Bucket=stage.bucket, Key=f"big/blobs/{result['config']}")
        assert size["ContentLength"] > 1024 * 1024
        assert f"export {export_id}: cache config" in stage.worker.log()
    finally:
        for key in stage.objects():
            stage.s3.delete_object(Bucket=stage.bucket, Key=key)
