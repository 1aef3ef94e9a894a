"""The local target on a real filesystem: the layout BuildKit writes, crash safety, locking.

No workers here: the export steps run in the order the tasks run them (copy every layer,
then config, manifest and index.json), so what lands on disk can be compared with what
BuildKit's ``--cache-to type=local`` leaves (``docs/buildkit-cache-format.md`` section 6).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from tasks.backends.local import source as local_source
from tasks.backends.local.ingest import LocalBlobWriter, clean_ingest
from tasks.backends.local.ociindex import put_tagged
from tasks.backends.local.target import LocalTarget
from tasks.backends.target import DigestMismatchError
from tasks.cacheformat import MEDIA_TYPE_CACHE_CONFIG, Descriptor, FormatError, decode_manifest
from tasks.plan import ExportPlan, plan_export
from tasks.request import LocalSpec, LocalTargetSpec, RequestError, parse_target
from tasks.verify import verify_local_cache
from tests.stack import REPO
from worker.samplecache import write_sample_cache

SIZES = [40_000, 300_000, 2_000]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF = "org.opencontainers.image.ref.name"


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    src, dest = tmp_path / "sources", tmp_path / "dests"
    src.mkdir()
    dest.mkdir()
    return src, dest


def target_for(text: str, dest_root: Path) -> LocalTarget:
    spec = parse_target(text)
    assert isinstance(spec, LocalTargetSpec)
    return LocalTarget(spec, [dest_root])


def export(src: Path, src_root: Path, target: LocalTarget) -> ExportPlan:
    """What the export, copy and finalize tasks do, in their order."""
    source = LocalSpec(src=str(src))
    plan = plan_export(local_source.load(source, [src_root]), target.spec)
    for layer in plan.layers:

        def opener(digest: str = layer.digest) -> BinaryIO:
            return local_source.open_blob(source, [src_root], digest)

        target.copy_layer(layer, opener)
    assert target.missing(plan.layers) == []
    target.put_blob(plan.config_desc, plan.config)
    target.put_blob(plan.manifest_desc, plan.manifest)
    target.write_names(plan)
    return plan


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory``: file bytes, or None for a directory."""
    found: dict[str, bytes | None] = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        found[rel] = None if path.is_dir() else path.read_bytes()
    return found


def readonly_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask & 0o444


def test_the_written_directory_is_byte_for_byte_what_buildkit_writes(
    roots: tuple[Path, Path],
) -> None:
    src_root, dest_root = roots
    # BuildKit's local exporter default: OCI media types, an image manifest.
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)
    dest = dest_root / "node-cache"
    plan = export(sample.path, src_root, target_for(f"type=local,dest={dest}", dest_root))

    assert plan.manifest_desc == sample.manifest
    got = tree(dest)
    # index.json as Go's json.Marshal writes ocispecs.Index, spelled out by hand.
    index = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
        f'"manifests":[{{"mediaType":"{MANIFEST}","digest":"{sample.manifest.digest}",'
        f'"size":{sample.manifest.size},"annotations":{{"{REF}":"latest"}}}}]}}'
    ).encode()
    expected: dict[str, bytes | None] = {
        "blobs": None,
        "blobs/sha256": None,
        "index.json": index,
        "ingest": None,  # containerd's store creates it; its uploads leave it empty
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
    }
    for blob in (*sample.layers, sample.config, sample.manifest):
        hexpart = blob.digest.removeprefix("sha256:")
        expected[f"blobs/sha256/{hexpart}"] = (sample.path / "blobs/sha256" / hexpart).read_bytes()
    assert got == expected
    # The sample writer's own layout (what tests treat as BuildKit's) agrees file by file.
    assert {k: v for k, v in got.items() if k != "ingest"} == tree(sample.path)
    for stored in (dest / "blobs/sha256").iterdir():
        assert stored.stat().st_mode & 0o777 == readonly_mode(), stored.name


