#!/usr/bin/env python3
"""Regenerate (or check) the committed protobuf modules for ``proto/orp.proto``.

Usage::

    python scripts/gen_proto.py          # rewrite src/outrelay/orp/_proto/orp_pb2.py{,i}
    python scripts/gen_proto.py --check  # exit 1 if the committed files are stale

The generator is ``python -m grpc_tools.protoc`` (the ``grpcio-tools`` dev
dependency), run with the interpreter that runs this script. ``--check``
generates into a temporary directory and compares byte for byte, so it also
notices a different ``grpcio-tools`` version (its output embeds the protoc
version); regenerate and commit when it fails.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ("orp.proto",)
OUT_DIR = ROOT / "src" / "outrelay" / "orp" / "_proto"
GENERATED = ("orp_pb2.py", "orp_pb2.pyi")


def generate(out_dir: Path) -> None:
    """Run protoc for every file in ``PROTO_FILES``, writing into ``out_dir``.

    Args:
        out_dir: an existing directory that receives ``orp_pb2.py`` and ``orp_pb2.pyi``.

    Raises:
        SystemExit: if protoc fails (its stderr is passed through).
    """
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR.relative_to(ROOT)}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str((PROTO_DIR / name).relative_to(ROOT)) for name in PROTO_FILES),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"gen_proto: protoc failed with exit code {result.returncode}")


def check() -> int:
    """Compare freshly generated modules with the committed ones.

    Returns:
        0 if every generated file matches, 1 otherwise (a diff excerpt is printed).
    """
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        for name in GENERATED:
            fresh = (tmp_dir / name).read_text(encoding="utf-8")
            committed_path = OUT_DIR / name
            rel = committed_path.relative_to(ROOT)
            if not committed_path.exists():
                stale.append(f"{rel}: missing")
                continue
            committed = committed_path.read_text(encoding="utf-8")
            if committed != fresh:
                diff = list(
                    difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        fresh.splitlines(keepends=True),
                        fromfile=f"{rel} (committed)",
                        tofile=f"{rel} (generated)",
                        n=1,
                    )
                )
                excerpt = "".join(diff[:40])
                more = "\n... (diff truncated)\n" if len(diff) > 40 else ""
                stale.append(f"{rel}: differs\n{excerpt}{more}")
    if stale:
        print("gen_proto --check: generated protobuf code is out of date:", file=sys.stderr)
        for entry in stale:
            print(f"  {entry}", file=sys.stderr)
        print(
            "Run `python scripts/gen_proto.py` and commit the result.",
            file=sys.stderr,
        )
        return 1
    print("gen_proto --check: generated protobuf code is up to date.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and exit 1 if the committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        for name in GENERATED:
            shutil.copyfile(tmp_dir / name, OUT_DIR / name)
            print(f"wrote {(OUT_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
