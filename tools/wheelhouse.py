"""Download wheels of effml's installed dependency closure for an air-gapped node.

The closure is read from this environment (``pip freeze``), so the node gets exactly the versions
the tests passed with; torch and the CUDA stack are left out (the node has its own build).
Usage: python tools/wheelhouse.py OUT_DIR PYTHON_VERSION PLATFORM [PLATFORM ...]
"""

import subprocess
import sys

# torch is the node's own build (with its CUDA stack); torch-pruning, torchao and torchmetrics are not
SKIP_NAMES = {"torch", "triton", "effml", "pytest", "ruff", "pip", "setuptools", "execnet", "iniconfig", "pluggy"}
SKIP_PREFIXES = ("nvidia-", "cuda-", "pytest-")


def closure() -> list[str]:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.split()
    return [req for req in frozen if "==" in req and not skipped(req.split("==")[0])]


def skipped(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in SKIP_NAMES or name.startswith(SKIP_PREFIXES)


def main() -> None:
    out, python, *platforms = sys.argv[1:]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "-d", out, "--python-version", python]
    for platform in platforms:
        command += ["--platform", platform]
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out]
    for requirement in closure():  # one at a time: a package without a wheel for the node is named, not fatal
        if subprocess.run([*command, requirement], capture_output=True).returncode == 0:
            continue
        # sdist-only packages (e.g. antlr4-python3-runtime 4.9.3) are pure Python: build the wheel here
        if subprocess.run([*build, requirement], capture_output=True).returncode:
            print(f"no {python}/{platforms} wheel for {requirement}; the node needs it from elsewhere")


if __name__ == "__main__":
    main()
