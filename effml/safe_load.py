"""Reading ``.pt`` / ``.ckpt`` files without running code in them.

A checkpoint is a pickle, and unpickling an arbitrary pickle runs whatever its ``__reduce__``
names (``os.system``, ...). Every file effml reads — its own ``end.pt``, ``last.ckpt`` and
``model.pt``, and the files a user names (a teacher checkpoint, the weights a PTQ/QAT/N:M run
starts from, a finished run directory) — goes through :func:`load`: ``torch.load`` with
``weights_only=True``, whose unpickler builds tensors, plain containers, numbers and strings only
(plus ``SAFE_GLOBALS``), and refuses anything else before any of it runs. Lightning loads
``last.ckpt`` the same way (``trainer.fit(..., weights_only=True)`` in the runner).

effml's own files need nothing more: what it saves is tensors and plain data (``ResumeState``
keeps numpy's RNG state as a list, not an ndarray). ``SAFE_GLOBALS`` is the one place to allow a
type should a checkpoint ever need one; each entry must be a plain data type, never a callable
that does something when called.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from effml.errors import EffmlError

SAFE_GLOBALS: list = []
torch.serialization.add_safe_globals(SAFE_GLOBALS)


def load(path: str | Path, what: str, broken: str = "does not load", advice: str = "", mmap: bool = False) -> Any:
    """``path`` unpickled onto the CPU with ``weights_only=True``; any failure is one EffmlError line.

    ``what`` names the file in errors ("teacher checkpoint"); a file that does not unpickle at all
    (truncated, not a torch file) ``broken`` ("does not load", "is corrupt"); ``advice`` ends both
    messages (e.g. "; delete it to redo that stage"). ``mmap``: map a torch zip file's tensors instead
    of reading them, for a check that the file loads, at little cost for a large one."""
    try:
        with warnings.catch_warnings():  # a pickle of another protocol is refused below, in one line
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        disallowed = refused_global(str(e)) or next(iter(pickled_globals(path)), None)
        if disallowed is None and "Can only " not in str(e):  # not refused: unreadable (a bad opcode, ...)
            raise EffmlError(f"{what} {path} {broken} ({type(e).__name__}){advice}") from None
        raise EffmlError(f"{what} {path} holds {refusal(disallowed)}{advice}") from None
    except Exception as e:  # noqa: BLE001 - any other failure to read it means the file is unusable
        raise EffmlError(f"{what} {path} {broken} ({type(e).__name__}){advice}") from None


def refusal(disallowed: str | None) -> str:
    """Why a file was refused, for the one-line error."""
    if disallowed and disallowed.startswith("torchao."):  # model.pt of a run whose layers got a torchao kernel
        return (f"torchao's quantized tensors ({disallowed}): a model as deployed with a quantized kernel, "
                "which effml does not load back to train or teach from")
    what = f"a disallowed object ({disallowed})" if disallowed else "disallowed objects"
    return (f"{what}: effml reads only tensors and plain data from a checkpoint and runs no code in it; "
            "this version of effml did not write this file")


def refused_global(message: str) -> str | None:
    """The global that ``torch.load``'s weights-only unpickler refused, from its error message."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    return found.group(1) if found else None


def pickled_globals(path: str | Path) -> list[str]:
    """The globals a plain pickle file (not a torch zip) names, found by parsing its opcodes with
    ``pickletools``, which never unpickles: for a pickle of a protocol the weights-only unpickler
    stops at before it reaches a global (protocol 4+ frames)."""
    if zipfile.is_zipfile(path):
        return []
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle past this point: what was named so far is the answer
        pass
    return names
