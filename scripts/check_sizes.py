"""Size limits of the source tree (make lint): no file over 500 lines, no function over 60.

Tests and generated protobuf code are exempt. A file may keep a larger size, or a function a
longer body, with a one-line ``# size: <reason>`` comment (in the file, or on the ``def`` line).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
MARK = "# size:"


def source_files(root: Path) -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [root / p for p in listed if not p.startswith("tests/") and "_pb2" not in p and (root / p).exists()]


def problems(path: Path, root: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    name = path.relative_to(root)
    found = []
    file_marked = any(line.lstrip().startswith(MARK) for line in lines)
    if len(lines) > MAX_FILE_LINES and not file_marked:
        found.append(f"{name}: {len(lines)} lines (limit {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES and MARK not in lines[node.lineno - 1]:
                found.append(f"{name}:{node.lineno}: {node.name} is {length} lines (limit {MAX_FUNCTION_LINES})")
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    found = [p for path in source_files(root) for p in problems(path, root)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
