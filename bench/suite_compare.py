"""Two runs of the test suite compared test by test, from pytest's JUnit XML (docs/testing.md,
"Comparing heads on one machine"): totals, the tests both runs share, and what the added tests cost.

    .venv/bin/python bench/suite_compare.py OLD.xml NEW.xml
"""

from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def load(path: str) -> tuple[dict[tuple[str, str], float], float]:
    """({(module, test): seconds}, the run's wall time)."""
    tree = ET.parse(path)
    times = {(tc.get("classname", ""), tc.get("name", "")): float(tc.get("time", 0)) for tc in tree.iter("testcase")}
    suite = next(tree.iter("testsuite"))
    return times, float(suite.get("time", 0))


def by_module(times: dict[tuple[str, str], float], keys) -> collections.Counter:
    modules: collections.Counter = collections.Counter()
    for key in keys:
        modules[key[0]] += times[key]
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    args = parser.parse_args()
    old, old_wall = load(args.old)
    new, new_wall = load(args.new)
    for label, times, wall in (("old", old, old_wall), ("new", new, new_wall)):
        print(f"{label}: {len(times)} tests, {sum(times.values()):.0f} s of test time, {wall:.0f} s wall")
    shared = old.keys() & new.keys()
    print(
        f"shared: {len(shared)} tests, old {sum(old[k] for k in shared):.0f} s, new {sum(new[k] for k in shared):.0f} s"
    )
    added = new.keys() - old.keys()
    print(f"added: {len(added)} tests, {sum(new[k] for k in added):.0f} s")
    for module, seconds in by_module(new, added).most_common():
        print(f"  {seconds:7.1f}  {module}")
    print("shared, by module (old, new):")
    old_mods, new_mods = by_module(old, shared), by_module(new, shared)
    for module, seconds in new_mods.most_common():
        print(f"  {old_mods[module]:7.1f} {seconds:7.1f}  {module}")


if __name__ == "__main__":
    main()
