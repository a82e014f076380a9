"""The long fuzz run: the strategies of ``tests/test_fuzz.py`` with ``--examples``
cases each (Fusion requests, worker requests, random bytes on every method) against the in-process
service tree of the tests (``tests/cluster.py``: real gRPC servers, the bundled models). Writes
the status codes seen and the live sessions afterwards::

    flock /tmp/coolfusion-model.lock .venv/bin/python bench/fuzz.py --examples 3400 --out bench/fuzz.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


async def main_async(examples: int) -> dict:
    os.environ["COOLFUSION_FUZZ_EXAMPLES"] = str(examples)  # read when test_fuzz is imported
    sys.path.insert(0, str(TESTS))
    import test_fuzz  # noqa: PLC0415 - needs the environment and path above
    from cluster import start_cluster, stop_cluster, wait_no_sessions  # noqa: PLC0415

    cluster = await start_cluster()
    try:
        runs = {}
        addresses = {
            "Fusion": cluster.address,
            "ModelWorker": cluster.worker_addresses["smollm2"],
            "TokenizerService": cluster.tokenizer_address,
        }
        jobs = {
            "fusion_requests": lambda: test_fuzz.fuzz_fusion(cluster.address, examples),
            "worker_requests": lambda: test_fuzz.fuzz_worker(cluster.worker_addresses["smollm2"], examples),
            "random_bytes": lambda: test_fuzz.fuzz_bytes(addresses, examples),
        }
        for name, job in jobs.items():
            t0 = time.perf_counter()
            seen = await asyncio.to_thread(job)
            runs[name] = {
                "cases": sum(seen.values()),
                "statuses": dict(seen),
                "seconds": round(time.perf_counter() - t0),
            }
            print(name, json.dumps(runs[name]), flush=True)
        live = await wait_no_sessions(cluster)
        await test_fuzz._still_serving(cluster)
        return {
            "cases": sum(r["cases"] for r in runs.values()),
            "runs": runs,
            "live_sessions_after": live,
            "statuses_allowed": sorted(c.name for c in test_fuzz.DOCUMENTED),
        }
    finally:
        await stop_cluster(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3400, help="cases per run (three runs)")
    parser.add_argument("--out", default="bench/fuzz.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args.examples))
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