def test_a_docker_manifest_list_holds_the_config_as_its_last_descriptor(
    roots: tuple[Path, Path],
) -> None:
    src_root, dest_root = roots
    sample = write_sample_cache(src_root / "cache", SIZES)
    dest = dest_root / "docker"
    plan = export(
        sample.path, src_root, target_for(f"type=local,dest={dest},oci-mediatypes=false", dest_root)
    )
    manifest = (dest / "blobs/sha256" / plan.manifest_desc.digest[7:]).read_bytes()
    document = json.loads(manifest)
    assert document["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert document["manifests"][-1] == {
        "mediaType": MEDIA_TYPE_CACHE_CONFIG,
        "digest": plan.config_desc.digest,
        "size": plan.config_desc.size,
    }
    assert {m["mediaType"] for m in document["manifests"][:-1]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    entry = json.loads((dest / "index.json").read_bytes())["manifests"][0]
    assert entry["mediaType"] == document["mediaType"]
    assert decode_manifest(manifest).config == plan.config_desc


def test_a_written_directory_is_a_source_for_the_next_export(roots: tuple[Path, Path]) -> None:
    src_root, dest_root = roots
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)
    first = dest_root / "first"
    plan = export(sample.path, src_root, target_for(f"type=local,dest={first}", dest_root))
    second = dest_root / "second"
    again = export(first, dest_root, target_for(f"type=local,dest={second}", dest_root))
    assert (again.config, again.manifest) == (plan.config, plan.manifest)
    assert tree(second) == tree(first)
    assert verify_local_cache(second, LocalSpec(src=str(second)), deep=True).sound


def test_tags_accumulate_and_the_same_tag_is_replaced(roots: tuple[Path, Path]) -> None:
    src_root, dest_root = roots
    one = write_sample_cache(src_root / "one", SIZES, seed=1, image_manifest=True)
    two = write_sample_cache(src_root / "two", SIZES[:1], seed=2, image_manifest=True)
    dest = dest_root / "shared"
    export(one.path, src_root, target_for(f"type=local,dest={dest}", dest_root))
    export(two.path, src_root, target_for(f"type=local,dest={dest},tag=pr-7", dest_root))
    export(two.path, src_root, target_for(f"type=local,dest={dest}", dest_root))
    entries = json.loads((dest / "index.json").read_bytes())["manifests"]
    assert [(e["annotations"][REF], e["digest"]) for e in entries] == [
        ("pr-7", two.manifest.digest),
        ("latest", two.manifest.digest),
    ]
    # The older cache's blobs stay: a layout is only ever added to.
    assert (dest / "blobs/sha256" / one.manifest.digest[7:]).exists()


def test_a_corrupt_source_blob_leaves_nothing_under_its_digest(roots: tuple[Path, Path]) -> None:
    src_root, dest_root = roots
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)
    dest = dest_root / "out"
    target = target_for(f"type=local,dest={dest}", dest_root)
    bad = sample.layers[1]
    path = sample.path / "blobs/sha256" / bad.digest[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    path.write_bytes(bytes(data))
    source = LocalSpec(src=str(sample.path))
    with pytest.raises(DigestMismatchError, match="does not match its digest"):
        target.copy_layer(bad, lambda: local_source.open_blob(source, [src_root], bad.digest))
    assert not (dest / "blobs/sha256" / bad.digest[7:]).exists()
    assert list((dest / "ingest").iterdir()) == []
    assert not (dest / "index.json").exists()
    assert target.missing([bad]) == [bad.digest]


def test_an_existing_blob_is_skipped_and_a_truncated_one_replaced(roots: tuple[Path, Path]) -> None:
    src_root, dest_root = roots
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)
    dest = dest_root / "out"
    export(sample.path, src_root, target_for(f"type=local,dest={dest}", dest_root))
    layer = sample.layers[0]
    source = LocalSpec(src=str(sample.path))
    target = target_for(f"type=local,dest={dest}", dest_root)

    def opener() -> BinaryIO:
        return local_source.open_blob(source, [src_root], layer.digest)

    assert target.copy_layer(layer, opener).action == "skipped"
    stored = dest / "blobs/sha256" / layer.digest[7:]
    stored.unlink()
    stored.write_bytes(b"half")
    assert target.missing([layer]) == [layer.digest]
    assert target.copy_layer(layer, opener).action == "uploaded"
    assert stored.read_bytes() == (sample.path / "blobs/sha256" / layer.digest[7:]).read_bytes()


