"""Benchmark: normalise a BuildKit-shaped cache config at ``mode=max`` scale.

The generated config looks like what a build farm exports with ``mode=max``: many builds on
a few shared base images, one record per build step linking to the previous step (and to
the build context through a selector), a layer for most steps, every record with results,
duplicated base-image roots, re-exported records and repeated layer entries, all shuffled
as a config on disk would be. It is the S3 layout (layer annotations included), read as
``cacheship config normalize`` reads it.

Run: ``.venv/bin/python bench/normalize.py [--records N] [--layers N] [--json]``
(``--input FILE`` normalises that config file instead).
The input is generated in a child process so that the peak RSS reported is the
normaliser's (plus the input bytes), not the generator's.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.cacheformat import (
    decode_config,
    descriptors_from_annotations,
    encode_config,
    marshal,
    normalize,
    parse_graph,
)

_MEDIA_TYPES = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
)
_SELECTORS = ("/src", "/src/app", "/src/go.mod", "/etc/ssl")


def _digest(rng: random.Random) -> str:
    return f"sha256:{rng.getrandbits(256):064x}"


def _time(rng: random.Random) -> str:
    seconds = 1_700_000_000 + rng.randrange(60_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    nanos = rng.randrange(1_000_000_000)
    fraction = f".{nanos:09d}".rstrip("0").rstrip(".") if rng.random() < 0.8 else ""
    return f"{stamp}{fraction}Z"


def generate(records: int, layers: int, seed: int = 1) -> dict[str, Any]:
    """A shuffled S3-layout config with exactly ``records`` records and ``layers`` layers."""
    rng = random.Random(seed)
    out_layers: list[dict[str, Any]] = []
    out_records: list[dict[str, Any]] = []

    def add_layer(parent: int) -> int:
        out_layers.append(
            {
                "blob": _digest(rng),
                "parent": parent,
                "annotations": {
                    "mediaType": rng.choice(_MEDIA_TYPES),
                    "diffID": _digest(rng),
                    "size": rng.randrange(1, 500_000_000),
                    "createdAt": _time(rng),
                },
            }
        )
        return len(out_layers) - 1

    def add_record(digest: str, inputs: list[list[dict[str, Any]]], layer: int) -> int:
        record: dict[str, Any] = {"digest": digest}
        if layer >= 0:
            record["layers"] = [{"layer": layer, "createdAt": _time(rng)}]
        if inputs:
            record["inputs"] = inputs
        out_records.append(record)
        return len(out_records) - 1

    bases = []
    for _ in range(40):
        top = -1
        for _ in range(rng.randrange(3, 9)):
            top = add_layer(top)
        bases.append((_digest(rng), top))

    while len(out_records) < records:
        base_digest, base_top = rng.choice(bases)
        # Every build re-exports its base image root: duplicate roots merge into one.
        previous = add_record(base_digest, [], base_top)
        context = add_record(_digest(rng), [], -1)
        top = base_top
        for _ in range(rng.randrange(20, 80)):
            if len(out_records) >= records:
                break
            remaining_records = records - len(out_records)
            remaining_layers = layers - len(out_layers)
            if remaining_layers > 0 and rng.random() < remaining_layers / remaining_records:
                top = add_layer(top)
            inputs: list[list[dict[str, Any]]] = [[{"link": previous}]]
            kind = rng.random()
            if kind < 0.3:
                inputs.append([{"selector": rng.choice(_SELECTORS), "link": context}])
            elif kind < 0.4:
                inputs[0].append({"selector": rng.choice(_SELECTORS), "link": context})
            digest = _digest(rng)
            step = add_record(digest, inputs, top)
            if rng.random() < 0.05 and len(out_records) < records:
                # Re-exported step: same key and links, another creation time.
                add_record(digest, [[dict(link) for link in slot] for slot in inputs], top)
            previous = step
    while len(out_layers) < layers:
        # Repeated layer entries, as in merged exports: the last one's annotations win.
        copy = json.loads(json.dumps(out_layers[rng.randrange(len(out_layers))]))
        copy["annotations"]["createdAt"] = _time(rng)
        out_layers.append(copy)

    layer_order = list(range(len(out_layers)))
    rng.shuffle(layer_order)
    new_layer = {old: new for new, old in enumerate(layer_order)}
    record_order = list(range(len(out_records)))
    rng.shuffle(record_order)
    new_record = {old: new for new, old in enumerate(record_order)}
    shuffled_layers = []
    for old in layer_order:
        layer = out_layers[old]
        layer["parent"] = -1 if layer["parent"] == -1 else new_layer[layer["parent"]]
        if layer["parent"] == 0:
            del layer["parent"]
        shuffled_layers.append(layer)
    shuffled_records = []
    for old in record_order:
        record = out_records[old]
        for result in record.get("layers", []):
            result["layer"] = new_layer[result["layer"]]
        for slot in record.get("inputs", []):
            for link in slot:
                link["link"] = new_record[link["link"]]
        shuffled_records.append(record)
    return {"layers": shuffled_layers, "records": shuffled_records}


T = TypeVar("T")


def _timed(phases: dict[str, list[float]], name: str, step: Callable[..., T], *args: Any) -> T:
    start, cpu = time.perf_counter(), time.process_time()
    result = step(*args)
    phases[name] = [time.perf_counter() - start, time.process_time() - cpu]
    return result


def run(data: bytes, *, trace: bool) -> dict[str, Any]:
    """Normalise ``data`` phase by phase, then in one call; return timings and sizes.

    Wall-clock and CPU seconds are both reported: on a shared machine the CPU time is the
    steadier figure.
    """
    phases: dict[str, list[float]] = {}
    if trace:
        tracemalloc.start()
    gc.collect()
    cfg = _timed(phases, "decode", decode_config, data)
    descriptors = _timed(phases, "descriptors", descriptors_from_annotations, cfg)
    graph = _timed(phases, "graph", parse_graph, cfg, descriptors)
    marshalled = _timed(phases, "marshal", marshal, graph)
    canonical = _timed(phases, "encode", encode_config, marshalled.config)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    python_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    if trace:
        tracemalloc.stop()
    total = [sum(wall for wall, _ in phases.values()), sum(cpu for _, cpu in phases.values())]
    counts = (len(cfg.records), len(cfg.layers))
    del cfg, descriptors, graph
    gc.collect()
    again = _timed(phases, "normalize()", normalize, data)
    if again != canonical:
        raise SystemExit("normalize() and the phases disagree")
    report: dict[str, Any] = {
        "input_bytes": len(data),
        "input_records": counts[0],
        "input_layers": counts[1],
        "output_bytes": len(canonical),
        "output_records": len(marshalled.config.records),
        "output_layers": len(marshalled.config.layers),
        "output_blobs": len(marshalled.layers),
        "digest": "sha256:" + hashlib.sha256(canonical).hexdigest(),
        # [wall, cpu] seconds per phase; "normalize()" is the whole path in one call
        "seconds": {name: [round(v, 3) for v in value] for name, value in phases.items()},
        "total_seconds": [round(v, 3) for v in total],
        "peak_rss_mib": round(peak_rss, 1),
    }
    if python_peak is not None:
        report["python_peak_mib"] = round(python_peak, 1)
    return report


def _generate_apart(args: argparse.Namespace) -> bytes:
    """The config generated in a child process (its memory is not this process's peak)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        size = ["--records", str(args.records), "--layers", str(args.layers)]
        subprocess.run(
            [sys.executable, __file__, *size, "--seed", str(args.seed), "--write", path],
            check=True,
        )
        return Path(path).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also report Python's allocation peak (slower: timings are inflated)",
    )
    parser.add_argument("--write", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--input", metavar="FILE", help="normalise this config file instead")
    args = parser.parse_args()

    if args.write:
        config = generate(args.records, args.layers, args.seed)
        Path(args.write).write_bytes(json.dumps(config, separators=(",", ":")).encode())
        return

    data = Path(args.input).read_bytes() if args.input else _generate_apart(args)
    report = run(data, trace=args.tracemalloc)
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"input: {report['input_records']:,} records, {report['input_layers']:,} layers, "
        f"{report['input_bytes'] / 2**20:.1f} MiB"
    )
    print(
        f"output: {report['output_records']:,} records, {report['output_layers']:,} layers, "
        f"{report['output_blobs']:,} blobs, {report['output_bytes'] / 2**20:.1f} MiB"
    )
    print(f"  {'phase':<12} {'wall':>8} {'cpu':>8}")
    for name, (wall, cpu) in report["seconds"].items():
        if name != "normalize()":
            print(f"  {name:<12} {wall:7.3f}s {cpu:7.3f}s")
    wall, cpu = report["total_seconds"]
    print(f"  {'total':<12} {wall:7.3f}s {cpu:7.3f}s")
    wall, cpu = report["seconds"]["normalize()"]
    print(f"  {'normalize()':<12} {wall:7.3f}s {cpu:7.3f}s  (one call, end to end)")
    print(f"peak RSS: {report['peak_rss_mib']} MiB (phases kept alive together)")
    if "python_peak_mib" in report:
        print(f"Python allocation peak: {report['python_peak_mib']} MiB")


if __name__ == "__main__":
    main()