def test_destinations_are_confined_to_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "dests"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    (root / "file").write_text("x")
    spec = parse_target(f"type=local,dest={root}/a")
    assert isinstance(spec, LocalTargetSpec)
    cases = {
        f"{tmp_path}/elsewhere": "outside the allowed destination roots",
        f"{root}/escape/x": "outside the allowed destination roots",
        f"{root}/../x": "outside the allowed destination roots",
        "relative/dir": "must be an absolute path",
        f"{root}/file": "not a directory",
    }
    for dest, message in cases.items():
        with pytest.raises(RequestError, match=message):
            LocalTarget(spec.model_copy(update={"dest": dest}), [root])
    with pytest.raises(RequestError, match="local targets are disabled"):
        LocalTarget(spec, [])
    LocalTarget(spec, [root])
    assert not (root / "a").exists()  # nothing is created before the first write


_HOLDER = """
import sys, time
from pathlib import Path
from tasks.backends.local.ingest import LocalBlobWriter
writer = LocalBlobWriter(Path(sys.argv[1]), sys.argv[2], 1 << 20)
writer.write(b"x" * 4096)
print(writer.path, flush=True)
time.sleep(600)
"""


def test_a_killed_writer_leaves_a_temporary_file_the_next_export_removes(
    roots: tuple[Path, Path],
) -> None:
    src_root, dest_root = roots
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)
    dest = dest_root / "out"
    target = target_for(f"type=local,dest={dest}", dest_root)
    config = (sample.path / "blobs/sha256" / sample.config.digest[7:]).read_bytes()
    target.put_blob(sample.config, config)
    dead_digest = "sha256:" + "d" * 64
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(dest), dead_digest],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    leftover = Path(proc.stdout.readline().strip())
    # While its writer lives, a cleaner must not touch it.
    assert clean_ingest(dest) == []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert leftover.exists() and leftover.parent == dest / "ingest"
    assert not (dest / "blobs/sha256" / dead_digest[7:]).exists()

    live = LocalBlobWriter(dest, "sha256:" + "e" * 64, 10)  # a concurrent export's upload
    export(sample.path, src_root, target)
    assert not leftover.exists()
    assert live.path.exists()
    live.close()
    assert list((dest / "ingest").iterdir()) == []
    assert verify_local_cache(dest, LocalSpec(src=str(dest)), deep=True).sound


def _put_many(directory: str, tag: str, count: int) -> None:
    for i in range(count):
        digest = "sha256:" + f"{i:02d}{tag}".ljust(64, "0")[:64]
        put_tagged(Path(directory), Descriptor(MANIFEST, digest, i), tag)


def test_concurrent_writers_never_lose_or_tear_index_json(tmp_path: Path) -> None:
    tags = ["aa", "bb", "cc", "dd"]
    stop = threading.Event()
    torn: list[str] = []

    def read_all_the_time() -> None:
        while not stop.is_set():
            try:
                data = (tmp_path / "index.json").read_bytes()
            except FileNotFoundError:
                continue
            try:
                json.loads(data)
            except ValueError:
                torn.append(data.decode(errors="replace"))

    reader = threading.Thread(target=read_all_the_time, daemon=True)
    reader.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_put_many, args=(str(tmp_path), tag, 15)) for tag in tags]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(300)
    finally:
        stop.set()
        reader.join()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * len(tags)
    assert torn == []
    entries = json.loads((tmp_path / "index.json").read_bytes())["manifests"]
    assert sorted(e["annotations"][REF] for e in entries) == tags
    assert {e["size"] for e in entries} == {14}
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["index.json", "oci-layout"]


def test_verify_reads_local_caches(roots: tuple[Path, Path]) -> None:
    src_root, _ = roots
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)
    spec = LocalSpec(src=str(sample.path))
    report = verify_local_cache(sample.path, spec, deep=True)
    assert report.sound, report.problems
    assert len(report.blobs) == len(SIZES) and all(b.hashed for b in report.blobs)
    assert report.to_json()["directory"] == str(sample.path)

    other_tag = verify_local_cache(sample.path, spec.model_copy(update={"tag": "nope"}))
    assert not other_tag.sound and "no manifest with tag 'nope'" in str(other_tag.problems[0])

    layer = sample.layers[0].digest[7:]
    blob = sample.path / "blobs/sha256" / layer
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))
    assert verify_local_cache(sample.path, spec).sound  # sizes only
    deep = verify_local_cache(sample.path, spec, deep=True)
    assert not deep.sound and "holds other bytes" in str(deep.problems)
    blob.unlink()
    missing = verify_local_cache(sample.path, spec)
    assert [p.where for p in missing.problems] == [f"layer sha256:{layer}"]

    shutil.rmtree(sample.path / "blobs")
    broken = verify_local_cache(sample.path, spec)
    assert not broken.sound and "missing" in str(broken.problems[0])


def test_the_verify_command_reads_a_local_directory(roots: tuple[Path, Path]) -> None:
    src_root, _ = roots
    sample = write_sample_cache(src_root / "cache", SIZES, image_manifest=True)

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", "verify", *args],
            cwd=src_root,  # a relative src is taken from here
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )

    sound = verify("--cache", "type=local,src=cache", "--deep")
    assert sound.returncode == 0, sound.stderr
    assert f"--cache-from type=local,src={sample.path} ." in sound.stdout
    assert f"{len(SIZES)} blobs read back and hashed" in sound.stdout
    (sample.path / "blobs/sha256" / sample.layers[2].digest[7:]).unlink()
    broken = verify("--cache", f"type=local,src={sample.path},tag=latest", "--json")
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert report["directory"] == str(sample.path) and not report["sound"]
    assert report["problems"][0]["where"] == sample.layers[2].digest.join(("layer ", ""))


def test_index_writes_clean_a_dead_writers_files_and_refuse_an_unreadable_index(
    tmp_path: Path,
) -> None:
    (tmp_path / "index.json.tmp-dead").write_text("{half")
    (tmp_path / "oci-layout.tmp-dead").write_text("{")
    desc = Descriptor(MANIFEST, "sha256:" + "a" * 64, 10)
    put_tagged(tmp_path, desc, "latest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "oci-layout"]

    (tmp_path / "index.json").write_bytes(b'{"manifests": 7}')
    with pytest.raises(FormatError, match=r"index\.json: manifests: expected an array"):
        put_tagged(tmp_path, desc, "v2")
    assert (tmp_path / "index.json").read_bytes() == b'{"manifests": 7}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "oci-layout"]


def test_a_symlink_planted_under_a_digest_is_replaced_not_trusted(
    roots: tuple[Path, Path], tmp_path: Path
) -> None:
    src_root, dest_root = roots
    sample = write_sample_cache(src_root / "cache", SIZES[:1], image_manifest=True)
    layer = sample.layers[0]
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"\0" * layer.size)  # the right size, other bytes
    dest = dest_root / "out"
    (dest / "blobs/sha256").mkdir(parents=True)
    planted = dest / "blobs/sha256" / layer.digest[7:]
    planted.symlink_to(decoy)
    export(sample.path, src_root, target_for(f"type=local,dest={dest}", dest_root))
    assert not planted.is_symlink()
    assert planted.read_bytes() == (sample.path / "blobs/sha256" / layer.digest[7:]).read_bytes()
    assert decoy.read_bytes() == b"\0" * layer.size
